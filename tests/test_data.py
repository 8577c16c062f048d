"""Tests for genblocks.data: toy densities, exact log-densities, digits, IDX files, dequantization, splits."""

import gzip
import math
import struct
import sys

import numpy as np
import pytest
from conftest import assert_backend
from hypothesis import given
from hypothesis import strategies as st

from genblocks import data as D
from genblocks.backends import Rng, to_device, to_numpy

NAMES = sorted(D.TOY_DENSITIES)


# ---------------------------------------------------------------------------------------------------
# Toy densities


@pytest.mark.parametrize("name", NAMES)
def test_toy_shape_dtype_backend_and_numpy_equality(name, backend):
    for dtype in ("float32", "float64"):
        x = D.toy(name, Rng(3, backend, host_draws=True), 257, dtype=dtype)
        assert tuple(x.shape) == (257, 2)
        assert str(x.dtype).endswith(dtype)
        assert_backend(x, backend)
        ref = D.toy(name, Rng(3, "numpy"), 257, dtype=dtype)
        np.testing.assert_allclose(to_numpy(x), ref, rtol=1e-6 if dtype == "float32" else 1e-12, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_toy_deterministic_per_seed_and_dtype_consistent(name):
    a = D.TOY_DENSITIES[name](Rng(7, "numpy"), 500)
    b = D.TOY_DENSITIES[name](Rng(7, "numpy"), 500)
    c = D.TOY_DENSITIES[name](Rng(8, "numpy"), 500)
    d = D.TOY_DENSITIES[name](Rng(7, "numpy"), 500, dtype="float64")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # drawn in float64 and cast: the float32 sample is the rounded float64 one
    np.testing.assert_array_equal(a, d.astype(np.float32))
    assert np.all(np.isfinite(d)) and np.all(np.abs(d) < 6.0)
    assert D.TOY_DENSITIES[name](Rng(0, "numpy"), 0).shape == (0, 2)


def test_toy_bad_arguments():
    with pytest.raises(ValueError, match=r"name: expected one of \['checkerboard', 'circles'.*got 'moon'"):
        D.toy("moon", Rng(0), 10)
    with pytest.raises(ValueError, match="n: expected a non-negative int, got -1"):
        D.moons(Rng(0), -1)
    with pytest.raises(ValueError, match="n: expected a non-negative int, got 2.5"):
        D.moons(Rng(0), 2.5)
    with pytest.raises(TypeError, match="rng: expected a genblocks.backends.Rng, got int"):
        D.checkerboard(0, 10)
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'float64', got 'float16'"):
        D.rings(Rng(0), 10, dtype="float16")


def _radii(x):
    return np.sqrt((x.astype(np.float64) ** 2).sum(-1))


def test_circles_and_rings_radii():
    r = _radii(D.circles(Rng(0, "numpy"), 20000, dtype="float64"))
    inner = r < 2.25
    assert abs(inner.mean() - 0.5) < 4 * math.sqrt(0.25 / r.size)
    # radial noise is approximately N(0, 0.24^2) around each radius
    assert abs(np.median(r[inner]) - 1.5) < 0.03 and abs(np.median(r[~inner]) - 3.0) < 0.03
    r = _radii(D.rings(Rng(0, "numpy"), 20000, dtype="float64"))
    k = np.clip(np.round(r / 0.75), 1, 4)
    assert np.abs(r - 0.75 * k).max() < 6 * 0.08
    np.testing.assert_allclose(np.bincount(k.astype(int))[1:] / r.size, 0.25, atol=4 * math.sqrt(0.1875 / r.size))


def test_moons_are_point_symmetric_half_circles():
    x = D.moons(Rng(1, "numpy"), 20000, dtype="float64")
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)
    # noise-free moon: |x - s (-1, -0.5)| = 2 for the moon of sign s
    upper = np.abs(np.hypot(x[:, 0] + 1.0, x[:, 1] + 0.5) - 2.0)
    lower = np.abs(np.hypot(x[:, 0] - 1.0, x[:, 1] - 0.5) - 2.0)
    assert np.median(np.minimum(upper, lower)) < 0.2


