"""One battery for every model family: params checked at the entry points, loss and samples on every backend.

Each family joins ``MODELS`` with a zero-argument constructor returning (model, a batch of training data).
"""

import numpy as np
import pytest

from genblocks.backends import Rng, namespace, to_device, to_numpy
from genblocks.blocks.discriminators import MLPDiscriminator, MLPGenerator
from genblocks.blocks.nn import MLP
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet
from genblocks.models.autoregressive import MADEModel
from genblocks.models.diffusion import Diffusion
from genblocks.models.flow import real_nvp
from genblocks.models.gan import GAN
from genblocks.models.mixture import GaussianMixture
from genblocks.models.vae import VAE

# PixelCNN (genblocks.models.autoregressive) is not in MODELS: it models integer-level images (n, H, W, C), and
# this battery feeds every family the same real-valued (16, 2) batch; its own tests (tests/test_autoregressive.py)
# cover the same ground: params checked at the entry points, loss dtypes, samples on every backend.
DATA = np.random.default_rng(0).standard_normal((16, 2))
MODELS = {
    "mixture": lambda: GaussianMixture(2, 4),
    "realnvp": lambda: real_nvp(2, layers=2, hidden=(8,)),
    "made": lambda: MADEModel(2, (8,), output="gaussian"),
    "diffusion": lambda: Diffusion(MLPScoreNet(2, (8,), time_embed_dim=4), DiscreteSchedule("linear", 20)),
    "vae": lambda: VAE(MLP((2, 8, 4)), MLP((2, 8, 2)), likelihood="gaussian", scale="learned"),
    "gan": lambda: GAN(MLPGenerator(2, 2, (8,)), MLPDiscriminator(2, (8,)), loss="wasserstein", penalty="gp"),
}


def _loss(model, params, x, rng):
    """The training loss; a GAN has two and no likelihood: its discriminator's (with the gradient penalty)."""
    if isinstance(model, GAN):
        return model.loss_d(params, x, rng)
    return model.loss(params, x, rng)


def _sample(model, params, rng):
    if isinstance(model, Diffusion):
        return model.sample(params, rng, 5, sampler="ddim", num_inference_steps=3, dtype="float64")
    return model.sample(params, rng, 5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_is_a_finite_scalar_in_the_params_dtype(name, dtype):
    model = MODELS[name]()
    params = model.init(Rng(0), dtype=dtype)
    value = _loss(model, params, DATA.astype(dtype), Rng(1))
    assert value.shape == () and np.isfinite(value) and str(value.dtype) == dtype


@pytest.mark.parametrize("name", sorted(MODELS))
def test_samples_on_every_backend(name, backend):
    model = MODELS[name]()
    params = to_device(model.init(Rng(0), dtype="float64"), backend)
    x = _sample(model, params, Rng(2, backend=backend))
    assert namespace(x).backend_name == backend and tuple(x.shape) == (5, 2)
    assert np.all(np.isfinite(to_numpy(x)))


@pytest.mark.parametrize("other", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_params_of_another_model_are_refused_with_every_difference(name, other, backend):
    model = MODELS[name]()
    params = to_device(MODELS[other]().init(Rng(0), dtype="float64"), backend)
    if name == other:
        _sample(model, params, Rng(2, backend=backend))  # its own params pass
        return
    with pytest.raises(ValueError, match=rf"(?s)params: do not match {type(model).__name__}'s parameters.*missing"):
        _sample(model, params, Rng(2, backend=backend))
    with pytest.raises(ValueError, match="params: do not match"):
        _loss(model, to_numpy(params), DATA, Rng(1))  # not a bare KeyError


def test_a_mixture_of_another_size_is_refused_not_silently_used():
    small = GaussianMixture(2, 4).init(Rng(0))
    with pytest.raises(ValueError, match=r"shape of params\['logits'\]: \(4,\) given, \(8,\) in the model"):
        GaussianMixture(2, 8).log_prob(small, DATA.astype("float32"))


# models whose exact log_prob is one forward pass (diffusion's is a PF-ODE solve: tested in test_samplers)
EXACT_LOG_PROB = {"mixture", "realnvp", "made"}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_terms_are_finite_arrays_in_the_params_dtype(name, dtype):
    model = MODELS[name]()
    params = model.init(Rng(0), dtype=dtype)
    terms = model.loss_terms(params, DATA.astype(dtype), Rng(1))
    assert isinstance(terms, dict) and terms
    for key, value in terms.items():
        for v in (value if isinstance(value, list) else [value]):  # e.g. a flow's per-layer log-dets
            v = to_numpy(v)
            assert np.all(np.isfinite(v)), key
            assert str(v.dtype) == dtype, (key, v.dtype)


@pytest.mark.parametrize("name", sorted(EXACT_LOG_PROB))
def test_log_prob_has_the_batch_shape_and_equals_numpy_on_every_backend(name, backend):
    model = MODELS[name]()
    params = model.init(Rng(0), dtype="float64")
    want = to_numpy(model.log_prob(params, DATA))
    assert want.shape == (16,) and np.all(np.isfinite(want))
    got = model.log_prob(to_device(params, backend), to_device(DATA, backend))
    assert namespace(got).backend_name == backend
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_checkpoint_round_trip_keeps_params_state_and_loss_bit_for_bit(name, tmp_path):
    from genblocks.train.checkpoint import load, save

    model = MODELS[name]()
    params = model.init(Rng(0), dtype="float32")
    state = model.init_state(params)
    path = tmp_path / f"{name}.npz"
    save(path, params, state=state, step=3, config={"model": name})
    loaded = load(path, like=params)
    assert loaded["step"] == 3 and loaded["config"] == {"model": name}

    def leaves(tree):
        if isinstance(tree, dict):
            return [v for k in sorted(tree) for v in leaves(tree[k])]
        if isinstance(tree, (list, tuple)):
            return [v for item in tree for v in leaves(item)]
        return [] if tree is None else [to_numpy(tree)]

    for a, b in zip(leaves(params), leaves(loaded["params"]), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    assert len(leaves(state)) == len(leaves(loaded["state"]))
    batch = DATA.astype("float32")
    np.testing.assert_array_equal(to_numpy(_loss(model, loaded["params"], batch, Rng(1))),
                                  to_numpy(_loss(model, params, batch, Rng(1))))


def test_check_params_remembers_a_passing_layout_and_still_refuses_others():
    # check_params compares a cheap layout signature with the last one that passed before building param_specs
    from genblocks.backends import value_and_grad

    mlp = MLP((3, 4, 2))
    params = mlp.init(Rng(0))
    mlp.check_params(params)
    mlp.check_params(mlp.init(Rng(1), "float64"))  # same layout, other values and dtype
    value_and_grad(lambda p: namespace(p).sum(mlp.apply(p, np.ones((2, 3), np.float32))))(params)  # traced leaves
    mlp.check_params(tuple(params))  # a tuple is indexed like the list: param_specs does not tell them apart
    bad = [dict(params[0]), {"W": params[1]["W"][:, :1], "b": params[1]["b"]}]
    for wrong, why in ((bad, "shape of"), (params[:1], "missing"), ([params[0], {**params[1], "c": params[1]["b"]}],
                                                                     "unexpected"),
                       ([params[0], {"W": params[1]["W"], "B": params[1]["b"]}], "missing")):
        with pytest.raises(ValueError, match=why):
            mlp.check_params(wrong)
        mlp.check_params(params)
