"""One battery for every model family: params checked at the entry points, loss and samples on every backend.

Each family joins ``MODELS`` with a zero-argument constructor returning (model, a batch of training data).
"""

import numpy as np
import pytest

from genblocks.backends import Rng, namespace, to_device, to_numpy
from genblocks.blocks.nn import MLP
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet
from genblocks.models.autoregressive import MADEModel
from genblocks.models.diffusion import Diffusion
from genblocks.models.flow import real_nvp
from genblocks.models.mixture import GaussianMixture
from genblocks.models.vae import VAE

DATA = np.random.default_rng(0).standard_normal((16, 2))
MODELS = {
    "mixture": lambda: GaussianMixture(2, 4),
    "realnvp": lambda: real_nvp(2, layers=2, hidden=(8,)),
    "made": lambda: MADEModel(2, (8,), output="gaussian"),
    "diffusion": lambda: Diffusion(MLPScoreNet(2, (8,), time_embed_dim=4), DiscreteSchedule("linear", 20)),
    "vae": lambda: VAE(MLP((2, 8, 4)), MLP((2, 8, 2)), likelihood="gaussian", scale="learned"),
}


def _sample(model, params, rng):
    if isinstance(model, Diffusion):
        return model.sample(params, rng, 5, sampler="ddim", num_inference_steps=3, dtype="float64")
    return model.sample(params, rng, 5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_loss_is_a_finite_scalar_in_the_params_dtype(name, dtype):
    model = MODELS[name]()
    params = model.init(Rng(0), dtype=dtype)
    value = model.loss(params, DATA.astype(dtype), Rng(1))
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
        model.loss(to_numpy(params), DATA, Rng(1))  # not a bare KeyError


def test_a_mixture_of_another_size_is_refused_not_silently_used():
    small = GaussianMixture(2, 4).init(Rng(0))
    with pytest.raises(ValueError, match=r"shape of params\['logits'\]: \(4,\) given, \(8,\) in the model"):
        GaussianMixture(2, 8).log_prob(small, DATA.astype("float32"))