def test_eight_gaussians_moments():
    x = D.eight_gaussians(Rng(2, "numpy"), 40000, dtype="float64")
    var = D.EIGHT_GAUSSIANS_RADIUS**2 / 2 + D.EIGHT_GAUSSIANS_STD**2  # 4.125 per coordinate
    np.testing.assert_allclose(x.mean(0), 0.0, atol=4 * math.sqrt(var / x.shape[0]))
    np.testing.assert_allclose(x.var(0), var, rtol=0.03)


# ---------------------------------------------------------------------------------------------------
# Exact log-densities and entropies


def _grid(lo, hi, n):
    h = (hi - lo) / n
    g = lo + h * (np.arange(n) + 0.5)  # cell midpoints: never on a checkerboard edge
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel()], -1), h


def test_checkerboard_log_prob_normalized_and_entropy():
    pts, h = _grid(-5.0, 5.0, 500)
    lp = D.checkerboard_log_prob(pts)
    p = np.exp(lp)
    assert abs(p.sum() * h * h - 1.0) < 1e-12
    support = np.isfinite(lp)
    assert abs(-(p[support] * lp[support]).sum() * h * h - D.TRUE_ENTROPY["checkerboard"]) < 1e-12
    assert D.TRUE_ENTROPY["checkerboard"] == pytest.approx(math.log(32.0), abs=1e-15)


