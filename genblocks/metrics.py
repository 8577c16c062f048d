"""Metrics: nats <-> bits per dimension, MMD and its permutation test, mode coverage, Frechet distance.

- ``nats_to_bits_per_dim(nll, D, num_bins=K)`` = (nll + D log K) / (D log 2): the NLL in nats of a density
  on data rescaled from K levels to [0, 1)^D, as bits per dimension of the discrete data (for 8-bit
  images K = 256 adds 8 bits per dimension). ``bits_per_dim_to_nats`` is its inverse.
- ``mmd(x, y)``: unbiased MMD^2 with a sum of RBF kernels (median-heuristic bandwidths by default);
  ``mmd_permutation_test`` gives its p-value under "x and y come from one distribution".
- ``mode_coverage(samples, centers, radius=r)``: the fraction of modes hit and of samples near a mode.
- ``high_quality_rate(samples, "eight_gaussians")`` and ``mixture_modes``: the GAN benchmarks' figures on the
  8-Gaussian ring and the 5x5 grid: the fraction of samples within 3 std of a centre, and the modes hit.
- ``frechet_distance(feat_a, feat_b)``: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) on given
  features (the FID formula without the Inception network), computed on the host in float64.
"""

import math

from genblocks.backends import Rng, namespace, to_device, to_numpy
from genblocks.blocks.validate import check_positive_int

__all__ = [
    "nats_to_bits_per_dim", "bits_per_dim_to_nats", "mmd", "mmd_permutation_test", "mode_coverage",
    "frechet_distance", "median_bandwidth", "high_quality_rate", "mixture_modes",
]

LOG_2 = math.log(2.0)



def _dequantization_nats(dim, num_bins):
    if num_bins is None:
        return 0.0
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins: expected a positive int or None, got {num_bins!r}")
    return dim * math.log(num_bins)


# ---------------------------------------------------------------------------------------------------
# Bits per dimension


def nats_to_bits_per_dim(nll_nats, dim, *, num_bins=None):
    """bpd = (nll + D log K) / (D log 2); without ``num_bins``, bpd = nll / (D log 2).

    ``nll_nats``: negative log-likelihood in nats per example (a float or an array of any shape) of a
    density over D = ``dim`` dimensions. With ``num_bins=K`` the density is taken to be over data that
    was rescaled from K integer levels to [0, 1)^D (y = (x + u) / K, as ``genblocks.data.uniform_dequantize``
    makes): rescaling by 1/K adds D log K nats of density, so the discrete data's NLL is nll + D log K.
    Returns bits per dimension, same type/shape as ``nll_nats``.
    """
    dim = check_positive_int(dim, "dim")
    return (nll_nats + _dequantization_nats(dim, num_bins)) / (dim * LOG_2)


def bits_per_dim_to_nats(bits_per_dim, dim, *, num_bins=None):
    """nll = bpd D log 2 - D log K: the inverse of ``nats_to_bits_per_dim`` (same arguments)."""
    dim = check_positive_int(dim, "dim")
    return bits_per_dim * (dim * LOG_2) - _dequantization_nats(dim, num_bins)


# ---------------------------------------------------------------------------------------------------
# Maximum mean discrepancy


def _check_samples(x, name, min_rows=2, dim=None):
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name}: expected an array of shape (n, d), got {type(x).__name__}")
    if len(shape) != 2:
        raise ValueError(f"{name}: expected shape (n, d), got {tuple(shape)}")
    if "float" not in str(x.dtype):
        raise TypeError(f"{name}: expected a float32/float64 array, got dtype {x.dtype}")
    if shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} rows, got shape {tuple(shape)}")
    if dim is not None and shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features like the first argument, got shape {tuple(shape)}")
    # a NaN would vanish in the distance clamp and a broken sampler could score well: refuse it
    xp = namespace(x)
    bad = int(to_numpy(xp.sum(xp.astype(xp.logical_not(xp.isfinite(x)), xp.int64))))
    if bad:
        raise ValueError(f"{name}: expected finite values, got {bad} NaN/inf entries")
    return x


