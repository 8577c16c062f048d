"""Probability distributions as value objects, exact and in log-space, on every backend.

A distribution is built from parameter arrays (plain, traced by autograd, strict or cupy) and offers
``log_prob(x)``, ``sample(rng, sample_shape=())``, ``rsample`` where reparameterizable, ``mean``,
``variance``, ``stddev``, ``entropy()`` where it has a closed form, ``batch_shape`` and ``event_shape``
(tuples). Samples have shape ``sample_shape + batch_shape + event_shape`` and the parameters' dtype
(``Categorical`` returns int64 class indices).

Parameters broadcast against each other. Python numbers and lists become arrays of the other
parameters' dtype (float32 when every parameter is a Python number).

``validate=True`` (the default) checks concrete parameter values at construction: a bad value raises
ValueError naming the parameter, the constraint and the offending values. Values are not checked while
autograd traces the parameters (the check would read through the trace), nor when ``validate=False``
(use that inside sampling loops on the GPU: each check moves one boolean to the host). Values of ``x``
outside the support give ``-inf`` log-probability (never NaN); with ``check_support=True`` they raise
ValueError instead.

``kl(p, q)`` has closed forms for Normal, Independent, MultivariateNormal, Bernoulli and Categorical
pairs (add more with ``@register_kl(P, Q)``); ``kl_mc(p, q, rng, n)`` is the Monte Carlo estimate.
"""

import math

from genblocks.backends import backend_of, is_traced, namespace, to_numpy
from genblocks.blocks.base import Distribution, dtype_name
from genblocks.blocks.ops import log1mexp, log_sigmoid, log_softmax, logsumexp, stop_gradient

LOG_2PI = math.log(2.0 * math.pi)

__all__ = [
    "Normal", "Independent", "MultivariateNormal", "Bernoulli", "Categorical", "Logistic", "Laplace", "Uniform",
    "MixtureSameFamily", "DiscretizedLogisticMixture", "kl", "kl_mc", "register_kl",
]


# ---------------------------------------------------------------------------------------------------
# Shapes, parameters and checks


_is_traced = is_traced  # traced values must not be read by validation


def _concrete(params):
    """True when no parameter is traced: only then are values read for validation (cheap to skip)."""
    return not any(_is_traced(v) for v in params.values())