def test_checkerboard_samples_are_on_the_black_squares_uniformly():
    for dtype in ("float32", "float64"):
        x = D.checkerboard(Rng(4, "numpy"), 40000, dtype=dtype)
        lp = D.checkerboard_log_prob(x)
        assert lp.dtype == np.dtype(dtype)
        np.testing.assert_allclose(lp, -math.log(32.0), rtol=1e-7)
    squares = (np.floor(x[:, 0] / 2) + 2) * 4 + (np.floor(x[:, 1] / 2) + 2)
    freq = np.bincount(squares.astype(int), minlength=16) / x.shape[0]
    black = [i * 4 + j for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    np.testing.assert_allclose(freq[black], 1 / 8, atol=5 * math.sqrt((1 / 8) * (7 / 8) / x.shape[0]))
    assert freq.sum() == pytest.approx(freq[black].sum())


def test_checkerboard_log_prob_edges_and_outside():
    x = np.array([[0.5, 0.5], [-0.5, 0.5], [2.0, 0.5], [4.0, 4.0], [4.01, 3.0], [-4.0, -4.0], [1.0, -1.0],
                  [1.99999, 0.5], [2.00001, 0.5], [2.0, 2.0]])
    lp = D.checkerboard_log_prob(x)
    black = [True, False, True, True, False, True, False, True, False, True]
    np.testing.assert_array_equal(np.isfinite(lp), black)


def test_eight_gaussians_log_prob_normalized_and_entropy_by_quadrature():
    pts, h = _grid(-6.0, 6.0, 500)
    lp = D.eight_gaussians_log_prob(pts)
    p = np.exp(lp)
    assert abs(p.sum() * h * h - 1.0) < 1e-10
    assert abs(-(p * lp).sum() * h * h - D.TRUE_ENTROPY["eight_gaussians"]) < 1e-9
    # below the well-separated value log 8 + log(2 pi e sigma^2) by the small overlap
    separated = math.log(8) + math.log(2 * math.pi * math.e * D.EIGHT_GAUSSIANS_STD**2)
    assert 0.005 < separated - D.TRUE_ENTROPY["eight_gaussians"] < 0.008


def test_eight_gaussians_entropy_by_monte_carlo():
    x = D.eight_gaussians(Rng(5, "numpy"), 100000, dtype="float64")
    nlp = -D.eight_gaussians_log_prob(x)
    se = nlp.std() / math.sqrt(nlp.size)
    assert abs(nlp.mean() - D.TRUE_ENTROPY["eight_gaussians"]) < 4 * se


def test_eight_gaussians_log_prob_matches_scipy():
    from scipy.stats import multivariate_normal

    x = np.random.default_rng(0).normal(size=(50, 2)) * 3
    ref = np.log(sum(
        multivariate_normal(D.EIGHT_GAUSSIANS_RADIUS * np.array([math.cos(k * math.pi / 4), math.sin(k * math.pi / 4)]),
                            D.EIGHT_GAUSSIANS_STD**2).pdf(x) for k in range(8)) / 8)
    np.testing.assert_allclose(D.eight_gaussians_log_prob(x), ref, rtol=1e-10)


def test_eight_gaussians_log_prob_gradient():
    from autograd import grad
    from autograd.test_util import check_grads

    x = np.random.default_rng(2).normal(size=(6, 2)) * 2

    def total(z):
        return D.eight_gaussians_log_prob(z).sum()

    check_grads(total, modes=["rev"], order=1)(x)
    # the score of one well-isolated component: -(x - c) / sigma^2
    c = np.array([[D.EIGHT_GAUSSIANS_RADIUS, 0.0]])
    x0 = c + 0.1
    np.testing.assert_allclose(grad(total)(x0), -(x0 - c) / D.EIGHT_GAUSSIANS_STD**2, rtol=1e-6)


@pytest.mark.parametrize("fn", [D.checkerboard_log_prob, D.eight_gaussians_log_prob])
def test_log_prob_backends_dtypes_and_errors(fn, backend):
    x = np.random.default_rng(1).uniform(-4.5, 4.5, size=(3, 40, 2))
    for dtype in ("float32", "float64"):
        out = fn(to_device(x, backend, dtype=dtype))
        assert tuple(out.shape) == (3, 40) and str(out.dtype).endswith(dtype)
        assert_backend(out, backend)
        np.testing.assert_allclose(to_numpy(out), fn(x.astype(dtype)), rtol=1e-6)
    assert np.all(np.isfinite(D.eight_gaussians_log_prob(np.full((2, 2), 1e3, dtype=np.float32))))
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 2\), got \(4, 3\)"):
        fn(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="x: expected a floating array"):
        fn(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(TypeError, match="x: expected an array of 2-D points, got list"):
        fn([[0.0, 0.0]])


# ---------------------------------------------------------------------------------------------------
# Digits


def test_digits_all_levels_and_labels():
    x, y = D.load_digits(split="all", backend="numpy")
    assert x.shape == (1797, 64) and x.dtype == np.float32 and y.shape == (1797,) and y.dtype == np.int64
    assert set(np.unique(x)) == set(range(17))
    assert set(np.unique(y)) == set(range(10))
    xb, yb = D.load_digits(split="all", binarize=True, dtype="float64", backend="numpy")
    assert xb.dtype == np.float64 and set(np.unique(xb)) == {0.0, 1.0}
    np.testing.assert_array_equal(xb, (x >= 8).astype(np.float64))
    np.testing.assert_array_equal(yb, y)


def _rows(x, y):
    return sorted(map(tuple, np.concatenate([x, y[:, None]], axis=1).tolist()))


def test_digits_split_sizes_disjoint_and_fixed():
    parts = D.load_digits(backend="numpy")
    assert set(parts) == {"train", "valid", "test"}
    assert {k: v[0].shape[0] for k, v in parts.items()} == {"train": 1000, "valid": 350, "test": 447}
    x, y = D.load_digits(split="all", backend="numpy")
    # the three parts together are the whole data set, each image exactly once
    together = sum((_rows(*parts[k]) for k in parts), [])
    assert sorted(together) == _rows(x, y)
    perm = to_numpy(Rng(D.DIGITS_SPLIT_SEED, backend="numpy").permutation(1797))
    np.testing.assert_array_equal(parts["valid"][0], x[perm[1000:1350]])
    xt, yt = D.load_digits(split="test", backend="numpy")
    np.testing.assert_array_equal(xt, parts["test"][0])
    np.testing.assert_array_equal(yt, y[perm[1350:]])


def test_digits_backend_and_errors(backend, monkeypatch):
    x, y = D.load_digits(split="valid", backend=backend)
    assert_backend((x, y), backend)
    np.testing.assert_array_equal(to_numpy(x), D.load_digits(split="valid", backend="numpy")[0])
    with pytest.raises(ValueError, match=r"split: expected None or one of \('train', 'valid', 'test', 'all'\)"):
        D.load_digits(split="validation")
    with pytest.raises(ValueError, match="dtype: expected 'float32' or 'float64', got 'int8'"):
        D.load_digits(dtype="int8")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r'load_digits needs scikit-learn.*pip install "genblocks\[data\]"'):
        D.load_digits()


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files written by the test)


