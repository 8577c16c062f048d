"""Bijectors: a registry of constructors, each run through the same property battery.

Every entry gets (hypothesis, float64): inverse(forward(x)) == x, forward(inverse(y)) == y, log_det equal to
log|det| of autograd's Jacobian (via genblocks.checks.check_bijector), forward + inverse log-dets summing to
zero, 1-d and 2-d batch shapes, float32 round trips, finite outputs at extreme inputs, and equal results on
the numpy and strict backends.
"""

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
from autograd.test_util import check_grads
from conftest import perturb_params
from hypothesis import given, settings
from hypothesis import strategies as st

from genblocks.backends import Rng, backend_of, grad, namespace, to_device, to_numpy
from genblocks.blocks import bijectors as bj
from genblocks.blocks.bijectors import rational_quadratic_spline
from genblocks.checks import check_bijector


def assert_backend(arrays, backend):
    for a in arrays:
        assert backend_of(a) == backend, f"expected a {backend} array, got {type(a).__name__}"

D = 3  # event size of the registry entries
CTX = 2  # context size of the conditional entries


def randomize(params, seed, scale=0.5):
    return perturb_params(params, seed, scale)


def init64(b, seed=0, scale=0.5):
    return randomize(b.init(Rng(seed, "numpy"), "float64"), seed + 1, scale)


def normal(scale=1.5):
    return lambda gen, shape: scale * gen.standard_normal(shape)


def uniform(low, high):
    return lambda gen, shape: gen.uniform(low, high, shape)


@dataclass
class Case:
    bijector: object
    params: object
    sample_x: object  # (np.random.Generator, shape) -> x in the forward domain
    sample_y: object = None  # -> y in the inverse domain (default: forward of sample_x)
    context_dim: int = 0
    invertible: bool = True
    extreme_x: tuple = (-1e3, -30.0, 30.0, 1e3)
    extreme_y: tuple = (-1e3, -30.0, 30.0, 1e3)
    examples: int = 25
    float32_ok: bool = True
    notes: dict = field(default_factory=dict)


class _StateBound(bj.Bijector):
    """A stateful bijector in evaluation mode as a plain one: params {"params", "state"} (so the battery moves,
    perturbs and differentiates the running statistics like any leaf)."""

    def __init__(self, bijector):
        self.bijector = bijector

    def forward(self, params, x, context=None):
        return self.bijector.forward(params["params"], x, context, state=params["state"])

    def inverse(self, params, y, context=None):
        return self.bijector.inverse(params["params"], y, context, state=params["state"])


def _bn():
    b = bj.BatchNormFlow(D)
    state = randomize(b.init_state(dtype="float64"), 7)
    state["running_var"] = np.exp(state["running_var"])  # a valid (positive) variance
    return Case(_StateBound(b), {"params": init64(b), "state": state}, normal())


def _chain():
    b = bj.Chain([bj.Affine(D), bj.Permute([2, 0, 1]), bj.AffineCoupling(bj.coupling_mask(D), hidden=(8,)),
                  bj.LULinear(D)])
    return Case(b, init64(b), normal(), examples=15)