def _sample_shape(sample_shape):
    if isinstance(sample_shape, int) and not isinstance(sample_shape, bool):
        sample_shape = (sample_shape,)
    try:
        if isinstance(sample_shape, str):
            raise TypeError
        shape = tuple(int(s) for s in sample_shape)
    except (TypeError, ValueError):
        raise TypeError(f"sample_shape: expected an int or a tuple of ints, got {sample_shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"sample_shape: expected non-negative sizes, got {shape}")
    return shape


def _broadcast_shapes(named_shapes):
    """numpy broadcasting of ``{name: shape}``; ValueError naming the parameters that do not fit."""
    out = ()
    for name, shape in named_shapes.items():
        shape = tuple(shape)
        n = max(len(out), len(shape))
        a, b = (1,) * (n - len(out)) + out, (1,) * (n - len(shape)) + shape
        merged = []
        for da, db in zip(a, b):
            if da != db and 1 not in (da, db):
                given = ", ".join(f"{k} {tuple(v)}" for k, v in named_shapes.items())
                raise ValueError(f"{name}: shape {shape} does not broadcast with the other parameters ({given})")
            merged.append(db if da == 1 else da)
        out = tuple(merged)
    return out


def _sigmoid(x):
    """exp(log sigmoid(x)): full relative precision in both tails (1 + tanh(x/2) cancels for x << 0)."""
    return namespace(x).exp(log_sigmoid(x))


def _safe_log(xp, p):
    """log p with log 0 = -inf and no warning or NaN gradient at 0."""
    positive = p > 0
    return xp.where(positive, xp.log(xp.where(positive, p, 1.0)), -math.inf)


def _broadcast_to(xp, x, shape):
    """xp.broadcast_to that autograd can differentiate: leading axes are added by reshape first."""
    shape = tuple(shape)
    if x.ndim < len(shape):
        x = xp.reshape(x, (1,) * (len(shape) - x.ndim) + tuple(x.shape))
    return x if tuple(x.shape) == shape else xp.broadcast_to(x, shape)


def _params(named, *, float_only=True):
    """Turn ``{name: value}`` into arrays on one backend with one floating dtype: (xp, dtype, arrays)."""
    arrays = {k: v for k, v in named.items() if backend_of(v) is not None}
    xp = namespace(list(arrays.values()))
    for name, v in arrays.items():
        if float_only and not xp.isdtype(v.dtype, "real floating"):
            raise TypeError(f"{name}: expected a floating array (float32 or float64), got dtype {v.dtype}")
    dtype = xp.result_type(*[v.dtype for v in arrays.values()]) if arrays else xp.float32
    device = xp.device_of(next(iter(arrays.values()))) if arrays else None
    out = {}
    for name, v in named.items():
        if name in arrays:
            out[name] = v if v.dtype == dtype else xp.astype(v, dtype)
        else:
            if isinstance(v, bool) or v is None:
                raise TypeError(f"{name}: expected an array or a number, got {v!r}")
            try:
                out[name] = xp.asarray(v, dtype=dtype, device=device)
            except (TypeError, ValueError) as err:
                raise TypeError(f"{name}: expected an array or a number, got {v!r} ({err})") from None
    return xp, next(iter(out.values())).dtype, out


def _check(xp, ok, name, constraint, value):
    """Raise ValueError naming ``name`` and up to 5 offending entries of ``value`` where ``ok`` fails."""
    if _is_traced(value) or _is_traced(ok):
        return
    if bool(to_numpy(xp.all(ok))):
        return
    host, bad = to_numpy(value), ~to_numpy(_broadcast_to(xp, ok, value.shape))
    values = host[bad]
    shown = ", ".join(repr(float(v)) for v in values[:5]) + (", ..." if values.size > 5 else "")
    raise ValueError(
        f"{name}: expected {constraint}, got {values.size} offending value(s) of {host.size}: [{shown}]"
    )


def _summary(x):
    """Short text for repr: the values when small and concrete, else shape and dtype."""
    if not _is_traced(x) and math.prod(x.shape) <= 4:
        host = to_numpy(x)
        return repr(float(host)) if x.ndim == 0 else repr([float(v) for v in host.flat])
    return f"<{dtype_name(x.dtype)} {tuple(x.shape)}>"


class _Base(Distribution):
    """Shared plumbing: shapes, dtype, sample shapes, backend checks, support handling, repr."""

    _param_names = ()
    support = "the real line"

    def _setup(self, xp, dtype, batch_shape, event_shape, validate, check_support):
        self._xp, self.dtype = xp, dtype
        self._batch_shape, self._event_shape = tuple(batch_shape), tuple(event_shape)
        self.validate, self.check_support = bool(validate), bool(check_support)

    @property
    def batch_shape(self):
        return self._batch_shape

    @property
    def event_shape(self):
        return self._event_shape

    @property
    def stddev(self):
        """sqrt(variance)."""
        return self._xp.sqrt(self.variance)

    def _shape(self, sample_shape):
        return _sample_shape(sample_shape) + self._batch_shape + self._event_shape

    def _rng(self, rng):
        want = self._xp.backend_name
        got = getattr(rng, "backend", None)
        if got != want:
            raise ValueError(
                f"rng: expected a genblocks Rng on the parameters' backend {want!r}, got {rng!r}; "
                f"use Rng(seed, backend={want!r})"
            )
        return rng

    def _x(self, x, dtype=None):
        if backend_of(x) is None:
            try:
                return self._xp.asarray(x, dtype=dtype or self.dtype)
            except (TypeError, ValueError) as err:
                raise TypeError(f"x: expected an array or a number, got {x!r} ({err})") from None
        namespace(x, list(self._param_values()))  # TypeError naming to_device when backends differ
        return x

    def _param_values(self):
        return [getattr(self, name) for name in self._param_names]

    def _support(self, x, lp, inside):
        """``lp`` where ``inside`` holds, -inf elsewhere (or ValueError when ``check_support``)."""
        if inside is None:
            return lp
        if self.check_support:
            _check(self._xp, inside, "x", f"values in the support of {type(self).__name__} ({self.support})", x)
        return self._xp.where(inside, lp, -math.inf)

    def _check_real(self, x):
        if self.check_support:
            _check(self._xp, self._xp.isfinite(x), "x", f"finite values ({self.support})", x)

    def sample(self, rng, sample_shape=()):
        """A draw of shape ``sample_shape + batch_shape + event_shape``, without gradients."""
        if self.has_rsample:
            return stop_gradient(self.rsample(rng, sample_shape))
        raise NotImplementedError(f"{type(self).__name__}.sample")

    def entropy(self):
        raise NotImplementedError(
            f"{type(self).__name__}.entropy has no closed form; estimate it as -mean(log_prob(sample(rng, n)))"
        )

    def __repr__(self):
        args = ", ".join(f"{name}={_summary(getattr(self, name))}" for name in self._param_names)
        return f"{type(self).__name__}({args}, batch_shape={self.batch_shape}, event_shape={self.event_shape})"


# ---------------------------------------------------------------------------------------------------
# Scalar continuous families


class _LocScale(_Base):
    """A location-scale family: loc, scale broadcastable arrays (scale > 0, both finite)."""

    has_rsample = True
    _param_names = ("loc", "scale")

    def __init__(self, loc, scale, *, validate=True, check_support=False):
        xp, dtype, p = _params({"loc": loc, "scale": scale})
        shape = _broadcast_shapes({k: v.shape for k, v in p.items()})
        if validate and _concrete(p):
            _check(xp, xp.isfinite(p["loc"]), "loc", "finite values", p["loc"])
            ok = xp.logical_and(p["scale"] > 0, xp.isfinite(p["scale"]))
            _check(xp, ok, "scale", "positive finite values (scale > 0)", p["scale"])
        self.loc, self.scale = _broadcast_to(xp, p["loc"], shape), _broadcast_to(xp, p["scale"], shape)
        self._setup(xp, dtype, shape, (), validate, check_support)


class Normal(_LocScale):
    """N(x; loc, scale^2): log p = -((x - loc)/scale)^2 / 2 - log scale - log(2 pi)/2, elementwise.

    loc, scale: broadcastable arrays (scale > 0) -> batch_shape = their broadcast shape, event_shape = ().
    """

    def log_prob(self, x):
        """log N(x; loc, scale^2); x broadcastable to batch_shape."""
        x = self._x(x)
        self._check_real(x)
        z = (x - self.loc) / self.scale
        return -0.5 * (z * z) - self._xp.log(self.scale) - 0.5 * LOG_2PI

    def rsample(self, rng, sample_shape=()):
        """loc + scale * eps, eps ~ N(0, 1): differentiable in loc and scale."""
        eps = self._rng(rng).normal(self._shape(sample_shape), dtype=dtype_name(self.dtype))
        return self.loc + self.scale * eps

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return self.scale * self.scale

    @property
    def stddev(self):
        return self.scale

    def entropy(self):
        """1/2 + log(2 pi)/2 + log scale."""
        return 0.5 + 0.5 * LOG_2PI + self._xp.log(self.scale)


class Logistic(_LocScale):
    """Logistic(loc, scale): log p = -z - 2 softplus(-z) - log scale, z = (x - loc)/scale, elementwise.

    loc, scale: broadcastable arrays (scale > 0) -> batch_shape = their broadcast shape, event_shape = ().
    """

    def log_prob(self, x):
        """-|z| - 2 log1p(exp(-|z|)) - log scale (the density is symmetric in z)."""
        x = self._x(x)
        self._check_real(x)
        xp = self._xp
        a = xp.abs((x - self.loc) / self.scale)
        return -a - 2.0 * xp.log1p(xp.exp(-a)) - xp.log(self.scale)

    def rsample(self, rng, sample_shape=()):
        """loc + scale * (log u - log(1 - u)), u ~ U(0, 1) kept away from 0 and 1."""
        xp = self._xp
        u = self._rng(rng).uniform(self._shape(sample_shape), dtype=dtype_name(self.dtype))
        info = xp.finfo(self.dtype)
        u = xp.clip(u, float(info.smallest_normal), 1.0 - float(info.eps))
        return self.loc + self.scale * (xp.log(u) - xp.log1p(-u))

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return self.scale * self.scale * (math.pi**2 / 3.0)

    def entropy(self):
        """log scale + 2."""
        return self._xp.log(self.scale) + 2.0


class Laplace(_LocScale):
    """Laplace(loc, scale): log p = -|x - loc| / scale - log(2 scale), elementwise.

    loc, scale: broadcastable arrays (scale > 0) -> batch_shape = their broadcast shape, event_shape = ().
    """

    def log_prob(self, x):
        x = self._x(x)
        self._check_real(x)
        return -self._xp.abs(x - self.loc) / self.scale - self._xp.log(2.0 * self.scale)

    def rsample(self, rng, sample_shape=()):
        """loc + scale * (E1 - E2) with E = -log(1 - u) ~ Exp(1), u ~ U[0, 1) (never log 0)."""
        xp, shape, name = self._xp, self._shape(sample_shape), dtype_name(self.dtype)
        r1, r2 = self._rng(rng).split(2)
        e1, e2 = -xp.log1p(-r1.uniform(shape, dtype=name)), -xp.log1p(-r2.uniform(shape, dtype=name))
        return self.loc + self.scale * (e1 - e2)

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        return 2.0 * self.scale * self.scale

    def entropy(self):
        """1 + log(2 scale)."""
        return 1.0 + self._xp.log(2.0 * self.scale)


class Uniform(_Base):
    """U(low, high): log p = -log(high - low) on [low, high], -inf outside, elementwise.

    low, high: broadcastable arrays (low < high) -> batch_shape = their broadcast shape, event_shape = ().
    """

    has_rsample = True
    _param_names = ("low", "high")
    support = "[low, high]"

    def __init__(self, low, high, *, validate=True, check_support=False):
        xp, dtype, p = _params({"low": low, "high": high})
        shape = _broadcast_shapes({k: v.shape for k, v in p.items()})
        low, high = _broadcast_to(xp, p["low"], shape), _broadcast_to(xp, p["high"], shape)
        if validate and _concrete(p):
            _check(xp, xp.isfinite(low), "low", "finite values", low)
            _check(xp, xp.isfinite(high), "high", "finite values", high)
            if not _is_traced(low) and not _is_traced(high) and not bool(to_numpy(xp.all(low < high))):
                lo, hi = to_numpy(low), to_numpy(high)
                bad = [(float(a), float(b)) for a, b in zip(lo.flat, hi.flat) if not a < b]
                raise ValueError(
                    f"low, high: expected low < high elementwise, got {len(bad)} offending pair(s) (low, high): "
                    f"{bad[:5]}"
                )
        self.low, self.high = low, high
        self._setup(xp, dtype, shape, (), validate, check_support)

    def log_prob(self, x):
        x = self._x(x)
        xp = self._xp
        inside = xp.logical_and(x >= self.low, x <= self.high)
        lp = -xp.log(self.high - self.low) + 0.0 * x  # broadcast to x's shape, gradient 0 in x
        return self._support(x, lp, inside)

    def rsample(self, rng, sample_shape=()):
        """low + (high - low) u, u ~ U[0, 1)."""
        u = self._rng(rng).uniform(self._shape(sample_shape), dtype=dtype_name(self.dtype))
        return self.low + (self.high - self.low) * u

    @property
    def mean(self):
        return 0.5 * (self.low + self.high)

    @property
    def variance(self):
        w = self.high - self.low
        return w * w / 12.0

    def entropy(self):
        """log(high - low)."""
        return self._xp.log(self.high - self.low)


# ---------------------------------------------------------------------------------------------------
# Discrete families


class Bernoulli(_Base):
    """Bernoulli(sigmoid(logits)): log p(x) = x log sigmoid(l) + (1 - x) log sigmoid(-l), x in {0, 1}.

    logits (or probs): array -> batch_shape = its shape, event_shape = (). Samples are 0.0/1.0 in the
    logits' dtype. Non-binary x is outside the support (-inf): binarize grey-level data first.
    """

    _param_names = ("logits",)
    support = "{0, 1}"

    def __init__(self, logits=None, *, probs=None, validate=True, check_support=False):
        if (logits is None) == (probs is None):
            raise ValueError(f"logits, probs: expected exactly one of them, got logits={logits!r}, probs={probs!r}")
        if probs is not None:
            xp, dtype, p = _params({"probs": probs})
            probs = p["probs"]
            if validate and _concrete(p):
                _check(xp, xp.logical_and(probs >= 0, probs <= 1), "probs", "probabilities in [0, 1]", probs)
            logits = _safe_log(xp, probs) - _safe_log(xp, 1.0 - probs)
        else:
            xp, dtype, p = _params({"logits": logits})
            logits = p["logits"]
            if validate and _concrete(p):
                _check(xp, xp.logical_not(xp.isnan(logits)), "logits", "values that are not NaN", logits)
        self.logits = logits
        self._setup(xp, dtype, logits.shape, (), validate, check_support)

    @property
    def probs(self):
        return _sigmoid(self.logits)

    def log_prob(self, x):
        """log sigmoid(l) where x = 1, log sigmoid(-l) where x = 0, -inf elsewhere."""
        x = self._x(x)
        xp = self._xp
        lp = xp.where(x == 1, log_sigmoid(self.logits), log_sigmoid(-self.logits))
        return self._support(x, lp, xp.logical_or(x == 0, x == 1))

    def sample(self, rng, sample_shape=()):
        """1.0 where u < sigmoid(logits), u ~ U[0, 1), else 0.0."""
        u = self._rng(rng).uniform(self._shape(sample_shape), dtype=dtype_name(self.dtype))
        xp = self._xp
        return xp.astype(u < stop_gradient(self.probs), self.dtype)

    @property
    def mean(self):
        return self.probs

    @property
    def variance(self):
        return _sigmoid(self.logits) * _sigmoid(-self.logits)

    def entropy(self):
        """-p log p - (1 - p) log(1 - p) with log p = log sigmoid(l), log(1 - p) = log sigmoid(-l); 0 log 0 = 0."""
        return -(_safe_plogp(log_sigmoid(self.logits)) + _safe_plogp(log_sigmoid(-self.logits)))


def _safe_plogp(logp, logq=None):
    """p (log p - log q) (log q = 0 when not given) with 0 log 0 = 0, gradient-safe where log p = -inf."""
    xp = namespace(logp)
    finite = xp.isfinite(logp)
    safe = xp.where(finite, logp, 0.0)
    return xp.where(finite, xp.exp(safe) * (safe if logq is None else safe - logq), 0.0)


class Categorical(_Base):
    """Categorical(softmax(logits)) over the last axis: log p(k) = logits_k - logsumexp(logits).

    logits (or probs): (..., K) -> batch_shape = (...), event_shape = (); x and samples are class
    indices in {0, ..., K-1} (samples are int64; x may be integer or integral float).
    """

    _param_names = ("logits",)

    def __init__(self, logits=None, *, probs=None, validate=True, check_support=False):
        if (logits is None) == (probs is None):
            raise ValueError(f"logits, probs: expected exactly one of them, got logits={logits!r}, probs={probs!r}")
        name = "logits" if probs is None else "probs"
        xp, dtype, p = _params({name: logits if probs is None else probs})
        value = p[name]
        if value.ndim == 0:
            raise ValueError(f"{name}: expected an array with a last axis of classes, got a scalar")
        if validate and probs is not None and _concrete(p):
            _check(xp, value >= 0, "probs", "non-negative values", value)
            total = xp.sum(value, axis=-1, keepdims=True)
            _check(xp, xp.abs(total - 1.0) < 1e-4, "probs", "rows summing to 1 over the last axis", total)
        if validate and probs is None and _concrete(p):
            _check(xp, xp.logical_not(xp.isnan(value)), "logits", "values that are not NaN", value)
            _check(xp, xp.any(value > -math.inf, axis=-1), "logits", "at least one finite logit per row",
                   xp.max(value, axis=-1))
        self.logits = log_softmax(value if probs is None else _safe_log(xp, value), axis=-1)
        self.num_classes = value.shape[-1]
        self.support = f"{{0, ..., {self.num_classes - 1}}}"
        self._setup(xp, dtype, value.shape[:-1], (), validate, check_support)

    @property
    def probs(self):
        return self._xp.exp(self.logits)

    def _onehot(self, x):
        xp = self._xp
        return xp.astype(xp.expand_dims(x, axis=-1), self.dtype) == self._classes()

    def log_prob(self, x):
        """logits_x (normalised); -inf outside {0, ..., K-1}. x broadcastable to batch_shape."""
        x = self._x(x, dtype=self.dtype)
        xp = self._xp
        picked = xp.where(self._onehot(x), self.logits, 0.0)
        lp = xp.sum(picked, axis=-1)
        xf = xp.astype(x, self.dtype)
        inside = xp.logical_and(xp.logical_and(xf >= 0, xf <= self.num_classes - 1), xp.floor(xf) == xf)
        return self._support(x, lp, inside)

    def sample(self, rng, sample_shape=()):
        """Gumbel-max: argmax(logits + g), g = -log(-log u), u ~ U[0, 1). int64 of sample+batch shape."""
        xp = self._xp
        shape = self._shape(sample_shape) + (self.num_classes,)
        u = self._rng(rng).uniform(shape, dtype=dtype_name(self.dtype))
        info = xp.finfo(self.dtype)
        u = xp.clip(u, float(info.smallest_normal), 1.0 - float(info.eps))
        gumbel = -xp.log(-xp.log(u))
        return xp.astype(xp.argmax(stop_gradient(self.logits) + gumbel, axis=-1), xp.int64)

    def _classes(self):
        xp = self._xp
        return xp.arange(self.num_classes, dtype=self.dtype, device=xp.device_of(self.logits))

    @property
    def mean(self):
        """E[k] = sum_k k p_k."""
        xp = self._xp
        return xp.sum(self.probs * self._classes(), axis=-1)

    @property
    def variance(self):
        """sum_k p_k (k - E[k])^2."""
        k = self._classes()
        xp = self._xp
        return xp.sum(self.probs * (k - xp.expand_dims(self.mean, axis=-1)) ** 2, axis=-1)

    def entropy(self):
        """-sum_k p_k log p_k (0 log 0 = 0)."""
        xp = self._xp
        return -xp.sum(_safe_plogp(self.logits), axis=-1)


class DiscretizedLogisticMixture(_Base):
    """PixelCNN++ likelihood: P(x) = sum_k pi_k [sigmoid((y + h - mu_k)/s_k) - sigmoid((y - h - mu_k)/s_k)].

    x are integer pixels in {0, ..., num_bins - 1} (integer or integral float arrays), rescaled to
    y = 2 x / (num_bins - 1) - 1 in [-1, 1] with bin half-width h = 1 / (num_bins - 1); the edge bins
    take the whole tails (x = 0: cdf(y + h); x = num_bins - 1: 1 - cdf(y - h)), so the bins sum to 1.
    ``loc`` and ``log_scale`` live on that [-1, 1] scale (as in PixelCNN++).

    logit_probs, loc, log_scale: (..., K) -> batch_shape = (...) broadcast, event_shape = (): each
    sub-pixel is one scalar event (wrap in Independent for images; couple channels through ``loc``).
    Each bin mass is computed in log space as log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)),
    exact and finite for any parameters. Samples are integral values in the parameters' dtype.
    """

    _param_names = ("logit_probs", "loc", "log_scale")

    def __init__(self, logit_probs, loc, log_scale, num_bins=256, *, validate=True, check_support=False):
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"num_bins: expected an int >= 2, got {num_bins!r}")
        xp, dtype, p = _params({"logit_probs": logit_probs, "loc": loc, "log_scale": log_scale})
        for name, v in p.items():
            if v.ndim == 0:
                raise ValueError(f"{name}: expected an array with a last axis of K mixture components, got a scalar")
        shape = _broadcast_shapes({k: v.shape for k, v in p.items()})
        if validate and _concrete(p):
            for name, v in p.items():
                _check(xp, xp.isfinite(v), name, "finite values", v)
        self.logit_probs, self.loc, self.log_scale = (_broadcast_to(xp, p[k], shape) for k in self._param_names)
        self.num_bins = num_bins
        self.support = f"{{0, ..., {num_bins - 1}}}"
        self._setup(xp, dtype, shape[:-1], (), validate, check_support)

    def _component_log_mass(self, x):
        """log P(bin x | component k): shape broadcast(x[..., None], params) = (..., K)."""
        xp = self._xp
        half = 1.0 / (self.num_bins - 1)
        y = xp.expand_dims(xp.astype(x, self.dtype), axis=-1) * (2.0 * half) - 1.0
        inv_s = xp.exp(-self.log_scale)
        a = (y + half - self.loc) * inv_s  # upper edge
        b = (y - half - self.loc) * inv_s  # lower edge
        middle = log_sigmoid(a) + log_sigmoid(-b) + log1mexp((-2.0 * half) * inv_s)  # b - a, without cancellation
        first = log_sigmoid(a)
        last = log_sigmoid(-b)
        return xp.where(y <= -1.0 + 0.5 * half, first, xp.where(y >= 1.0 - 0.5 * half, last, middle))

    def log_prob(self, x):
        """log sum_k pi_k P(bin x | k); -inf outside {0, ..., num_bins - 1}."""
        x = self._x(x)
        xp = self._xp
        weights = log_softmax(self.logit_probs, axis=-1)
        lp = logsumexp(weights + self._component_log_mass(x), axis=-1)
        xf = xp.astype(x, self.dtype)
        inside = xp.logical_and(xp.logical_and(xf >= 0, xf <= self.num_bins - 1), xp.floor(xf) == xf)
        return self._support(x, lp, inside)

    def sample(self, rng, sample_shape=()):
        """Pick k by Gumbel-max, draw y ~ Logistic(mu_k, s_k), return its bin clip(round(...))."""
        xp = self._xp
        r1, r2 = self._rng(rng).split(2)
        k = Categorical(stop_gradient(self.logit_probs), validate=False).sample(r1, sample_shape)
        onehot = xp.expand_dims(k, axis=-1) == xp.arange(
            self.logit_probs.shape[-1], dtype=xp.int64, device=xp.device_of(self.loc)
        )
        loc = xp.sum(xp.where(onehot, stop_gradient(self.loc), 0.0), axis=-1)
        log_scale = xp.sum(xp.where(onehot, stop_gradient(self.log_scale), 0.0), axis=-1)
        y = Logistic(loc, xp.exp(log_scale), validate=False).sample(r2)
        bins = xp.round((y + 1.0) * (0.5 * (self.num_bins - 1)))
        return xp.clip(bins, 0.0, float(self.num_bins - 1))

    def _bin_log_probs(self):
        """log P(x = j) for every bin j: batch_shape + (num_bins,) (memory batch * K * num_bins)."""
        xp = self._xp
        bins = xp.arange(self.num_bins, dtype=self.dtype, device=xp.device_of(self.loc))
        bins = xp.reshape(bins, (self.num_bins,) + (1,) * len(self.batch_shape))
        lp = self.log_prob(bins)  # (num_bins,) + batch_shape
        return xp.moveaxis(lp, 0, -1)

    @property
    def mean(self):
        """sum_j j P(j), exact by enumerating the bins."""
        xp = self._xp
        bins = xp.arange(self.num_bins, dtype=self.dtype, device=xp.device_of(self.loc))
        return xp.sum(xp.exp(self._bin_log_probs()) * bins, axis=-1)

    @property
    def variance(self):
        """sum_j (j - mean)^2 P(j), exact by enumerating the bins."""
        xp = self._xp
        bins = xp.arange(self.num_bins, dtype=self.dtype, device=xp.device_of(self.loc))
        centred = bins - xp.expand_dims(self.mean, axis=-1)
        return xp.sum(xp.exp(self._bin_log_probs()) * centred * centred, axis=-1)

    def entropy(self):
        """-sum_j P(j) log P(j), exact by enumerating the bins."""
        xp = self._xp
        return -xp.sum(_safe_plogp(self._bin_log_probs()), axis=-1)


