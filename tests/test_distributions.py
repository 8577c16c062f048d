"""Distributions: scipy agreement, normalisation, moments, gradients, KL, backends, numerics and bad input.

``DISTRIBUTIONS`` maps a name to a constructor ``make(on=identity)`` (callable with zero arguments) that
builds a float64 distribution from host parameters moved by ``on``; every entry gets the batteries
below (normalisation, sample moments, backends, dtypes and shapes) for free.
"""

import math
import warnings

import autograd.numpy as anp
import numpy as np
import pytest
import scipy.special as sp
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate
from scipy import stats as ss

from genblocks.backends import Rng, backend_of, to_device, to_numpy
from genblocks.blocks.distributions import (
    Bernoulli,
    Categorical,
    DiscretizedLogisticMixture,
    Independent,
    Laplace,
    Logistic,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    Uniform,
    kl,
    kl_mc,
    register_kl,
)
from genblocks.checks import check_normalized


def _id(tree):
    return tree


def _a(*values):
    return np.array(values, dtype=np.float64)


L2 = np.array([[1.2, 0.0], [0.7, 0.5]])
L2B = np.array([[0.6, 0.0], [-0.4, 0.9]])

DISTRIBUTIONS = {
    "normal": lambda on=_id: Normal(*on([_a(0.3, -1.0, 2.0), _a(0.5, 2.0, 0.1)])),
    "logistic": lambda on=_id: Logistic(*on([_a(0.3, -1.0, 2.0), _a(0.5, 2.0, 0.1)])),
    "laplace": lambda on=_id: Laplace(*on([_a(0.3, -1.0, 2.0), _a(0.5, 2.0, 0.1)])),
    "uniform": lambda on=_id: Uniform(*on([_a(-1.0, 0.0, 2.0), _a(1.0, 0.5, 5.0)])),
    "bernoulli": lambda on=_id: Bernoulli(on(_a(-2.0, 0.0, 3.0))),
    "categorical": lambda on=_id: Categorical(on(np.array([[0.0, 1.0, 2.0, -1.0], [3.0, 0.0, 0.0, 0.0]]))),
    "mvn": lambda on=_id: MultivariateNormal(*on([_a(1.0, -1.0), L2])),
    "independent_normal": lambda on=_id: Independent(
        Normal(*on([np.array([[0.0, 1.0], [2.0, 3.0]]), np.array([[1.0, 0.5], [2.0, 0.3]])])), 1),
    "mixture_1d": lambda on=_id: MixtureSameFamily(
        on(_a(0.0, 1.0, -1.0)), Normal(*on([_a(-2.0, 0.0, 3.0), _a(0.5, 1.0, 0.7)]))),
    "mixture_mvn_2d": lambda on=_id: MixtureSameFamily(
        on(_a(0.0, 0.5)), MultivariateNormal(*on([np.array([[0.0, 0.0], [3.0, 1.0]]), np.stack([L2, L2B])]))),
    "mixture_diag_2d": lambda on=_id: MixtureSameFamily(
        on(_a(0.2, -0.3, 0.0)), Independent(Normal(*on([
            np.array([[-2.0, 0.0], [1.0, 1.0], [2.0, -2.0]]), np.array([[0.5, 1.0], [0.8, 0.3], [1.0, 0.6]])])), 1)),
    "dlm": lambda on=_id: DiscretizedLogisticMixture(*on([
        np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.0]]), np.array([[-0.5, 0.0, 0.9], [-0.99, 0.2, 1.0]]),
        np.array([[-3.0, -2.0, -4.0], [-6.0, -1.0, -5.0]])]), num_bins=256),
}

# How to integrate each entry: ("1d", low, high), ("2d", low, high) or ("discrete", low, high); bounds
# for the discrete ones go past the support, which must add nothing.
SUPPORTS = {
    "normal": ("1d", -math.inf, math.inf), "logistic": ("1d", -math.inf, math.inf),
    "laplace": ("1d", -math.inf, math.inf), "uniform": ("1d", None, None),
    "bernoulli": ("discrete", -2, 3), "categorical": ("discrete", -2, 5),
    "mvn": ("2d", (-9.0, -8.0), (11.0, 6.0)), "independent_normal": ("2d", (-12.0, -4.0), (16.0, 7.0)),
    "mixture_1d": ("1d", -math.inf, math.inf), "mixture_mvn_2d": ("2d", (-8.0, -7.0), (9.0, 8.0)),
    "mixture_diag_2d": ("2d", (-7.0, -6.0), (8.0, 6.0)), "dlm": ("discrete", -3, 258),
}


def _batch_slices(d, j):
    """log_prob_fn for batch element j of d: points (m,) or (m, 2) -> (m,)."""
    nb = len(d.batch_shape)

    def fn(points):
        pts = points.reshape(points.shape[:1] + (1,) * nb + points.shape[1:])
        lp = to_numpy(d.log_prob(pts)).reshape(points.shape[0], -1)
        return lp[:, j]

    return fn


# ---------------------------------------------------------------------------------------------------
# Normalisation (genblocks.checks.check_normalized)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_normalised(name):
    d = DISTRIBUTIONS[name]()
    kind, low, high = SUPPORTS[name]
    for j in range(max(1, math.prod(d.batch_shape))):
        fn = _batch_slices(d, j)
        if kind == "discrete":
            total = check_normalized(fn, low, high, discrete=True, atol=1e-12)
        elif name == "uniform":  # breakpoints at the edges, or quad can step over a narrow box
            lo, hi = to_numpy(d.low)[j], to_numpy(d.high)[j]
            total = check_normalized(fn, lo - 1.0, hi + 1.0, points=(lo, hi), atol=1e-8)
        elif kind == "1d":
            total = check_normalized(fn, low, high, atol=1e-8)
        else:
            total = check_normalized(fn, low, high, n=400, atol=1e-6)
        assert abs(total - 1.0) < 1e-6