# name -> zero-argument constructor returning a Case. A new bijector joins here and gets the battery.
REGISTRY = {
    "identity": lambda: Case(bj.Identity(), {}, normal()),
    "shift": lambda: Case(bj.Shift(D), init64(bj.Shift(D)), normal()),
    "scale": lambda: Case(bj.Scale(D), init64(bj.Scale(D)), normal()),
    "affine": lambda: Case(bj.Affine(D), init64(bj.Affine(D)), normal()),
    "exp": lambda: Case(bj.Exp(), {}, uniform(-5.0, 5.0), uniform(1e-3, 50.0), extreme_x=(-700.0, -30.0, 30.0, 700.0),
                        extreme_y=(1e-300, 1e-30, 1e30, 1e300)),
    "sigmoid": lambda: Case(bj.Sigmoid(), {}, uniform(-8.0, 8.0), uniform(1e-4, 1 - 1e-4),
                            extreme_y=(1e-300, 1e-12, 0.5, 1 - 1e-12)),
    "logit": lambda: Case(bj.Logit(), {}, uniform(1e-4, 1 - 1e-4), normal(3.0),
                          extreme_x=(1e-300, 1e-12, 0.5, 1 - 1e-12)),
    "tanh": lambda: Case(bj.Tanh(), {}, uniform(-5.0, 5.0), uniform(-1 + 1e-6, 1 - 1e-6),
                         extreme_y=(-1 + 1e-15, -1 + 1e-9, 1 - 1e-9, 1 - 1e-15)),
    "softplus": lambda: Case(bj.Softplus(), {}, uniform(-10.0, 10.0), uniform(1e-3, 30.0),
                             extreme_y=(1e-300, 1e-12, 30.0, 1e3)),
    "permute": lambda: Case(bj.Permute(D, rng=Rng(3)), {}, normal()),
    "reverse": lambda: Case(bj.Reverse(), {}, normal()),
    "lu_linear": lambda: Case(bj.LULinear(D), init64(bj.LULinear(D), scale=0.3), normal()),
    "actnorm": lambda: Case(bj.ActNorm(D), init64(bj.ActNorm(D)), normal()),
    "batchnorm_eval": _bn,
    "spline": lambda: Case(bj.RationalQuadraticSpline(D, bins=5, bound=2.0),
                           init64(bj.RationalQuadraticSpline(D, bins=5, bound=2.0), scale=1.0), normal(2.0)),
    "additive_coupling": lambda: Case(bj.AdditiveCoupling(bj.coupling_mask(D), hidden=(8,)),
                                      init64(bj.AdditiveCoupling(bj.coupling_mask(D), hidden=(8,))), normal(),
                                      examples=15),
    "affine_coupling": lambda: Case(bj.AffineCoupling(bj.coupling_mask(D, kind="half"), hidden=(8, 8)),
                                    init64(bj.AffineCoupling(bj.coupling_mask(D, kind="half"), hidden=(8, 8))),
                                    normal(), examples=15),
    "affine_coupling_conditional": lambda: (lambda b: Case(b, init64(b), normal(), context_dim=CTX, examples=10))(
        bj.AffineCoupling(bj.coupling_mask(D, flip=True), hidden=(8,), context_dim=CTX)),
    "spline_coupling": lambda: (lambda b: Case(b, init64(b, scale=0.8), normal(2.0), examples=10))(
        bj.SplineCoupling(bj.coupling_mask(D), bins=4, bound=2.0, hidden=(8,))),
    "maf": lambda: (lambda b: Case(b, init64(b), normal(), examples=10))(bj.MaskedAutoregressive(D, hidden=(8,))),
    "maf_conditional": lambda: (lambda b: Case(b, init64(b), normal(), context_dim=CTX, examples=8))(
        bj.MaskedAutoregressive(D, hidden=(8,), context_dim=CTX, order=(2, 0, 1))),
    "iaf": lambda: (lambda b: Case(b, init64(b), normal(), examples=8))(bj.InverseAutoregressive(D, hidden=(8,))),
    "spline_autoregressive": lambda: (lambda b: Case(b, init64(b, scale=0.3), normal(2.0), examples=8))(
        bj.SplineAutoregressive(D, bins=4, bound=2.0, hidden=(8,))),
    "spline_autoregressive_conditional": lambda: (lambda b: Case(b, init64(b, scale=0.3), normal(2.0), context_dim=CTX,
                                                                 examples=6))(
        bj.SplineAutoregressive(D, bins=3, bound=2.0, hidden=(6,), context_dim=CTX)),
    "planar": lambda: Case(bj.Planar(D), init64(bj.Planar(D)), normal(), invertible=False),
    "radial": lambda: Case(bj.Radial(D), init64(bj.Radial(D)), normal(), invertible=False),
    "chain": _chain,
    "invert_chain": lambda: (lambda c: Case(bj.Invert(c.bijector), c.params, normal(), examples=10))(_chain()),
}

NAMES = sorted(REGISTRY)
INVERTIBLE = [n for n in NAMES if REGISTRY[n]().invertible]
BATCHES = st.sampled_from([(4,), (2, 3)])


def draw(case, seed, batch, which="x"):
    gen = np.random.default_rng(seed)
    sampler = case.sample_x if which == "x" else case.sample_y
    x = sampler(gen, batch + (D,))
    context = gen.standard_normal(batch + (case.context_dim,)) if case.context_dim else None
    return x, context


def run_property(case, test):
    """Run ``test(seed, batch)`` under hypothesis with the case's example budget."""
    settings(max_examples=case.examples)(given(seed=st.integers(0, 2**31 - 1), batch=BATCHES)(test))()


# ---------------------------------------------------------------------------------------------------
# The battery


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_and_log_det_match_autograd_jacobian(name):
    case = REGISTRY[name]()

    def test(seed, batch):
        x, context = draw(case, seed, batch)
        report = check_bijector(case.bijector, case.params, x, atol=1e-8, context=context)
        assert report["max_log_det_error"] <= 1e-8
        if case.invertible:
            assert report["max_roundtrip_error"] <= 1e-8
        else:
            assert report["inverse"] == "not implemented"

    run_property(case, test)


