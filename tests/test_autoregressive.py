"""MADE and PixelCNN as density models: exact normalisation, autoregressive structure (``check_autoregressive``),
sampling (naive and cached), inpainting, backends, training."""

import itertools
import math

import numpy as np
import pytest
from conftest import BACKENDS, assert_backend, perturb_params
from scipy.special import logsumexp

from genblocks.backends import Rng, jacobian, to_device, to_numpy
from genblocks.blocks.distributions import Bernoulli, Categorical, Logistic, MixtureSameFamily, Normal
from genblocks.blocks.nn import MaskedConv2d, made_masks
from genblocks.checks import check_autoregressive
from genblocks.models.autoregressive import MADE, OUTPUTS, MADEModel, PixelCNN, resolve_order
from genblocks.train.loop import fit
from genblocks.train.optim import adam

KW = {"bernoulli": {}, "categorical": {"num_classes": 3}, "gaussian": {},
      "mixture_gaussian": {"num_components": 3}, "mixture_logistic": {"num_components": 2},
      "discretized_logistic": {"num_classes": 4, "num_components": 2}}


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
@pytest.mark.parametrize("output,levels,dim", [("bernoulli", 2, 4), ("categorical", 3, 3),
                                               ("discretized_logistic", 4, 3)])
def test_probabilities_of_all_configurations_sum_to_one(output, levels, dim, num_masks):
    model = _model(output, dim, order="random", order_seed=3, num_masks=num_masks)
    assert model.shared_order == (num_masks == 1)  # several masks: each its own random order
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
    x = np.random.default_rng(1).standard_normal(4)
    assert model.shared_order == (order != "random")  # "random": each mask its own order
    for k in range(2):
        rank = np.array(model.orders[k])
        J = to_numpy(jacobian(lambda v: model.network_outputs(params, v, mask_index=k))(x))  # (D, P, D)
        for i, j in itertools.product(range(4), repeat=2):
            if rank[j] >= rank[i]:
                assert np.all(J[i, :, j] == 0.0), (output, order, k, i, j)
        first, last = int(np.argmin(rank)), int(np.argmax(rank))
        assert np.any(J[last] != 0.0)  # the last variable sees something
        assert np.all(J[first] == 0.0)  # the first sees nothing
    rank = np.array(model.order)
    if order == "random":
        with pytest.raises(ValueError, match="order: the masks have different orders"):
            model.conditional_log_probs(params, x)
    elif output not in ("bernoulli", "categorical", "discretized_logistic"):
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


def test_order_random_gives_each_mask_its_own_order_and_a_list_sets_them():
    one = MADEModel(6, (8,), order="random", order_seed=3)
    many = MADEModel(6, (8,), order="random", order_seed=3, num_masks=4)
    assert many.orders[0] == one.order == many.order  # mask 0 keeps the single-mask order
    assert len(set(many.orders)) == 4 and not many.shared_order
    assert all(sorted(o) == list(range(6)) for o in many.orders)
    assert MADEModel(6, (8,), order="random", order_seed=3, num_masks=4).orders == many.orders  # constants
    for k, (rank, visit) in enumerate(zip(many.orders, many.visits)):
        assert [rank[j] for j in visit] == list(range(6)), k
    shared = MADEModel(4, (8,), order=[3, 1, 0, 2], num_masks=3)
    assert shared.shared_order and shared.orders == ((3, 1, 0, 2),) * 3
    assert MADEModel(4, (8,), num_masks=2).orders == ((0, 1, 2, 3),) * 2
    listed = MADEModel(3, (8,), order=np.array([[0, 1, 2], [2, 1, 0]]), num_masks=2)
    assert listed.orders == ((0, 1, 2), (2, 1, 0)) and "one per mask" in repr(listed)
    with pytest.raises(ValueError, match=r"order: expected one permutation per mask \(2 with num_masks=2\), got 3"):
        MADEModel(3, order=[[0, 1, 2], [2, 1, 0], [1, 0, 2]], num_masks=2)
    with pytest.raises(ValueError, match=r"order: expected a permutation of range\(3\)"):
        MADEModel(3, order=[[0, 1, 2], [2, 2, 0]], num_masks=2)