def test_check_normalized_catches_bad_densities_and_bad_arguments():
    half = Normal(_a(0.0), _a(1.0))
    with pytest.raises(AssertionError, match="differs from 1"):
        check_normalized(lambda t: half.log_prob(t) + math.log(0.5), -math.inf, math.inf)
    with pytest.raises(AssertionError, match="differs from 1"):
        check_normalized(lambda t: half.log_prob(t), -1.0, 1.0)  # mass outside the box is missing
    with pytest.raises(AssertionError, match="differs from 1"):
        check_normalized(lambda p: np.zeros(p.shape[0]) - 1.0, (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(AssertionError, match="NaN"):
        check_normalized(lambda t: np.full(t.shape, np.nan), 0.0, 1.0)
    with pytest.raises(ValueError, match="low, high"):
        check_normalized(lambda t: t, 1.0, 0.0)
    with pytest.raises(ValueError, match="low, high"):
        check_normalized(lambda t: t, (0.0, 0.0), 1.0)
    with pytest.raises(ValueError, match="finite bounds"):
        check_normalized(lambda t: t, (0.0, -math.inf), (1.0, 1.0))
    with pytest.raises(ValueError, match="log_prob_fn: expected shape"):
        check_normalized(lambda p: np.zeros((p.shape[0], 2)), (0.0, 0.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="discrete"):
        check_normalized(lambda p: p, (0.0, 0.0), (1.0, 1.0), discrete=True)
    with pytest.raises(ValueError, match="points"):
        check_normalized(lambda t: half.log_prob(t), -math.inf, math.inf, points=(0.0,))
    # the uniform square: exactly 1 by the grid, on the strict backend too
    assert check_normalized(lambda p: p[:, 0] * 0.0, (0.0, 0.0), (1.0, 1.0), backend="strict") == pytest.approx(1.0)


def test_dlm_bins_sum_to_one_for_extreme_parameters():
    loc = np.array([[-1.0, 1.0, 0.0, 5.0, -0.3]])
    log_scale = np.array([[-7.0, -7.0, 3.0, -1.0, -12.0]])
    for bins in (2, 8, 256):
        d = DiscretizedLogisticMixture(np.zeros((5, 1)), loc.T, log_scale.T, num_bins=bins)
        lp = to_numpy(d.log_prob(np.arange(bins, dtype=np.float64)[:, None]))
        assert np.all(np.isfinite(lp) | (lp == -np.inf)) and not np.any(np.isnan(lp))
        np.testing.assert_allclose(np.exp(lp).sum(axis=0), 1.0, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# scipy agreement (hypothesis, float64 over wide ranges; float32 at float32 tolerance)

locs = st.floats(-1e3, 1e3)
log_scales = st.floats(math.log(1e-3), math.log(1e3))
zs = st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=5)

SCALAR = {
    "normal": (Normal, ss.norm, 1e-12),
    "logistic": (Logistic, ss.logistic, 1e-12),
    "laplace": (Laplace, ss.laplace, 1e-12),
}


def _close(ours, ref, rtol, atol=0.0):
    np.testing.assert_allclose(to_numpy(ours), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("family", sorted(SCALAR))
@given(loc=locs, log_scale=log_scales, z=zs)
def test_scalar_families_match_scipy(family, loc, log_scale, z):
    cls, ref, rtol = SCALAR[family]
    scale = math.exp(log_scale)
    x = loc + scale * np.array(z)
    d, r = cls(_a(loc), _a(scale)), ref(loc, scale)
    _close(d.log_prob(x), r.logpdf(x), rtol=1e-10, atol=1e-10)
    _close(d.entropy(), r.entropy(), rtol=1e-10, atol=1e-12)
    _close(d.mean, r.mean(), rtol=rtol, atol=1e-12)
    _close(d.variance, r.var(), rtol=1e-10)


@given(low=st.floats(-1e3, 1e3), log_width=log_scales, u=st.lists(st.floats(-0.5, 1.5), min_size=1, max_size=5))
def test_uniform_matches_scipy(low, log_width, u):
    width = math.exp(log_width)
    high = low + width
    x = low + width * np.array(u)
    d, r = Uniform(_a(low), _a(high)), ss.uniform(low, high - low)
    _close(d.log_prob(x), r.logpdf(x), rtol=1e-10)
    _close(d.entropy(), r.entropy(), rtol=1e-9, atol=1e-12)
    _close(d.mean, r.mean(), rtol=1e-12, atol=1e-12)
    _close(d.variance, r.var(), rtol=1e-9)


@given(logit=st.floats(-15.0, 15.0))
def test_bernoulli_matches_scipy(logit):
    p = sp.expit(logit)
    d, r = Bernoulli(_a(logit)), ss.bernoulli(p)
    _close(d.log_prob(_a(0.0, 1.0)), r.logpmf([0, 1]), rtol=1e-9)
    _close(d.entropy(), r.entropy(), rtol=1e-7, atol=1e-13)
    _close(d.mean, r.mean(), rtol=1e-12)
    _close(d.variance, r.var(), rtol=1e-7, atol=1e-16)


@given(logits=st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=7))
def test_categorical_matches_scipy(logits):
    logits = np.array(logits)
    k = np.arange(len(logits))
    p = sp.softmax(logits)
    d, r = Categorical(logits), ss.rv_discrete(values=(k, p))
    _close(d.log_prob(k), sp.log_softmax(logits), rtol=1e-12, atol=1e-12)
    _close(d.entropy(), ss.entropy(p), rtol=1e-9, atol=1e-12)
    _close(d.mean, r.mean(), rtol=1e-9, atol=1e-12)
    _close(d.variance, r.var(), rtol=1e-7, atol=1e-10)


@given(d=st.integers(1, 5), seed=st.integers(0, 2**31), spread=st.floats(0.0, 3.0))
def test_mvn_matches_scipy(d, seed, spread):
    rs = np.random.default_rng(seed)
    L = np.tril(rs.normal(size=(d, d)), -1) + np.diag(np.exp(rs.uniform(-spread, spread, size=d)))
    loc = rs.normal(size=d) * 10
    x = loc + (rs.normal(size=(6, d)) * 3) @ L.T
    ours, ref = MultivariateNormal(loc, L), ss.multivariate_normal(loc, L @ L.T)
    _close(ours.log_prob(x), ref.logpdf(x), rtol=1e-8, atol=1e-8)
    _close(ours.entropy(), ref.entropy(), rtol=1e-9, atol=1e-10)
    _close(ours.mean, loc, rtol=1e-15)
    _close(ours.variance, np.diag(L @ L.T), rtol=1e-12)
    _close(ours.covariance_matrix, L @ L.T, rtol=1e-12)
    batched = MultivariateNormal(np.stack([loc, -loc]), np.stack([L, 2.0 * L]))  # the batched solve path
    want = np.stack([ref.logpdf(x), ss.multivariate_normal(-loc, 4.0 * L @ L.T).logpdf(x)], axis=-1)
    _close(batched.log_prob(x[:, None, :]), want, rtol=1e-8, atol=1e-8)
    by_cov = MultivariateNormal(loc, covariance_matrix=L @ L.T)
    _close(by_cov.log_prob(x), ref.logpdf(x), rtol=1e-7, atol=1e-7)
    if spread <= 1.0:  # float32 at float32 tolerance, on the float32-rounded inputs
        loc32, L32, x32 = loc.astype(np.float32), L.astype(np.float32), x.astype(np.float32)
        out = MultivariateNormal(loc32, L32).log_prob(x32)
        ref32 = ss.multivariate_normal(loc32.astype(np.float64), L32.astype(np.float64) @ L32.T.astype(np.float64))
        assert out.dtype == np.float32
        _close(out, ref32.logpdf(x32.astype(np.float64)), rtol=1e-4, atol=1e-4)


@given(seed=st.integers(0, 2**31), k=st.integers(1, 4))
def test_independent_and_mixture_match_scipy(seed, k):
    rs = np.random.default_rng(seed)
    loc, scale, logits = rs.normal(size=(k, 3)) * 3, np.exp(rs.normal(size=(k, 3))), rs.normal(size=k) * 2
    x = rs.normal(size=(5, 3)) * 4
    ind = Independent(Normal(loc, scale), 1)
    ref = ss.norm(loc, scale).logpdf(x[:, None, :]).sum(-1)  # (5, k)
    _close(ind.log_prob(x[:, None, :]), ref, rtol=1e-10)
    _close(ind.entropy(), ss.norm(loc, scale).entropy().sum(-1), rtol=1e-10)
    mix = MixtureSameFamily(logits, ind)
    _close(mix.log_prob(x), sp.logsumexp(ref + sp.log_softmax(logits), axis=-1), rtol=1e-10, atol=1e-12)


def test_mixture_1d_moments_by_quadrature():
    d = DISTRIBUTIONS["mixture_1d"]()
    dens = lambda t: math.exp(float(to_numpy(d.log_prob(_a(t)))[0]))
    mean = integrate.quad(lambda t: t * dens(t), -np.inf, np.inf)[0]
    var = integrate.quad(lambda t: (t - mean) ** 2 * dens(t), -np.inf, np.inf)[0]
    _close(d.mean, mean, rtol=1e-8)
    _close(d.variance, var, rtol=1e-8)


def test_dlm_matches_logistic_cdf_differences():
    rs = np.random.default_rng(0)
    logit_probs, loc, log_scale = rs.normal(size=(4, 3)), rs.uniform(-1, 1, size=(4, 3)), rs.uniform(-3, 0, (4, 3))
    d = DiscretizedLogisticMixture(logit_probs, loc, log_scale, num_bins=16)
    x = np.arange(16.0)[:, None, None]
    y, h = 2 * x / 15 - 1, 1 / 15
    cdf = lambda t: ss.logistic.cdf(t, loc, np.exp(log_scale))
    mass = np.where(x == 0, cdf(y + h), np.where(x == 15, 1 - cdf(y - h), cdf(y + h) - cdf(y - h)))
    ref = np.log((mass * sp.softmax(logit_probs, axis=-1)).sum(-1))
    _close(d.log_prob(x[..., 0]), ref, rtol=1e-9)
    p = np.exp(ref)
    _close(d.mean, (p * x[..., 0]).sum(0), rtol=1e-9)
    _close(d.entropy(), -(p * ref).sum(0), rtol=1e-9)


F32 = {"normal": (Normal, ss.norm), "logistic": (Logistic, ss.logistic), "laplace": (Laplace, ss.laplace)}


@pytest.mark.parametrize("family", sorted(F32))
@given(loc=st.floats(-100, 100), log_scale=st.floats(math.log(1e-2), math.log(1e2)),
       z=st.lists(st.floats(-10.0, 10.0), min_size=1, max_size=5))
def test_float32_matches_scipy_at_float32_tolerance(family, loc, log_scale, z):
    cls, ref = F32[family]
    loc32, scale32 = np.float32(loc), np.float32(math.exp(log_scale))
    x32 = (loc32 + scale32 * np.array(z, dtype=np.float32)).astype(np.float32)
    d = cls(np.array(loc32), np.array(scale32))
    out = d.log_prob(x32)
    assert out.dtype == np.float32 and d.entropy().dtype == np.float32
    r = ref(np.float64(loc32), np.float64(scale32))
    _close(out, r.logpdf(x32.astype(np.float64)), rtol=2e-5, atol=2e-5)
    _close(d.entropy(), r.entropy(), rtol=2e-5, atol=2e-5)


@given(logits=st.lists(st.floats(-30.0, 30.0), min_size=2, max_size=6))
def test_float32_discrete_match_scipy(logits):
    lg = np.array(logits, dtype=np.float32)
    c = Categorical(lg)
    ref = sp.log_softmax(lg.astype(np.float64))
    out = c.log_prob(np.arange(len(logits)))
    assert out.dtype == np.float32
    _close(out, ref, rtol=1e-5, atol=1e-4)
    b = Bernoulli(lg)
    _close(b.log_prob(np.ones_like(lg)), sp.log_expit(lg.astype(np.float64)), rtol=1e-5, atol=1e-6)
    _close(b.log_prob(np.zeros_like(lg)), sp.log_expit(-lg.astype(np.float64)), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Sample moments within standard-error bounds (fixed seeds)


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_sample_moments_match_mean_and_variance(name):
    d = DISTRIBUTIONS[name]()
    n = 20000
    x = to_numpy(d.sample(Rng(7), (n,))).astype(np.float64)
    assert x.shape == (n,) + d.batch_shape + d.event_shape
    mean, var = to_numpy(d.mean), to_numpy(d.variance)
    se_mean = np.sqrt(var / n)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean + 1e-12), (x.mean(0), mean)
    sq = (x - mean) ** 2
    se_var = np.sqrt(sq.var(0) / n)
    assert np.all(np.abs(sq.mean(0) - var) < 5 * se_var + 1e-12), (sq.mean(0), var)


CDFS = {
    "normal": lambda d: ss.norm(to_numpy(d.loc), to_numpy(d.scale)).cdf,
    "logistic": lambda d: ss.logistic(to_numpy(d.loc), to_numpy(d.scale)).cdf,
    "laplace": lambda d: ss.laplace(to_numpy(d.loc), to_numpy(d.scale)).cdf,
    "uniform": lambda d: ss.uniform(to_numpy(d.low), to_numpy(d.high - d.low)).cdf,
    "mixture_1d": lambda d: lambda x: (sp.softmax(to_numpy(d.mixture_logits)) * ss.norm(
        to_numpy(d.component.loc), to_numpy(d.component.scale)).cdf(x[..., None])).sum(-1),
}


@pytest.mark.parametrize("name", sorted(CDFS))
def test_samples_pass_a_kolmogorov_smirnov_test(name):
    # the largest gap between the empirical and the exact CDF stays below the 0.1% critical value
    d = DISTRIBUTIONS[name]()
    n = 100000
    x = np.sort(to_numpy(d.sample(Rng(13), (n,))), axis=0)
    cdf = CDFS[name](d)(x)
    upper = np.arange(1, n + 1)[(...,) + (None,) * (x.ndim - 1)] / n
    gap = np.maximum(np.abs(upper - cdf), np.abs(upper - 1.0 / n - cdf)).max(axis=0)
    assert np.all(gap < 1.95 / math.sqrt(n)), gap


def test_samples_follow_the_density_and_support():
    # a chi-square-free check that draws land where the density says: compare bin frequencies
    d = DISTRIBUTIONS["categorical"]()
    x = to_numpy(d.sample(Rng(1), (40000,)))
    assert x.dtype == np.int64 and x.min() >= 0 and x.max() <= 3
    p = np.exp(to_numpy(d.logits))
    freq = np.stack([(x == k).mean(0) for k in range(4)], axis=-1)
    assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / 40000) + 1e-12)
    u = to_numpy(DISTRIBUTIONS["uniform"]().sample(Rng(2), (1000,)))
    assert np.all(u >= _a(-1.0, 0.0, 2.0)) and np.all(u < _a(1.0, 0.5, 5.0))
    px = to_numpy(DISTRIBUTIONS["dlm"]().sample(Rng(3), (1000,)))
    assert np.all(px == np.round(px)) and px.min() >= 0 and px.max() <= 255


# ---------------------------------------------------------------------------------------------------
# Gradients (float64, against finite differences)


def _tril3(log_diag, off):
    """A 3x3 lower-triangular matrix with diagonal exp(log_diag) and off-diagonal entries off."""
    e, z = anp.exp(log_diag), 0.0 * off[0]
    return anp.stack([anp.stack([e[0], z, z]), anp.stack([off[0], e[1], z]), anp.stack([off[1], off[2], e[2]])])


RSAMPLE = {
    "normal": lambda v: Normal(v[0], anp.exp(v[1])),
    "logistic": lambda v: Logistic(v[0], anp.exp(v[1])),
    "laplace": lambda v: Laplace(v[0], anp.exp(v[1])),
    "uniform": lambda v: Uniform(v[0], v[0] + anp.exp(v[1])),
    "independent_normal": lambda v: Independent(Normal(v[0], anp.exp(v[1])), 1),
    "mvn": lambda v: MultivariateNormal(v[0], _tril3(0.5 * v[0], v[1])),
}


@pytest.mark.parametrize("name", sorted(RSAMPLE))
def test_rsample_gradients_match_finite_differences(name):
    v0 = np.random.default_rng(0).normal(size=(2, 3)) * 0.5

    def loss(v):
        x = RSAMPLE[name](v).rsample(Rng(11), (4,))
        return anp.sum(anp.sin(x) + x * x)

    check_grads(loss, modes=["rev"], order=1)(v0)


LOGPROB_PARAMS = {
    **RSAMPLE,
    "bernoulli": lambda v: Bernoulli(v[0] * 3),
    "categorical": lambda v: Categorical(anp.reshape(v, (3, 2))),
    "mixture": lambda v: MixtureSameFamily(v[0], Normal(v[1], anp.exp(v[0]))),
    "mixture_mvn": lambda v: MixtureSameFamily(v[0, :2], MultivariateNormal(
        anp.stack([v[1, :2], v[0, 1:]]), _tril3(v[1], v[0])[1:, 1:])),
    "dlm": lambda v: DiscretizedLogisticMixture(v[0], v[1] * 0.3, v[0] - 2.0, num_bins=8),
}

POINTS = {
    "bernoulli": np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), "categorical": np.array([[0, 1, 1], [1, 0, 1]]),
    "dlm": np.array([[0.0], [3.0], [7.0]]), "mvn": np.array([[0.3, -0.2, 1.0], [1.5, 0.1, -0.7]]),
    "mixture_mvn": np.array([[0.3, -0.2], [1.5, 0.1]]), "uniform": np.array([[0.3, 0.6, 0.5], [0.4, 1.0, 1.0]]),
}