# ---------------------------------------------------------------------------------------------------
# Multivariate and composite


def _param_values(dist):
    """The parameter arrays of a distribution (none known for foreign Distribution subclasses)."""
    return dist._param_values() if hasattr(dist, "_param_values") else []


def _check_event(x, event_shape, name="x"):
    n = len(event_shape)
    if n and tuple(x.shape[len(x.shape) - n:]) != tuple(event_shape):
        raise ValueError(f"{name}: expected trailing axes {tuple(event_shape)} (the event shape), got shape {x.shape}")


class Independent(_Base):
    """Treat the last n batch axes of ``dist`` as event axes: log p(x) = sum over those axes of log p_i(x_i).

    dist: any distribution; reinterpreted_batch_ndims: n in [0, len(dist.batch_shape)] ->
    batch_shape = dist.batch_shape[:-n], event_shape = dist.batch_shape[-n:] + dist.event_shape.
    Parameter and support checks are those of ``dist`` (its ``validate`` / ``check_support``).
    """

    def __init__(self, dist, reinterpreted_batch_ndims, *, validate=True, check_support=False):
        if not isinstance(dist, Distribution):
            raise TypeError(f"dist: expected a genblocks Distribution, got {type(dist).__name__}")
        n = reinterpreted_batch_ndims
        nb = len(dist.batch_shape)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= nb:
            raise ValueError(
                f"reinterpreted_batch_ndims: expected an int in [0, {nb}] (dist.batch_shape={dist.batch_shape}), "
                f"got {n!r}"
            )
        self.base_dist, self.reinterpreted_batch_ndims = dist, n
        self.has_rsample = dist.has_rsample
        xp = getattr(dist, "_xp", None) or namespace(_param_values(dist))
        self._setup(xp, getattr(dist, "dtype", None), dist.batch_shape[: nb - n],
                    dist.batch_shape[nb - n:] + dist.event_shape, validate, check_support)

    def _param_values(self):
        return _param_values(self.base_dist)

    def _sum(self, value):
        n = self.reinterpreted_batch_ndims
        xp = self._xp
        return xp.sum(value, axis=tuple(range(-n, 0))) if n else value

    def log_prob(self, x):
        x = self._x(x)
        _check_event(x, self.event_shape)
        return self._sum(self.base_dist.log_prob(x))

    def rsample(self, rng, sample_shape=()):
        return self.base_dist.rsample(rng, sample_shape)

    def sample(self, rng, sample_shape=()):
        return self.base_dist.sample(rng, sample_shape)

    @property
    def mean(self):
        return self.base_dist.mean

    @property
    def variance(self):
        return self.base_dist.variance

    def entropy(self):
        return self._sum(self.base_dist.entropy())

    def __repr__(self):
        return f"Independent({self.base_dist!r}, reinterpreted_batch_ndims={self.reinterpreted_batch_ndims})"


