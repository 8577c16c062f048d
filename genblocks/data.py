"""Data: 2-D toy densities, 8x8 digits, a Fashion-MNIST reader, splits and dequantization.

Toy densities: ``name(rng, n, *, dtype="float32") -> (n, 2)`` array on ``rng``'s backend. Draws are made
in float64 and cast at the end, so float32 and float64 samples of one seed agree to float32 precision,
and numpy and strict (which share the host generator) give the same numbers. ``TOY_DENSITIES`` maps names
to functions; ``toy(name, rng, n)`` looks one up. ``checkerboard`` and ``eight_gaussians`` have exact
log-densities (``*_log_prob``) and entropies (``TRUE_ENTROPY``, nats) for checking density models.

Images: ``load_digits`` (scikit-learn's bundled 8x8 digits, 17 grey levels) and ``load_fashion_mnist``
(IDX files on disk, e.g. Debian's ``dataset-fashion-mnist`` package). Both return ``(x, y)`` with ``x``
of shape (n, pixels) holding integer grey levels as floats and ``y`` int64 labels.

Dequantization: integer data x in {0..K-1}^D becomes y = (x + u) / K in [0, 1)^D with u ~ U[0, 1)^D;
a density p on [0, 1)^D then bounds the discrete log-likelihood:
log P(x) >= E_u[log p(y)] + dequantization_log_det(K, D), with dequantization_log_det(K, D) = -D log K.
"""

import math
import os

from genblocks.backends import Rng, float_dtype_name, namespace, namespace_of, resolve_dtype, to_device, to_numpy
from genblocks.blocks.ops import logsumexp
from genblocks.blocks.validate import check_nonnegative_int, check_positive_int

__all__ = [
    "moons", "circles", "eight_gaussians", "checkerboard", "pinwheel", "two_spirals", "rings", "swiss_roll",
    "TOY_DENSITIES", "TRUE_ENTROPY", "toy", "checkerboard_log_prob", "eight_gaussians_log_prob",
    "EIGHT_GAUSSIANS_RADIUS", "EIGHT_GAUSSIANS_STD", "grid_gaussians", "GRID_SPACING", "GRID_STD", "mixture_centers",
    "FASHION_MNIST_CLASSES",
    "load_digits", "DIGITS_SPLIT_SIZES", "DIGITS_SPLIT_SEED", "load_fashion_mnist", "FASHION_MNIST_ENV",
    "FASHION_MNIST_DEFAULT_DIR", "uniform_dequantize", "quantize", "dequantization_log_det",
    "train_valid_test_split", "standardize", "unstandardize",
]

# ---------------------------------------------------------------------------------------------------
# Argument checks


def _check_rng(rng):
    if not isinstance(rng, Rng):
        raise TypeError(f"rng: expected a genblocks.backends.Rng, got {type(rng).__name__}")
    return rng




def _is_floating(x):
    return "float" in str(getattr(x, "dtype", ""))


# ---------------------------------------------------------------------------------------------------
# 2-D toy densities


def _toy_args(rng, n, dtype):
    return _check_rng(rng), check_nonnegative_int(n, "n"), float_dtype_name(dtype)


def _finish(xp, a, b, dtype):
    """Stack two (n,) float64 coordinates into an (n, 2) array of ``dtype``."""
    return xp.astype(xp.stack([a, b], axis=-1), resolve_dtype(xp, dtype))


def _unit_normal2(rng, n):
    z = rng.normal((n, 2), dtype="float64")
    return z[..., 0], z[..., 1]


def _random_sign(rng, n):
    """+1.0 or -1.0 with probability 1/2 each: (n,) float64."""
    k = rng.integers(0, 2, shape=(n,))
    xp = namespace(k)
    return 2.0 * xp.astype(k, xp.float64) - 1.0