def _sq_dists(xp, a, b):
    """|a_i - b_j|^2 as (n, m), clipped at 0 against cancellation."""
    aa = xp.sum(a * a, axis=-1)[:, None]
    bb = xp.sum(b * b, axis=-1)[None, :]
    return xp.maximum(aa + bb - 2.0 * xp.matmul(a, xp.matrix_transpose(b)), 0.0)


def _pooled_sq_dists(xp, z):
    d2 = _sq_dists(xp, z, z)
    d2 = 0.5 * (d2 + xp.matrix_transpose(d2))  # exactly symmetric: each pair appears twice, equal
    n = z.shape[0]
    eye = xp.astype(xp.eye(n, dtype=z.dtype, device=xp.device_of(z)), xp.bool)
    return xp.where(eye, xp.zeros_like(d2), d2)


def _median_distance(xp, d2):
    """The median of sqrt(d2_ij) over pairs i < j, for symmetric (N, N) d2 with a zero diagonal, d2 >= 0."""
    n = d2.shape[0]
    s = xp.sort(xp.reshape(d2, (-1,)))
    # sorted: the n diagonal zeros first, then every pair value twice in a row
    pairs = n * (n - 1) // 2
    if pairs % 2:
        return xp.sqrt(s[n + pairs - 1])
    return 0.5 * (xp.sqrt(s[n + pairs - 2]) + xp.sqrt(s[n + pairs]))


MEDIAN_MAX_POINTS = 1000