def test_loss_terms_of_masks_with_their_own_orders_add_up_to_the_mixture_nll():
    model = _model("categorical", 4, order="random", order_seed=1, num_masks=3)
    params = _params(model, scale=1.0)
    x = np.random.default_rng(2).integers(0, 3, (12, 4)).astype(np.float64)
    terms = model.loss_terms(params, x)
    assert set(terms) == {"nll", "nll_per_dim", "mask_kl"} and terms["nll_per_dim"].shape == (4,)
    nll = -np.mean(to_numpy(model.log_prob(params, x)))
    np.testing.assert_allclose(float(terms["nll"]), nll, atol=1e-10)
    np.testing.assert_allclose(float(np.sum(terms["nll_per_dim"])) + float(terms["mask_kl"]), nll, atol=1e-10)
    assert 0.0 < float(terms["mask_kl"]) < math.log(3)
    np.testing.assert_allclose(float(model.loss(params, x)), nll, atol=1e-10)  # no rng: the mixture NLL


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


@pytest.mark.parametrize("num_masks,order", [(1, [1, 2, 0]), (2, [1, 2, 0]), (3, "random")])
def test_sample_frequencies_match_exp_log_prob(num_masks, order):
    model = _model("bernoulli", 3, order=order, order_seed=4, num_masks=num_masks, hidden=(8,))
    assert model.shared_order == (order != "random")
    params = _params(model, scale=1.0)
    configs = _all_configurations(2, 3)
    p = np.exp(to_numpy(model.log_prob(params, configs)))
    n = 20000
    samples = to_numpy(model.sample(params, Rng(7), n))
    assert samples.shape == (n, 3) and samples.dtype == np.float64
    _within_five_standard_errors(_frequencies(samples, configs), p, n)
    if order == "random":  # the test has power: the mixture is far from any one mask's distribution
        for k in range(num_masks):
            pk = np.exp(to_numpy(model.conditional(model.network_outputs(params, configs, mask_index=k))
                                 .log_prob(configs)).sum(-1))
            assert np.max(np.abs(pk - p)) > 0.03


def test_order_agnostic_categorical_samples_follow_each_mask_s_own_order():
    model = _model("categorical", 3, order=[[0, 1, 2], [2, 1, 0], [1, 2, 0]], num_masks=3, hidden=(10,))
    assert model.visits == ((0, 1, 2), (2, 1, 0), (2, 0, 1))
    params = _params(model, seed=3, scale=1.0)
    configs = _all_configurations(3, 3)
    p = np.exp(to_numpy(model.log_prob(params, configs)))
    assert abs(p.sum() - 1.0) < 1e-10
    n = 30000
    samples = to_numpy(model.sample(params, Rng(11), n))
    freq = _frequencies(samples, configs)
    _within_five_standard_errors(freq, p, n)
    chi2 = n * np.sum((freq - p) ** 2 / p)  # 26 degrees of freedom: mean 26, sd 7.2
    assert chi2 < 26 + 5 * 7.2, chi2


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