@pytest.mark.parametrize("name", sorted(LOGPROB_PARAMS))
def test_log_prob_gradients_in_parameters_and_x(name):
    v0 = np.random.default_rng(1).normal(size=(2, 3)) * 0.5
    x = POINTS.get(name, np.array([[0.3, -0.2, 1.0], [1.5, 0.1, -0.7]]))
    if name == "mixture":
        x = x[..., None]
    check_grads(lambda v: anp.sum(LOGPROB_PARAMS[name](v).log_prob(x)), modes=["rev"], order=1)(v0)
    if name not in ("bernoulli", "categorical", "dlm", "uniform"):
        d = LOGPROB_PARAMS[name](v0)
        check_grads(lambda x: anp.sum(d.log_prob(x)), modes=["rev"], order=1)(x)


@pytest.mark.parametrize("name", ["normal", "logistic", "laplace", "uniform", "bernoulli", "categorical", "mvn"])
def test_entropy_and_moment_gradients(name):
    v0 = np.random.default_rng(2).normal(size=(2, 3)) * 0.5
    check_grads(lambda v: anp.sum(LOGPROB_PARAMS[name](v).entropy()), modes=["rev"], order=1)(v0)
    check_grads(lambda v: anp.sum(LOGPROB_PARAMS[name](v).variance), modes=["rev"], order=1)(v0)


