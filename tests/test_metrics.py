"""Tests for genblocks.metrics: bits per dimension, MMD and its permutation test, mode coverage, Frechet."""

import math

import numpy as np
import pytest
import scipy.linalg
from conftest import assert_backend
from hypothesis import given
from hypothesis import strategies as st
from scipy.spatial.distance import pdist

from genblocks import data as D
from genblocks import metrics as M
from genblocks.backends import Rng, to_device, to_numpy

# ---------------------------------------------------------------------------------------------------
# Bits per dimension


def test_bits_per_dim_known_values():
    assert M.nats_to_bits_per_dim(64 * math.log(2.0), 64) == pytest.approx(1.0)
    # 8-bit data rescaled to [0, 1): a uniform density (nll 0) is exactly 8 bits per dimension
    assert M.nats_to_bits_per_dim(0.0, 3072, num_bins=256) == pytest.approx(8.0)
    assert M.nats_to_bits_per_dim(784 * math.log(2.0), 784, num_bins=2) == pytest.approx(2.0)
    nll = np.array([[10.0, 20.0]])
    out = M.nats_to_bits_per_dim(nll, 4, num_bins=16)
    assert out.shape == (1, 2)
    np.testing.assert_allclose(out, (nll + 4 * math.log(16)) / (4 * math.log(2)))


@given(st.floats(-1e4, 1e4), st.integers(1, 5000), st.one_of(st.none(), st.integers(1, 1024)))
def test_bits_per_dim_round_trip(nll, dim, num_bins):
    bpd = M.nats_to_bits_per_dim(nll, dim, num_bins=num_bins)
    assert M.bits_per_dim_to_nats(bpd, dim, num_bins=num_bins) == pytest.approx(nll, abs=1e-9 * (1 + dim))


def test_bits_per_dim_matches_dequantized_uniform_data():
    # the discrete NLL of uniform K-level data is D log K nats = log2 K bits per dimension
    dim, k = 64, 17
    bound = 0.0 + D.dequantization_log_det(k, dim)  # log p_y = 0 for the uniform density on [0, 1)^D
    assert M.nats_to_bits_per_dim(-bound, dim) == pytest.approx(math.log2(k))
    assert M.nats_to_bits_per_dim(0.0, dim, num_bins=k) == pytest.approx(math.log2(k))


def test_bits_per_dim_errors():
    with pytest.raises(ValueError, match="dim: expected a positive int, got 0"):
        M.nats_to_bits_per_dim(1.0, 0)
    with pytest.raises(ValueError, match="num_bins: expected a positive int or None, got 0"):
        M.nats_to_bits_per_dim(1.0, 2, num_bins=0)
    with pytest.raises(ValueError, match="dim: expected a positive int, got 1.5"):
        M.bits_per_dim_to_nats(1.0, 1.5)


# ---------------------------------------------------------------------------------------------------
# MMD