class MultivariateNormal(_Base):
    """N(x; loc, L L^T): log p = -|L^-1 (x - loc)|^2 / 2 - sum log diag L - d log(2 pi) / 2.

    loc: (..., d); scale_tril L: (..., d, d) lower triangular with a positive diagonal (or give
    ``covariance_matrix`` (..., d, d), symmetric positive definite, factorised by Cholesky) ->
    batch_shape = broadcast of loc.shape[:-1] and L.shape[:-2], event_shape = (d,).
    """

    has_rsample = True
    _param_names = ("loc", "scale_tril")
    support = "R^d"

    def __init__(self, loc, scale_tril=None, *, covariance_matrix=None, validate=True, check_support=False):
        if (scale_tril is None) == (covariance_matrix is None):
            raise ValueError("scale_tril, covariance_matrix: expected exactly one of them")
        mname = "scale_tril" if covariance_matrix is None else "covariance_matrix"
        xp, dtype, p = _params({"loc": loc, mname: scale_tril if covariance_matrix is None else covariance_matrix})
        loc, m = p["loc"], p[mname]
        if loc.ndim < 1:
            raise ValueError(f"loc: expected an array (..., d), got shape {loc.shape}")
        d = loc.shape[-1]
        if m.ndim < 2 or m.shape[-1] != d or m.shape[-2] != d:
            raise ValueError(f"{mname}: expected shape (..., {d}, {d}) to match loc {loc.shape}, got {m.shape}")
        batch = _broadcast_shapes({"loc": loc.shape[:-1], mname: m.shape[:-2]})
        if validate and _concrete(p):
            _check(xp, xp.isfinite(loc), "loc", "finite values", loc)
            _check(xp, xp.isfinite(m), mname, "finite values", m)
        if covariance_matrix is not None:
            if validate and _concrete(p):
                # A A^T computed in floating point can be off by rounding; Cholesky reads the lower triangle
                size = xp.max(xp.abs(m), axis=(-2, -1), keepdims=True)
                _check(xp, xp.abs(m - xp.matrix_transpose(m)) <= 1e-4 * size, mname, "a symmetric matrix", m)
            try:
                m = xp.linalg.cholesky(m)
            except ValueError as err:  # numpy's LinAlgError is a ValueError
                raise ValueError(f"covariance_matrix: expected a positive definite matrix (Cholesky: {err})") from None
            if validate and _concrete(p):  # cupy returns NaN instead of raising
                _check(xp, xp.isfinite(m), mname, "a positive definite matrix (Cholesky failed)", m)
        elif validate and _concrete(p):
            _check(xp, xp.triu(m, k=1) == 0.0, "scale_tril", "a lower-triangular matrix (zeros above the diagonal)", m)
            _check(xp, xp.linalg.diagonal(m) > 0.0, "scale_tril",
                   "a positive diagonal (a non-singular Cholesky factor)", xp.linalg.diagonal(m))
        self.loc, self.scale_tril = loc, m
        self._setup(xp, dtype, batch, (d,), validate, check_support)

    def _mahalanobis(self, diff):
        """|L^-1 diff|^2 over the last axis via one linear solve (all samples as columns when L is shared)."""
        xp, L, d = self._xp, self.scale_tril, self.event_shape[0]
        if L.ndim == 2:
            cols = xp.matrix_transpose(xp.reshape(diff, (-1, d)))  # (d, N)
            z = xp.linalg.solve(L, cols)
            return xp.reshape(xp.sum(z * z, axis=0), diff.shape[:-1])
        shape = _broadcast_shapes({"x": diff.shape[:-1], "scale_tril": L.shape[:-2]})
        diff = _broadcast_to(xp, diff, shape + (d,))
        z = xp.linalg.solve(_broadcast_to(xp, L, shape + (d, d)), xp.expand_dims(diff, axis=-1))
        return xp.sum(z[..., 0] * z[..., 0], axis=-1)

    def _half_log_det(self):
        xp = self._xp
        return xp.sum(xp.log(xp.linalg.diagonal(self.scale_tril)), axis=-1)

    def log_prob(self, x):
        """x: (..., d) broadcastable with batch_shape + (d,) -> (...)."""
        x = self._x(x)
        _check_event(x, self.event_shape)
        if self.check_support:
            _check(self._xp, self._xp.isfinite(x), "x", "finite values (R^d)", x)
        d = self.event_shape[0]
        diff = x - self.loc
        return -0.5 * self._mahalanobis(diff) - self._half_log_det() - 0.5 * d * LOG_2PI

    def rsample(self, rng, sample_shape=()):
        """loc + L eps, eps ~ N(0, I_d)."""
        xp = self._xp
        eps = self._rng(rng).normal(self._shape(sample_shape), dtype=dtype_name(self.dtype))
        return self.loc + xp.squeeze(xp.matmul(self.scale_tril, xp.expand_dims(eps, axis=-1)), axis=-1)

    @property
    def covariance_matrix(self):
        return self._xp.matmul(self.scale_tril, self._xp.matrix_transpose(self.scale_tril))

    @property
    def mean(self):
        return _broadcast_to(self._xp, self.loc, self.batch_shape + self.event_shape)

    @property
    def variance(self):
        """diag(L L^T) = row sums of L^2."""
        xp = self._xp
        v = xp.sum(self.scale_tril * self.scale_tril, axis=-1)
        return _broadcast_to(xp, v, self.batch_shape + self.event_shape)

    def entropy(self):
        """d (1 + log 2 pi) / 2 + sum log diag L."""
        d = self.event_shape[0]
        h = 0.5 * d * (1.0 + LOG_2PI) + self._half_log_det()
        return _broadcast_to(self._xp, h, self.batch_shape)