def test_inpainting_with_masks_of_different_orders_that_all_start_with_the_given_entries_is_exact():
    # three masks, each its own order, all generating x_0 and x_1 (in either order) before x_2 and x_3
    orders = [[0, 1, 2, 3], [1, 0, 3, 2], [0, 1, 3, 2]]
    model = _model("bernoulli", 4, order=orders, num_masks=3, hidden=(12,))
    assert not model.shared_order
    params = _params(model, seed=2, scale=1.0)
    configs = _all_configurations(2, 4)
    joint = np.exp(to_numpy(model.log_prob(params, configs)))
    n = 20000
    x_init = np.zeros((n, 4))
    x_init[n // 2:, :2] = [1.0, 0.0]
    mask = np.zeros((n, 4), dtype=bool)
    mask[:, :2] = True
    samples = to_numpy(model.sample(params, Rng(5), n, x_init=x_init, mask=mask))
    np.testing.assert_array_equal(samples[:, :2], x_init[:, :2])
    for given, rows in (([0.0, 0.0], slice(0, n // 2)), ([1.0, 0.0], slice(n // 2, n))):
        keep = np.all(configs[:, :2] == given, axis=1)
        cond = joint[keep] / joint[keep].sum()  # p(x_2, x_3 | x_0, x_1) of the mixture, exact
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


@pytest.mark.parametrize("order", ["natural", "random"])
@pytest.mark.parametrize("output", ["bernoulli", "categorical", "mixture_gaussian", "discretized_logistic"])
def test_backend_arrays_in_and_out(output, order, backend):
    model = _model(output, 3, num_masks=2, context_classes=2, order=order, order_seed=1)
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


@pytest.mark.parametrize("order", ["natural", "random"])
def test_fit_lowers_the_nll_of_a_tiny_binary_dataset(order):
    patterns = np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], dtype=np.float64)
    data = patterns[np.random.default_rng(0).integers(0, 3, 240)]
    model = MADE(4, (16,), output="bernoulli", num_masks=2, order=order, order_seed=0)
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


# ===================================================================================================
# check_autoregressive


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_check_autoregressive_passes_on_made_with_random_orders(seed):
    model = MADEModel(5, (16, 16), output="categorical", num_classes=3, order="random", order_seed=seed,
                      num_masks=2, activation="tanh")
    params = _params(model, seed)
    x = Rng(seed).normal((4, 5), "float64")
    assert model.orders[0] != model.orders[1]  # order-agnostic: each mask its own order
    for k in range(2):
        report = check_autoregressive(lambda v: model.network_outputs(params, v, mask_index=k), x, model.orders[k],
                                      complete=True)
        assert report["violations"] == [] and report["blind_spots"] == []
    with pytest.raises(AssertionError, match="outputs depend on inputs not before them"):
        check_autoregressive(lambda v: model.network_outputs(params, v, mask_index=1), x, model.orders[0])
    # the conditionals' log-densities log p(x_i | x_<i) do depend on x_i itself: not a parameter map
    gaussian = MADEModel(4, (12,), output="gaussian", order="random", order_seed=seed)
    gp = _params(gaussian, seed)
    check_autoregressive(lambda v: gaussian.network_outputs(gp, v), x[:, :4], gaussian.order)
    with pytest.raises(AssertionError, match=r"\(\d, \d\)"):
        check_autoregressive(lambda v: gaussian.conditional_log_probs(gp, v), x[:, :4], gaussian.order)


def test_check_autoregressive_catches_a_wrong_order_and_a_dense_net_and_names_the_pairs():
    model = MADEModel(4, (12,), output="bernoulli", order=[2, 0, 3, 1], activation="tanh")
    params = _params(model)
    x = Rng(3).normal((3, 4), "float64")
    fn = lambda v: model.network_outputs(params, v)  # noqa: E731
    check_autoregressive(fn, x, [2, 0, 3, 1])
    with pytest.raises(AssertionError, match=r"outputs depend on inputs not before them .*\(0, 1\)"):
        check_autoregressive(fn, x)  # the natural order is not this net's order
    W = np.triu(np.ones((4, 4)))  # output i sees inputs j <= i: x_i itself leaks in
    with pytest.raises(AssertionError, match=r"4 outputs depend .*\[\(0, 0\), \(1, 1\), \(2, 2\), \(3, 3\)\]"):
        check_autoregressive(lambda v: np.tanh(v @ W), x)
    report = check_autoregressive(lambda v: np.tanh(v @ np.triu(np.ones((4, 4)), 1)), x, complete=True)
    assert report["dependencies"][3] == [True, True, True, False]
    with pytest.raises(ValueError, match=r"order: expected a permutation of range\(4\)"):
        check_autoregressive(fn, x, [0, 0, 1, 2])
    with pytest.raises(ValueError, match=r"x: expected an array \(n, D\)"):
        check_autoregressive(fn, x[0])
    with pytest.raises(ValueError, match=r"fn: expected an output of shape \(3, 4\)"):
        check_autoregressive(lambda v: v[:, :2], x)


# ===================================================================================================
# PixelCNN


def _pixelcnn(h=3, w=3, c=1, levels=2, **kw):
    return PixelCNN(h, w, c, levels, **{"features": 4 * c if c > 1 else 4, "num_blocks": 2, **kw})


def _images(levels, shape):
    return np.array(list(itertools.product(range(levels), repeat=math.prod(shape))),
                    dtype=np.float64).reshape((-1,) + shape)


def _flat(model, params, context=None):
    """x (n, D) -> theta (n, D, P) in raster-then-channel order, for check_autoregressive."""
    shape = (model.height, model.width, model.channels)
    return lambda v: np.reshape(model.network_outputs(params, np.reshape(v, (v.shape[0],) + shape), context),
                                (v.shape[0], model.dim, -1))


def test_pixelcnn_sums_to_one_over_every_3x3_binary_image():
    model = _pixelcnn()
    params = _params(model)
    lp = to_numpy(model.log_prob(params, _images(2, (3, 3, 1))))
    assert lp.shape == (512,)
    assert abs(np.exp(lp).sum() - 1.0) < 1e-10
    assert np.ptp(lp) > 1.0  # perturbed: far from uniform


@pytest.mark.parametrize("output", ["categorical", "logistic_mixture"])
def test_pixelcnn_with_channels_and_classes_sums_to_one_per_class(output):
    model = _pixelcnn(1, 2, 2, 3, output=output, num_components=2, context_classes=2)
    params = _params(model)
    xs = _images(3, (1, 2, 2))  # 81 images of two 3-level channels
    totals = [np.exp(to_numpy(model.log_prob(params, xs, np.full(81, y)))).sum() for y in (0, 1)]
    np.testing.assert_allclose(totals, 1.0, atol=1e-10)
    a, b = (to_numpy(model.log_prob(params, xs, np.full(81, y))) for y in (0, 1))
    assert np.max(np.abs(a - b)) > 1e-2  # the class matters


def test_pixelcnn_is_autoregressive_in_raster_and_channel_order_with_no_blind_spot():
    model = _pixelcnn(4, 4, activation="tanh")
    report = check_autoregressive(_flat(model, _params(model)), Rng(0).normal((3, 16), "float64"), complete=True)
    assert report["dependencies"][15] == [True] * 15 + [False]  # the last pixel sees every other pixel
    colour = _pixelcnn(3, 3, 3, 4, output="logistic_mixture", num_components=2, context_classes=3, activation="tanh")
    check_autoregressive(_flat(colour, _params(colour), np.array([0, 2, 1])), Rng(1).normal((3, 27), "float64"),
                         complete=True)


class _MaskedConvStack:
    """The original PixelCNN's stack of 3x3 masked convolutions (type A, then B): it has a blind spot."""

    def __init__(self, layers=3, features=8):
        self.layers = [MaskedConv2d(1, features, 3, mask_type="A", activation="tanh")]
        self.layers += [MaskedConv2d(features, features, 3, mask_type="B", activation="tanh")
                        for _ in range(layers - 2)]
        self.layers += [MaskedConv2d(features, 2, 3, mask_type="B")]
        self.params = [perturb_params(layer.init(r, "float64"), 0, 0.3)
                       for layer, r in zip(self.layers, Rng(0).split(layers))]

    def __call__(self, v):
        h = np.reshape(v, (v.shape[0], 5, 5, 1))
        for layer, p in zip(self.layers, self.params):
            h = layer.apply(p, h)
        return np.reshape(h, (v.shape[0], 25, 2))


def test_check_autoregressive_catches_the_blind_spot_of_a_masked_conv_stack():
    net, x = _MaskedConvStack(), Rng(2).normal((3, 25), "float64")
    report = check_autoregressive(net, x)  # causal: nothing after a pixel leaks in
    # ... but pixel (2, 2) = 12 never sees (1, 4) = 9, up and to the right, though it comes first
    assert (12, 9) in report["blind_spots"] and report["violations"] == []
    with pytest.raises(AssertionError, match=r"blind spots: .*\(12, 9\)"):
        check_autoregressive(net, x, complete=True)
    gated = _pixelcnn(5, 5, num_blocks=3, activation="tanh")  # the gated stacks have none
    check_autoregressive(_flat(gated, _params(gated)), x, complete=True)


def test_pixelcnn_samples_match_log_prob_by_chi_square():
    from scipy.stats import chisquare

    model = _pixelcnn(2, 2)
    params = _params(model, scale=1.0)
    configs = _images(2, (2, 2, 1))
    p = np.exp(to_numpy(model.log_prob(params, configs)))
    n = 20000
    samples = to_numpy(model.sample(params, Rng(7), n, cached=True)).reshape(n, 4)
    counts = np.array([np.sum(np.all(samples == c.reshape(4), axis=1)) for c in configs])
    assert counts.sum() == n
    assert chisquare(counts, n * p).pvalue > 1e-3
    # inpainting the bottom row given the top row samples p(bottom | top)
    top = np.array([1.0, 0.0])
    given = np.zeros((2, 2, 1), dtype=bool)
    given[0] = True
    x_init = np.zeros((2, 2, 1))
    x_init[0, :, 0] = top
    out = to_numpy(model.sample(params, Rng(8), n, x_init=x_init, mask=given)).reshape(n, 4)
    assert np.all(out[:, :2] == top)
    rows = [c for c in range(16) if np.all(configs[c].reshape(4)[:2] == top)]
    counts = np.array([np.sum(np.all(out == configs[c].reshape(4), axis=1)) for c in rows])
    assert chisquare(counts, n * p[rows] / p[rows].sum()).pvalue > 1e-3


@pytest.mark.parametrize("kw", [{}, {"c": 3, "levels": 5, "output": "logistic_mixture", "num_components": 2,
                                     "context_classes": 3}, {"h": 4, "w": 5, "kernel_size": 5, "num_blocks": 3}])
def test_cached_sampling_gives_the_naive_loop_s_images(kw):
    model = _pixelcnn(**kw)
    params = _params(model)
    context = np.array([0, 2, 1, 1, 0]) if model.context_classes else None
    naive = model.sample(params, Rng(3), 5, context=context)
    fast = model.sample(params, Rng(3), 5, context=context, cached=True)
    np.testing.assert_array_equal(fast, naive)
    assert np.ptp(naive) > 0  # not a constant image
    # and inpainting: the top row given, the same completions either way
    x_init = to_numpy(model.sample(params, Rng(4), 5, context=context))
    given = np.zeros(x_init.shape, dtype=bool)
    given[:, 0] = True
    a = model.sample(params, Rng(5), 5, context=context, x_init=x_init, mask=given)
    b = model.sample(params, Rng(5), 5, context=context, x_init=x_init, mask=given, cached=True)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, 0], x_init[:, 0])