def moons(rng, n, *, dtype="float32"):
    """Two interleaved half-moons: x = s (2 cos t - 1, 2 sin t - 1/2) + 0.2 eps.

    t ~ U[0, pi), s = +1 or -1 with probability 1/2 each, eps ~ N(0, I_2): scikit-learn's ``make_moons``
    (noise 0.1) centred on the origin and scaled by 2. Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    s = _random_sign(rng, n)
    xp = namespace(s)
    t = math.pi * rng.uniform((n,), dtype="float64")
    e0, e1 = _unit_normal2(rng, n)
    return _finish(xp, s * (2.0 * xp.cos(t) - 1.0) + 0.2 * e0, s * (2.0 * xp.sin(t) - 0.5) + 0.2 * e1, dtype)


def circles(rng, n, *, dtype="float32"):
    """Two concentric circles: x = r (cos t, sin t) + 0.24 eps, r in {1.5, 3} with probability 1/2 each.

    t ~ U[0, 2 pi), eps ~ N(0, I_2) (scikit-learn's ``make_circles(factor=0.5, noise=0.08)`` times 3).
    Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    k = rng.integers(0, 2, shape=(n,))
    xp = namespace(k)
    r = 1.5 + 1.5 * xp.astype(k, xp.float64)
    t = 2.0 * math.pi * rng.uniform((n,), dtype="float64")
    e0, e1 = _unit_normal2(rng, n)
    return _finish(xp, r * xp.cos(t) + 0.24 * e0, r * xp.sin(t) + 0.24 * e1, dtype)


def rings(rng, n, *, dtype="float32"):
    """Four concentric rings: x = r (cos t, sin t) + 0.08 eps, r in {0.75, 1.5, 2.25, 3} equally likely.

    t ~ U[0, 2 pi), eps ~ N(0, I_2). Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    k = rng.integers(0, 4, shape=(n,))
    xp = namespace(k)
    r = 0.75 * (1.0 + xp.astype(k, xp.float64))
    t = 2.0 * math.pi * rng.uniform((n,), dtype="float64")
    e0, e1 = _unit_normal2(rng, n)
    return _finish(xp, r * xp.cos(t) + 0.08 * e0, r * xp.sin(t) + 0.08 * e1, dtype)


EIGHT_GAUSSIANS_RADIUS = 2.0 * math.sqrt(2.0)
EIGHT_GAUSSIANS_STD = math.sqrt(2.0) / 4.0


def eight_gaussians(rng, n, *, dtype="float32"):
    """Equal mixture of 8 gaussians N(c_k, sigma^2 I), c_k = 2 sqrt(2) (cos k pi/4, sin k pi/4), sigma = sqrt(2)/4.

    These are FFJORD's "8gaussians" (centres at radius 4, std 0.5, all divided by 1.414) with the exact
    sqrt(2): radius 2.8284, std 0.35355, so neighbouring centres are 6.1 sigma apart. Differential entropy
    ``TRUE_ENTROPY["eight_gaussians"]`` = 2.8315784 nats (the well-separated value log 8 + log(2 pi e
    sigma^2) = 2.8378771 minus a small overlap term). Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    k = rng.integers(0, 8, shape=(n,))
    xp = namespace(k)
    angle = (math.pi / 4.0) * xp.astype(k, xp.float64)
    e0, e1 = _unit_normal2(rng, n)
    c = EIGHT_GAUSSIANS_RADIUS
    s = EIGHT_GAUSSIANS_STD
    return _finish(xp, c * xp.cos(angle) + s * e0, c * xp.sin(angle) + s * e1, dtype)


GRID_SPACING = 2.0
GRID_STD = 0.05


def grid_gaussians(rng, n, *, dtype="float32"):
    """Equal mixture of 25 gaussians N(c_ij, 0.05^2 I) on the 5x5 grid c_ij = (2i, 2j), i, j in {-2..2}.

    The 25-Gaussian grid of the GAN mode-collapse literature (VEEGAN, PacGAN): centres 2 apart, 40 sigma
    between neighbours, so a sample is unambiguously near one centre or off every mode. (n, 2).
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    k = rng.integers(0, 25, shape=(n,))
    xp = namespace(k)
    e0, e1 = _unit_normal2(rng, n)
    i = xp.astype(k // 5, xp.float64) - 2.0
    j = xp.astype(k % 5, xp.float64) - 2.0
    return _finish(xp, GRID_SPACING * i + GRID_STD * e0, GRID_SPACING * j + GRID_STD * e1, dtype)


def mixture_centers(name):
    """(centres (K, 2) host float64, std) of the "eight_gaussians" or "grid_gaussians" toy mixture."""
    xp = namespace_of("numpy")
    if name == "eight_gaussians":
        angle = (math.pi / 4.0) * xp.arange(8, dtype=xp.float64)
        c = EIGHT_GAUSSIANS_RADIUS * xp.stack([xp.cos(angle), xp.sin(angle)], axis=-1)
        return c, EIGHT_GAUSSIANS_STD
    if name == "grid_gaussians":
        k = xp.arange(25, dtype=xp.int64)
        c = GRID_SPACING * xp.stack([xp.astype(k // 5, xp.float64) - 2.0, xp.astype(k % 5, xp.float64) - 2.0], axis=-1)
        return c, GRID_STD
    raise ValueError(f"name: expected one of ['eight_gaussians', 'grid_gaussians'], got {name!r}")


def checkerboard(rng, n, *, dtype="float32"):
    """Uniform on the 8 "black" squares of a 4x4 board of 2x2 squares on [-4, 4]^2.

    Square (i, j) = [2i, 2i + 2] x [2j, 2j + 2], i, j in {-2, -1, 0, 1}, is black when i + j is even
    (FFJORD's "checkerboard"). Total area 32, so log p = -log 32 on the support and the differential
    entropy is ``TRUE_ENTROPY["checkerboard"]`` = log 32 = 3.4657359 nats. Returns (n, 2) on ``rng``'s
    backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    u = rng.uniform((n, 2), dtype="float64")
    row = rng.integers(0, 2, shape=(n,))
    xp = namespace(u)
    x0 = 8.0 * u[..., 0] - 4.0
    i = xp.floor(0.5 * x0)
    parity = i - 2.0 * xp.floor(0.5 * i)  # i mod 2 in {0, 1}
    j = 2.0 * xp.astype(row, xp.float64) - 2.0 + parity  # i + j even
    return _finish(xp, x0, 2.0 * (j + u[..., 1]), dtype)


def pinwheel(rng, n, *, dtype="float32"):
    """Five curved arms: x = 2 R(a) f with f = (1 + 0.3 e0, 0.1 e1), a = 2 pi k / 5 + 0.25 exp(f_0).

    k uniform on {0..4}, e ~ N(0, I_2), R(a) the rotation by angle a (after FFJORD's "pinwheel").
    Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    k = rng.integers(0, 5, shape=(n,))
    xp = namespace(k)
    e0, e1 = _unit_normal2(rng, n)
    f0 = 1.0 + 0.3 * e0
    f1 = 0.1 * e1
    a = (2.0 * math.pi / 5.0) * xp.astype(k, xp.float64) + 0.25 * xp.exp(f0)
    c, s = xp.cos(a), xp.sin(a)
    return _finish(xp, 2.0 * (c * f0 - s * f1), 2.0 * (s * f0 + c * f1), dtype)


def two_spirals(rng, n, *, dtype="float32"):
    """Two interleaved spirals: x = s t (-cos t, sin t) / 3 + 0.1 eps, t = 3 pi sqrt(u), u ~ U[0, 1).

    s = +1 or -1 with probability 1/2 each, eps ~ N(0, I_2) (after FFJORD's "2spirals"); radius up to pi.
    Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    s = _random_sign(rng, n)
    xp = namespace(s)
    t = 3.0 * math.pi * xp.sqrt(rng.uniform((n,), dtype="float64"))
    e0, e1 = _unit_normal2(rng, n)
    return _finish(xp, -s * t * xp.cos(t) / 3.0 + 0.1 * e0, s * t * xp.sin(t) / 3.0 + 0.1 * e1, dtype)


def swiss_roll(rng, n, *, dtype="float32"):
    """A 2-D swiss roll: x = t (cos t, sin t) / 5 + 0.2 eps, t = 1.5 pi (1 + 2 u), u ~ U[0, 1).

    eps ~ N(0, I_2): scikit-learn's ``make_swiss_roll(noise=1)`` seen from above, divided by 5.
    Returns (n, 2) on ``rng``'s backend.
    """
    rng, n, dtype = _toy_args(rng, n, dtype)
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.uniform((n,), dtype="float64"))
    xp = namespace(t)
    e0, e1 = _unit_normal2(rng, n)
    return _finish(xp, t * xp.cos(t) / 5.0 + 0.2 * e0, t * xp.sin(t) / 5.0 + 0.2 * e1, dtype)


TOY_DENSITIES = {
    "grid_gaussians": grid_gaussians,
    "moons": moons, "circles": circles, "eight_gaussians": eight_gaussians, "checkerboard": checkerboard,
    "pinwheel": pinwheel, "two_spirals": two_spirals, "rings": rings, "swiss_roll": swiss_roll,
}

TRUE_ENTROPY = {
    # uniform on area 32: log 32
    "checkerboard": math.log(32.0),
    # quadrature of -p log p on grids of 401^2 to 2401^2 points over [-6, 6]^2 (mass 1 within 1e-13;
    # all agree to 1e-10). Well separated it would be log 8 + log(2 pi e sigma^2) = 2.8378771.
    "eight_gaussians": 2.8315783605,
}
"""Differential entropies in nats of the toy densities that have them in closed form or by quadrature."""


def toy(name, rng, n, *, dtype="float32"):
    """n samples of the toy density ``name`` (a key of ``TOY_DENSITIES``): (n, 2) on ``rng``'s backend."""
    fn = TOY_DENSITIES.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ValueError(f"name: expected one of {sorted(TOY_DENSITIES)}, got {name!r}")
    return fn(rng, n, dtype=dtype)


def _check_points(x, name="x"):
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name}: expected an array of 2-D points, got {type(x).__name__}")
    if len(shape) == 0 or shape[-1] != 2:
        raise ValueError(f"{name}: expected shape (..., 2), got {tuple(shape)}")
    if not _is_floating(x):
        raise TypeError(f"{name}: expected a floating array (float32 or float64), got dtype {x.dtype}")
    return x


def checkerboard_log_prob(x):
    """log p(x) of ``checkerboard``: -log 32 on the (closed) black squares, -inf elsewhere.

    Points on an edge count as black when a black square touches them (a null set for the density), so a
    float32 sample rounded onto an edge still has a finite log-density.
    x (..., 2) float on any backend -> (...,) in x's dtype and backend.
    """
    xp = namespace(_check_points(x))
    h0, h1 = 0.5 * x[..., 0], 0.5 * x[..., 1]
    # the squares whose closure holds the point: a single one inside, two or four on edges and corners
    rows = (xp.ceil(h0) - 1.0, xp.floor(h0))
    cols = (xp.ceil(h1) - 1.0, xp.floor(h1))
    black = None
    for i in rows:
        for j in cols:
            s = i + j
            hit = xp.logical_and(
                xp.logical_and(xp.logical_and(i >= -2.0, i <= 1.0), xp.logical_and(j >= -2.0, j <= 1.0)),
                xp.equal(s, 2.0 * xp.floor(0.5 * s)),
            )
            black = hit if black is None else xp.logical_or(black, hit)
    return xp.where(black, xp.full_like(h0, -math.log(32.0)), xp.full_like(h0, -math.inf))


def eight_gaussians_log_prob(x):
    """log p(x) of ``eight_gaussians``: log (1/8) sum_k N(x; c_k, sigma^2 I), by log-sum-exp.

    x (..., 2) float on any backend -> (...,) in x's dtype and backend.
    """
    xp = namespace(_check_points(x))
    angles = [k * math.pi / 4.0 for k in range(8)]
    c0 = xp.asarray([EIGHT_GAUSSIANS_RADIUS * math.cos(a) for a in angles], dtype=x.dtype, device=xp.device_of(x))
    c1 = xp.asarray([EIGHT_GAUSSIANS_RADIUS * math.sin(a) for a in angles], dtype=x.dtype, device=xp.device_of(x))
    d0 = x[..., 0:1] - c0
    d1 = x[..., 1:2] - c1
    var = EIGHT_GAUSSIANS_STD**2
    log_norm = -math.log(8.0) - math.log(2.0 * math.pi * var)
    return logsumexp(-(d0 * d0 + d1 * d1) / (2.0 * var), axis=-1) + log_norm


# ---------------------------------------------------------------------------------------------------
# 8x8 digits

DIGITS_SPLIT_SIZES = {"train": 1000, "valid": 350, "test": 447}
DIGITS_SPLIT_SEED = 1797
DATA_INSTALL_HINT = 'pip install "genblocks[data]"'


def _digits_host():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ImportError(
            f"load_digits needs scikit-learn (it ships the 8x8 digits): {DATA_INSTALL_HINT} (import failed: {err})"
        ) from err
    bunch = sk_load_digits()
    return bunch.data, bunch.target


def _split_name(split, choices):
    if split is not None and split not in choices:
        raise ValueError(f"split: expected None or one of {choices}, got {split!r}")
    return split


def load_digits(*, binarize=False, split=None, dtype="float32", backend=None):
    """scikit-learn's 8x8 handwritten digits: x (n, 64) grey levels in {0, ..., 16} as floats, y (n,) int64.

    ``binarize=True`` maps each pixel to 1.0 if its level is >= 8 (half of the maximum 16) else 0.0.
    ``split``: "train", "valid" or "test" gives that part of a fixed 1000/350/447 split, made by the
    permutation ``Rng(DIGITS_SPLIT_SEED=1797, backend="numpy").permutation(1797)`` (the first 1000 indices
    are train, the next 350 valid, the last 447 test); "all" gives all 1797 images in scikit-learn's order;
    None (the default) gives the dict {"train": (x, y), "valid": (x, y), "test": (x, y)}.
    Arrays are on ``backend`` (default: the current default backend). Needs scikit-learn.
    """
    dtype = float_dtype_name(dtype)
    _split_name(split, ("train", "valid", "test", "all"))
    images, labels = _digits_host()
    host = namespace(images)
    if binarize:
        images = host.astype(images >= 8.0, host.float64)
    if split == "all":
        return _to_backend(images, labels, backend, dtype)
    perm = to_numpy(Rng(DIGITS_SPLIT_SEED, backend="numpy").permutation(images.shape[0]))
    parts, start = {}, 0
    for name, size in DIGITS_SPLIT_SIZES.items():
        idx = perm[start:start + size]
        start += size
        parts[name] = _to_backend(host.take(images, idx, axis=0), host.take(labels, idx, axis=0), backend, dtype)
    return parts if split is None else parts[split]


def _to_backend(images, labels, backend, dtype):
    from genblocks.backends import get_backend

    name = get_backend() if backend is None else backend
    host = namespace(images)
    x = to_device(host.astype(images, resolve_dtype(host, dtype)), name)
    y = to_device(host.astype(labels, host.int64), name)
    return x, y


# ---------------------------------------------------------------------------------------------------
# Fashion-MNIST

FASHION_MNIST_ENV = "GENBLOCKS_FASHION_MNIST"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_PREFIX = {"train": "train", "test": "t10k"}


def _idx_candidates(prefix, kind, ndim):
    """File names tried, in order: the Zalando/Debian names, then the torchvision-style dotted ones."""
    names = []
    for stem in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
        names += [stem + ".gz", stem]
    return names


def _find_file(directory, names):
    for name in names:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _read_idx_checked(path):
    from genblocks.io import read_idx

    try:
        return read_idx(path)
    except ValueError:
        raise
    except (OSError, EOFError) as err:  # corrupt or truncated gzip streams
        raise ValueError(f"path: {path!r} is not a readable IDX file ({err})") from err


def load_fashion_mnist(directory=None, *, split="train", binarize=False, flatten=True, dtype="float32",
                       backend=None):
    """Fashion-MNIST from IDX files: x (n, 784) grey levels in {0, ..., 255} as floats, y (n,) int64 in 0..9.

    ``directory`` defaults to ``$GENBLOCKS_FASHION_MNIST``, else ``/usr/share/datasets/fashion-mnist/``
    (where Debian's ``dataset-fashion-mnist`` package puts ``train-images-idx3-ubyte.gz``,
    ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``);
    uncompressed files and ``train-images.idx3-ubyte``-style names are found too.
    ``split``: "train" (60000 images) or "test" (10000, the ``t10k`` files). ``binarize=True`` maps levels
    >= 128 to 1.0 and the rest to 0.0. ``flatten=False`` keeps images as (n, 28, 28). Class names are in
    ``FASHION_MNIST_CLASSES``. Missing files raise FileNotFoundError; corrupt ones ValueError.
    """
    dtype = float_dtype_name(dtype)
    if split not in _FASHION_PREFIX:
        raise ValueError(f"split: expected one of {tuple(_FASHION_PREFIX)}, got {split!r}")
    if directory is None:
        directory = os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR
    directory = os.fspath(directory)
    prefix = _FASHION_PREFIX[split]
    paths = {}
    for kind, ndim in (("images", 3), ("labels", 1)):
        names = _idx_candidates(prefix, kind, ndim)
        paths[kind] = _find_file(directory, names)
        if paths[kind] is None:
            raise FileNotFoundError(
                f"directory: no Fashion-MNIST {split} {kind} file in {directory!r} (looked for {', '.join(names)}). "
                "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, into "
                f"{FASHION_MNIST_DEFAULT_DIR}) or download them from https://github.com/zalandoresearch/fashion-mnist "
                f"and pass directory=... or set {FASHION_MNIST_ENV}"
            )
    images = _read_idx_checked(paths["images"])
    labels = _read_idx_checked(paths["labels"])
    if images.ndim != 3 or str(images.dtype) != "uint8":
        raise ValueError(
            f"path: {paths['images']!r} should hold uint8 images of shape (n, rows, cols), "
            f"got {images.dtype} of shape {images.shape}"
        )
    if labels.ndim != 1 or str(labels.dtype) != "uint8" or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"path: {paths['labels']!r} should hold {images.shape[0]} uint8 labels (one per image in "
            f"{paths['images']!r}), got {labels.dtype} of shape {labels.shape}"
        )
    host = namespace(images)
    if labels.shape[0] and int(host.max(labels)) > 9:
        raise ValueError(f"path: {paths['labels']!r} holds labels up to {int(host.max(labels))}, expected 0..9")
    if binarize:
        images = images >= 128
    if flatten:
        images = host.reshape(images, (images.shape[0], -1))
    return _to_backend(images, labels, backend, dtype)