def _brute_mmd(x, y, bandwidths):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(np.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return ((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean())


def test_mmd_matches_brute_force_and_median_heuristic():
    r = np.random.default_rng(0)
    x, y = r.normal(size=(13, 3)), r.normal(size=(9, 3)) + 0.5
    for bw in [(0.7,), (0.3, 1.0, 4.0)]:
        assert float(M.mmd(x, y, bandwidths=bw)) == pytest.approx(_brute_mmd(x, y, bw), rel=1e-10)
    med = np.median(pdist(np.concatenate([x, y])))
    assert float(M.median_bandwidth(np.concatenate([x, y]))) == pytest.approx(med, rel=1e-12)
    assert float(M.median_bandwidth(x)) == pytest.approx(np.median(pdist(x)), rel=1e-12)  # odd pair count
    assert float(M.mmd(x, y)) == pytest.approx(_brute_mmd(x, y, (med / 2, med, 2 * med)), rel=1e-10)


def test_median_bandwidth_subsamples_large_inputs():
    z = np.random.default_rng(5).normal(size=(1500, 3))
    idx = (np.arange(1000) * 1500) // 1000
    assert float(M.median_bandwidth(z)) == pytest.approx(np.median(pdist(z[idx])), rel=1e-12)
    assert float(M.median_bandwidth(z)) == pytest.approx(np.median(pdist(z)), rel=0.02)


def test_mmd_same_distribution_near_zero_shifted_large():
    r = Rng(1, "numpy")
    x, y = r.normal((400, 2), "float64"), r.normal((400, 2), "float64")
    same = float(M.mmd(x, y))
    shifted = float(M.mmd(x, y + 1.0))
    # the unbiased estimate under the null has mean 0 and sd of order 1/n
    assert abs(same) < 0.01
    assert shifted > 0.2
    # averaged over independent pairs, the null estimate is centred on 0 (unbiased)
    vals = [float(M.mmd(r.normal((50, 2), "float64"), r.normal((50, 2), "float64"))) for _ in range(60)]
    assert abs(np.mean(vals)) < 4 * np.std(vals) / math.sqrt(len(vals))


def test_mmd_backends_and_dtypes(backend):
    r = np.random.default_rng(2)
    x, y = r.normal(size=(30, 2)), r.normal(size=(20, 2)) + 0.3
    for dtype in ("float32", "float64"):
        out = M.mmd(to_device(x, backend, dtype=dtype), to_device(y, backend, dtype=dtype))
        assert_backend(out, backend)
        assert tuple(out.shape) == () and str(out.dtype).endswith(dtype)
        assert float(to_numpy(out)) == pytest.approx(float(M.mmd(x, y)), rel=1e-4, abs=1e-6)


def test_mmd_errors():
    x = np.zeros((5, 2)) + np.arange(5.0)[:, None]
    with pytest.raises(ValueError, match=r"y: expected 2 features like the first argument, got shape \(5, 3\)"):
        M.mmd(x, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"x: expected at least 2 rows, got shape \(1, 2\)"):
        M.mmd(x[:1], x)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, d\), got \(5,\)"):
        M.mmd(x[:, 0], x)
    with pytest.raises(TypeError, match="y: expected the dtype of x"):
        M.mmd(x, x.astype(np.float32))
    with pytest.raises(ValueError, match="bandwidths: expected a non-empty sequence of positive finite floats"):
        M.mmd(x, x, bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError, match="median-heuristic bandwidth is 0"):
        M.mmd(np.zeros((3, 2)), np.zeros((3, 2)))
    with pytest.raises(TypeError, match="arrays from several backends"):
        M.mmd(x, to_device(x, "strict"))


# ---------------------------------------------------------------------------------------------------
# Permutation test


def test_permutation_test_p_values(backend):
    r = Rng(3, "numpy")
    x, y = r.normal((60, 2), "float64"), r.normal((60, 2), "float64")
    xs, ys = to_device((x, y), backend)
    p_same = M.mmd_permutation_test(xs, ys, Rng(0, backend, host_draws=True), 99)
    p_shift = M.mmd_permutation_test(xs, ys + 1.0, Rng(0, backend), 99)
    assert isinstance(p_same, float) and p_same > 0.05
    assert p_shift == pytest.approx(1 / 100)  # the smallest possible value: no relabelling beats it
    assert round(p_same * 100) == pytest.approx(p_same * 100)
    assert M.mmd_permutation_test(xs, ys, Rng(0, backend, host_draws=True), 99) == p_same
    assert M.mmd_permutation_test(x, y, Rng(0, "numpy"), 99) == p_same  # the same relabellings on every backend
    p_device = M.mmd_permutation_test(xs, ys, Rng(0, backend), 99)  # cupy: its own generator
    assert p_device > 0.05 and M.mmd_permutation_test(xs, ys, Rng(0, backend), 99) == p_device


def test_permutation_test_is_calibrated_under_the_null():
    r = Rng(4, "numpy")
    ps = [M.mmd_permutation_test(r.normal((15, 2), "float64"), r.normal((15, 2), "float64"), r, 39)
          for _ in range(100)]
    # p is super-uniform under the null: P(p <= 0.1) <= 0.1; binomial(100, 0.1) sd is 3
    assert sum(p <= 0.1 for p in ps) <= 19
    assert sum(p <= 0.5 for p in ps) >= 30  # and not degenerate near 1


def test_permutation_test_errors():
    x = np.random.default_rng(0).normal(size=(5, 2))
    with pytest.raises(ValueError, match="n_permutations: expected a positive int, got 0"):
        M.mmd_permutation_test(x, x, Rng(0, "numpy"), 0)
    with pytest.raises(TypeError, match="rng: expected a genblocks.backends.Rng, got int"):
        M.mmd_permutation_test(x, x, 0, 10)
    with pytest.raises(TypeError, match="rng: expected an Rng on the samples' backend 'numpy', got 'strict'"):
        M.mmd_permutation_test(x, x, Rng(0, "strict"), 10)


# ---------------------------------------------------------------------------------------------------
# Mode coverage


def _centers():
    angles = np.arange(8) * np.pi / 4
    return D.EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], -1)