def _idx_bytes(a):
    a = np.asarray(a, dtype=np.uint8)
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def _write(path, payload, gz):
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_fashion(tmp_path, n=5, prefix="train", gz=True, dotted=False, seed=0):
    r = np.random.default_rng(seed)
    images = r.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = r.integers(0, 10, size=n, dtype=np.uint8)
    sep = "." if dotted else "-"
    suffix = ".gz" if gz else ""
    _write(tmp_path / f"{prefix}-images{sep}idx3-ubyte{suffix}", _idx_bytes(images), gz)
    _write(tmp_path / f"{prefix}-labels{sep}idx1-ubyte{suffix}", _idx_bytes(labels), gz)
    return images, labels


@pytest.mark.parametrize("gz,dotted", [(True, False), (False, False), (False, True), (True, True)])
def test_fashion_mnist_reads_written_files(tmp_path, gz, dotted):
    images, labels = _fake_fashion(tmp_path, gz=gz, dotted=dotted)
    x, y = D.load_fashion_mnist(tmp_path, backend="numpy")
    assert x.shape == (5, 784) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, images.reshape(5, -1))
    np.testing.assert_array_equal(y, labels)


def test_fashion_mnist_options_env_and_backend(tmp_path, monkeypatch, backend):
    images, labels = _fake_fashion(tmp_path, n=3, prefix="t10k")
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    x, y = D.load_fashion_mnist(split="test", flatten=False, binarize=True, dtype="float64", backend=backend)
    assert_backend((x, y), backend)
    assert tuple(x.shape) == (3, 28, 28) and str(x.dtype).endswith("float64")
    np.testing.assert_array_equal(to_numpy(x), (images >= 128).astype(np.float64))
    np.testing.assert_array_equal(to_numpy(y), labels)


def test_fashion_mnist_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        D.load_fashion_mnist(tmp_path, split="train")
    msg = str(err.value)
    for part in (str(tmp_path), "train-images-idx3-ubyte.gz", "train-images.idx3-ubyte",
                 "apt-get install dataset-fashion-mnist", D.FASHION_MNIST_ENV):
        assert part in msg
    _fake_fashion(tmp_path, prefix="train")
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        D.load_fashion_mnist(tmp_path, split="test")
    with pytest.raises(ValueError, match=r"split: expected one of \('train', 'test'\), got 'valid'"):
        D.load_fashion_mnist(tmp_path, split="valid")


def test_fashion_mnist_corrupt_and_truncated_files(tmp_path):
    images, labels = _fake_fashion(tmp_path, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    good = img.read_bytes()
    img.write_bytes(good[:-7])  # truncated data
    with pytest.raises(ValueError, match="its header promises"):
        D.load_fashion_mnist(tmp_path)
    img.write_bytes(good[:10])  # truncated header
    with pytest.raises(ValueError, match="truncated"):
        D.load_fashion_mnist(tmp_path)
    img.write_bytes(b"\x89PNG" + good[4:])  # not an IDX file
    with pytest.raises(ValueError, match="not an IDX file"):
        D.load_fashion_mnist(tmp_path)
    img.unlink()
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(good)[:-30])  # truncated gzip stream
    with pytest.raises(ValueError, match="not a readable IDX file"):
        D.load_fashion_mnist(tmp_path)
    gz.write_bytes(b"garbage, not gzip at all")
    with pytest.raises(ValueError, match="not a readable IDX file"):
        D.load_fashion_mnist(tmp_path)
    gz.write_bytes(gzip.compress(good))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:4]))
    with pytest.raises(ValueError, match="should hold 5 uint8 labels"):
        D.load_fashion_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([0, 1, 2, 3, 12])))
    with pytest.raises(ValueError, match="labels up to 12, expected 0..9"):
        D.load_fashion_mnist(tmp_path)
    gz.write_bytes(gzip.compress(_idx_bytes(images[:, 0, :])))  # 2-d "images"
    with pytest.raises(ValueError, match=r"should hold uint8 images of shape \(n, rows, cols\)"):
        D.load_fashion_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Dequantization