class MixtureSameFamily(_Base):
    """p(x) = sum_k softmax(mixture_logits)_k p_k(x): log p = logsumexp_k(log pi_k + log p_k(x)).

    mixture_logits: (..., K) (or a Categorical); component: a distribution with batch_shape (..., K)
    and any event_shape E (e.g. Independent(Normal(locs, scales), 1) or MultivariateNormal for
    Gaussian mixtures in d dimensions) -> batch_shape = (...), event_shape = E. Not reparameterizable
    (the component choice is discrete). Support checks are the component's.
    """

    def __init__(self, mixture_logits, component, *, validate=True, check_support=False):
        if isinstance(mixture_logits, Categorical):
            mixture_logits = mixture_logits.logits
        if not isinstance(component, Distribution):
            raise TypeError(f"component: expected a genblocks Distribution, got {type(component).__name__}")
        if len(component.batch_shape) < 1:
            raise ValueError("component: expected a batch_shape (..., K) with K mixture components, got ()")
        xp, dtype, p = _params({"mixture_logits": mixture_logits})
        logits = p["mixture_logits"]
        k = component.batch_shape[-1]
        if logits.ndim < 1 or logits.shape[-1] != k:
            raise ValueError(
                f"mixture_logits: expected a last axis of size {k} (component.batch_shape={component.batch_shape}), "
                f"got shape {logits.shape}"
            )
        batch = _broadcast_shapes({"mixture_logits": logits.shape[:-1], "component": component.batch_shape[:-1]})
        if validate and _concrete(p):
            _check(xp, xp.logical_not(xp.isnan(logits)), "mixture_logits", "values that are not NaN", logits)
        self.mixture = Categorical(logits, validate=False)
        self.mixture_logits = self.mixture.logits
        self.component = component
        self._setup(xp, dtype, batch, component.event_shape, validate, check_support)

    def _param_values(self):
        return [self.mixture_logits] + _param_values(self.component)

    def log_prob(self, x):
        """x: batch_shape + event_shape (broadcastable) -> batch_shape."""
        x = self._x(x)
        _check_event(x, self.event_shape)
        xp = self._xp
        x = xp.expand_dims(x, axis=x.ndim - len(self.event_shape))  # a K axis before the event axes
        return logsumexp(self.mixture_logits + self.component.log_prob(x), axis=-1)

    def _pick(self, k, values):
        """values[..., k, *event] at the sampled index k (batch shape), by a one-hot sum."""
        xp, ne = self._xp, len(self.event_shape)
        K = self.mixture_logits.shape[-1]
        onehot = xp.expand_dims(k, axis=-1) == xp.arange(K, dtype=xp.int64, device=xp.device_of(self.mixture_logits))
        onehot = xp.reshape(onehot, onehot.shape + (1,) * ne)
        return xp.sum(xp.where(onehot, values, 0.0), axis=-1 - ne)

    def sample(self, rng, sample_shape=()):
        """k ~ Categorical(pi), then x ~ p_k (draws every component and keeps the chosen one)."""
        r1, r2 = self._rng(rng).split(2)
        sample_shape = _sample_shape(sample_shape)
        logits = _broadcast_to(self._xp, self.mixture_logits, self.batch_shape + self.mixture_logits.shape[-1:])
        k = Categorical(stop_gradient(logits), validate=False).sample(r1, sample_shape)
        # leading batch axes that only the mixture weights have become extra sample axes of the component
        comp_batch = self.component.batch_shape[:-1]
        extra = self.batch_shape[: len(self.batch_shape) - len(comp_batch)]
        if extra + comp_batch != self.batch_shape:
            raise NotImplementedError(
                f"sample: component batch_shape {self.component.batch_shape} broadcasts against mixture_logits "
                f"batch {self.batch_shape}; give the component parameters the full batch shape to sample"
            )
        draws = self.component.sample(r2, sample_shape + extra)  # sample + batch + (K,) + E
        return self._pick(k, draws)

    def _expand_w(self):
        xp = self._xp
        return xp.reshape(self.mixture.probs, self.mixture.probs.shape + (1,) * len(self.event_shape))

    @property
    def mean(self):
        """sum_k pi_k mean_k."""
        xp = self._xp
        return xp.sum(self._expand_w() * self.component.mean, axis=-1 - len(self.event_shape))

    @property
    def variance(self):
        """sum_k pi_k (var_k + mean_k^2) - mean^2 (law of total variance, per event coordinate)."""
        xp, axis = self._xp, -1 - len(self.event_shape)
        m = self.component.mean
        second = xp.sum(self._expand_w() * (self.component.variance + m * m), axis=axis)
        mean = self.mean
        return second - mean * mean

    def __repr__(self):
        return (f"MixtureSameFamily(mixture_logits={_summary(self.mixture_logits)}, component={self.component!r}, "
                f"batch_shape={self.batch_shape}, event_shape={self.event_shape})")