@pytest.mark.parametrize("name", INVERTIBLE)
def test_forward_of_inverse_on_the_inverse_domain(name):
    case = REGISTRY[name]()
    b, p = case.bijector, case.params

    def test(seed, batch):
        if case.sample_y is None:
            x0, context = draw(case, seed, batch)
            y = to_numpy(b.forward(p, x0, context)[0])
        else:
            y, context = draw(case, seed, batch, "y")
        x, inv_ld = b.inverse(p, y, context)
        y2, ld = b.forward(p, x, context)
        assert inv_ld.shape == batch and ld.shape == batch
        np.testing.assert_allclose(y2, y, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(ld + inv_ld, 0.0, atol=1e-8 * (1 + np.abs(ld).max()))

    run_property(case, test)


@pytest.mark.parametrize("name", NAMES)
def test_float32_in_float32_out_and_roundtrip(name):
    case = REGISTRY[name]()
    b = case.bijector
    p32 = to_device(case.params, "numpy", dtype="float32")
    x, context = draw(case, 7, (5,))
    x32 = x.astype(np.float32)
    c32 = None if context is None else context.astype(np.float32)
    y, ld = b.forward(p32, x32, c32)
    assert y.dtype == np.float32 and ld.dtype == np.float32
    y64, ld64 = b.forward(case.params, x, context)
    np.testing.assert_allclose(y, y64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ld, ld64, rtol=1e-4, atol=1e-4)
    if case.invertible:
        x2, inv_ld = b.inverse(p32, y, c32)
        assert x2.dtype == np.float32 and inv_ld.dtype == np.float32
        np.testing.assert_allclose(x2, x32, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ld + inv_ld, 0.0, atol=1e-4 * (1 + np.abs(ld).max()))


@pytest.mark.parametrize("name", NAMES)
def test_batch_shapes_are_handled_elementwise(name):
    """(2, 3, d) gives the same rows as (6, d); a single event (d,) gives a scalar log-det."""
    case = REGISTRY[name]()
    b, p = case.bijector, case.params
    x, context = draw(case, 11, (2, 3))
    y, ld = b.forward(p, x, context)
    assert y.shape == (2, 3, D) and ld.shape == (2, 3)
    flat_c = None if context is None else context.reshape(6, -1)
    y_flat, ld_flat = b.forward(p, x.reshape(6, D), flat_c)
    np.testing.assert_allclose(y.reshape(6, D), y_flat, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld.reshape(6), ld_flat, rtol=1e-12, atol=1e-12)
    y1, ld1 = b.forward(p, x[0, 0], None if context is None else context[0, 0])
    assert y1.shape == (D,) and np.shape(ld1) == ()
    np.testing.assert_allclose(y1, y[0, 0], rtol=1e-12, atol=1e-12)
    if case.invertible:
        x1, ild1 = b.inverse(p, y1, None if context is None else context[0, 0])
        assert x1.shape == (D,) and np.shape(ild1) == ()


@pytest.mark.parametrize("name", NAMES)
def test_finite_at_extreme_inputs(name):
    case = REGISTRY[name]()
    b, p = case.bijector, case.params
    gen = np.random.default_rng(5)
    context = gen.standard_normal((len(case.extreme_x), case.context_dim)) if case.context_dim else None
    x = np.repeat(np.asarray(case.extreme_x)[:, None], D, axis=1)
    x[:, 1] = np.asarray(case.extreme_x)[::-1]  # mix extremes within one event
    y, ld = b.forward(p, x, context)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(ld)), (y, ld)
    if case.invertible:
        yy = np.repeat(np.asarray(case.extreme_y)[:, None], D, axis=1)
        xi, ild = b.inverse(p, yy, context)
        assert np.all(np.isfinite(xi)) and np.all(np.isfinite(ild)), (xi, ild)