def test_mode_coverage_eight_gaussians(backend):
    x = D.eight_gaussians(Rng(0, backend), 2000)
    out = M.mode_coverage(x, to_device(_centers(), backend, dtype="float32"), radius=3 * D.EIGHT_GAUSSIANS_STD)
    assert out["modes_covered"] == 1.0 and out["n_modes_covered"] == 8
    # within 3 sigma of its centre with probability 1 - exp(-9/2) = 0.9889 in 2-D
    assert abs(out["high_quality"] - (1 - math.exp(-4.5))) < 4 * math.sqrt(0.011 * 0.989 / 2000)
    assert sum(out["counts"]) == round(out["high_quality"] * 2000) and len(out["counts"]) == 8


def test_mode_coverage_dropped_modes_and_bad_samples():
    c = _centers()
    x = np.concatenate([np.repeat(c[:6], 10, axis=0), np.full((20, 2), 10.0)])
    out = M.mode_coverage(x, c, radius=0.5)
    assert out == {"modes_covered": 6 / 8, "high_quality": 60 / 80, "n_modes_covered": 6,
                   "counts": [10] * 6 + [0, 0]}
    x2 = np.concatenate([x, c[6:7]])  # one sample on mode 6
    assert M.mode_coverage(x2, c, radius=0.5)["n_modes_covered"] == 7
    assert M.mode_coverage(x2, c, radius=0.5, min_count=2)["n_modes_covered"] == 6
    with pytest.raises(ValueError, match="radius: expected a positive float, got 0"):
        M.mode_coverage(x, c, radius=0)
    with pytest.raises(ValueError, match="min_count: expected a positive int, got 0"):
        M.mode_coverage(x, c, radius=1.0, min_count=0)
    with pytest.raises(ValueError, match=r"centers: expected 2 features like the first argument"):
        M.mode_coverage(x, np.zeros((8, 3)), radius=1.0)


# ---------------------------------------------------------------------------------------------------
# Frechet distance


def _whitened(n, d, seed):
    """n points with sample mean exactly 0 and unbiased sample covariance exactly I."""
    z = np.random.default_rng(seed).normal(size=(n, d))
    z -= z.mean(0)
    cov = z.T @ z / (n - 1)
    return z @ np.linalg.inv(np.linalg.cholesky(cov)).T