def _median_sq_dists(xp, z):
    """The pairwise d2 the median heuristic uses: of all rows of z, or for more than ``MEDIAN_MAX_POINTS``
    rows, of 1000 rows evenly spaced through z."""
    n = z.shape[0]
    if n > MEDIAN_MAX_POINTS:
        idx = [(i * n) // MEDIAN_MAX_POINTS for i in range(MEDIAN_MAX_POINTS)]
        z = xp.take(z, xp.asarray(idx, dtype=xp.int64, device=xp.device_of(z)), axis=0)
    return _pooled_sq_dists(xp, z)


def median_bandwidth(z):
    """The median heuristic: the median Euclidean distance over distinct pairs of rows of z (n, d) -> 0-d.

    Exact up to ``MEDIAN_MAX_POINTS`` = 1000 rows; beyond, over 1000 rows evenly spaced through z (the
    median of 499500 pairs; sorting all n^2 distances would dominate the cost of ``mmd``).
    """
    _check_samples(z, "z")
    xp = namespace(z)
    return _median_distance(xp, _median_sq_dists(xp, z))


def _check_bandwidths(bandwidths):
    try:
        bw = tuple(float(h) for h in bandwidths)
    except (TypeError, ValueError):
        raise TypeError(f"bandwidths: expected a sequence of positive floats or None, got {bandwidths!r}") from None
    if not bw or any(not (h > 0.0 and math.isfinite(h)) for h in bw):
        raise ValueError(f"bandwidths: expected a non-empty sequence of positive finite floats, got {bandwidths!r}")
    return bw


def _kernel_matrix(xp, d2, bandwidths):
    k = None
    for h in bandwidths:
        term = xp.exp(d2 * (-0.5 / (h * h)))
        k = term if k is None else k + term
    return k


def _pooled_kernel(x, y, bandwidths):
    _check_samples(x, "x")
    _check_samples(y, "y", dim=x.shape[1])
    xp = namespace(x, y)
    if x.dtype != y.dtype:
        raise TypeError(f"y: expected the dtype of x ({x.dtype}), got {y.dtype}")
    z = xp.concat([x, y], axis=0)
    if bandwidths is None:
        med = float(to_numpy(_median_distance(xp, _median_sq_dists(xp, z))))
        if not med > 0.0:
            raise ValueError("x, y: all points coincide, the median-heuristic bandwidth is 0; pass bandwidths=")
        bandwidths = (0.5 * med, med, 2.0 * med)
    else:
        bandwidths = _check_bandwidths(bandwidths)
    # the diagonal need not be exactly k(z, z): the unbiased estimate subtracts it as computed
    return xp, _kernel_matrix(xp, _sq_dists(xp, z, z), bandwidths)


def _mmd_from_kernel(xp, k, s, n, m):
    """Unbiased MMD^2 for group indicators s (..., N) (1 for x, 0 for y) over a pooled kernel k (N, N)."""
    diag = xp.linalg.diagonal(k)
    t = 1.0 - s
    ks = xp.matmul(s, k)
    kt = xp.matmul(t, k)
    sxx = xp.sum(ks * s, axis=-1) - xp.sum(s * diag, axis=-1)
    syy = xp.sum(kt * t, axis=-1) - xp.sum(t * diag, axis=-1)
    sxy = xp.sum(ks * t, axis=-1)
    return sxx / float(n * (n - 1)) + syy / float(m * (m - 1)) - 2.0 * sxy / float(n * m)


def _indicator(xp, n, m, like):
    ones = xp.ones((n,), dtype=like.dtype, device=xp.device_of(like))
    zeros = xp.zeros((m,), dtype=like.dtype, device=xp.device_of(like))
    return xp.concat([ones, zeros], axis=0)


def mmd(x, y, *, bandwidths=None):
    """Unbiased MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j).

    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) over ``bandwidths`` h (default: 0.5, 1 and 2 times the
    median distance between distinct points of the pooled sample, ``median_bandwidth``).
    x (n, d), y (m, d), n, m >= 2, same backend and dtype -> a 0-d array in that dtype (it can be slightly
    negative: it is unbiased).
    """
    xp, k = _pooled_kernel(x, y, bandwidths)
    n, m = x.shape[0], y.shape[0]
    return _mmd_from_kernel(xp, k, _indicator(xp, n, m, k), n, m)


def mmd_permutation_test(x, y, rng, n_permutations=200, *, bandwidths=None):
    """p = (1 + #{b : MMD^2_b >= MMD^2}) / (1 + B) over B random relabellings of the pooled sample.

    Tests "x and y are drawn from one distribution"; small p is evidence against it. The bandwidths
    (default: the median heuristic on the pooled sample, which relabelling does not change) are fixed
    across permutations. x (n, d), y (m, d); ``rng`` an Rng on their backend. Returns a Python float in
    (0, 1]; it is never below 1 / (1 + B).
    """
    if not isinstance(rng, Rng):
        raise TypeError(f"rng: expected a genblocks.backends.Rng, got {type(rng).__name__}")
    if isinstance(n_permutations, bool) or not isinstance(n_permutations, int) or n_permutations < 1:
        raise ValueError(f"n_permutations: expected a positive int, got {n_permutations!r}")
    xp, k = _pooled_kernel(x, y, bandwidths)
    if xp.backend_name != rng.backend:
        raise TypeError(f"rng: expected an Rng on the samples' backend {xp.backend_name!r}, got {rng.backend!r}")
    n, m = x.shape[0], y.shape[0]
    s0 = _indicator(xp, n, m, k)
    # row 0 is the observed labelling: one batched computation, so no rounding differs between them
    labels = [s0] + [xp.take(s0, rng.permutation(n + m), axis=0) for _ in range(n_permutations)]
    stats = _mmd_from_kernel(xp, k, xp.stack(labels, axis=0), n, m)
    exceed = int(to_numpy(xp.sum(xp.astype(stats[1:] >= stats[0], xp.int64))))
    return (1.0 + exceed) / (1.0 + n_permutations)


# ---------------------------------------------------------------------------------------------------
# Mode coverage


def mode_coverage(samples, centers, *, radius, min_count=1):
    """Modes hit and sample quality: sample i is "high quality" when min_k |x_i - c_k| <= radius.

    A mode k is covered when at least ``min_count`` high-quality samples have it as nearest centre.
    samples (n, d), centers (K, d) on one backend. Returns a dict of host values:
    {"modes_covered": covered / K, "high_quality": fraction of high-quality samples,
    "n_modes_covered": int, "counts": list of K ints (high-quality samples per mode)}.
    """
    _check_samples(samples, "samples", min_rows=1)
    _check_samples(centers, "centers", min_rows=1, dim=samples.shape[1])
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius > 0):
        raise ValueError(f"radius: expected a positive float, got {radius!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count: expected a positive int, got {min_count!r}")
    xp = namespace(samples, centers)
    d2 = _sq_dists(xp, samples, xp.astype(centers, samples.dtype))
    nearest = xp.argmin(d2, axis=-1)
    good = xp.min(d2, axis=-1) <= float(radius) ** 2
    n_modes = centers.shape[0]
    modes = xp.arange(n_modes, dtype=nearest.dtype, device=xp.device_of(samples))
    hits = xp.logical_and(xp.equal(nearest[:, None], modes[None, :]), good[:, None])
    counts = [int(c) for c in to_numpy(xp.sum(xp.astype(hits, xp.int64), axis=0))]
    covered = sum(c >= min_count for c in counts)
    return {
        "modes_covered": covered / n_modes,
        "high_quality": sum(counts) / samples.shape[0],
        "n_modes_covered": covered,
        "counts": counts,
    }