def test_pixelcnn_on_every_backend_gives_numpy_s_numbers(backend):
    model = _pixelcnn(3, 3, 3, 4, output="logistic_mixture", num_components=2, context_classes=2)
    params = _params(model)
    x = np.random.default_rng(0).integers(0, 4, (6, 3, 3, 3)).astype(np.float64)
    y = np.array([0, 1, 1, 0, 1, 0])
    want = to_numpy(model.log_prob(params, x, y))
    got = model.log_prob(to_device(params, backend), to_device(x, backend), to_device(y, backend))
    assert_backend(got, backend)
    np.testing.assert_allclose(to_numpy(got), want, atol=1e-10)
    ref = to_numpy(model.sample(params, Rng(1, host_draws=True), 4, context=y[:4]))
    for cached in (False, True):
        out = model.sample(to_device(params, backend), Rng(1, backend, host_draws=True), 4,
                           context=to_device(y[:4], backend), cached=cached)
        assert_backend(out, backend)
        np.testing.assert_array_equal(to_numpy(out), ref)


GPU = [b for b in BACKENDS if getattr(b, "values", (b,))[0] == "cupy"]  # cupy only: skips, saying why, without


@pytest.mark.parametrize("gpu", GPU)
@pytest.mark.parametrize("output", ["categorical", "logistic_mixture"])
def test_pixelcnn_on_cupy_samples_without_waiting_for_the_host(gpu, output):
    import cupyx

    if getattr(cupyx, "allow_synchronize", None) is None:
        pytest.skip("this cupy has no cupyx.allow_synchronize to catch a host synchronisation")
    model = _pixelcnn(4, 5, 3, 6, output=output, num_components=2, context_classes=0, num_blocks=2)
    params = to_device(_params(model), gpu, dtype="float32")
    images = []
    for cached in (False, True):
        with cupyx.allow_synchronize(False):  # any device-to-host copy or sync in the pixel loop raises
            x = model.sample(params, Rng(3, gpu), 7, cached=cached)
        assert_backend(x, gpu)
        images.append(to_numpy(x))
    np.testing.assert_array_equal(images[0], images[1])  # the same draws, the same images
    host = to_device(params, "numpy", dtype="float64")
    np.testing.assert_allclose(to_numpy(model.log_prob(params, x)), to_numpy(model.log_prob(host, images[0])),
                               rtol=1e-4, atol=1e-3)