# ---------------------------------------------------------------------------------------------------
# KL divergence

_KL = {}


def register_kl(type_p, type_q):
    """Decorator: ``@register_kl(P, Q) def f(p, q): ...`` adds a closed-form KL(p || q) for that pair."""
    for name, t in (("type_p", type_p), ("type_q", type_q)):
        if not (isinstance(t, type) and issubclass(t, Distribution)):
            raise TypeError(f"{name}: expected a Distribution subclass, got {t!r}")

    def decorator(fn):
        _KL[(type_p, type_q)] = fn
        return fn

    return decorator


def _lookup(tp, tq):
    best, rank = None, None
    for (a, b), fn in _KL.items():
        if issubclass(tp, a) and issubclass(tq, b):
            r = (tp.__mro__.index(a), tq.__mro__.index(b))
            if rank is None or r < rank:
                best, rank = fn, r
    return best


def kl(p, q):
    """KL(p || q) = E_p[log p(x) - log q(x)] in closed form, shape = broadcast batch shape.

    Closed forms: Normal, Independent (same reinterpreted axes), MultivariateNormal, Bernoulli,
    Categorical pairs; others raise NotImplementedError (use ``kl_mc``).
    """
    fn = _lookup(type(p), type(q))
    if fn is None:
        raise NotImplementedError(
            f"kl: no closed form for KL({type(p).__name__} || {type(q).__name__}); use the Monte Carlo "
            f"estimate kl_mc(p, q, rng, n) or add one with @register_kl({type(p).__name__}, {type(q).__name__})"
        )
    if tuple(p.event_shape) != tuple(q.event_shape):
        raise ValueError(f"q: expected event_shape {p.event_shape} (p's), got {q.event_shape}")
    return fn(p, q)


