"""MADE as a density model: exact normalisation, autoregressive structure, sampling, inpainting, training."""

import itertools
import math

import numpy as np
import pytest
from conftest import assert_backend, perturb_params
from scipy.special import logsumexp

from genblocks.backends import Rng, jacobian, to_device, to_numpy
from genblocks.blocks.distributions import Bernoulli, Categorical, Logistic, MixtureSameFamily, Normal
from genblocks.blocks.nn import made_masks
from genblocks.models.autoregressive import MADE, OUTPUTS, MADEModel, resolve_order
from genblocks.train.loop import fit
from genblocks.train.optim import adam

KW = {"bernoulli": {}, "categorical": {"num_classes": 3}, "gaussian": {},
      "mixture_gaussian": {"num_components": 3}, "mixture_logistic": {"num_components": 2}}


def _model(output, dim=4, **kw):
    return MADEModel(dim, kw.pop("hidden", (12, 12)), output=output, **{**KW[output], **kw})


def _params(model, seed=0, scale=0.5):
    """float64 params perturbed away from init (init's output biases are zero)."""
    return perturb_params(model.init(Rng(seed), dtype="float64"), seed + 1, scale)


def _all_configurations(levels, dim):
    return np.array(list(itertools.product(range(levels), repeat=dim)), dtype=np.float64)


def _frequencies(samples, configs):
    return np.array([np.mean(np.all(samples == c, axis=1)) for c in configs])


# ---------------------------------------------------------------------------------------------------
# Exact normalisation (float64, perturbed params)


@pytest.mark.parametrize("num_masks", [1, 3])
@pytest.mark.parametrize("output,levels,dim", [("bernoulli", 2, 4), ("categorical", 3, 3)])
def test_probabilities_of_all_configurations_sum_to_one(output, levels, dim, num_masks):
    model = _model(output, dim, order="random", order_seed=3, num_masks=num_masks)
    params = _params(model)
    xs = _all_configurations(levels, dim)
    lp = to_numpy(model.log_prob(params, xs))
    assert lp.shape == (levels**dim,)
    assert abs(np.exp(lp).sum() - 1.0) < 1e-10
    assert np.ptp(lp) > 0.5  # perturbed: far from uniform


def test_mask_mixture_is_the_mean_of_the_mask_probabilities_and_averaging_logs_is_not_normalised():
    model = _model("bernoulli", 4, num_masks=3, hidden=(16,))
    params = _params(model, scale=1.0)
    xs = _all_configurations(2, 4)
    per_mask = np.stack([to_numpy(model.conditional(model.network_outputs(params, xs, mask_index=k)).log_prob(xs))
                         .sum(-1) for k in range(3)])
    assert np.all(np.ptp(per_mask, axis=0) > 1e-3)  # the masks really differ
    for k in range(3):
        assert abs(np.exp(per_mask[k]).sum() - 1.0) < 1e-10  # each mask is a normalised model
    mixture = to_numpy(model.log_prob(params, xs))
    np.testing.assert_allclose(mixture, logsumexp(per_mask, axis=0) - math.log(3), atol=1e-12)
    # negative control: the geometric mean of the masks' joints (averaging log-probabilities) loses mass
    geometric = np.exp(per_mask.mean(axis=0)).sum()
    assert geometric < 1.0 - 1e-3


def test_averaging_logits_over_masks_is_not_the_mixture():
    xs = _all_configurations(2, 4)
    # two masks with different orders: averaging their logits per variable mixes conditionals on x_<i and
    # on x_>i, which is no longer a chain-rule factorisation, and it does not sum to 1
    forward = _model("bernoulli", 4, hidden=(16,))
    backward = _model("bernoulli", 4, hidden=(16,), order=[3, 2, 1, 0])
    params = _params(forward, scale=1.0)
    logits = 0.5 * (to_numpy(forward.network_outputs(params, xs)) + to_numpy(backward.network_outputs(params, xs)))
    averaged = to_numpy(Bernoulli(logits=logits[..., 0]).log_prob(xs)).sum(-1)
    assert abs(np.exp(averaged).sum() - 1.0) > 1e-2
    # the probability average of the same two masks is normalised
    mixture = logsumexp(np.stack([to_numpy(forward.log_prob(params, xs)), to_numpy(backward.log_prob(params, xs))]),
                        axis=0) - math.log(2)
    assert abs(np.exp(mixture).sum() - 1.0) < 1e-10
    # with a shared order (this model's masks) averaged logits are another AR model, normalised but not p(x)
    model = _model("bernoulli", 4, num_masks=3, hidden=(16,))
    params = _params(model, scale=1.0)
    logits = np.mean([to_numpy(model.network_outputs(params, xs, mask_index=k)) for k in range(3)], axis=0)
    averaged = to_numpy(Bernoulli(logits=logits[..., 0]).log_prob(xs)).sum(-1)
    assert abs(np.exp(averaged).sum() - 1.0) < 1e-10
    assert np.max(np.abs(averaged - to_numpy(model.log_prob(params, xs)))) > 1e-3