@pytest.mark.parametrize("name", NAMES)
def test_numpy_and_other_backends_agree(name, backend):
    case = REGISTRY[name]()
    b = case.bijector
    x, context = draw(case, 13, (4,))
    ref_y, ref_ld = b.forward(case.params, x, context)
    p, xb, cb = to_device((case.params, x, context), backend)
    y, ld = b.forward(p, xb, cb)
    assert_backend((y, ld), backend)
    np.testing.assert_allclose(to_numpy(y), ref_y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(to_numpy(ld), ref_ld, rtol=1e-10, atol=1e-10)
    if case.invertible:
        ref_x, ref_ild = b.inverse(case.params, ref_y, context)
        xi, ild = b.inverse(p, to_device(ref_y, backend), cb)
        assert_backend((xi, ild), backend)
        np.testing.assert_allclose(to_numpy(xi), ref_x, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(to_numpy(ild), ref_ild, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# Gradients (training differentiates log-dets and outputs with respect to params)


@pytest.mark.parametrize("name", ["affine_coupling", "spline_coupling", "maf", "lu_linear", "spline"])
def test_gradients_of_the_inverse_log_density_wrt_params(name):
    case = REGISTRY[name]()
    b = case.bijector
    y = to_numpy(b.forward(case.params, draw(case, 3, (3,))[0])[0])

    def objective(params):
        x, ld = b.inverse(params, y)
        return np.sum(-0.5 * x * x) + np.sum(ld)

    check_grads(objective, modes=["rev"], order=1)(case.params)


# ---------------------------------------------------------------------------------------------------
# Specific behaviour


def test_chain_applies_in_list_order_and_log_dets_add():
    a, s = bj.Affine(D), bj.Tanh()
    pa = init64(a)
    x = np.random.default_rng(0).standard_normal((5, D))
    y1, l1 = a.forward(pa, x)
    y2, l2 = s.forward({}, y1)
    y, ld = bj.Chain([a, s]).forward([pa, {}], x)
    np.testing.assert_allclose(y, y2)
    np.testing.assert_allclose(ld, l1 + l2)
    # the other order is a different map
    assert not np.allclose(bj.Chain([s, a]).forward([{}, pa], x)[0], y)
    empty_y, empty_ld = bj.Chain([]).forward([], x)
    np.testing.assert_array_equal(empty_y, x)
    np.testing.assert_array_equal(empty_ld, np.zeros(5))


def test_chain_rejects_wrong_params():
    with pytest.raises(ValueError, match="params: expected a list of 2"):
        bj.Chain([bj.Tanh(), bj.Exp()]).forward([{}], np.zeros((2, D)))
    with pytest.raises(TypeError, match="bijectors"):
        bj.Chain([bj.Tanh(), "tanh"])


def test_invert_swaps_directions():
    b = bj.Affine(D)
    p = init64(b)
    x = np.random.default_rng(1).standard_normal((4, D))
    y, ld = bj.Invert(b).forward(p, x)
    y_ref, ld_ref = b.inverse(p, x)
    np.testing.assert_allclose(y, y_ref)
    np.testing.assert_allclose(ld, ld_ref)


@pytest.mark.parametrize("cls", [bj.Planar, bj.Radial])
def test_planar_and_radial_are_forward_only_and_say_what_to_use(cls):
    b = cls(D)
    with pytest.raises(NotImplementedError, match="no closed-form inverse.*AffineCoupling"):
        b.inverse(b.init(Rng(0)), np.zeros((2, D), dtype=np.float32))
    assert "Forward only" in cls.__doc__


def test_planar_constraint_keeps_the_map_invertible():
    """w . u_hat >= -1 even when the raw u points against w (so the log-det stays finite)."""
    b = bj.Planar(2)
    p = {"w": np.array([1.0, 0.0]), "u": np.array([-5.0, 0.0]), "b": np.array(0.0)}
    _, ld = b.forward(p, np.random.default_rng(0).standard_normal((50, 2)))
    assert np.all(np.isfinite(ld))
    u_hat = b._u_hat(np, p["w"], p["u"])
    assert p["w"] @ u_hat > -1.0


def test_tanh_log_det_is_the_stable_formula():
    x = np.array([[-40.0, -3.0, 0.0, 3.0, 40.0]])
    _, ld = bj.Tanh().forward({}, x)
    expected = np.sum(2 * (math.log(2) - x - np.logaddexp(0, -2 * x)))
    np.testing.assert_allclose(ld, [expected], rtol=1e-12)
    naive = np.sum(np.log1p(-np.tanh(x[:, 1:4]) ** 2))  # fine away from the tails
    _, ld_mid = bj.Tanh().forward({}, x[:, 1:4])
    np.testing.assert_allclose(ld_mid, [naive], rtol=1e-10)


def test_spline_is_identity_outside_the_bound_and_at_zero_params():
    b = bj.RationalQuadraticSpline(2, bins=6, bound=2.0)
    x = np.array([[-5.0, 2.5], [-2.0001, 1e3], [0.3, -1.2]])
    p = init64(b, scale=2.0)
    y, ld = b.forward(p, x)
    np.testing.assert_array_equal(y[:2], x[:2])
    np.testing.assert_array_equal(ld[:2], 0.0)
    y0, ld0 = b.forward(b.init(Rng(0), "float64"), x)
    np.testing.assert_allclose(y0, x, atol=1e-12)
    np.testing.assert_allclose(ld0, 0.0, atol=1e-12)


def test_spline_is_monotone_continuous_and_maps_the_interval_onto_itself():
    gen = np.random.default_rng(0)
    K = 7
    w, h, d = gen.standard_normal(K) * 2, gen.standard_normal(K) * 2, gen.standard_normal(K - 1) * 2
    x = np.linspace(-3.5, 3.5, 20001)
    y, ld = rational_quadratic_spline(x, w, h, d, bound=3.0)
    assert np.all(np.diff(y) > 0)
    np.testing.assert_allclose(rational_quadratic_spline(np.array([-3.0, 3.0]), w, h, d, bound=3.0)[0], [-3, 3],
                               atol=1e-12)
    assert np.max(np.abs(np.diff(y))) < 0.01  # no jumps at the knots
    # the derivative is continuous across every knot, and equal to 1 where the linear tails join
    knots = bj._knots(namespace(w), w, 3.0, 1e-3)
    left = rational_quadratic_spline(knots - 1e-9, w, h, d, bound=3.0)[1]
    right = rational_quadratic_spline(knots + 1e-9, w, h, d, bound=3.0)[1]
    np.testing.assert_allclose(np.exp(left), np.exp(right), rtol=1e-5)
    np.testing.assert_allclose(np.exp(left[[0, -1]]), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_split_last_and_knots_match_slicing_and_cumulative_sums(backend, dtype):
    gen = np.random.default_rng(1)
    a = (gen.standard_normal((4, 3, 11)) * 10.0 ** gen.integers(-30, 30, (4, 3, 11))).astype(dtype)
    xa = to_device(a, backend)
    xp = namespace(xa)
    parts = bj._split_last(xp, xa, (4, 4, 3))
    assert_backend(parts, backend)
    for part, want in zip(parts, (a[..., :4], a[..., 4:8], a[..., 8:])):  # selection by matmul is exact
        assert to_numpy(part).dtype == np.dtype(dtype)
        np.testing.assert_array_equal(to_numpy(part), want)
    with pytest.raises(ValueError, match="sizes"):
        bj._split_last(xp, xa, (4, 4))
    raw = gen.standard_normal((5, 6)).astype(dtype)
    knots = to_numpy(bj._knots(xp, to_device(raw, backend), 2.0, 1e-3))
    sizes = 1e-3 + (1.0 - 6e-3) * np.exp(raw - np.log(np.sum(np.exp(raw), axis=-1, keepdims=True)))
    np.testing.assert_array_equal(knots[:, [0, -1]], [[-2.0, 2.0]] * 5)  # the edges are exact
    np.testing.assert_allclose(knots[:, 1:-1], -2.0 + 4.0 * np.cumsum(sizes[:, :-1], axis=-1),
                               rtol=1e-5 if dtype == "float32" else 1e-12)
    assert np.all(np.diff(knots, axis=-1) > 0) and knots.dtype == np.dtype(dtype)


def test_spline_minimum_bin_size_and_derivative_hold_for_extreme_raw_parameters():
    K = 5
    w = np.array([50.0, -50.0, -50.0, -50.0, -50.0])
    d = np.array([-50.0, 50.0, -50.0, 0.0])
    x = np.linspace(-2.999, 2.999, 101)
    y, ld = rational_quadratic_spline(x, w, w, d, bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3,
                                      min_derivative=1e-3)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(ld))
    back, _ = rational_quadratic_spline(y, w, w, d, bound=3.0, inverse=True)
    np.testing.assert_allclose(back, x, atol=1e-8)
    with pytest.raises(ValueError, match="derivatives"):
        rational_quadratic_spline(x, w, w, d[:2], bound=3.0)
    with pytest.raises(ValueError, match="min_bin_width"):
        bj.RationalQuadraticSpline(2, bins=K, min_bin_width=0.5)


def test_actnorm_init_from_data_standardises_the_batch():
    b = bj.ActNorm(D)
    y = np.random.default_rng(0).normal(loc=[1.0, -2.0, 5.0], scale=[0.5, 3.0, 10.0], size=(500, D))
    p = b.init_from_data(b.init(Rng(0), "float64"), y)
    x, _ = b.inverse(p, y)
    np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(x.std(axis=0), 1.0, atol=1e-5)
    assert p["loc"].dtype == np.float64 and set(p) == {"loc", "log_scale"}


def test_batchnorm_training_uses_batch_statistics_and_update_stats_tracks_them():
    b = bj.BatchNormFlow(D, momentum=0.5)
    p = b.init(Rng(0), "float64")
    assert set(p) == {"log_gamma", "beta"}  # the running statistics are state, not trained params
    s = b.init_state(p)
    assert set(s) == {"running_mean", "running_var"} and s["running_var"].dtype == np.float64
    y = np.random.default_rng(0).normal(loc=3.0, scale=2.0, size=(400, D))
    x_train, ld_train = b.inverse(p, y, training=True)
    np.testing.assert_allclose(x_train.mean(axis=0), 0.0, atol=1e-10)
    np.testing.assert_allclose(x_train.var(axis=0), 1.0, atol=1e-4)
    x_eval, ld_eval = b.inverse(p, y, state=s)  # running stats start at (0, 1): y / sqrt(1 + eps)
    np.testing.assert_allclose(x_eval, y / math.sqrt(1 + 1e-5), rtol=1e-12)
    s2 = b.update_stats(s, y)
    np.testing.assert_allclose(s2["running_mean"], 0.5 * y.mean(axis=0))
    np.testing.assert_allclose(s2["running_var"], 0.5 + 0.5 * y.var(axis=0))
    np.testing.assert_array_equal(s["running_mean"], np.zeros(D))  # pure: the old state is untouched
    s_full = b.update_stats(s, y, momentum=1.0)
    x_full, ld_full = b.inverse(p, y, state=s_full)
    np.testing.assert_allclose(x_full, x_train, atol=1e-10)
    np.testing.assert_allclose(ld_full, ld_train, atol=1e-10)
    # evaluation and the forward direction need the state, and say so
    for call in (lambda: b.inverse(p, y), lambda: b.forward(p, y)):
        with pytest.raises(ValueError, match="state"):
            call()
    # the chain and Invert pass training and state on; the chain's state mirrors its params
    chain = bj.Chain([bj.Identity(), b])
    np.testing.assert_allclose(chain.inverse([{}, p], y, training=True)[0], x_train)
    assert chain.init_state([{}, p])[0] == {} and set(chain.init_state()[1]) == {"running_mean", "running_var"}
    np.testing.assert_allclose(chain.inverse([{}, p], y, state=[{}, s_full])[0], x_train, atol=1e-10)
    x, ld, new = chain.inverse_and_update([{}, p], y, state=[{}, s])
    np.testing.assert_allclose(x, x_train)
    np.testing.assert_allclose(new[1]["running_var"], s2["running_var"])
    inv = bj.Invert(b)
    np.testing.assert_allclose(inv.forward(p, y, state=s_full)[0], x_train, atol=1e-10)
    assert set(inv.init_state(p)) == {"running_mean", "running_var"}


def test_permute_from_rng_is_reproducible_and_checked():
    assert bj.Permute(6, rng=Rng(4)).perm == bj.Permute(6, rng=Rng(4)).perm
    assert sorted(bj.Permute(6, rng=Rng(4)).perm) == list(range(6))
    with pytest.raises(ValueError, match="perm: expected a permutation"):
        bj.Permute([0, 0, 1])
    with pytest.raises(ValueError, match="rng"):
        bj.Permute(4)


def test_lu_linear_weight_has_the_stated_determinant():
    b = bj.LULinear(4)
    p = init64(b)
    W = b.weight(p)
    np.testing.assert_allclose(np.linalg.slogdet(W)[1], p["log_diag"].sum(), rtol=1e-12)
    np.testing.assert_allclose(b.weight(b.init(Rng(0))), np.eye(4))


def test_couplings_leave_the_conditioning_half_unchanged_and_start_at_identity():
    mask = (1, 0, 1, 0)
    for cls in (bj.AdditiveCoupling, bj.AffineCoupling, bj.SplineCoupling):
        b = cls(mask, hidden=(8,))
        x = np.random.default_rng(0).standard_normal((6, 4))
        y, ld = b.forward(init64(b), x)
        np.testing.assert_array_equal(y[:, [0, 2]], x[:, [0, 2]])
        y0, ld0 = b.forward(b.init(Rng(0), "float64"), x)
        np.testing.assert_allclose(y0, x, atol=1e-12)
        np.testing.assert_allclose(ld0, 0.0, atol=1e-12)


def test_coupling_with_a_custom_conditioner():
    from genblocks.blocks.nn import MLP

    cond = MLP((2, 5, 4), activation="tanh")
    b = bj.AffineCoupling((0, 1, 1, 0), conditioner=cond)
    p = init64(b)
    check_bijector(b, p, np.random.default_rng(0).standard_normal((3, 4)))
    assert "conditioner=MLP" in repr(b)


def test_maf_output_i_depends_only_on_earlier_inputs():
    b = bj.MaskedAutoregressive(4, hidden=(16,), order=(3, 1, 0, 2))
    p = init64(b)
    from genblocks.backends import jacobian

    J = jacobian(lambda y: b.inverse(p, y[None])[0][0])(np.random.default_rng(0).standard_normal(4))
    order = np.array(b.order)
    later = order[None, :] > order[:, None]  # J[i, j] with j after i in the order must vanish
    np.testing.assert_array_equal(J[later], 0.0)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="x: expected a last .* of size 3"):
        bj.Affine(3).forward(bj.Affine(3).init(Rng(0)), np.zeros((2, 4), np.float32))
    b = bj.AffineCoupling((1, 0, 1), hidden=(4,), context_dim=2)
    with pytest.raises(ValueError, match="context: this layer is conditional"):
        b.forward(b.init(Rng(0)), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="mask"):
        bj.AffineCoupling((1, 1, 1))
    with pytest.raises(ValueError, match="context_dim"):
        bj.AffineCoupling((1, 0), context_dim=-1)
    with pytest.raises(ValueError, match="bins"):
        bj.SplineCoupling((1, 0), bins=1)
    with pytest.raises(TypeError, match="x: expected a floating array"):
        bj.Tanh().forward({}, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="dtype"):
        bj.Affine(2).init(Rng(0), "int32")


def test_repr_is_readable():
    assert repr(bj.Affine(3)) == "Affine(dim=3)"
    assert repr(bj.Permute([1, 0])) == "Permute(perm=(1, 0))"
    assert "AffineCoupling(mask=(1, 0, 1), hidden=(4,)" in repr(bj.AffineCoupling((1, 0, 1), hidden=(4,)))
    assert repr(bj.InverseAutoregressive(3, hidden=(4,))).startswith("InverseAutoregressive(dim=3")
    assert "Tanh()" in repr(bj.Chain([bj.Tanh()]))


def test_check_bijector_catches_a_wrong_log_det():
    class Wrong(bj.Bijector):
        def forward(self, params, x, context=None):
            return 2.0 * x, np.zeros(x.shape[:-1])  # missing d log 2

        def inverse(self, params, y, context=None):
            return y / 2.0, np.zeros(y.shape[:-1])

    with pytest.raises(AssertionError, match="max_log_det_error"):
        check_bijector(Wrong(), {}, np.ones((2, 3)))

    class NotInverse(bj.Bijector):
        def forward(self, params, x, context=None):
            return x + 1.0, np.zeros(x.shape[:-1])

        def inverse(self, params, y, context=None):
            return y, np.zeros(y.shape[:-1])

    with pytest.raises(AssertionError, match="max_roundtrip_error"):
        check_bijector(NotInverse(), {}, np.ones((2, 3)))

    class Mixing(bj.Bijector):  # couples examples of the batch: not a bijector per example
        def forward(self, params, x, context=None):
            return x + x.mean(axis=0), np.zeros(x.shape[:-1])

        def inverse(self, params, y, context=None):
            return y, np.zeros(y.shape[:-1])

    with pytest.raises(AssertionError, match="cross_example"):
        check_bijector(Mixing(), {}, np.ones((2, 3)))
    with pytest.raises(ValueError, match="x: expected an array"):
        check_bijector(bj.Tanh(), {}, np.ones(3))


def test_spline_gradient_at_bound_agrees_with_log_det():
    """At, just inside and just outside +-bound, autograd's slope equals exp(log_det) (old clip gave 0 at bound)."""
    import autograd
    import numpy as onp

    from genblocks.blocks.bijectors import rational_quadratic_spline

    rng = onp.random.default_rng(0)
    K = 5
    w, h, d = rng.normal(size=K), rng.normal(size=K), rng.normal(size=K - 1)
    for x0 in (3.0, -3.0, 3.0 - 1e-9, -3.0 + 1e-9, 3.0 + 1e-9, -3.0 - 1e-9):
        def f(x):
            return rational_quadratic_spline(x, w, h, d, bound=3.0)[0]
        y, ld = rational_quadratic_spline(onp.array(x0), w, h, d, bound=3.0)
        slope = autograd.grad(f)(onp.array(x0))
        assert abs(slope - onp.exp(ld)) < 1e-6, (x0, slope, onp.exp(ld))
        assert abs(y - x0) < 1e-6


def test_check_bijector_tells_ill_conditioning_from_a_defect():
    """A defective inverse is flagged without a conditioning note; a correct but ill-conditioned flow is
    reported with its Jacobian condition number (old check_bijector reported neither)."""
    import numpy as onp
    import pytest as _pytest
    from conftest import perturb_params

    from genblocks.backends import Rng
    from genblocks.checks import check_bijector
    from genblocks.models.flow import neural_spline_flow

    class Defective:
        def forward(self, params, x, context=None):
            return 2.0 * x, onp.full(x.shape[:-1], x.shape[-1] * onp.log(2.0))

        def inverse(self, params, y, context=None):
            return 0.5 * y + 1e-3, onp.full(y.shape[:-1], -y.shape[-1] * onp.log(2.0))

    x = onp.random.default_rng(0).uniform(-2, 2, size=(6, 3))
    with _pytest.raises(AssertionError) as bad:
        check_bijector(Defective(), {}, x)
    assert "roundtrip" in str(bad.value) and "ill-conditioning" not in str(bad.value)

    m = neural_spline_flow(3)
    p = perturb_params(m.init(Rng(0), dtype="float64")["bijector"], 1, 0.3)
    with _pytest.raises(AssertionError) as ill:
        check_bijector(m.bijector, p, x)
    assert "ill-conditioning" in str(ill.value), str(ill.value)


# -- domains: a clear error outside them, NaN only when validation is off ---------------------------------

OUT_OF_DOMAIN = [  # (bijector, direction, a value outside the domain, domain text)
    (bj.Logit, "forward", 1.5, "[0, 1]"),
    (bj.Logit, "forward", -0.25, "[0, 1]"),
    (bj.Sigmoid, "inverse", 1.5, "[0, 1]"),
    (bj.Exp, "inverse", -1.0, "[0, inf)"),
    (bj.Tanh, "inverse", 1.5, "[-1, 1]"),
    (bj.Tanh, "inverse", -2.0, "[-1, 1]"),
    (bj.Softplus, "inverse", -0.5, "[0, inf)"),
]


@pytest.mark.parametrize("cls,direction,bad,domain", OUT_OF_DOMAIN)
def test_out_of_domain_input_raises_naming_bijector_argument_and_domain(cls, direction, bad, domain, backend):
    x = to_device(np.array([[0.5, bad], [0.25, 0.75]]), backend, dtype="float32")
    arg = "x" if direction == "forward" else "y"
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{direction}: {arg} must lie in {re.escape(domain)}.*"
                                         rf"1 value\(s\) outside it \[{bad!r}\]"):
        getattr(cls(), direction)({}, x)


@pytest.mark.parametrize("cls,direction,bad,domain", OUT_OF_DOMAIN[:1] + OUT_OF_DOMAIN[2:])
def test_out_of_domain_is_checked_under_autograd_and_skipped_when_validation_is_off(cls, direction, bad, domain):
    x = np.array([[0.5, bad]])
    with pytest.raises(ValueError, match="must lie in"):
        grad(lambda v: namespace(v).sum(getattr(cls(), direction)({}, v)[0]))(x)
    with np.errstate(invalid="ignore"):
        y, log_det = getattr(cls(validate_args=False), direction)({}, x)
    assert np.isnan(y[0, 1]) and np.isnan(log_det[0])
    assert repr(cls(validate_args=False)) == f"{cls.__name__}(validate_args=False)"
    assert repr(cls()) == f"{cls.__name__}()"


@pytest.mark.parametrize("cls,direction,edge", [(bj.Logit, "forward", 1.0), (bj.Sigmoid, "inverse", 0.0),
                                                (bj.Exp, "inverse", 0.0), (bj.Tanh, "inverse", -1.0),
                                                (bj.Softplus, "inverse", 0.0)])
def test_domain_boundary_is_allowed_and_nan_passes_through(cls, direction, edge):
    with np.errstate(divide="ignore", invalid="ignore"):
        y, _ = getattr(cls(), direction)({}, np.array([[edge, np.nan]]))
    assert np.isinf(y[0, 0]) and np.isnan(y[0, 1])


# ---------------------------------------------------------------------------------------------------
# float32 accuracy of the spline (issue 10.5)


def test_spline_float32_log_det_matches_float64_in_steep_bins(backend):
    # raw parameters of scale 8 give bins of minimum height next to wide ones and derivatives up to ~20: a
    # point near the top of such a bin used to lose 1 - theta to cancellation in the inverse (0.55 nats of
    # log-det); solving from the nearer knot keeps every point within 0.02 nats of float64 on the same
    # float32 inputs (measured max 0.010 inverse, 0.005 forward over 20000 points)
    g = np.random.default_rng(0)
    n, K = 20000, 8
    raw = [g.normal(0.0, 8.0, (n, K)), g.normal(0.0, 8.0, (n, K)), g.normal(0.0, 8.0, (n, K - 1))]
    x = g.uniform(-3.2, 3.2, n)
    args32 = [a.astype(np.float32) for a in [x] + raw]
    for inverse in (False, True):
        out32, ld32 = rational_quadratic_spline(*to_device(args32, backend), inverse=inverse)
        out64, ld64 = rational_quadratic_spline(*[a.astype(np.float64) for a in args32], inverse=inverse)
        err = np.abs(to_numpy(ld32).astype(np.float64) - ld64)
        assert err.max() < 0.02, (inverse, err.max(), int(err.argmax()))
        assert np.abs(to_numpy(out32) - out64).max() < 0.01


def test_perturbed_spline_flow_is_exact_layer_by_layer_and_only_the_composition_is_ill_conditioned():
    """Issue 10.2: a neural_spline_flow(3) with every parameter perturbed by N(0, 0.3^2) fails its round trip
    as a whole, yet each of its nine layers passes check_bijector alone at float64 tolerance; the chain's
    Jacobian condition number is the product of the layers' (measured 1.6e8 and 1e7 for the first two
    splines, 1.3e18 for the chain) and its round-trip error stays under the floor that conditioning sets."""
    from conftest import perturb_params

    from genblocks.models.flow import neural_spline_flow

    m = neural_spline_flow(3)
    p = perturb_params(m.init(Rng(0), dtype="float64")["bijector"], 1, 0.3)
    x = np.random.default_rng(0).uniform(-2, 2, size=(40, 3))
    h, conds = x, []
    for layer, lp in zip(m.bijector.bijectors, p):
        conds.append(check_bijector(layer, lp, h)["max_jacobian_condition"])  # raises on any defect
        h, _ = layer.forward(lp, h)
    whole = check_bijector(m.bijector, p, x, atol=1e9)  # report only
    assert max(conds) < 1e9 < 1e14 < whole["max_jacobian_condition"]
    assert whole["max_roundtrip_error"] > 1e-8  # the chain does fail at float64 tolerance ...
    assert whole["max_roundtrip_error"] <= whole["roundtrip_error_floor"]  # ... within what conditioning allows