@pytest.mark.parametrize("name", sorted(LOGPROB_PARAMS))
def test_float32_parameters_get_float32_gradients(name):
    v0 = (np.random.default_rng(3).normal(size=(2, 3)) * 0.5).astype(np.float32)
    x = POINTS.get(name, np.array([[0.3, -0.2, 1.0], [1.5, 0.1, -0.7]])).astype(np.float32)
    if name == "mixture":
        x = x[..., None]
    if name in ("categorical",):
        x = x.astype(np.int64)
    losses = [lambda v: anp.sum(LOGPROB_PARAMS[name](v).log_prob(x))]
    if name not in ("mixture", "mixture_mvn", "dlm"):
        losses.append(lambda v: anp.sum(LOGPROB_PARAMS[name](v).entropy()))
    for loss in losses:
        assert np.asarray(loss(v0)).dtype == np.float32
        assert grad(loss)(v0).dtype == np.float32


def test_float32_kl_gradients():
    v0 = (np.random.default_rng(4).normal(size=(2, 3)) * 0.5).astype(np.float32)
    assert grad(lambda v: anp.sum(kl(Bernoulli(v), Bernoulli(-v))))(v0).dtype == np.float32
    assert grad(lambda v: anp.sum(kl(Categorical(v), Categorical(-v))))(v0).dtype == np.float32
    assert grad(lambda v: anp.sum(kl(Normal(v[0], anp.exp(v[1])), Normal(0.0, 1.0))))(v0).dtype == np.float32