@pytest.mark.parametrize("num_bins", [2, 17, 256])
def test_dequantize_round_trip_and_range(num_bins, backend):
    host = np.random.default_rng(num_bins).integers(0, num_bins, size=(300, 7)).astype(np.float64)
    for dtype in ("float32", "float64"):
        x = to_device(host, backend, dtype=dtype)
        y = D.uniform_dequantize(x, Rng(0, backend, host_draws=True), num_bins=num_bins)
        assert_backend(y, backend)
        assert tuple(y.shape) == (300, 7) and str(y.dtype).endswith(dtype)
        yn = to_numpy(y)
        assert yn.min() > 0.0 and yn.max() < 1.0
        np.testing.assert_array_equal(to_numpy(D.quantize(y, num_bins=num_bins)), host)
        ref = D.uniform_dequantize(host.astype(dtype), Rng(0, "numpy"), num_bins=num_bins)
        np.testing.assert_allclose(yn, ref, rtol=1e-6)


@given(st.integers(1, 1000), st.integers(0, 2**32), st.sampled_from(["float32", "float64"]))
def test_dequantize_round_trip_property(num_bins, seed, dtype):
    x = np.random.default_rng(seed).integers(0, num_bins, size=(64,)).astype(dtype)
    x[:2] = [0, num_bins - 1]
    y = D.uniform_dequantize(x, Rng(seed, "numpy"), num_bins=num_bins)
    assert y.dtype == np.dtype(dtype) and y.min() >= 0.0 and y.max() < 1.0
    np.testing.assert_array_equal(D.quantize(y, num_bins=num_bins), x)


def test_dequantize_noise_is_uniform():
    x = np.zeros((50000,))
    u = D.uniform_dequantize(x, Rng(1, "numpy"), num_bins=4) * 4.0
    assert abs(u.mean() - 0.5) < 4 * math.sqrt(1 / 12 / u.size)
    assert abs(u.var() - 1 / 12) < 0.003


class _AlmostOneRng(Rng):
    """Draws the largest value below 1 of the dtype: the worst case for rounding into the next bin."""

    def uniform(self, shape=(), dtype="float32", low=0.0, high=1.0):
        return np.full(shape, np.nextafter(np.array(1.0, dtype=dtype), np.array(0.0, dtype=dtype)), dtype=dtype)


def test_dequantize_never_rounds_into_the_next_bin():
    x = np.arange(256, dtype=np.float32)
    y = D.uniform_dequantize(x, _AlmostOneRng(0, "numpy"), num_bins=256)
    np.testing.assert_array_equal(D.quantize(y, num_bins=256), x)
    assert y.max() < 1.0
    assert np.any(y == (x + 0.5) / 256)  # float32 x + u rounds up for large x: put at the midpoint


class _ZeroRng(Rng):
    """Draws u = 0 exactly (numpy's float32 uniform does, with probability 2^-24 per number)."""

    def uniform(self, shape=(), dtype="float32", low=0.0, high=1.0):
        return np.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dequantize_never_returns_zero(dtype):
    """y = 0 would make the flow's sigmoid data side take logit(0) = -inf (a NaN loss after ~1,800 digits steps)."""
    x = np.array([0.0, 1.0, 16.0], dtype=dtype)
    y = D.uniform_dequantize(x, _ZeroRng(0, "numpy"), num_bins=17)
    assert y.dtype == np.dtype(dtype) and y.min() > 0.0
    assert y[0] == np.asarray(0.5, dtype) / np.asarray(17.0, dtype)  # x = 0, u = 0: the bin's midpoint
    np.testing.assert_array_equal(y[1:], x[1:] / 17)
    np.testing.assert_array_equal(D.quantize(y, num_bins=17), x)