def mixture_modes(samples, target, *, n_std=3.0, min_count=1):
    """``mode_coverage`` on a toy mixture: radius = n_std * its std around each of its centres.

    ``target``: "eight_gaussians" (8 modes, std sqrt(2)/4) or "grid_gaussians" (25 modes, std 0.05), the
    mixtures of ``genblocks.data``. Returns ``mode_coverage``'s dict plus "n_modes".
    """
    from genblocks.data import mixture_centers

    centers, std = mixture_centers(target)
    if not (isinstance(n_std, (int, float)) and not isinstance(n_std, bool) and n_std > 0):
        raise ValueError(f"n_std: expected a positive float, got {n_std!r}")
    xp = namespace(samples)
    centers = to_device(centers, xp.backend_name)
    out = mode_coverage(samples, centers, radius=float(n_std) * std, min_count=min_count)
    out["n_modes"] = int(centers.shape[0])
    return out


def high_quality_rate(samples, target, *, n_std=3.0):
    """Fraction of samples within n_std standard deviations of a centre of ``target``'s mixture (a float)."""
    return mixture_modes(samples, target, n_std=n_std)["high_quality"]


# ---------------------------------------------------------------------------------------------------
# Frechet distance


def frechet_distance(feat_a, feat_b):
    """d^2 = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to two feature sets.

    feat_a (n, d), feat_b (m, d), n, m >= 2, any backend: moved to the host and computed in float64 with
    unbiased covariances. tr (S_a S_b)^(1/2) = sum_i sqrt(lambda_i) for the eigenvalues lambda_i of the
    symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2) (scipy.linalg.eigh; no complex parts as with sqrtm).
    Returns a Python float >= 0.
    """
    import scipy.linalg

    _check_samples(feat_a, "feat_a")
    _check_samples(feat_b, "feat_b", dim=feat_a.shape[1])
    a = to_device(to_numpy(feat_a), "numpy", dtype="float64")
    b = to_device(to_numpy(feat_b), "numpy", dtype="float64")
    host = namespace(a)
    mu_a, mu_b = host.mean(a, axis=0), host.mean(b, axis=0)
    cov_a, cov_b = _covariance(host, a, mu_a), _covariance(host, b, mu_b)
    w, v = scipy.linalg.eigh(cov_a)
    root_a = host.matmul(v * host.sqrt(host.clip(w, 0.0, None))[None, :], host.matrix_transpose(v))
    middle = host.matmul(host.matmul(root_a, cov_b), root_a)
    middle = 0.5 * (middle + host.matrix_transpose(middle))
    lam = scipy.linalg.eigvalsh(middle)
    tr_root = float(host.sum(host.sqrt(host.clip(lam, 0.0, None))))
    diff = mu_a - mu_b
    trace = float(host.sum(host.linalg.diagonal(cov_a)) + host.sum(host.linalg.diagonal(cov_b)))
    return max(float(host.sum(diff * diff)) + trace - 2.0 * tr_root, 0.0)


def _covariance(host, a, mu):
    c = a - mu[None, :]
    return host.matmul(host.matrix_transpose(c), c) / float(a.shape[0] - 1)


# ---------------------------------------------------------------------------------------------------
# Frechet distance on the features of a small digits classifier (no Inception network)