def test_gradients_stay_finite_at_extreme_logits():
    lg = _a(-1e4, -50.0, 0.0, 50.0, 1e4)
    x = _a(1.0, 0.0, 1.0, 0.0, 0.0)
    for f in (lambda l: anp.sum(Bernoulli(l).log_prob(x)), lambda l: anp.sum(Bernoulli(l).entropy()),
              lambda l: anp.sum(kl(Bernoulli(l), Bernoulli(-l))),
              lambda l: anp.sum(Categorical(l).log_prob(_a(0.0, 4.0))), lambda l: Categorical(l).entropy(),
              lambda l: kl(Categorical(l), Categorical(l[::-1]))):
        value, g = f(lg), grad(f)(lg)
        assert np.isfinite(value) and np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------------------
# KL divergence


def _kl_pairs():
    L3 = np.array([[1.0, 0.0, 0.0], [0.5, 0.7, 0.0], [-0.3, 0.2, 1.4]])
    L3b = np.array([[0.8, 0.0, 0.0], [-0.2, 1.1, 0.0], [0.1, 0.4, 0.6]])
    return {
        "normal": (Normal(_a(0.0, 1.0), _a(1.0, 0.5)), Normal(_a(0.5, -1.0), _a(2.0, 0.7))),
        "independent": (Independent(Normal(_a(0.0, 1.0), _a(1.0, 0.5)), 1),
                        Independent(Normal(_a(0.5, -1.0), _a(2.0, 0.7)), 1)),
        "mvn": (MultivariateNormal(_a(0.0, 1.0, -1.0), L3), MultivariateNormal(_a(0.5, 0.0, 0.0), L3b)),
        "bernoulli": (Bernoulli(_a(-1.0, 0.5, 3.0)), Bernoulli(_a(0.5, 2.0, -1.0))),
        "categorical": (Categorical(np.array([[0.0, 1.0, 2.0], [1.0, -1.0, 0.0]])),
                        Categorical(np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 2.0]]))),
    }


@pytest.mark.parametrize("pair", ["normal", "independent", "mvn", "bernoulli", "categorical"])
def test_kl_closed_form_matches_monte_carlo(pair):
    p, q = _kl_pairs()[pair]
    exact = to_numpy(kl(p, q))
    n = 40000
    x = p.sample(Rng(5), (n,))
    ratio = to_numpy(p.log_prob(x) - q.log_prob(x))
    se = ratio.std(0) / math.sqrt(n)
    assert exact.shape == p.batch_shape
    assert np.all(np.abs(ratio.mean(0) - exact) < 5 * se + 1e-12), (ratio.mean(0), exact)
    np.testing.assert_allclose(to_numpy(kl_mc(p, q, Rng(5), n)), ratio.mean(0), rtol=1e-12)
    np.testing.assert_allclose(to_numpy(kl(p, p)), 0.0, atol=1e-12)


@given(m1=st.floats(-50, 50), m2=st.floats(-50, 50), s1=log_scales, s2=log_scales)
def test_kl_normal_matches_the_mvn_formula_and_is_nonnegative(m1, m2, s1, s2):
    p, q = Normal(_a(m1), _a(math.exp(s1))), Normal(_a(m2), _a(math.exp(s2)))
    value = to_numpy(kl(p, q))
    assert np.all(value >= -1e-12)
    ref = kl(MultivariateNormal(_a(m1), np.array([[math.exp(s1)]])),
             MultivariateNormal(_a(m2), np.array([[math.exp(s2)]])))
    np.testing.assert_allclose(value, to_numpy(ref), rtol=1e-9, atol=1e-12)


def test_kl_unknown_pair_says_what_to_do_and_register_kl_adds_one():
    with pytest.raises(NotImplementedError, match=r"KL\(Laplace \|\| Normal\).*kl_mc\(p, q, rng, n\)"):
        kl(Laplace(_a(0.0), _a(1.0)), Normal(_a(0.0), _a(1.0)))

    class MyLaplace(Laplace):
        pass

    @register_kl(MyLaplace, MyLaplace)
    def _kl(p, q):
        return q.loc - p.loc

    assert to_numpy(kl(MyLaplace(_a(1.0), _a(1.0)), MyLaplace(_a(3.0), _a(1.0))))[0] == 2.0
    assert to_numpy(kl(MyLaplace(_a(0.0), _a(1.0)), MyLaplace(_a(0.0), _a(1.0))))[0] == 0.0
    with pytest.raises(TypeError, match="type_p"):
        register_kl(int, Normal)
    with pytest.raises(ValueError, match=r"q: expected event_shape \(2,\)"):
        kl(Independent(Normal(np.zeros((2, 2)), 1.0), 1), Independent(Normal(np.zeros((2, 2)), 1.0), 2))
    with pytest.raises(ValueError, match="n: expected a positive int"):
        kl_mc(Normal(_a(0.0), _a(1.0)), Normal(_a(0.0), _a(1.0)), Rng(0), 0)


# ---------------------------------------------------------------------------------------------------
# Backends: every forward path returns arrays of that backend equal to numpy's


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_backends_agree_with_numpy(name, backend, on):
    ref, d = DISTRIBUTIONS[name](), DISTRIBUTIONS[name](on)
    assert (d.batch_shape, d.event_shape) == (ref.batch_shape, ref.event_shape)
    x = to_numpy(ref.sample(Rng(0), (3,)))
    outs = {"log_prob": (d.log_prob(on(x)), ref.log_prob(x)), "mean": (d.mean, ref.mean),
            "variance": (d.variance, ref.variance)}
    if not isinstance(ref, MixtureSameFamily):
        outs["entropy"] = (d.entropy(), ref.entropy())
    for what, (ours, want) in outs.items():
        assert backend_of(ours) == backend, what
        np.testing.assert_allclose(to_numpy(ours), to_numpy(want), rtol=1e-10, atol=1e-12, err_msg=what)
    s = d.sample(Rng(0, backend), (3,))
    assert backend_of(s) == backend and s.shape == x.shape
    if backend == "strict":  # strict draws the numpy numbers
        np.testing.assert_allclose(to_numpy(s), x, rtol=1e-12)
    if d.has_rsample:
        r = d.rsample(Rng(0, backend), (2,))
        assert backend_of(r) == backend and r.shape == (2,) + d.batch_shape + d.event_shape
    assert kl_pairs_on(backend, on)