@given(st.integers(1, 300), st.integers(1, 4096))
def test_dequantization_log_det(num_bins, dim):
    assert D.dequantization_log_det(num_bins, dim) == pytest.approx(-dim * math.log(num_bins), rel=1e-14)


def test_dequantization_log_det_is_exact_for_uniform_data():
    # P(x) = K^-D for uniform discrete data; the uniform density on [0, 1)^D has log p = 0, so the bound is tight
    assert D.dequantization_log_det(256, 3) == pytest.approx(math.log(256.0**-3))


def test_dequantize_bad_inputs():
    x = np.array([0.0, 1.0, 3.0])
    with pytest.raises(ValueError, match=r"x: expected integer values in \[0, 2\] \(num_bins=3\)"):
        D.uniform_dequantize(x, Rng(0, "numpy"), num_bins=3)
    with pytest.raises(ValueError, match=r"x: expected integer values"):
        D.uniform_dequantize(np.array([0.5]), Rng(0, "numpy"), num_bins=3)
    with pytest.raises(ValueError, match=r"x: expected integer values"):
        D.uniform_dequantize(np.array([-1.0]), Rng(0, "numpy"), num_bins=3)
    with pytest.raises(TypeError, match="x: expected a float32/float64 array, got int64"):
        D.uniform_dequantize(np.array([0, 1]), Rng(0, "numpy"), num_bins=3)
    with pytest.raises(ValueError, match="num_bins: expected a positive int, got 0"):
        D.uniform_dequantize(x, Rng(0, "numpy"), num_bins=0)
    with pytest.raises(TypeError, match="rng: expected an Rng on x's backend 'numpy', got one on 'strict'"):
        D.uniform_dequantize(x, Rng(0, "strict"), num_bins=4)
    with pytest.raises(TypeError, match="y: expected a float32/float64 array"):
        D.quantize([0.1], num_bins=4)
    with pytest.raises(ValueError, match="dim: expected a positive int, got 0"):
        D.dequantization_log_det(4, 0)


# ---------------------------------------------------------------------------------------------------
# Splits


def test_split_sizes_alignment_and_determinism(backend):
    x = np.arange(40.0).reshape(20, 2)
    y = np.arange(20)
    parts = D.train_valid_test_split(to_device((x, y), backend), Rng(0, backend, host_draws=True), (12, 5, 3))
    assert [tuple(p[0].shape) for p in parts] == [(12, 2), (5, 2), (3, 2)]
    assert all(isinstance(p, tuple) for p in parts)
    assert_backend(parts, backend)
    ys = np.concatenate([to_numpy(p[1]) for p in parts])
    assert sorted(ys.tolist()) == list(range(20)) and ys.tolist() != list(range(20))
    for px, py in parts:
        np.testing.assert_array_equal(to_numpy(px), x[to_numpy(py)])
    ref = D.train_valid_test_split((x, y), Rng(0, "numpy"), (12, 5, 3))
    np.testing.assert_array_equal(ys, np.concatenate([p[1] for p in ref]))


def test_split_fractions_and_errors():
    x = np.arange(10.0)
    parts = D.train_valid_test_split(x, Rng(1, "numpy"), (0.5, 0.25, 0.25))
    assert [p.shape[0] for p in parts] == [5, 2, 3]
    with pytest.raises(ValueError, match=r"sizes: expected non-negative ints summing to n=10, got \[5, 4\]"):
        D.train_valid_test_split(x, Rng(0, "numpy"), (5, 4))
    with pytest.raises(ValueError, match="sizes: expected non-negative fractions summing to 1"):
        D.train_valid_test_split(x, Rng(0, "numpy"), (0.5, 0.4))
    with pytest.raises(ValueError, match="x: expected arrays sharing the leading axis"):
        D.train_valid_test_split((x, np.arange(9)), Rng(0, "numpy"), (5, 5))
    with pytest.raises(TypeError, match="rng: expected an Rng on x's backend"):
        D.train_valid_test_split(x, Rng(0, "strict"), (5, 5))
    with pytest.raises(TypeError, match="x: expected an array with a leading axis"):
        D.train_valid_test_split(3.0, Rng(0, "numpy"), (1,))