def test_pixelcnn_loss_terms_add_up_and_the_dtype_follows_the_params():
    model = _pixelcnn(2, 3, 2, 4, features=4)
    params = _params(model)
    x = to_numpy(model.sample(params, Rng(0), 7))
    terms = model.loss_terms(params, x)
    assert tuple(terms["nll_per_dim"].shape) == (2, 3, 2)
    np.testing.assert_allclose(float(terms["nll"]), float(model.loss(params, x)), atol=1e-10)
    np.testing.assert_allclose(float(np.sum(terms["nll_per_dim"])), -float(np.mean(model.log_prob(params, x))),
                               atol=1e-10)
    p32 = to_device(params, "numpy", dtype="float32")
    assert str(model.log_prob(p32, x.astype(np.int64)).dtype) == "float32"
    assert str(model.sample(p32, Rng(0), 2, cached=True).dtype) == "float32"
    assert np.isfinite(float(model.loss(p32, x)))


def test_pixelcnn_bad_arguments_raise_errors_naming_them():
    model = _pixelcnn(2, 2, 1, 3)
    params = model.init(Rng(0), dtype="float64")
    good = np.zeros((2, 2, 2, 1))
    with pytest.raises(ValueError, match=r"x: expected images of shape \(n, 2, 2, 1\), got shape \(2, 2, 3, 1\)"):
        model.log_prob(params, np.zeros((2, 2, 3, 1)))
    with pytest.raises(ValueError, match=r"x: expected a 4-d array"):
        model.log_prob(params, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"x: expected integer levels in \[0, 3\), got values \[3.0\]"):
        model.log_prob(params, good + 3.0)
    with pytest.raises(ValueError, match=r"x: expected integer levels .* got values \[-1.0, 0.5\]"):
        model.loss(params, np.concatenate([good - 1.0, good + 0.5]))
    with pytest.raises(ValueError, match="context: this PixelCNN was built without classes"):
        model.log_prob(params, good, np.zeros(2))
    with pytest.raises(ValueError, match=r"features: expected a multiple of channels=3"):
        PixelCNN(2, 2, 3, 4, features=4)
    with pytest.raises(ValueError, match=r"kernel_size: expected an odd int >= 3"):
        PixelCNN(2, 2, 1, 4, kernel_size=4)
    with pytest.raises(ValueError, match=r"levels: expected an int >= 2"):
        PixelCNN(2, 2, 1, 1)
    with pytest.raises(ValueError, match=r"output: expected one of"):
        PixelCNN(2, 2, 1, 4, output="gaussian")
    with pytest.raises(TypeError, match=r"mask: expected a boolean array"):
        model.sample(params, Rng(0), 2, x_init=good, mask=np.ones((2, 2, 2, 1)))
    with pytest.raises(ValueError, match=r"x_init: expected integer levels in \[0, 3\)"):
        model.sample(params, Rng(0), 2, x_init=good + 7.0, mask=np.ones((2, 2, 2, 1), dtype=bool))
    with pytest.raises(ValueError, match=r"mask: expected shape \(2, 2, 2, 1\) or \(2, 2, 1\)"):
        model.sample(params, Rng(0), 2, x_init=good, mask=np.ones((2, 3, 2, 1), dtype=bool))
    with pytest.raises(ValueError, match="x_init, mask: expected both"):
        model.sample(params, Rng(0), 2, x_init=good)
    with pytest.raises(ValueError, match=r"params: do not match PixelCNN"):
        model.log_prob(_pixelcnn(2, 2, 1, 4).init(Rng(0)), good)
    labelled = _pixelcnn(2, 2, 1, 3, context_classes=2)
    lparams = labelled.init(Rng(0), dtype="float64")
    with pytest.raises(ValueError, match=r"context: this PixelCNN expects an integer class label in 0..1"):
        labelled.sample(lparams, Rng(0), 2)
    with pytest.raises(ValueError, match=r"context: expected integer class labels in 0..1, got values \[2.0\]"):
        labelled.log_prob(lparams, good, np.array([0, 2]))


def test_pixelcnn_fit_lowers_the_nll_of_tiny_binary_images():
    model = _pixelcnn(3, 3, features=8)
    data = np.tile(np.array([[1, 0, 1], [0, 1, 0], [1, 0, 1]], dtype=np.float64).reshape(1, 3, 3, 1), (64, 1, 1, 1))
    data[::2] = 1.0 - data[::2]  # two checkerboards
    start = model.init(Rng(0), dtype="float64")
    result = fit(model.loss, start, data, Rng(1), adam(0.02), steps=60, batch_size=32, progress=False)
    before, after = float(model.loss(start, data)), float(model.loss(result.params, data))
    assert after < 0.5 * before and after < 1.5  # log 2 nats is the floor