DIGITS_LEVELS = 16.0  # load_digits' grey levels run 0..16


class DigitsFeatures:
    """phi(x) = h_2 (n, hidden[-1]): the penultimate layer of an MLP classifier 64 -> 128 -> 64 -> 10 of the digits.

    ``DigitsFeatures.train(rng, steps)`` fits the classifier (softmax cross-entropy, Adam) on the 1000
    training digits of ``genblocks.data.load_digits`` (needs scikit-learn); ``.features(x)`` maps images
    x (n, 64) or (n, 8, 8[, 1]) in load_digits' grey levels 0..16 (multiply images in [0, 1] by 16) to
    their features; ``.frechet_distance(x, y)`` is ``frechet_distance`` on the features of two image sets:
    the FID recipe with a classifier that trains in seconds instead of an Inception network.
    ``.accuracy``: the classifier's accuracy on the 350 validation digits (a sanity figure).
    """

    def __init__(self, mlp, params, accuracy=None):
        self.mlp, self.params, self.accuracy = mlp, params, accuracy

    def __repr__(self):
        acc = "untested" if self.accuracy is None else f"valid accuracy {self.accuracy:.3f}"
        return f"DigitsFeatures(widths={self.mlp.widths}, {acc})"

    @classmethod
    def train(cls, rng, steps=400, *, hidden=(128, 64), batch_size=128, lr=2e-3):
        """The classifier fitted for ``steps`` Adam steps on the training digits, its init and batches from ``rng``.

        Deterministic for a given ``rng`` seed (float64 on the host). A few seconds at the defaults.
        """
        from genblocks.blocks import ops
        from genblocks.blocks.nn import MLP
        from genblocks.data import load_digits
        from genblocks.train.loop import fit
        from genblocks.train.optim import adam

        if not isinstance(rng, Rng):
            raise TypeError(f"rng: expected a genblocks Rng, got {type(rng).__name__}")
        steps = check_positive_int(steps, "steps")
        hidden = tuple(check_positive_int(h, "hidden") for h in hidden)
        mlp = MLP((64,) + hidden + (10,), activation="relu")
        x, y = load_digits(split="train", dtype="float64", backend="numpy")
        r_init, r_fit = rng.split(2)

        def loss(params, batch, _rng):
            xb, yb = batch
            xp = namespace(xb, params)
            logits = mlp.apply(params, xb / DIGITS_LEVELS)
            picked = xp.take_along_axis(logits, xp.reshape(yb, (-1, 1)), axis=-1)[:, 0]
            return xp.mean(ops.logsumexp(logits, axis=-1) - picked)

        result = fit(loss, mlp.init(r_init, "float64"), (x, y), r_fit, adam(lr), steps, batch_size=batch_size,
                     progress=False)
        out = cls(mlp, result.params)
        xv, yv = load_digits(split="valid", dtype="float64", backend="numpy")
        xp = namespace(xv)
        logits = mlp.apply(out.params, xv / DIGITS_LEVELS)
        out.accuracy = float(xp.mean(xp.astype(xp.equal(xp.argmax(logits, axis=-1), yv), xp.float64)))
        return out

    def features(self, x):
        """h_2 (n, hidden[-1]) for images x (n, 64) or (n, 8, 8[, 1]) in grey levels 0..16, on the host in float64."""
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) < 2 or math.prod(shape[1:]) != 64:
            raise ValueError(f"x: expected 8x8 digit images (n, 64) or (n, 8, 8[, 1]), got shape "
                             f"{None if shape is None else tuple(shape)}")
        h = to_device(to_numpy(x), "numpy", dtype="float64")
        host = namespace(h)
        h = host.reshape(h, (h.shape[0], 64)) / DIGITS_LEVELS
        for p, layer in zip(self.params[:-1], self.mlp.layers[:-1]):
            h = host.dense(h, p["W"], p["b"], layer.activation)
        return h

    def frechet_distance(self, x, y):
        """``frechet_distance(features(x), features(y))``: x (n, 64), y (m, 64) digit images, n, m >= 2."""
        return frechet_distance(self.features(x), self.features(y))