def kl_pairs_on(backend, on):
    for name, (p, q) in _kl_pairs().items():
        if isinstance(p, Independent):
            continue
        params = lambda d: [getattr(d, k) for k in d._param_names]
        pb = type(p)(*on(to_numpy(params(p))))
        qb = type(q)(*on(to_numpy(params(q))))
        out = kl(pb, qb)
        assert backend_of(out) == backend
        np.testing.assert_allclose(to_numpy(out), to_numpy(kl(p, q)), rtol=1e-10, atol=1e-12)
    return True


def test_more_paths_on_backends(backend, on):
    cov = L2 @ L2.T
    m, ref = MultivariateNormal(*on([_a(1.0, -1.0)]), covariance_matrix=on(cov)), MultivariateNormal(_a(1.0, -1.0), L2)
    x = np.array([[0.5, 0.2], [-1.0, 3.0]])
    assert backend_of(m.log_prob(on(x))) == backend
    np.testing.assert_allclose(to_numpy(m.log_prob(on(x))), ref.log_prob(x), rtol=1e-10)
    batched = MultivariateNormal(*on([np.zeros((3, 2)), np.stack([L2, L2B, L2])]))
    assert to_numpy(batched.log_prob(on(x[:, None, :]))).shape == (2, 3)
    d = DISTRIBUTIONS["dlm"](on)
    pixels = on(np.array([[0, 255], [17, 128]], dtype=np.int64))
    np.testing.assert_allclose(to_numpy(d.log_prob(pixels)), to_numpy(DISTRIBUTIONS["dlm"]().log_prob(
        np.array([[0, 255], [17, 128]]))), rtol=1e-12)
    c = Categorical(*on([np.log(np.array([0.2, 0.3, 0.5]))]))
    np.testing.assert_allclose(to_numpy(c.log_prob(on(np.array([0, 1, 2, 3])))), [*np.log([0.2, 0.3, 0.5]), -np.inf])
    assert repr(Normal(*on([_a(0.0), _a(1.0)]))).startswith("Normal(loc=[0.0], scale=[1.0]")


def test_rng_on_another_backend_is_a_clear_error():
    d = DISTRIBUTIONS["normal"](lambda t: to_device(t, "strict"))
    with pytest.raises(ValueError, match="rng: expected a genblocks Rng on the parameters' backend 'strict'"):
        d.sample(Rng(0, "numpy"))
    with pytest.raises(TypeError, match="to_device"):
        d.log_prob(np.zeros(3))


# ---------------------------------------------------------------------------------------------------
# Shapes, dtypes, broadcasting, repr


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_shapes_and_dtypes(name, dtype):
    d = DISTRIBUTIONS[name](lambda t: to_device(t, "numpy", dtype=dtype))
    assert isinstance(d.batch_shape, tuple) and isinstance(d.event_shape, tuple)
    for sample_shape in ((), 5, (2, 3)):
        s = d.sample(Rng(0), sample_shape)
        sample_shape = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
        assert s.shape == sample_shape + d.batch_shape + d.event_shape
        assert s.dtype == (np.int64 if isinstance(d, Categorical) else np.dtype(dtype))
        lp = d.log_prob(s)
        assert lp.shape == sample_shape + d.batch_shape and lp.dtype == np.dtype(dtype)
        assert np.all(np.isfinite(lp))
    for value in (d.mean, d.variance):
        assert value.shape == d.batch_shape + d.event_shape and value.dtype == np.dtype(dtype)
    if not isinstance(d, MixtureSameFamily):
        assert d.entropy().shape == d.batch_shape and d.entropy().dtype == np.dtype(dtype)
    text = repr(d)
    assert text.startswith(type(d).__name__ + "(") and "batch_shape" in text


def test_parameters_broadcast_and_numbers_are_accepted():
    d = Normal(np.zeros((4, 1)), np.ones(3))
    assert d.batch_shape == (4, 3) and d.mean.shape == (4, 3)
    assert Normal(0.0, 1.0).dtype == np.float32 and Normal(0.0, 1.0).batch_shape == ()
    assert Normal(np.zeros(2, dtype=np.float64), 1).dtype == np.float64
    assert Normal(np.zeros(2, dtype=np.float32), np.ones(2)).dtype == np.float64  # promotes like numpy
    m = MultivariateNormal(np.zeros((5, 1, 2)), np.stack([L2, L2B]))
    assert m.batch_shape == (5, 2) and m.log_prob(np.zeros(2)).shape == (5, 2)
    assert m.rsample(Rng(0), 3).shape == (3, 5, 2, 2)
    mix = MixtureSameFamily(np.zeros((4, 3)), Normal(np.zeros(3), 1.0))
    assert mix.batch_shape == (4,) and mix.sample(Rng(0), 2).shape == (2, 4)
    assert not np.any(mix.sample(Rng(0), 2)[:, 0] == mix.sample(Rng(0), 2)[:, 1])  # independent across batch
    odd = MixtureSameFamily(np.zeros((4, 1, 3)), Normal(np.zeros((1, 5, 3)), 1.0))
    assert odd.batch_shape == (4, 5) and odd.log_prob(np.zeros((4, 5))).shape == (4, 5)
    with pytest.raises(NotImplementedError, match="full batch shape"):
        odd.sample(Rng(0))
    assert repr(Normal(0.0, 1.0)) == "Normal(loc=0.0, scale=1.0, batch_shape=(), event_shape=())"
    assert "<float64 (5, 7)>" in repr(Normal(np.zeros((5, 7)), 1.0))
    assert repr(Independent(Normal(np.zeros(2), 1.0), 1)).startswith("Independent(Normal(")
    # gradient through a scalar parameter broadcast against an array one
    g = grad(lambda s: anp.sum(Normal(np.zeros(3), s).log_prob(_a(1.0, 2.0, 3.0))))(1.5)
    np.testing.assert_allclose(g, -3 / 1.5 + (1 + 4 + 9) / 1.5**3)