def _frechet_sqrtm(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(ca @ cb).real
    return ((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root)


def test_frechet_identical_and_closed_forms():
    a = np.random.default_rng(0).normal(size=(500, 4)) @ np.random.default_rng(1).normal(size=(4, 4))
    assert M.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert M.frechet_distance(a, a + shift) == pytest.approx((shift**2).sum(), rel=1e-9)
    # N(0, I) vs N(m, diag(s^2)): |m|^2 + sum (1 - s)^2
    w = _whitened(400, 3, 2)
    s = np.array([0.5, 1.0, 3.0])
    m = np.array([0.0, 1.0, 2.0])
    assert M.frechet_distance(w, w * s + m) == pytest.approx((m**2).sum() + ((1 - s) ** 2).sum(), rel=1e-9)


def test_frechet_matches_sqrtm_formula_and_is_symmetric(backend):
    r = np.random.default_rng(3)
    a = r.normal(size=(200, 5))
    b = r.normal(size=(150, 5)) @ r.normal(size=(5, 5)) + 0.3
    ref = _frechet_sqrtm(a, b)
    got = M.frechet_distance(to_device(a, backend), to_device(b, backend))
    assert isinstance(got, float) and got == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(b, a) == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(ref, rel=1e-5)


def test_frechet_errors():
    a = np.zeros((10, 3))
    with pytest.raises(ValueError, match=r"feat_b: expected 3 features like the first argument, got shape \(10, 2\)"):
        M.frechet_distance(a, np.zeros((10, 2)))
    with pytest.raises(ValueError, match=r"feat_a: expected at least 2 rows, got shape \(1, 3\)"):
        M.frechet_distance(a[:1], a)
    with pytest.raises(TypeError, match="feat_a: expected a float32/float64 array, got dtype int64"):
        M.frechet_distance(np.zeros((4, 3), dtype=np.int64), a)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_every_metric_refuses_non_finite_samples(backend, bad):
    """Old code: mmd of samples with a NaN was finite on numpy (the distance clamp ate it)."""
    rng = np.random.default_rng(0)
    good = rng.normal(size=(20, 2))
    broken = good.copy()
    broken[3, 1] = bad
    g, b = to_device((good, broken), backend)
    calls = {
        "x": lambda: M.mmd(b, g), "y": lambda: M.mmd(g, b),
        "z": lambda: M.median_bandwidth(b),
        "samples": lambda: M.mode_coverage(b, g, radius=1.0), "centers": lambda: M.mode_coverage(g, b, radius=1.0),
        "feat_a": lambda: M.frechet_distance(b, g), "feat_b": lambda: M.frechet_distance(g, b),
    }
    for arg, call in calls.items():
        with pytest.raises(ValueError, match=f"{arg}: expected finite values, got 1 NaN/inf"):
            call()
    for arg, bad_args in {"x": (b, g), "y": (g, b)}.items():
        with pytest.raises(ValueError, match=f"{arg}: expected finite values"):
            M.mmd_permutation_test(*bad_args, Rng(0, backend), 9)


# ---------------------------------------------------------------------------------------------------
# High-quality rate and modes on the 8-Gaussian ring and the 5x5 grid


@pytest.mark.parametrize("target, n_modes", [("eight_gaussians", 8), ("grid_gaussians", 25)])
def test_high_quality_rate_of_the_data_itself_is_the_chi2_mass_within_3_std(target, n_modes):
    from genblocks.data import toy
    from genblocks.metrics import high_quality_rate, mixture_modes

    x = toy(target, Rng(0), 20000, dtype="float64")
    want = 1.0 - math.exp(-4.5)  # P(|N(0, I_2)| <= 3) = 0.98889
    rate = high_quality_rate(x, target)
    assert abs(rate - want) < 4 * math.sqrt(want * (1 - want) / 20000) + 2e-3  # + overlap of the ring's modes
    modes = mixture_modes(x, target, min_count=20)
    assert modes["n_modes"] == n_modes and modes["n_modes_covered"] == n_modes


def test_a_collapsed_or_off_mode_generator_scores_low():
    from genblocks.data import mixture_centers
    from genblocks.metrics import high_quality_rate, mixture_modes

    centers, std = mixture_centers("grid_gaussians")
    collapsed = np.repeat(centers[:1], 100, axis=0) + 0.01
    out = mixture_modes(collapsed, "grid_gaussians")
    assert out["n_modes_covered"] == 1 and out["high_quality"] == 1.0
    between = centers[:10] + 1.0  # halfway between grid centres: 20 std off every mode
    assert high_quality_rate(between, "grid_gaussians") == 0.0
    assert high_quality_rate(between, "grid_gaussians", n_std=30.0) == 1.0
    with pytest.raises(ValueError, match="name: expected one of \\['eight_gaussians', 'grid_gaussians'\\]"):
        high_quality_rate(between, "rings")
    with pytest.raises(ValueError, match="n_std: expected a positive float"):
        high_quality_rate(between, "grid_gaussians", n_std=0)