# ---------------------------------------------------------------------------------------------------
# Dequantization and splits


def uniform_dequantize(x, rng, *, num_bins):
    """y = (x + u) / K with u ~ U[0, 1): integer levels x in {0..K-1} to y in (0, 1), K = ``num_bins``.

    x: float array of any shape holding integers in [0, K), on ``rng``'s backend -> y of the same shape,
    dtype and backend. ``quantize(y, num_bins=K)`` returns x exactly: the rare draws (probability about
    K * eps of the dtype) that float rounding would carry into the next bin are put at the bin's midpoint,
    and so is y = 0 (x = 0 and u = 0, probability 2^-24 in float32), so that a logit of y is always finite.
    Pair with ``dequantization_log_det(K, D)`` to turn log p(y) into a bound on log P(x).
    """
    num_bins = check_positive_int(num_bins, "num_bins")
    _check_rng(rng)
    shape = getattr(x, "shape", None)
    if shape is None or not _is_floating(x):
        raise TypeError(f"x: expected a float32/float64 array, got {getattr(x, 'dtype', type(x).__name__)}")
    xp = namespace(x)
    if xp.backend_name != rng.backend:
        raise TypeError(
            f"rng: expected an Rng on x's backend {xp.backend_name!r}, got one on {rng.backend!r}; "
            "use Rng(seed, backend=...) or move x with genblocks.backends.to_device"
        )
    ok = xp.logical_and(xp.equal(xp.floor(x), x), xp.logical_and(x >= 0.0, x <= num_bins - 1.0))
    if not bool(xp.all(ok)):
        raise ValueError(f"x: expected integer values in [0, {num_bins - 1}] (num_bins={num_bins})")
    u = rng.uniform(tuple(shape), dtype=str(x.dtype).rsplit(".", 1)[-1])
    y = (x + u) / float(num_bins)
    # unclipped, so it also rejects y == 1; y == 0 goes too (the sigmoid data side of a flow takes its logit)
    stays = xp.logical_and(xp.equal(xp.floor(y * float(num_bins)), x), y > 0.0)
    return xp.where(stays, y, (x + 0.5) / float(num_bins))