def test_same_seed_same_samples():
    for name, make in DISTRIBUTIONS.items():
        d = make()
        np.testing.assert_array_equal(d.sample(Rng(3), 4), d.sample(Rng(3), 4), err_msg=name)
        assert not np.array_equal(d.sample(Rng(3), 50), d.sample(Rng(4), 50)), name


# ---------------------------------------------------------------------------------------------------
# Numerics at the edges


def test_extreme_logits_stay_finite():
    lg = _a(-1e4, 1e4)
    b = Bernoulli(lg)
    np.testing.assert_array_equal(b.log_prob(_a(1.0, 1.0)), _a(-1e4, 0.0))
    np.testing.assert_array_equal(b.log_prob(_a(0.0, 0.0)), _a(0.0, -1e4))
    assert np.all(np.isfinite(b.entropy())) and np.all(np.isfinite(kl(b, Bernoulli(-lg))))
    np.testing.assert_allclose(kl(b, Bernoulli(-lg)), 1e4)
    c = Categorical(_a(1e4, -1e4, 0.0))
    np.testing.assert_array_equal(c.log_prob(_a(0.0, 1.0, 2.0)), _a(0.0, -2e4, -1e4))
    assert np.isfinite(c.entropy()) and np.isfinite(kl(c, Categorical(_a(-1e4, 1e4, 0.0))))
    for dtype in (np.float32, np.float64):
        lg = np.array([-1e4, 1e4], dtype=dtype)
        assert np.all(np.isfinite(Bernoulli(lg).log_prob(np.array([1.0, 0.0], dtype=dtype))))
        assert np.all(np.isfinite(Categorical(lg).log_prob(np.array([0, 1]))))


def test_zero_probabilities_give_minus_inf_not_nan():
    c = Categorical(probs=_a(0.5, 0.5, 0.0))
    np.testing.assert_array_equal(c.log_prob(_a(2.0)), [-np.inf])
    np.testing.assert_allclose(c.entropy(), math.log(2))
    np.testing.assert_allclose(kl(c, Categorical(_a(0.0, 0.0, 5.0))), -math.log(2) + sp.logsumexp([0, 0, 5.0]))
    g = grad(lambda l: Categorical(anp.concatenate([l, _a(-np.inf)])).entropy())(_a(0.0, 1.0))
    assert np.all(np.isfinite(g))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no log(0) warnings either
        b = Bernoulli(probs=_a(0.0, 1.0))
    np.testing.assert_array_equal(b.log_prob(_a(0.0, 1.0)), [0.0, 0.0])
    np.testing.assert_array_equal(b.log_prob(_a(1.0, 0.0)), [-np.inf, -np.inf])
    np.testing.assert_array_equal(b.entropy(), [0.0, 0.0])


def test_tiny_scales_in_float64():
    d = Normal(_a(0.0, 0.0), _a(1e-30, 1e-30))
    lp = d.log_prob(_a(0.0, 1e-29))
    np.testing.assert_allclose(lp, -np.log(1e-30) - 0.5 * np.log(2 * np.pi) - [0.0, 50.0], rtol=1e-12)
    assert np.all(np.isfinite(d.log_prob(_a(1.0, -1.0))))
    for cls in (Logistic, Laplace):
        assert np.all(np.isfinite(cls(_a(0.0), _a(1e-30)).log_prob(_a(0.0, 1.0))))
    m = MultivariateNormal(_a(0.0, 0.0), np.diag(_a(1e-30, 1.0)))
    assert np.all(np.isfinite(m.log_prob(np.array([[0.0, 0.0], [1e-29, 3.0]]))))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@given(loc=st.floats(-1e3, 1e3), log_scale=st.floats(math.log(1e-6), math.log(1e6)),
       z=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=4), logits=st.lists(st.floats(-1e4, 1e4), min_size=3,
                                                                                 max_size=3))
def test_no_nan_from_valid_input(dtype, loc, log_scale, z, logits):
    cast = lambda v: np.asarray(v, dtype=dtype)
    scale = math.exp(log_scale)
    x = cast(loc + scale * np.array(z))
    lg = cast(logits)
    outs = [cls(cast(loc), cast(scale)).log_prob(x) for cls in (Normal, Logistic, Laplace)]
    outs += [Uniform(cast(loc), cast(loc + max(scale, 1e-3 * (1 + abs(loc))))).log_prob(x)]
    outs += [Bernoulli(lg).log_prob(cast([0, 1, 1])), Bernoulli(lg).entropy(), Categorical(lg).entropy(),
             Categorical(lg).log_prob(cast([0, 1, 2])), kl(Categorical(lg), Categorical(lg[::-1])),
             kl(Bernoulli(lg), Bernoulli(-lg))]
    dlm = DiscretizedLogisticMixture(lg * 1e-3, cast([-1.0, 0.0, 1.0]), lg * 1e-3, 256)
    outs += [dlm.log_prob(cast([[0], [128], [255]]))]
    outs += [MixtureSameFamily(lg, Normal(cast(loc), cast(scale) * cast([1.0, 2.0, 0.5]))).log_prob(x[:, None])]
    for out in outs:
        assert out.dtype == np.dtype(dtype) and not np.any(np.isnan(out))