def kl_mc(p, q, rng, n=1000):
    """(1/n) sum_i [log p(x_i) - log q(x_i)], x_i ~ p: the Monte Carlo estimate of KL(p || q).

    Returns the batch-shaped estimate; its standard error shrinks as 1/sqrt(n). Draws use ``rsample``
    when p is reparameterizable, so gradients in p's parameters are unbiased; for other p they miss the
    score-function term (differentiate only in q's parameters then).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if tuple(p.event_shape) != tuple(q.event_shape):
        raise ValueError(f"q: expected event_shape {p.event_shape} (p's), got {q.event_shape}")
    x = p.rsample(rng, (n,)) if p.has_rsample else p.sample(rng, (n,))
    xp = namespace(x)
    return xp.mean(p.log_prob(x) - q.log_prob(x), axis=0)


@register_kl(Normal, Normal)
def _kl_normal_normal(p, q):
    """log(s_q/s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2."""
    xp = p._xp
    r = p.scale / q.scale
    z = (p.loc - q.loc) / q.scale
    return 0.5 * (r * r + z * z - 1.0) - xp.log(p.scale) + xp.log(q.scale)


@register_kl(Independent, Independent)
def _kl_independent(p, q):
    if p.reinterpreted_batch_ndims != q.reinterpreted_batch_ndims:
        raise NotImplementedError(
            f"kl: Independent pairs need the same reinterpreted_batch_ndims, got {p.reinterpreted_batch_ndims} "
            f"and {q.reinterpreted_batch_ndims}; use kl_mc(p, q, rng, n)"
        )
    return p._sum(kl(p.base_dist, q.base_dist))


@register_kl(Bernoulli, Bernoulli)
def _kl_bernoulli(p, q):
    """p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q)), all through log sigmoid."""
    a, b = p.logits, q.logits
    return _safe_plogp(log_sigmoid(a), log_sigmoid(b)) + _safe_plogp(log_sigmoid(-a), log_sigmoid(-b))


@register_kl(Categorical, Categorical)
def _kl_categorical(p, q):
    """sum_k p_k (log p_k - log q_k), with 0 log 0 = 0."""
    xp = p._xp
    if p.num_classes != q.num_classes:
        raise ValueError(f"q: expected {p.num_classes} classes (p's), got {q.num_classes}")
    return xp.sum(_safe_plogp(p.logits, q.logits), axis=-1)


@register_kl(MultivariateNormal, MultivariateNormal)
def _kl_mvn(p, q):
    """(|Lq^-1 Lp|_F^2 + |Lq^-1 (m_q - m_p)|^2 - d) / 2 + sum log diag Lq - sum log diag Lp."""
    xp, d = p._xp, p.event_shape[0]
    batch = _broadcast_shapes({"p": p.batch_shape, "q": q.batch_shape})
    Lq = _broadcast_to(xp, q.scale_tril, batch + (d, d))
    Lp = _broadcast_to(xp, p.scale_tril, batch + (d, d))
    m = xp.linalg.solve(Lq, Lp)
    diff = _broadcast_to(xp, q.loc - p.loc, batch + (d,))
    z = xp.linalg.solve(Lq, xp.expand_dims(diff, axis=-1))
    trace = xp.sum(xp.reshape(m * m, batch + (d * d,)), axis=-1)
    maha = xp.sum(xp.reshape(z * z, batch + (d,)), axis=-1)
    return 0.5 * (trace + maha - d) + q._half_log_det() - p._half_log_det()