def test_conditionals_sum_to_log_prob_and_loss_terms_add_up():
    for num_masks in (1, 3):
        model = _model("mixture_gaussian", 3, num_masks=num_masks, order=[2, 0, 1])
        params = _params(model)
        x = np.random.default_rng(0).standard_normal((10, 3))
        cond = to_numpy(model.conditional_log_probs(params, x))
        np.testing.assert_allclose(cond.sum(-1), to_numpy(model.log_prob(params, x)), atol=1e-10)
        terms = model.loss_terms(params, x)
        assert set(terms) == {"nll", "nll_per_dim"} and terms["nll_per_dim"].shape == (3,)
        np.testing.assert_allclose(to_numpy(terms["nll_per_dim"]), -cond.mean(0), atol=1e-12)
        np.testing.assert_allclose(float(terms["nll"]), float(model.loss(params, x)), atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Autoregressive structure


@pytest.mark.parametrize("order", ["natural", "random", [2, 0, 3, 1]])
@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_each_conditional_depends_only_on_earlier_variables(output, order):
    model = _model(output, 4, order=order, order_seed=5, num_masks=2, hidden=(8, 8))
    params = _params(model)
    rank = np.array(model.order)
    x = np.random.default_rng(1).standard_normal(4)
    for k in range(2):
        J = to_numpy(jacobian(lambda v: model.network_outputs(params, v, mask_index=k))(x))  # (D, P, D)
        for i, j in itertools.product(range(4), repeat=2):
            if rank[j] >= rank[i]:
                assert np.all(J[i, :, j] == 0.0), (output, order, k, i, j)
    first, last = int(np.argmin(rank)), int(np.argmax(rank))
    assert np.any(J[last] != 0.0)  # the last variable sees something
    assert np.all(J[first] == 0.0)  # the first sees nothing
    if output not in ("bernoulli", "categorical"):
        J = to_numpy(jacobian(lambda v: model.conditional_log_probs(params, v))(x))  # (D, D): mask mixture
        for i, j in itertools.product(range(4), repeat=2):
            if rank[j] > rank[i]:
                assert J[i, j] == 0.0, (output, order, i, j)


def test_mask_zero_is_plain_made_and_the_other_masks_are_constants():
    model = _model("gaussian", 4, order=[1, 3, 0, 2], num_masks=3, hidden=(8, 6))
    want = made_masks(4, (8, 6), order=[1, 3, 0, 2], out_multiplier=2)
    for layer, m in zip(model.nets[0], want):
        np.testing.assert_array_equal(layer.mask, m)
    again = _model("gaussian", 4, order=[1, 3, 0, 2], num_masks=3, hidden=(8, 6))
    for k in (1, 2):
        for a, b in zip(model.nets[k], again.nets[k]):
            np.testing.assert_array_equal(a.mask, b.mask)
    assert any(np.any(a.mask != b.mask) for a, b in zip(model.nets[1], model.nets[2]))
    assert model.init(Rng(0)).keys() == {"layers"}  # the masks are not parameters


def test_orders():
    assert resolve_order(4) == (0, 1, 2, 3)
    assert resolve_order(4, "random", 0) == resolve_order(4, "random", 0)
    assert sorted(resolve_order(6, "random", 1)) == list(range(6))
    assert resolve_order(3, np.array([2, 0, 1])) == (2, 0, 1)
    with pytest.raises(ValueError, match=r"order: expected a permutation of range\(3\).*got \[0, 0, 1\]"):
        MADEModel(3, output="gaussian", order=[0, 0, 1])
    with pytest.raises(ValueError, match="order: expected 'natural', 'random' or a permutation"):
        MADEModel(3, order="reversed")
    with pytest.raises(ValueError, match="order_seed: expected a non-negative int with order='random', got None"):
        MADEModel(3, order="random")


def test_bad_arguments_raise_errors_naming_them():
    with pytest.raises(ValueError, match="output: expected one of"):
        MADEModel(3, output="poisson")
    with pytest.raises(ValueError, match="num_classes: expected an int >= 2"):
        MADEModel(3, output="categorical")
    with pytest.raises(ValueError, match="num_masks: expected a positive int"):
        MADEModel(3, num_masks=0)
    model = _model("bernoulli", 3)
    params = model.init(Rng(0))
    with pytest.raises(ValueError, match="x: expected a last axis of size 3"):
        model.log_prob(params, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="x_init, mask: expected both"):
        model.sample(params, Rng(0), 2, x_init=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="mask: expected a boolean array"):
        model.sample(params, Rng(0), 2, x_init=np.zeros(3, np.float32), mask=np.zeros(3))
    with pytest.raises(ValueError, match="context: this model was built without context"):
        model.log_prob(params, np.zeros((2, 3), np.float32), np.zeros((2, 1), np.float32))
    with pytest.raises(ValueError, match="params: do not match"):
        _model("bernoulli", 4).log_prob(params, np.zeros((2, 4), np.float32))


# ---------------------------------------------------------------------------------------------------
# Sampling


def _within_five_standard_errors(freq, p, n):
    se = np.sqrt(p * (1.0 - p) / n)
    assert np.all(np.abs(freq - p) <= 5.0 * se + 1e-12), (freq, p)


@pytest.mark.parametrize("num_masks", [1, 2])
def test_sample_frequencies_match_exp_log_prob(num_masks):
    model = _model("bernoulli", 3, order=[1, 2, 0], num_masks=num_masks, hidden=(8,))
    params = _params(model, scale=1.0)
    configs = _all_configurations(2, 3)
    p = np.exp(to_numpy(model.log_prob(params, configs)))
    n = 20000
    samples = to_numpy(model.sample(params, Rng(7), n))
    assert samples.shape == (n, 3) and samples.dtype == np.float64
    _within_five_standard_errors(_frequencies(samples, configs), p, n)


def test_inpainting_keeps_given_entries_and_samples_the_right_conditional():
    model = _model("bernoulli", 3, num_masks=2, hidden=(8,))
    params = _params(model, scale=1.0)
    configs = _all_configurations(2, 3)
    joint = np.exp(to_numpy(model.log_prob(params, configs)))
    n = 20000
    # x_0 given (the first variable in the order): half the rows with x_0 = 0, half with x_0 = 1
    x_init = np.zeros((n, 3))
    x_init[n // 2:, 0] = 1.0
    mask = np.zeros((n, 3), dtype=bool)
    mask[:, 0] = True
    samples = to_numpy(model.sample(params, Rng(3), n, x_init=x_init, mask=mask))
    np.testing.assert_array_equal(samples[:, 0], x_init[:, 0])
    for value, rows in ((0.0, slice(0, n // 2)), (1.0, slice(n // 2, n))):
        keep = configs[:, 0] == value
        cond = joint[keep] / joint[keep].sum()  # p(x_1, x_2 | x_0 = value), exact
        _within_five_standard_errors(_frequencies(samples[rows], configs[keep]), cond, n // 2)


def test_inpainting_keeps_real_given_entries_exactly_anywhere_in_the_order():
    model = _model("mixture_logistic", 4, order="random", order_seed=2, num_masks=2)
    params = _params(model)
    x_init = np.random.default_rng(0).standard_normal((6, 4))
    mask = np.array([True, False, False, True])
    out = to_numpy(model.sample(params, Rng(1), 6, x_init=x_init, mask=mask))
    np.testing.assert_array_equal(out[:, mask], x_init[:, mask])
    assert np.all(out[:, ~mask] != x_init[:, ~mask]) and np.all(np.isfinite(out))


@pytest.mark.parametrize("output", sorted(OUTPUTS))
def test_same_seed_same_samples_in_the_params_dtype(output):
    model = _model(output, 3, num_masks=2)
    for dtype in ("float32", "float64"):
        params = model.init(Rng(0), dtype=dtype)
        a, b = model.sample(params, Rng(5), 8), model.sample(params, Rng(5), 8)
        assert a.dtype == np.dtype(dtype) and a.shape == (8, 3)
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, model.sample(params, Rng(6), 8))
        lp = model.log_prob(params, a)
        assert lp.dtype == np.dtype(dtype) and np.all(np.isfinite(lp))


@pytest.mark.parametrize("output", ["bernoulli", "categorical", "mixture_gaussian"])
def test_backend_arrays_in_and_out(output, backend):
    model = _model(output, 3, num_masks=2, context_classes=2)
    host = _params(model)
    params = to_device(host, backend)
    x = model.sample(params, Rng(1, backend=backend), 5, context=1)
    assert_backend(x, backend)
    lp = model.log_prob(params, x, to_device(np.ones(5), backend))
    assert_backend(lp, backend)
    np.testing.assert_allclose(to_numpy(lp), to_numpy(model.log_prob(host, to_numpy(x), np.ones(5))), atol=1e-10)
    mask = to_device(np.array([True, False, False]), backend)
    y = model.sample(params, Rng(2, backend=backend), 5, context=0, x_init=x, mask=mask)
    assert_backend(y, backend)
    np.testing.assert_array_equal(to_numpy(y)[:, 0], to_numpy(x)[:, 0])


# ---------------------------------------------------------------------------------------------------
# Context


def test_class_context_reaches_every_conditional_and_each_class_is_normalised():
    model = _model("bernoulli", 3, context_classes=3, hidden=(8,))
    params = _params(model, scale=1.0)
    configs = _all_configurations(2, 3)
    lps = []
    for label in range(3):
        lp = to_numpy(model.log_prob(params, configs, np.full(8, label)))
        assert abs(np.exp(lp).sum() - 1.0) < 1e-10
        lps.append(to_numpy(model.conditional_log_probs(params, configs, label)))
    assert np.all(np.abs(lps[0] - lps[1]).max(axis=0) > 1e-3)  # every variable, the first included
    vector = _model("gaussian", 3, context_dim=2)
    vp = _params(vector)
    x = np.zeros((4, 3))
    a = to_numpy(vector.conditional_log_probs(vp, x, np.zeros(2)))
    b = to_numpy(vector.conditional_log_probs(vp, x, np.ones((4, 2))))
    assert np.all(np.abs(a - b) > 1e-6)
    with pytest.raises(ValueError, match="context: this model expects a vector of size 2"):
        vector.log_prob(vp, x)
    draws = to_numpy(vector.sample(vp, Rng(0), 4, context=np.arange(8.0).reshape(4, 2)))
    assert draws.shape == (4, 3) and np.all(np.isfinite(draws))
    with pytest.raises(ValueError, match=r"context: expected integer class labels in 0..2, got values \[3.0\]"):
        model.log_prob(params, configs, np.full(8, 3))
    with pytest.raises(ValueError, match="context: this model expects an integer label in 0..2"):
        model.sample(params, Rng(0), 2)


# ---------------------------------------------------------------------------------------------------
# One variable: the conditional is the marginal


def test_one_dimension_matches_the_genblocks_distributions():
    x = np.linspace(-3.0, 3.0, 7)[:, None]
    s_min = -7.0

    def scale(raw):
        return np.exp(s_min + np.logaddexp(0.0, raw - s_min))

    for output in ("gaussian", "mixture_gaussian", "mixture_logistic"):
        model = _model(output, 1)
        params = _params(model)
        b = params["layers"][-1]["b"]  # with D = 1 the outputs are the output layer's biases
        np.testing.assert_allclose(to_numpy(model.network_outputs(params, x))[:, 0], np.broadcast_to(b, (7, b.size)))
        if output == "gaussian":
            ref = Normal(b[0], scale(b[1])).log_prob(x[:, 0])
        else:
            C = b.size // 3
            family = Normal if output == "mixture_gaussian" else Logistic
            ref = MixtureSameFamily(b[:C], family(b[C:2 * C], scale(b[2 * C:]))).log_prob(x[:, 0])
        np.testing.assert_allclose(to_numpy(model.log_prob(params, x)), to_numpy(ref), atol=1e-12)
    model = _model("categorical", 1)
    params = _params(model)
    ref = Categorical(logits=params["layers"][-1]["b"]).log_prob(np.arange(3.0))
    np.testing.assert_allclose(model.log_prob(params, np.arange(3)[:, None]), ref, atol=1e-12)


def test_float32_has_no_nan_far_from_the_data():
    for output in ("gaussian", "mixture_gaussian", "mixture_logistic"):
        model = _model(output, 3)
        params = to_device(perturb_params(model.init(Rng(0)), 1, 3.0), "numpy", dtype="float32")
        x = np.array([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [1e-30, 3e3, -3e3]], np.float32)
        lp = model.log_prob(params, x)
        assert lp.dtype == np.float32 and np.all(np.isfinite(lp))


# ---------------------------------------------------------------------------------------------------
# Training


def test_fit_lowers_the_nll_of_a_tiny_binary_dataset():
    patterns = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=np.float64)
    data = patterns[np.random.default_rng(0).integers(0, 3, 240)]
    model = MADE(4, (16,), output="bernoulli", num_masks=2)
    params = model.init(Rng(0), dtype="float64")
    before = float(model.loss(params, data))
    result = fit(model.loss, params, data, Rng(1), adam(0.05), 150, batch_size=60, progress=False)
    after = float(model.loss(result.params, data))
    assert after < before - 1.0 and after < math.log(3) + 0.25, (before, after)


def test_demo_row_smoke_learns_two_moons():
    from genblocks.demo import FAMILIES, made_row

    assert ("autoregressive", made_row) in FAMILIES
    row = made_row(Rng(0), smoke=True)
    # the initial model scores about 3.6 nats on these moons; 60 Adam steps must get well below (the full
    # row reaches about 2.57, the Gaussian-mixture baseline about 2.58)
    assert row["family"] == "autoregressive" and row["value"] < 3.45
    assert row["samples"].shape == (1000, 2) and np.all(np.isfinite(row["samples"]))