# ---------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("build, match", [
    (lambda: Normal(0.0, _a(1.0, -2.0)), r"scale: expected positive finite values \(scale > 0\), got 1 .*-2\.0"),
    (lambda: Normal(0.0, 0.0), r"scale: expected positive"),
    (lambda: Normal(np.nan, 1.0), r"loc: expected finite values.*nan"),
    (lambda: Logistic(0.0, -1.0), r"scale: expected positive.*-1\.0"),
    (lambda: Laplace(0.0, np.inf), r"scale: expected positive finite"),
    (lambda: Uniform(_a(0.0, 2.0), _a(1.0, 1.0)), r"low, high: expected low < high.*\(2\.0, 1\.0\)"),
    (lambda: Uniform(0.0, np.inf), r"high: expected finite values"),
    (lambda: Normal(np.zeros(2), np.ones(3)), r"scale: shape \(3,\) does not broadcast.*loc \(2,\)"),
    (lambda: MultivariateNormal(np.zeros(2), np.ones((2, 2))), r"scale_tril: expected a lower-triangular.*1\.0"),
    (lambda: MultivariateNormal(np.zeros(2), np.diag(_a(1.0, 0.0))), r"scale_tril: expected a positive diagonal"),
    (lambda: MultivariateNormal(np.zeros(3), np.eye(2)), r"scale_tril: expected shape \(\.\.\., 3, 3\)"),
    (lambda: MultivariateNormal(np.zeros((3, 2)), np.stack([np.eye(2)] * 2)), r"scale_tril: shape \(2,\) does not"),
    (lambda: MultivariateNormal(np.zeros(2), covariance_matrix=np.array([[1.0, 2.0], [2.0, 1.0]])),
     r"covariance_matrix: expected a positive definite"),
    (lambda: MultivariateNormal(np.zeros(2), covariance_matrix=np.array([[1.0, 0.1], [0.0, 1.0]])),
     r"covariance_matrix: expected a symmetric"),
    (lambda: MultivariateNormal(np.zeros(2)), r"scale_tril, covariance_matrix: expected exactly one"),
    (lambda: Bernoulli(probs=_a(0.5, 1.5)), r"probs: expected probabilities in \[0, 1\].*1\.5"),
    (lambda: Bernoulli(), r"logits, probs: expected exactly one"),
    (lambda: Categorical(probs=_a(0.5, 0.6)), r"probs: expected rows summing to 1"),
    (lambda: Categorical(_a(-np.inf, -np.inf)), r"logits: expected at least one finite logit"),
    (lambda: Categorical(np.float64(1.0)), r"logits: expected an array with a last axis of classes"),
    (lambda: Independent(Normal(np.zeros(2), 1.0), 2), r"reinterpreted_batch_ndims: expected an int in \[0, 1\]"),
    (lambda: MixtureSameFamily(np.zeros(3), Normal(np.zeros(2), 1.0)),
     r"mixture_logits: expected a last axis of size 2"),
    (lambda: MixtureSameFamily(np.zeros(3), Normal(0.0, 1.0)), r"component: expected a batch_shape"),
    (lambda: DiscretizedLogisticMixture(np.zeros(2), np.zeros(2), np.zeros(2), num_bins=1), r"num_bins: expected"),
    (lambda: DiscretizedLogisticMixture(np.zeros(2), _a(0.0, np.nan), np.zeros(2)), r"loc: expected finite"),
])
def test_invalid_parameters_raise_value_errors_naming_them(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_type_errors_and_sample_shapes():
    with pytest.raises(TypeError, match="loc: expected a floating array"):
        Normal(np.zeros(2, dtype=np.int64), 1.0)
    with pytest.raises(TypeError, match="scale: expected an array or a number"):
        Normal(0.0, "one")
    with pytest.raises(TypeError, match="component: expected a genblocks Distribution"):
        MixtureSameFamily(np.zeros(2), "normal")
    with pytest.raises(TypeError, match="sample_shape"):
        Normal(0.0, 1.0).sample(Rng(0), "big")
    with pytest.raises(ValueError, match="sample_shape: expected non-negative"):
        Normal(0.0, 1.0).sample(Rng(0), (-1,))
    with pytest.raises(ValueError, match=r"x: expected trailing axes \(2,\)"):
        MultivariateNormal(np.zeros(2), np.eye(2)).log_prob(np.zeros(3))
    with pytest.raises(ValueError, match=r"x: expected trailing axes \(3,\)"):
        Independent(Normal(np.zeros(3), 1.0), 1).log_prob(np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"x: expected trailing axes \(2,\)"):
        DISTRIBUTIONS["mixture_mvn_2d"]().log_prob(np.zeros((4, 1)))
    with pytest.raises(NotImplementedError, match="not reparameterizable"):
        Bernoulli(_a(0.0)).rsample(Rng(0))
    with pytest.raises(NotImplementedError, match="no closed form"):
        DISTRIBUTIONS["mixture_1d"]().entropy()


def test_outside_support_is_minus_inf_or_an_error_when_asked():
    cases = [
        (Uniform(_a(0.0), _a(1.0)), _a(-0.5, 1.5, np.nan), Uniform(_a(0.0), _a(1.0), check_support=True)),
        (Bernoulli(_a(0.3)), _a(0.5, 2.0, -1.0), Bernoulli(_a(0.3), check_support=True)),
        (Categorical(_a(0.0, 1.0)), _a(-1.0, 2.0, 0.5), Categorical(_a(0.0, 1.0), check_support=True)),
        (DiscretizedLogisticMixture(_a(0.0), _a(0.0), _a(-2.0), 4), _a(-1.0, 4.0, 1.5),
         DiscretizedLogisticMixture(_a(0.0), _a(0.0), _a(-2.0), 4, check_support=True)),
    ]
    for loose, x, strict in cases:
        out = loose.log_prob(x)
        np.testing.assert_array_equal(out, -np.inf)
        with pytest.raises(ValueError, match=r"x: expected values in the support of .*got 3 offending"):
            strict.log_prob(x)
        assert np.all(np.isfinite(strict.log_prob(strict.sample(Rng(0), 3))))
    for cls in (Normal, Logistic, Laplace):
        assert cls(_a(0.0), _a(1.0)).log_prob(_a(np.inf))[0] == -np.inf
        with pytest.raises(ValueError, match="x: expected finite values"):
            cls(_a(0.0), _a(1.0), check_support=True).log_prob(_a(np.inf))
    with pytest.raises(ValueError, match="x: expected finite values"):
        MultivariateNormal(np.zeros(2), np.eye(2), check_support=True).log_prob(_a(0.0, np.nan))


def test_validation_is_skipped_while_tracing_and_can_be_turned_off():
    # under autograd the parameters are traced boxes: no host reads, gradients still exact
    g = grad(lambda s: anp.sum(Normal(0.0, s).log_prob(_a(1.0))))(_a(2.0))
    np.testing.assert_allclose(g, [-1 / 2.0 + 1 / 8.0])
    # the values inside a trace are not read: an invalid traced scale does not raise (it would when concrete)
    with np.errstate(invalid="ignore"):
        g = grad(lambda s: anp.sum(Normal(0.0, s).log_prob(_a(1.0))))(_a(-2.0))
    np.testing.assert_allclose(g, [1 / 2.0 - 1 / 8.0])
    d = Normal(_a(0.0), _a(-1.0), validate=False)  # the caller takes responsibility
    with np.errstate(invalid="ignore"):
        assert np.isnan(d.log_prob(_a(0.0)))[0]
    assert MultivariateNormal(np.zeros(2), np.ones((2, 2)), validate=False).batch_shape == ()