def _bin_index(xp, y, num_bins):
    return xp.clip(xp.floor(y * float(num_bins)), 0.0, num_bins - 1.0)


def quantize(y, *, num_bins):
    """x = clip(floor(K y), 0, K - 1): the inverse of ``uniform_dequantize``; y of any shape, same dtype out."""
    num_bins = check_positive_int(num_bins, "num_bins")
    if getattr(y, "shape", None) is None or not _is_floating(y):
        raise TypeError(f"y: expected a float32/float64 array, got {getattr(y, 'dtype', type(y).__name__)}")
    return _bin_index(namespace(y), y, num_bins)


def dequantization_log_det(num_bins, dim):
    """-D log K: log|det| of y = v / K from v = x + u in [0, K)^D to [0, 1)^D (a Python float).

    log P(x) >= E_u[log p_y((x + u) / K)] + dequantization_log_det(K, D) for a density p_y on [0, 1)^D.
    """
    check_positive_int(num_bins, "num_bins")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim: expected a positive int, got {dim!r}")
    return -dim * math.log(num_bins)


def standardize(x, *, min_std=1e-8):
    """z = (x - mean) / std per feature (statistics over axis 0): (n, ...) -> (z, scaling).

    scaling = {"mean": (...), "std": (...)} in x's dtype (std floored at ``min_std``, so a constant feature
    stays finite); ``unstandardize(z, scaling)`` undoes it. Models whose defaults assume unit scale
    (diffusion) train on z; their samples go back through ``unstandardize``.
    """
    if not _is_floating(x) or len(x.shape) < 2 or x.shape[0] < 2:
        raise ValueError(f"x: expected a float array (n, ...) with n >= 2, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    xp = namespace(x)
    mean = xp.mean(x, axis=0)
    std = xp.maximum(xp.std(x, axis=0), min_std)
    return (x - mean) / std, {"mean": mean, "std": std}


def unstandardize(z, scaling):
    """x = z std + mean: the inverse of ``standardize`` for (n, ...) arrays."""
    return z * scaling["std"] + scaling["mean"]


def train_valid_test_split(x, rng, sizes):
    """Shuffle the rows of x by one permutation and cut them into consecutive parts of the given sizes.

    x: an array (n, ...) or a tuple/list of arrays sharing the leading axis n (e.g. ``(images, labels)``),
    on ``rng``'s backend. ``sizes``: ints summing to n, or fractions summing to 1 (each part gets
    floor(f n), the last part the rest). Returns a list with one part per size, each shaped like ``x``.
    """
    _check_rng(rng)
    arrays = list(x) if isinstance(x, (tuple, list)) else [x]
    if not arrays or any(getattr(a, "shape", None) is None or len(a.shape) == 0 for a in arrays):
        raise TypeError("x: expected an array with a leading axis, or a tuple/list of such arrays")
    n = arrays[0].shape[0]
    if any(a.shape[0] != n for a in arrays):
        raise ValueError(f"x: expected arrays sharing the leading axis, got shapes {[tuple(a.shape) for a in arrays]}")
    counts = _split_counts(sizes, n)
    xp = namespace(arrays)
    if xp.backend_name != rng.backend:
        raise TypeError(f"rng: expected an Rng on x's backend {xp.backend_name!r}, got one on {rng.backend!r}")
    perm = rng.permutation(n)
    parts, start = [], 0
    for c in counts:
        idx = perm[start:start + c]
        start += c
        taken = [xp.take(a, idx, axis=0) for a in arrays]
        parts.append(type(x)(taken) if isinstance(x, (tuple, list)) else taken[0])
    return parts


def _split_counts(sizes, n):
    try:
        sizes = list(sizes)
    except TypeError:
        raise TypeError(f"sizes: expected a sequence of ints or fractions, got {sizes!r}") from None
    if not sizes:
        raise ValueError("sizes: expected at least one part, got an empty sequence")
    if all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
        if any(s < 0 for s in sizes) or sum(sizes) != n:
            raise ValueError(f"sizes: expected non-negative ints summing to n={n}, got {sizes}")
        return sizes
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sizes):
        if any(s < 0 for s in sizes) or abs(sum(sizes) - 1.0) > 1e-9:
            raise ValueError(f"sizes: expected non-negative fractions summing to 1, got {sizes}")
        counts = [int(math.floor(s * n)) for s in sizes[:-1]]
        return counts + [n - sum(counts)]
    raise TypeError(f"sizes: expected ints or floats, got {sizes!r}")
