"""Bijectors: invertible maps y = f(x) with a tractable log|det df/dx|.

Protocol (docs/architecture.md, Blocks and their protocols): ``forward(params, x, context=None) -> (y, log_det)`` and
``inverse(params, y, context=None) -> (x, log_det)``, each log_det = log|det| of that direction's Jacobian,
with the batch shape ``x.shape[:-1]``; events are the trailing axis. ``Chain([b1, b2])`` applies b1 first,
``Invert(b)`` swaps the directions. Blocks store hyperparameters and constants (masks, permutations);
``init(rng, dtype)`` returns the parameters.

In a :class:`~genblocks.models.flow.Flow` the forward direction maps base noise to data (sampling) and the
inverse direction maps data to noise (density evaluation). Couplings, MAF/IAF and splines follow that
convention: ``MaskedAutoregressive.inverse`` is the one-pass density direction, its ``forward`` the D-pass
sampling direction; ``InverseAutoregressive`` is the other way round.

Layers that take a conditioning ``context`` (..., context_dim) declare ``context_dim > 0``; every other layer
ignores ``context``, so one context can be handed to a whole ``Chain``.
"""

import functools
import math

from genblocks.backends import namespace, namespace_of, to_numpy
from genblocks.blocks import ops
from genblocks.blocks.base import Bijector, check_array, check_dtype
from genblocks.blocks.nn import MADE, MLP
from genblocks.blocks.validate import check_nonnegative_int, check_positive_int, check_positive_real

__all__ = [
    "Identity", "Shift", "Scale", "Affine", "Exp", "Sigmoid", "Logit", "Tanh", "Softplus",
    "Permute", "Reverse", "LULinear", "ActNorm", "BatchNormFlow",
    "AdditiveCoupling", "AffineCoupling", "SplineCoupling", "coupling_mask",
    "MaskedAutoregressive", "InverseAutoregressive", "SplineAutoregressive",
    "RationalQuadraticSpline", "rational_quadratic_spline", "Planar", "Radial", "Chain", "Invert",
]


# ---------------------------------------------------------------------------------------------------
# Helpers


def _zeros(rng, shape, dtype):
    xp = namespace_of(rng.backend)
    return xp.zeros(tuple(shape), dtype=getattr(xp, check_dtype(dtype)))


def _batch_zeros(xp, x):
    """A zero log-det with x's batch shape, dtype and device."""
    return xp.zeros(tuple(x.shape[:-1]), dtype=x.dtype, device=xp.device_of(x))


def _check_dim(x, name, dim):
    check_array(x, name, min_ndim=1)
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name}: expected a last (event) axis of size {dim}, got shape {tuple(x.shape)}")
    return x


def _check_context(xp, x, context, context_dim):
    """The context broadcast to x's batch shape, or None for a layer that takes none."""
    if not context_dim:
        return None
    if context is None:
        raise ValueError(f"context: this layer is conditional (context_dim={context_dim}), got None")
    check_array(context, "context", min_ndim=1, last_dim=context_dim)
    return xp.broadcast_to(context, tuple(x.shape[:-1]) + (context_dim,))


def _check_mask(mask, name="mask"):
    mask = tuple(int(m) for m in mask)
    if any(m not in (0, 1) for m in mask) or not any(mask) or all(mask):
        raise ValueError(f"{name}: expected a 0/1 sequence with both values present, got {mask}")
    return mask




def _bounded(xp, raw, bound):
    """bound * tanh(raw / bound): the identity near 0, never beyond +-bound (keeps scales finite)."""
    # tanh is exactly +-1 beyond |20| in float32 and float64; clipping there keeps autograd's tanh
    # gradient, 1 / cosh^2, from overflowing cosh for huge raw outputs
    return bound * xp.tanh(xp.clip(raw * (1.0 / bound), -20.0, 20.0))


def _indices(xp, ref, idx):
    """A constant int64 index vector on ``ref``'s device."""
    return xp.asarray(list(idx), dtype=xp.int64, device=xp.device_of(ref))


def _split_last(xp, a, sizes):
    """Consecutive parts of a's last axis: sizes (2, 3) splits (..., 5) into (..., 2) and (..., 3).

    Each part is a matmul with a constant 0/1 selection matrix: exact for finite values (an inf or NaN spreads
    NaN to its row's other parts), and its gradient is another matmul (slicing's gradient on numpy is a
    ufunc.at scatter, many times slower at these sizes).
    """
    n = a.shape[-1]
    if sum(sizes) != n:
        raise ValueError(f"sizes: expected parts adding up to the last axis {n}, got {tuple(sizes)}")
    flat = xp.reshape(a, (-1, n))
    parts, start = [], 0
    for size in sizes:
        select = xp.asarray(_selection(n, start, size), dtype=a.dtype, device=xp.device_of(a))
        parts.append(xp.reshape(xp.matmul(flat, select), tuple(a.shape[:-1]) + (size,)))
        start += size
    return parts


@functools.lru_cache(maxsize=256)
def _selection(n, start, size):
    """The (n, size) 0/1 matrix picking columns start..start+size-1, as nested tuples (host constant)."""
    return tuple(tuple(1.0 if i == start + j else 0.0 for j in range(size)) for i in range(n))


@functools.lru_cache(maxsize=64)
def _strict_upper_ones(K):
    """The (K, K - 1) 0/1 matrix T[i, j - 1] = [i < j]: row vector @ T = running sums s_0 + ... + s_{j-1}."""
    return tuple(tuple(1.0 if i < j else 0.0 for j in range(1, K)) for i in range(K))


def _takes_training(b):
    return getattr(b, "takes_training", False)


def call_bijector(b, direction, params, x, context=None, training=False, state=None):
    """(y, log_det) = b.forward or b.inverse ("forward" / "inverse"), passing ``training`` and ``state`` only to
    layers that take them (BatchNormFlow, Chain, Invert): how a model drives any bijector in training or
    evaluation mode."""
    if direction not in ("forward", "inverse"):
        raise ValueError(f"direction: expected 'forward' or 'inverse', got {direction!r}")
    fn = getattr(b, direction)
    kw = {}
    if training and _takes_training(b):
        kw["training"] = True
    if state is not None and getattr(b, "takes_state", False):
        kw["state"] = state
    return fn(params, x, context, **kw)


def init_state_of(b, params=None, dtype="float32"):
    """``b.init_state(params, dtype)``, or ``{}`` for a bijector without one (not a genblocks Block)."""
    fn = getattr(b, "init_state", None)
    return {} if fn is None else fn(params, dtype)


def inverse_and_update(b, params, y, context=None, state=None):
    """(x, log_det, new_state): ``b``'s training-mode inverse and its state after seeing the batch y.

    Layers with state (BatchNormFlow, Chain, Invert) update it in the same pass; others return it as is.
    """
    fn = getattr(b, "inverse_and_update", None)
    if fn is not None:
        return fn(params, y, context, state)
    x, log_det = call_bijector(b, "inverse", params, y, context, True, state)
    return x, log_det, state


_call = call_bijector


# ---------------------------------------------------------------------------------------------------
# Elementwise bijectors (log-dets summed over the event axis)


class Identity(Bijector):
    """y = x, log_det = 0.  x (..., d) -> y (..., d), log_det (...,)."""

    def forward(self, params, x, context=None):
        xp = namespace(x)
        return x, _batch_zeros(xp, _check_dim(x, "x", None))

    def inverse(self, params, y, context=None):
        xp = namespace(y)
        return y, _batch_zeros(xp, _check_dim(y, "y", None))


class Shift(Bijector):
    """y = x + shift, log_det = 0.  x (..., dim) -> y (..., dim); params {"shift": (dim,)} (zeros)."""

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        return {"shift": _zeros(rng, (self.dim,), dtype)}

    def forward(self, params, x, context=None):
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        return x + params["shift"], _batch_zeros(xp, x)

    def inverse(self, params, y, context=None):
        xp = namespace(y, params)
        _check_dim(y, "y", self.dim)
        return y - params["shift"], _batch_zeros(xp, y)


class Scale(Bijector):
    """y = x exp(log_scale), log_det = sum(log_scale).  x (..., dim); params {"log_scale": (dim,)} (zeros)."""

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        return {"log_scale": _zeros(rng, (self.dim,), dtype)}

    def forward(self, params, x, context=None):
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        s = params["log_scale"]
        return x * xp.exp(s), _batch_zeros(xp, x) + xp.sum(s)

    def inverse(self, params, y, context=None):
        xp = namespace(y, params)
        _check_dim(y, "y", self.dim)
        s = params["log_scale"]
        return y * xp.exp(-s), _batch_zeros(xp, y) - xp.sum(s)


class Affine(Bijector):
    """y = x exp(log_scale) + shift, log_det = sum(log_scale).

    x (..., dim) -> y (..., dim); params {"shift": (dim,), "log_scale": (dim,)} (identity at init).
    """

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        return {"shift": _zeros(rng, (self.dim,), dtype), "log_scale": _zeros(rng, (self.dim,), dtype)}

    def forward(self, params, x, context=None):
        return _affine_forward(x, params["shift"], params["log_scale"], self.dim)

    def inverse(self, params, y, context=None):
        return _affine_inverse(y, params["shift"], params["log_scale"], self.dim)


def _affine_forward(x, shift, log_scale, dim):
    """y = x exp(s) + shift, log_det = sum(s) per example (shared by Affine and ActNorm)."""
    xp = namespace(x, shift, log_scale)
    _check_dim(x, "x", dim)
    return x * xp.exp(log_scale) + shift, _batch_zeros(xp, x) + xp.sum(log_scale)


def _affine_inverse(y, shift, log_scale, dim):
    """x = (y - shift) exp(-s), log_det = -sum(s) per example."""
    xp = namespace(y, shift, log_scale)
    _check_dim(y, "y", dim)
    return (y - shift) * xp.exp(-log_scale), _batch_zeros(xp, y) - xp.sum(log_scale)


class _Elementwise(Bijector):
    """Elementwise bijectors whose one direction has a restricted domain.

    ``validate_args=True`` (the default) checks that direction's input and raises ``ValueError`` naming the
    bijector, the argument and the domain when any value lies outside it (the boundary itself, e.g. y = 0
    for ``Exp``'s inverse, is allowed and gives +-inf as the formula does; NaN passes through as NaN). The
    check reads one boolean on the host, also under autograd, so it costs one device sync per call on a
    GPU. With ``validate_args=False`` nothing is checked: out-of-domain values give NaN values and log-dets.
    """

    def __init__(self, *, validate_args=True):
        self.validate_args = bool(validate_args)

    def _repr_args(self):
        return [] if self.validate_args else ["validate_args=False"]

    def _check_domain(self, direction, name, value, outside, domain):
        if not self.validate_args:
            return
        value = ops.stop_gradient(value)
        bad = outside(value)
        if not bool(to_numpy(namespace(bad).any(bad))):
            return
        host = to_numpy(value)[to_numpy(bad)]
        shown = ", ".join(repr(float(v)) for v in host[:3]) + (", ..." if host.size > 3 else "")
        raise ValueError(
            f"{type(self).__name__}.{direction}: {name} must lie in {domain}, got {host.size} value(s) outside it "
            f"[{shown}]; validate_args=False skips this check (such values then give NaN)"
        )


def _sigmoid_forward(x):
    xp = namespace(x)
    # exp(log_sigmoid) keeps tiny values for very negative x (the tanh form rounds them to 0)
    return xp.exp(ops.log_sigmoid(x)), xp.sum(ops.log_sigmoid(x) + ops.log_sigmoid(-x), axis=-1)


def _sigmoid_inverse(y):
    xp = namespace(y)
    return ops.logit(y), -xp.sum(xp.log(y) + xp.log1p(-y), axis=-1)


def _outside_unit(v):
    return (v < 0.0) | (v > 1.0)


class Exp(_Elementwise):
    """y = exp(x), log_det = sum(x); inverse x = log(y) for y >= 0.  x (..., d) -> y (..., d)."""

    def forward(self, params, x, context=None):
        xp = namespace(x)
        _check_dim(x, "x", None)
        return xp.exp(x), xp.sum(x, axis=-1)

    def inverse(self, params, y, context=None):
        xp = namespace(y)
        _check_dim(y, "y", None)
        self._check_domain("inverse", "y", y, lambda v: v < 0.0, "[0, inf)")
        x = xp.log(y)
        return x, -xp.sum(x, axis=-1)


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)), log_det = sum(log_sigmoid(x) + log_sigmoid(-x)).  x (..., d) -> y in (0, 1)."""

    def forward(self, params, x, context=None):
        _check_dim(x, "x", None)
        return _sigmoid_forward(x)

    def inverse(self, params, y, context=None):
        _check_dim(y, "y", None)
        self._check_domain("inverse", "y", y, _outside_unit, "[0, 1]")
        return _sigmoid_inverse(y)


class Logit(_Elementwise):
    """y = log(x / (1 - x)) for x in [0, 1], log_det = -sum(log x + log(1 - x)).  Inverse: Sigmoid."""

    def forward(self, params, x, context=None):
        _check_dim(x, "x", None)
        self._check_domain("forward", "x", x, _outside_unit, "[0, 1]")
        return _sigmoid_inverse(x)

    def inverse(self, params, y, context=None):
        _check_dim(y, "y", None)
        return _sigmoid_forward(y)


class Tanh(_Elementwise):
    """y = tanh(x), log_det = sum(2 (log 2 - x - softplus(-2x))) (stable form of log(1 - tanh(x)^2)).

    x (..., d) -> y in (-1, 1); inverse x = (log1p(y) - log1p(-y)) / 2 for y in [-1, 1],
    log_det = -sum(log1p(y) + log1p(-y)).
    """

    def forward(self, params, x, context=None):
        xp = namespace(x)
        _check_dim(x, "x", None)
        return xp.tanh(x), xp.sum(2.0 * (ops.LOG_2 - x - ops.softplus(-2.0 * x)), axis=-1)

    def inverse(self, params, y, context=None):
        xp = namespace(y)
        _check_dim(y, "y", None)
        self._check_domain("inverse", "y", y, lambda v: (v < -1.0) | (v > 1.0), "[-1, 1]")
        a, b = xp.log1p(y), xp.log1p(-y)
        return 0.5 * (a - b), -xp.sum(a + b, axis=-1)


class Softplus(_Elementwise):
    """y = log(1 + exp(x)), log_det = sum(log_sigmoid(x)) = sum(x - y).

    x (..., d) -> y > 0; inverse x = y + log(-expm1(-y)) for y >= 0, log_det = sum(y - x).
    """

    def forward(self, params, x, context=None):
        xp = namespace(x)
        _check_dim(x, "x", None)
        return ops.softplus(x), xp.sum(ops.log_sigmoid(x), axis=-1)

    def inverse(self, params, y, context=None):
        xp = namespace(y)
        _check_dim(y, "y", None)
        self._check_domain("inverse", "y", y, lambda v: v < 0.0, "[0, inf)")
        x = y + xp.log(-xp.expm1(-y))
        return x, xp.sum(y - x, axis=-1)


# ---------------------------------------------------------------------------------------------------
# Permutations and linear maps


class Permute(Bijector):
    """y[..., i] = x[..., perm[i]], log_det = 0.  A constant permutation, not a parameter.

    ``Permute(perm)`` with a sequence of ints, or ``Permute(dim, rng=Rng(...))`` for a random one drawn now.
    x (..., dim) -> y (..., dim).
    """

    def __init__(self, perm, *, rng=None):
        if isinstance(perm, int) and not isinstance(perm, bool):
            if rng is None:
                raise ValueError(f"rng: Permute({perm}) draws a random permutation and needs rng=Rng(seed)")
            from genblocks.backends import to_numpy

            perm = [int(i) for i in to_numpy(rng.permutation(check_positive_int(perm, "perm")))]
        try:
            perm = tuple(int(i) for i in perm)
        except TypeError:
            raise TypeError(f"perm: expected a dim (int) or a sequence of ints, got {perm!r}") from None
        if sorted(perm) != list(range(len(perm))):
            raise ValueError(f"perm: expected a permutation of range({len(perm)}), got {perm}")
        self.perm = perm
        self.dim = len(perm)
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        self.inverse_perm = tuple(inv)

    def __repr__(self):
        return f"Permute(perm={self.perm})"

    def forward(self, params, x, context=None):
        xp = namespace(x)
        _check_dim(x, "x", self.dim)
        return xp.take(x, _indices(xp, x, self.perm), axis=-1), _batch_zeros(xp, x)

    def inverse(self, params, y, context=None):
        xp = namespace(y)
        _check_dim(y, "y", self.dim)
        return xp.take(y, _indices(xp, y, self.inverse_perm), axis=-1), _batch_zeros(xp, y)


class Reverse(Bijector):
    """y[..., i] = x[..., d - 1 - i], log_det = 0.  x (..., d) -> y (..., d)."""

    def forward(self, params, x, context=None):
        xp = namespace(x)
        _check_dim(x, "x", None)
        return xp.flip(x, axis=-1), _batch_zeros(xp, x)

    def inverse(self, params, y, context=None):
        return self.forward(params, y, context)


class LULinear(Bijector):
    """y = x W^T + b with W = L U: L unit lower triangular, U upper triangular with diagonal exp(log_diag).

    log_det = sum(log_diag) (Glow's invertible 1x1 convolution in LU form, on vectors). Combine with
    ``Permute`` for the pivoting P of a full PLU parameterisation. x (..., dim) -> y (..., dim);
    params {"lower": (dim, dim), "upper": (dim, dim), "log_diag": (dim,), "bias": (dim,)}, only the strict
    lower/upper triangles of "lower"/"upper" are used; identity at init.
    """

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        d = self.dim
        return {"lower": _zeros(rng, (d, d), dtype), "upper": _zeros(rng, (d, d), dtype),
                "log_diag": _zeros(rng, (d,), dtype), "bias": _zeros(rng, (d,), dtype)}

    def weight(self, params):
        """W = L U, (dim, dim)."""
        xp = namespace(params)
        low, up = params["lower"], params["upper"]
        eye = xp.eye(self.dim, dtype=low.dtype, device=xp.device_of(low))
        L = xp.tril(low, k=-1) + eye
        U = xp.triu(up, k=1) + eye * xp.exp(params["log_diag"])
        return xp.matmul(L, U)

    def forward(self, params, x, context=None):
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        y = xp.matmul(x, xp.matrix_transpose(self.weight(params))) + params["bias"]
        return y, _batch_zeros(xp, x) + xp.sum(params["log_diag"])

    def inverse(self, params, y, context=None):
        xp = namespace(y, params)
        _check_dim(y, "y", self.dim)
        w_inv = xp.linalg.inv(self.weight(params))
        x = xp.matmul(y - params["bias"], xp.matrix_transpose(w_inv))
        return x, _batch_zeros(xp, y) - xp.sum(params["log_diag"])


class ActNorm(Bijector):
    """y = x exp(log_scale) + loc, log_det = sum(log_scale) (Glow's activation normalisation).

    The inverse x = (y - loc) exp(-log_scale) normalises data-side activations; ``init_from_data(params, y)``
    sets loc = mean(y), log_scale = log(std(y)) so that the inverse output of that batch has zero mean and
    unit variance. x (..., dim) -> y (..., dim); params {"loc": (dim,), "log_scale": (dim,)}.
    """

    def __init__(self, dim, *, eps=1e-6):
        self.dim = check_positive_int(dim, "dim")
        self.eps = check_positive_real(eps, "eps")

    def init(self, rng, dtype="float32"):
        return {"loc": _zeros(rng, (self.dim,), dtype), "log_scale": _zeros(rng, (self.dim,), dtype)}

    def init_from_data(self, params, y):
        """New params with loc = mean(y), log_scale = log(std(y) + eps) over all batch axes of y (..., dim)."""
        xp = namespace(y, params)
        _check_dim(y, "y", self.dim)
        flat = xp.reshape(y, (-1, self.dim))
        loc = xp.mean(flat, axis=0)
        log_scale = xp.log(xp.std(flat, axis=0) + self.eps)
        dtype = params["loc"].dtype
        return {**params, "loc": xp.astype(loc, dtype), "log_scale": xp.astype(log_scale, dtype)}

    def forward(self, params, x, context=None):
        return _affine_forward(x, params["loc"], params["log_scale"], self.dim)

    def inverse(self, params, y, context=None):
        return _affine_inverse(y, params["loc"], params["log_scale"], self.dim)


class BatchNormFlow(Bijector):
    """Batch normalisation as a bijector (Dinh et al. 2017; Papamakarios et al. 2017).

    Inverse (data -> noise): x = (y - m) / sqrt(v + eps) exp(log_gamma) + beta, log_det =
    sum(log_gamma - log(v + eps) / 2); forward is its inverse. With ``training=True`` the inverse uses the
    batch mean and variance (m, v) of y over all batch axes, otherwise the running statistics, which live
    in the block's *state*, not its params (the optimizer must not train them): ``init_state(params)`` ->
    {"running_mean": zeros, "running_var": ones}, ``update_stats(state, y)`` returns the state moved towards
    y's batch statistics (``momentum``; ``momentum=1`` sets them). y (..., dim) -> x (..., dim); params
    {"log_gamma", "beta"} each (dim,). The forward direction has no batch statistics to use and always
    uses the running ones, so it (and evaluation) needs ``state=``.
    """

    takes_training = True
    takes_state = True

    def __init__(self, dim, *, momentum=0.1, eps=1e-5):
        self.dim = check_positive_int(dim, "dim")
        if not (isinstance(momentum, (int, float)) and 0 < momentum <= 1):
            raise ValueError(f"momentum: expected a float in (0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.eps = check_positive_real(eps, "eps")

    def init(self, rng, dtype="float32"):
        z = _zeros(rng, (self.dim,), dtype)
        return {"log_gamma": z, "beta": z}

    def init_state(self, params=None, dtype="float32"):
        """{"running_mean": zeros (dim,), "running_var": ones (dim,)} on ``params``' backend and dtype."""
        if params is not None:
            xp, dt = namespace(params), params["log_gamma"].dtype
        else:
            xp = namespace()
            dt = getattr(xp, check_dtype(dtype))
        z = xp.zeros((self.dim,), dtype=dt)
        return {"running_mean": z, "running_var": z + 1.0}

    def _batch_stats(self, xp, y):
        flat = xp.reshape(y, (-1, self.dim))
        return xp.mean(flat, axis=0), xp.var(flat, axis=0)

    def _running(self, state):
        if not (isinstance(state, dict) and {"running_mean", "running_var"} <= set(state)):
            got = "None" if state is None else (sorted(state) if isinstance(state, dict) else type(state).__name__)
            raise ValueError(
                "state: BatchNormFlow needs its running statistics {'running_mean', 'running_var'} in evaluation "
                f"and in the forward (sampling) direction, got {got}; pass state=model.init_state(params) or the "
                "state fit returned (FitResult.state)"
            )
        return state["running_mean"], state["running_var"]

    def update_stats(self, state, y, *, momentum=None):
        """The state with running stats <- (1 - momentum) running + momentum batch stats of y (..., dim)."""
        m0, v0 = self._running(state)
        xp = namespace(y, state)
        _check_dim(y, "y", self.dim)
        mom = self.momentum if momentum is None else float(momentum)
        m, v = self._batch_stats(xp, ops.stop_gradient(y))
        return {
            **state,
            "running_mean": xp.astype((1.0 - mom) * m0 + mom * m, m0.dtype),
            "running_var": xp.astype((1.0 - mom) * v0 + mom * v, v0.dtype),
        }

    def forward(self, params, x, context=None, *, training=False, state=None):
        m, v = self._running(state)
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        log_std = 0.5 * xp.log(v + self.eps)
        y = (x - params["beta"]) * xp.exp(log_std - params["log_gamma"]) + m
        return y, _batch_zeros(xp, x) + xp.sum(log_std - params["log_gamma"])

    def inverse(self, params, y, context=None, *, training=False, state=None):
        xp = namespace(y, params)
        _check_dim(y, "y", self.dim)
        if training:
            m, v = self._batch_stats(xp, y)
        else:
            m, v = self._running(state)
        log_std = 0.5 * xp.log(v + self.eps)
        x = (y - m) * xp.exp(params["log_gamma"] - log_std) + params["beta"]
        return x, _batch_zeros(xp, y) + xp.sum(params["log_gamma"] - log_std)

    def inverse_and_update(self, params, y, context=None, state=None):
        """(x, log_det, new_state): the training-mode inverse and the state moved towards y's statistics."""
        x, log_det = self.inverse(params, y, context, training=True)
        return x, log_det, self.update_stats(state, y)


# ---------------------------------------------------------------------------------------------------
# Rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows")


def _spline_derivative_offset(min_derivative):
    """c with min_derivative + softplus(c) = 1, so zero raw parameters give the identity spline."""
    return math.log(math.expm1(1.0 - min_derivative))


def _knots(xp, raw, bound, min_size):
    """Knot positions -B = k_0 < ... < k_K = B from raw sizes (..., K) via softmax with a minimum bin size."""
    K = raw.shape[-1]
    sizes = min_size + (1.0 - min_size * K) * ops.softmax(raw, axis=-1)
    # interior knots k_j = -B + 2B (s_0 + ... + s_{j-1}), j = 1..K-1: the running sums as one matmul with a
    # constant 0/1 triangle (a single BLAS call forward and backward; a cumulative sum along this short
    # last axis is several times slower on numpy)
    triangle = xp.asarray(_strict_upper_ones(K), dtype=raw.dtype, device=xp.device_of(raw))
    batch = tuple(raw.shape[:-1])
    running = xp.reshape(xp.matmul(xp.reshape(sizes, (-1, K)), triangle), batch + (K - 1,))
    edge = xp.full(batch + (1,), bound, dtype=raw.dtype, device=xp.device_of(raw))
    return xp.concat([-edge, -bound + 2.0 * bound * running, edge], axis=-1)


def rational_quadratic_spline(x, widths, heights, derivatives, *, bound=3.0, inverse=False,
                              min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3):
    """Monotone rational-quadratic spline on [-B, B], identity (linear tails) outside; elementwise.

    Inside bin k with theta = (x - x_k) / w_k, s_k = h_k / w_k:
    y = y_k + h_k (s_k theta^2 + d_k theta (1 - theta)) / (s_k + (d_k + d_{k+1} - 2 s_k) theta (1 - theta)).
    Widths/heights are softmax(raw) with a minimum size, interior derivatives min_derivative + softplus(raw);
    the boundary derivatives are 1 so the tails join smoothly. ``inverse=True`` solves the quadratic for x.
    x (...,), widths (..., K), heights (..., K), derivatives (..., K - 1) (broadcast against x) ->
    (y (...,), log|dy/dx| (...,)) (for inverse=True: (x, log|dx/dy|)).
    """
    xp = namespace(x, widths, heights, derivatives)
    K = widths.shape[-1]
    if heights.shape[-1] != K or derivatives.shape[-1] != K - 1:
        raise ValueError(
            f"derivatives: expected widths/heights (..., K) and derivatives (..., K-1), got shapes "
            f"{tuple(widths.shape)}, {tuple(heights.shape)}, {tuple(derivatives.shape)}"
        )
    if min_bin_width * K >= 1.0 or min_bin_height * K >= 1.0:
        raise ValueError(f"min_bin_width: {K} bins of minimum size must fit in the interval, got "
                         f"min_bin_width={min_bin_width}, min_bin_height={min_bin_height}")
    xk = _knots(xp, widths, bound, min_bin_width)
    yk = _knots(xp, heights, bound, min_bin_height)
    d_inner = min_derivative + ops.softplus(derivatives + _spline_derivative_offset(min_derivative))
    ones = xp.ones(tuple(d_inner.shape[:-1]) + (1,), dtype=d_inner.dtype, device=xp.device_of(d_inner))
    d = xp.concat([ones, d_inner, ones], axis=-1)

    inside = xp.logical_and(x >= -bound, x <= bound)
    # clip keeps the unused branch finite; where(inside, x, .) keeps d v/dx = 1 at exactly +-bound,
    # where clip's own gradient is 0 (the spline's edge slope is 1, so value, log-det and gradient agree)
    v = xp.where(inside, x, xp.clip(x, -bound, bound))
    # bin k = number of interior knots k_1..k_{K-1} at or below v (a count, outside the gradient); the
    # values at the knots either side of it are gathered with take_along_axis
    search = ops.stop_gradient(yk if inverse else xk)[..., 1:K]
    k = xp.sum(xp.astype(xp.expand_dims(ops.stop_gradient(v), axis=-1) >= search, xp.int32), axis=-1)
    k = xp.expand_dims(xp.astype(k, xp.int64), axis=-1)
    knots_shape = tuple(k.shape[:-1]) + (K + 1,)

    def at(a, index):
        a = a if tuple(a.shape) == knots_shape else xp.broadcast_to(a, knots_shape)
        return xp.squeeze(xp.take_along_axis(a, index, axis=-1), axis=-1)

    x0, y0, d0 = at(xk, k), at(yk, k), at(d, k)
    x1, y1, d1 = at(xk, k + 1), at(yk, k + 1), at(d, k + 1)
    w, h = x1 - x0, y1 - y0
    s = h / w
    c = d0 + d1 - 2.0 * s
    # Work from the nearer end of the bin: u = theta (lower half) or 1 - theta (upper half). The formulas are
    # symmetric under theta -> 1 - theta with d0 <-> d1 and distances measured from the other knot, and in
    # float32 a theta near 1 measured from x_k / y_k loses 1 - theta to cancellation (up to ~1 nat of log-det
    # in a steep bin next to the bound); from the near knot it keeps its relative accuracy.
    if inverse:  # upper half: v above the value at theta = 1/2, y_k + h (s + d0) / (2 s + d0 + d1)
        upper = (v - y0) * (2.0 * s + d0 + d1) > h * (s + d0)
        r = xp.where(upper, y1 - v, v - y0)
    else:
        upper = 2.0 * (v - x0) > w
        r = xp.where(upper, x1 - v, v - x0)
    d_near, d_far = xp.where(upper, d1, d0), xp.where(upper, d0, d1)
    if inverse:  # solve the quadratic a u^2 + b u + q = 0 in its cancellation-free form
        a = h * (s - d_near) + r * c
        b = h * d_near - r * c
        q = -s * r
        disc = xp.maximum(b * b - 4.0 * a * q, 0.0)
        u = (2.0 * q) / (-b - xp.sqrt(disc))
    else:
        u = r / w
    t1 = u * (1.0 - u)
    denom = s + c * t1
    if inverse:
        out = xp.where(upper, x1 - u * w, x0 + u * w)
    else:
        g = h * (s * u * u + d_near * t1) / denom
        out = xp.where(upper, y1 - g, y0 + g)
    log_deriv = (2.0 * xp.log(s) + xp.log(d_far * u * u + 2.0 * s * t1 + d_near * (1.0 - u) ** 2)
                 - 2.0 * xp.log(denom))
    if inverse:
        log_deriv = -log_deriv
    zero = xp.zeros_like(x)
    return xp.where(inside, out, x), xp.where(inside, log_deriv, zero)


def _split_spline_params(xp, raw, bins):
    """(..., 3K - 1) raw outputs -> widths (..., K), heights (..., K), derivatives (..., K - 1)."""
    return _split_last(xp, raw, (bins, bins, bins - 1))


class _SplineOptions:
    def _set_spline_options(self, bins, bound, min_bin_width, min_bin_height, min_derivative):
        self.bins = check_positive_int(bins, "bins")
        if bins < 2:
            raise ValueError(f"bins: expected at least 2 bins, got {bins}")
        self.bound = check_positive_real(bound, "bound")
        self.min_bin_width = check_positive_real(min_bin_width, "min_bin_width")
        self.min_bin_height = check_positive_real(min_bin_height, "min_bin_height")
        self.min_derivative = check_positive_real(min_derivative, "min_derivative")
        if self.min_bin_width * bins >= 1 or self.min_bin_height * bins >= 1:
            raise ValueError(f"min_bin_width: {bins} bins of the minimum size must fit, got "
                             f"{min_bin_width} and min_bin_height={min_bin_height}")

    def _spline(self, x, raw, inverse):
        xp = namespace(x, raw)
        w, h, d = _split_spline_params(xp, raw, self.bins)
        y, ld = rational_quadratic_spline(
            x, w, h, d, bound=self.bound, inverse=inverse, min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height, min_derivative=self.min_derivative,
        )
        return y, xp.sum(ld, axis=-1)


class RationalQuadraticSpline(Bijector, _SplineOptions):
    """y_i = RQS(x_i; theta_i): an elementwise rational-quadratic spline per dimension with its own knots.

    Identity outside [-bound, bound]. x (..., dim) -> y (..., dim); params {"widths": (dim, K),
    "heights": (dim, K), "derivatives": (dim, K - 1)} (raw, unconstrained; zeros = identity).
    """

    def __init__(self, dim, *, bins=8, bound=3.0, min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3):
        self.dim = check_positive_int(dim, "dim")
        self._set_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)

    def init(self, rng, dtype="float32"):
        d, K = self.dim, self.bins
        return {"widths": _zeros(rng, (d, K), dtype), "heights": _zeros(rng, (d, K), dtype),
                "derivatives": _zeros(rng, (d, K - 1), dtype)}

    def _raw(self, xp, params):
        return xp.concat([params["widths"], params["heights"], params["derivatives"]], axis=-1)

    def forward(self, params, x, context=None):
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        return self._spline(x, self._raw(xp, params), inverse=False)

    def inverse(self, params, y, context=None):
        xp = namespace(y, params)
        _check_dim(y, "y", self.dim)
        return self._spline(y, self._raw(xp, params), inverse=True)


# ---------------------------------------------------------------------------------------------------
# Coupling layers (Dinh et al. 2015, 2017; Durkan et al. 2019)


def coupling_mask(dim, *, kind="alternate", flip=False):
    """A 0/1 tuple of length dim: 1 marks the identity (conditioning) half of a coupling layer.

    kind="alternate": (1, 0, 1, 0, ...); kind="half": first ceil(dim/2) ones. ``flip`` swaps 0 and 1.
    """
    check_positive_int(dim, "dim")
    if dim < 2:
        raise ValueError(f"dim: a coupling layer needs at least 2 dimensions, got {dim}")
    if kind == "alternate":
        mask = [1 - i % 2 for i in range(dim)]
    elif kind == "half":
        mask = [1 if i < (dim + 1) // 2 else 0 for i in range(dim)]
    else:
        raise ValueError(f"kind: expected 'alternate' or 'half', got {kind!r}")
    return tuple(1 - m if flip else m for m in mask)


class _Coupling(Bijector):
    """y_a = x_a, y_b = g(x_b; theta(x_a, context)): subclasses define the per-element transform g.

    The conditioner maps (..., n_a + context_dim) -> (..., n_b * params_per_dim). When built here it is an
    MLP whose last layer starts at zero, so the layer starts close to the identity.
    """

    params_per_dim = 1

    def __init__(self, mask, *, hidden=(64, 64), conditioner=None, context_dim=0, activation="relu"):
        self.mask = _check_mask(mask)
        self.dim = len(self.mask)
        self.context_dim = check_nonnegative_int(context_dim, "context_dim")
        self.hidden = tuple(hidden)
        self.activation = activation
        self._idx_a = tuple(i for i, m in enumerate(self.mask) if m == 1)
        self._idx_b = tuple(i for i, m in enumerate(self.mask) if m == 0)
        order = self._idx_a + self._idx_b
        back = [0] * self.dim
        for i, j in enumerate(order):
            back[j] = i
        self._back = tuple(back)
        n_in, n_out = len(self._idx_a) + self.context_dim, len(self._idx_b) * self.params_per_dim
        self._own_conditioner = conditioner is None
        if conditioner is None:
            conditioner = MLP((n_in, *self.hidden, n_out), activation=activation)
        if not hasattr(conditioner, "apply") or not hasattr(conditioner, "init"):
            raise TypeError(f"conditioner: expected a Block with init(rng, dtype) and apply(params, h) mapping "
                            f"(..., {n_in}) -> (..., {n_out}), got {conditioner!r}")
        self.conditioner = conditioner

    def __repr__(self):
        extra = f", context_dim={self.context_dim}" if self.context_dim else ""
        cond = f"hidden={self.hidden}" if self._own_conditioner else f"conditioner={self.conditioner!r}"
        return f"{type(self).__name__}(mask={self.mask}, {cond}{extra}{self._extra_repr()})"

    def _extra_repr(self):
        return ""

    def init(self, rng, dtype="float32"):
        params = self.conditioner.init(rng, dtype)
        if self._own_conditioner:
            xp = namespace(params)
            last = params[-1]
            params[-1] = {k: xp.zeros_like(v) for k, v in last.items()}
        return {"conditioner": params}

    def _theta(self, params, xp, x_a, context):
        h = x_a
        c = _check_context(xp, x_a, context, self.context_dim)
        if c is not None:
            h = xp.concat([x_a, c], axis=-1)
        out = self.conditioner.apply(params["conditioner"], h)
        n_b = len(self._idx_b)
        return xp.reshape(out, tuple(out.shape[:-1]) + (n_b, self.params_per_dim))

    def _run(self, params, x, context, inverse):
        xp = namespace(x, params, context)
        _check_dim(x, "y" if inverse else "x", self.dim)
        x_a = xp.take(x, _indices(xp, x, self._idx_a), axis=-1)
        x_b = xp.take(x, _indices(xp, x, self._idx_b), axis=-1)
        theta = self._theta(params, xp, x_a, context)
        y_b, log_det = self._transform(xp, x_b, theta, inverse)
        y = xp.take(xp.concat([x_a, y_b], axis=-1), _indices(xp, x, self._back), axis=-1)
        return y, log_det

    def forward(self, params, x, context=None):
        return self._run(params, x, context, inverse=False)

    def inverse(self, params, y, context=None):
        return self._run(params, y, context, inverse=True)


class AdditiveCoupling(_Coupling):
    """NICE: y_a = x_a, y_b = x_b + t(x_a, context); log_det = 0.

    mask: 0/1 sequence (1 = x_a, kept); x (..., dim) -> y (..., dim); params {"conditioner": ...}.
    """

    params_per_dim = 1

    def _transform(self, xp, x_b, theta, inverse):
        t = theta[..., 0]
        y_b = x_b - t if inverse else x_b + t
        return y_b, _batch_zeros(xp, x_b)


class AffineCoupling(_Coupling):
    """RealNVP: y_a = x_a, y_b = x_b exp(s) + t with s = B tanh(s_raw / B), (t, s_raw) = NN(x_a, context).

    log_det = sum(s). mask: 0/1 sequence (1 = x_a, kept); x (..., dim) -> y (..., dim);
    params {"conditioner": ...}; ``log_scale_bound`` B bounds the log-scale.
    """

    params_per_dim = 2

    def __init__(self, mask, *, hidden=(64, 64), conditioner=None, context_dim=0, activation="relu",
                 log_scale_bound=3.0):
        super().__init__(mask, hidden=hidden, conditioner=conditioner, context_dim=context_dim,
                         activation=activation)
        self.log_scale_bound = check_positive_real(log_scale_bound, "log_scale_bound")

    def _extra_repr(self):
        return f", log_scale_bound={self.log_scale_bound}"

    def _transform(self, xp, x_b, theta, inverse):
        t, s = theta[..., 0], _bounded(xp, theta[..., 1], self.log_scale_bound)
        if inverse:
            return (x_b - t) * xp.exp(-s), -xp.sum(s, axis=-1)
        return x_b * xp.exp(s) + t, xp.sum(s, axis=-1)


class SplineCoupling(_Coupling, _SplineOptions):
    """Neural spline coupling: y_a = x_a, y_b = RQS(x_b; theta(x_a, context)), K bins on [-bound, bound].

    mask: 0/1 sequence (1 = x_a, kept); x (..., dim) -> y (..., dim); params {"conditioner": ...} (its
    output has n_b * (3K - 1) raw spline parameters).
    """

    def __init__(self, mask, *, bins=8, bound=3.0, hidden=(64, 64), conditioner=None, context_dim=0,
                 activation="relu", min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3):
        self._set_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
        self.params_per_dim = 3 * bins - 1
        super().__init__(mask, hidden=hidden, conditioner=conditioner, context_dim=context_dim,
                         activation=activation)

    def _extra_repr(self):
        return f", bins={self.bins}, bound={self.bound}"

    def _transform(self, xp, x_b, theta, inverse):
        return self._spline(x_b, theta, inverse)


# ---------------------------------------------------------------------------------------------------
# Autoregressive layers (Papamakarios et al. 2017; Kingma et al. 2016; Durkan et al. 2019)


class _Autoregressive(Bijector):
    """x_i = g(u_i; theta_i(x_<i, context)) with theta from a MADE; subclasses define g.

    inverse(x) (data -> noise) is one pass: u = g^-1(x; theta(x)). forward(u) (noise -> data) takes ``dim``
    passes, each fixing one more coordinate in the autoregressive order.
    """

    params_per_dim = 1

    def __init__(self, dim, *, hidden=(64, 64), context_dim=0, activation="relu", order=None):
        self.dim = check_positive_int(dim, "dim")
        self.hidden = tuple(hidden)
        self.context_dim = check_nonnegative_int(context_dim, "context_dim")
        self.activation = activation
        self.made = MADE(dim, self.hidden, out_multiplier=self.params_per_dim, context_dim=self.context_dim,
                         activation=activation, order=order)
        self.order = self.made.order

    def __repr__(self):
        extra = f", context_dim={self.context_dim}" if self.context_dim else ""
        order = "" if self.order == tuple(range(self.dim)) else f", order={self.order}"
        return f"{type(self).__name__}(dim={self.dim}, hidden={self.hidden}{extra}{order}{self._extra_repr()})"

    def _extra_repr(self):
        return ""

    def init(self, rng, dtype="float32"):
        params = self.made.init(rng, dtype)
        xp = namespace(params)
        last = params["layers"][-1]
        params["layers"][-1] = {k: xp.zeros_like(v) for k, v in last.items()}  # start near the identity
        return params

    def _theta(self, params, xp, x, context):
        c = _check_context(xp, x, context, self.context_dim)
        return self.made.apply(params, x, c)

    def inverse(self, params, y, context=None):
        xp = namespace(y, params, context)
        _check_dim(y, "y", self.dim)
        return self._transform(xp, y, self._theta(params, xp, y, context), inverse=True)

    def forward(self, params, x, context=None):
        xp = namespace(x, params, context)
        _check_dim(x, "x", self.dim)
        y = xp.zeros_like(x)
        log_det = None
        for _ in range(self.dim):
            # after pass k the first k coordinates (in order) are exact; the last pass's theta only
            # reads coordinates that were already exact, so its log-det is the final one
            y, log_det = self._transform(xp, x, self._theta(params, xp, y, context), inverse=False)
        return y, log_det


class MaskedAutoregressive(_Autoregressive):
    """MAF: x_i = u_i exp(s_i) + t_i with (t_i, s_i) = MADE(x_<i, context), s = B tanh(s_raw / B).

    inverse (density, one pass): u = (x - t(x)) exp(-s(x)), log_det = -sum(s). forward (sampling) takes
    ``dim`` passes. u (..., dim) <-> x (..., dim); params = MADE params (output layer zero at init).
    """

    params_per_dim = 2

    def __init__(self, dim, *, hidden=(64, 64), context_dim=0, activation="relu", order=None,
                 log_scale_bound=3.0):
        self.log_scale_bound = check_positive_real(log_scale_bound, "log_scale_bound")
        super().__init__(dim, hidden=hidden, context_dim=context_dim, activation=activation, order=order)

    def _transform(self, xp, v, theta, inverse):
        t, s = theta[..., 0], _bounded(xp, theta[..., 1], self.log_scale_bound)
        if inverse:
            return (v - t) * xp.exp(-s), -xp.sum(s, axis=-1)
        return v * xp.exp(s) + t, xp.sum(s, axis=-1)


class SplineAutoregressive(_Autoregressive, _SplineOptions):
    """Autoregressive neural spline: x_i = RQS(u_i; theta_i(x_<i, context)), theta from a MADE.

    inverse (density) is one pass, forward (sampling) ``dim`` passes. u (..., dim) <-> x (..., dim);
    params = MADE params with 3K - 1 outputs per dimension.
    """

    def __init__(self, dim, *, bins=8, bound=3.0, hidden=(64, 64), context_dim=0, activation="relu", order=None,
                 min_bin_width=1e-3, min_bin_height=1e-3, min_derivative=1e-3):
        self._set_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
        self.params_per_dim = 3 * bins - 1
        super().__init__(dim, hidden=hidden, context_dim=context_dim, activation=activation, order=order)

    def _extra_repr(self):
        return f", bins={self.bins}, bound={self.bound}"

    def _transform(self, xp, v, theta, inverse):
        return self._spline(v, theta, inverse)


# ---------------------------------------------------------------------------------------------------
# Residual flows without a closed-form inverse (Rezende & Mohamed 2015)


def _no_inverse(name):
    return NotImplementedError(
        f"{name}.inverse: {name} has no closed-form inverse; use it in the sampling (forward) direction, "
        f"e.g. in a variational posterior, or use AffineCoupling / MaskedAutoregressive / SplineCoupling "
        f"when log-densities of data are needed"
    )


class Planar(Bijector):
    """y = x + u_hat tanh(w . x + b), log_det = log|1 + tanh'(w . x + b) w . u_hat|. Forward only.

    u_hat = u + (m(w . u) - w . u) w / |w|^2 with m(a) = -1 + softplus(a) keeps the map invertible, but
    the inverse has no closed form: ``inverse`` raises NotImplementedError. x (..., dim) -> y (..., dim);
    params {"w": (dim,), "u": (dim,), "b": ()}.
    """

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        r1, r2 = rng.split(2)
        scale = 1.0 / math.sqrt(self.dim)
        return {"w": r1.normal((self.dim,), dtype, scale=scale), "u": r2.normal((self.dim,), dtype, scale=scale),
                "b": _zeros(rng, (), dtype)}

    def _u_hat(self, xp, w, u):
        wu = xp.sum(w * u)
        return u + (-1.0 + ops.softplus(wu) - wu) * w / (xp.sum(w * w) + 1e-12)

    def forward(self, params, x, context=None):
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        w, b = params["w"], params["b"]
        u_hat = self._u_hat(xp, w, params["u"])
        a = xp.sum(x * w, axis=-1) + b
        t = xp.tanh(a)
        y = x + xp.expand_dims(t, axis=-1) * u_hat
        return y, xp.log(xp.abs(1.0 + (1.0 - t * t) * xp.sum(w * u_hat)))

    def inverse(self, params, y, context=None):
        raise _no_inverse("Planar")


class Radial(Bijector):
    """y = x + beta h(r) (x - x0), h(r) = 1 / (alpha + r), r = |x - x0|. Forward only.

    alpha = softplus(a_raw) > 0 and beta = -alpha + softplus(b_raw) >= -alpha keep it invertible;
    log_det = (dim - 1) log(1 + beta h) + log(1 + beta h - beta h^2 r). ``inverse`` raises
    NotImplementedError. x (..., dim) -> y (..., dim); params {"x0": (dim,), "alpha_raw": (), "beta_raw": ()}.
    """

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        return {"x0": rng.normal((self.dim,), dtype), "alpha_raw": _zeros(rng, (), dtype),
                "beta_raw": _zeros(rng, (), dtype)}

    def forward(self, params, x, context=None):
        xp = namespace(x, params)
        _check_dim(x, "x", self.dim)
        alpha = ops.softplus(params["alpha_raw"])
        beta = -alpha + ops.softplus(params["beta_raw"])
        diff = x - params["x0"]
        r = xp.sqrt(xp.sum(diff * diff, axis=-1))
        h = 1.0 / (alpha + r)
        y = x + xp.expand_dims(beta * h, axis=-1) * diff
        log_det = (self.dim - 1) * xp.log1p(beta * h) + xp.log1p(beta * h - beta * h * h * r)
        return y, log_det

    def inverse(self, params, y, context=None):
        raise _no_inverse("Radial")


# ---------------------------------------------------------------------------------------------------
# Composition


class Chain(Bijector):
    """f = f_n o ... o f_1 for Chain([f_1, ..., f_n]) (f_1 applied first); log-dets add.

    x (..., d) -> y (..., d); params = list of the layers' params, state (``init_state``) = list of the
    layers' states. ``training=True`` and ``state`` are passed on to layers that take them (BatchNormFlow).
    """

    takes_training = True
    takes_state = True

    def __init__(self, bijectors):
        bijectors = list(bijectors)
        for i, b in enumerate(bijectors):
            if not (hasattr(b, "forward") and hasattr(b, "inverse")):
                raise TypeError(f"bijectors[{i}]: expected a Bijector, got {type(b).__name__}")
        self.bijectors = bijectors

    def __repr__(self):
        inner = ",\n  ".join(repr(b) for b in self.bijectors)
        return f"Chain([\n  {inner}\n])"

    def init(self, rng, dtype="float32"):
        check_dtype(dtype)
        if not self.bijectors:
            return []
        return [b.init(r, dtype) for b, r in zip(self.bijectors, rng.split(len(self.bijectors)))]

    def _check_params(self, params):
        # autograd traces lists as SequenceBox: accept any sequence of the right length
        if isinstance(params, dict) or not hasattr(params, "__len__") or len(params) != len(self.bijectors):
            got = f"{len(params)} items" if hasattr(params, "__len__") else type(params).__name__
            raise ValueError(f"params: expected a list of {len(self.bijectors)} layer params, got {got}")

    def init_state(self, params=None, dtype="float32"):
        """The list of the layers' states (``{}`` for stateless layers)."""
        ps = [None] * len(self.bijectors) if params is None else list(params)
        return [init_state_of(b, p, dtype) for b, p in zip(self.bijectors, ps)]

    def _states(self, state):
        if state is None:
            return [None] * len(self.bijectors)
        if isinstance(state, dict) or not hasattr(state, "__len__") or len(state) != len(self.bijectors):
            got = f"{len(state)} items" if hasattr(state, "__len__") else type(state).__name__
            raise ValueError(f"state: expected a list of {len(self.bijectors)} layer states "
                             f"(Chain.init_state), got {got}")
        return list(state)

    def forward(self, params, x, context=None, *, training=False, state=None):
        self._check_params(params)
        xp = namespace(x, params)
        log_det = _batch_zeros(xp, _check_dim(x, "x", None))
        for b, p, s in zip(self.bijectors, params, self._states(state)):
            x, ld = _call(b, "forward", p, x, context, training, s)
            log_det = log_det + ld
        return x, log_det

    def inverse(self, params, y, context=None, *, training=False, state=None):
        self._check_params(params)
        xp = namespace(y, params)
        log_det = _batch_zeros(xp, _check_dim(y, "y", None))
        states = self._states(state)
        for b, p, s in zip(reversed(self.bijectors), reversed(list(params)), reversed(states)):
            y, ld = _call(b, "inverse", p, y, context, training, s)
            log_det = log_det + ld
        return y, log_det

    def inverse_terms(self, params, y, context=None, *, training=False, state=None):
        """Like ``inverse`` but returns (x, [log_det of each layer in chain order])."""
        self._check_params(params)
        states = self._states(state)
        terms = [None] * len(self.bijectors)
        for i in reversed(range(len(self.bijectors))):
            y, terms[i] = _call(self.bijectors[i], "inverse", params[i], y, context, training, states[i])
        return y, terms

    def inverse_and_update(self, params, y, context=None, state=None):
        """(x, log_det, new state list): the training-mode inverse, each layer's state updated by its input."""
        self._check_params(params)
        xp = namespace(y, params)
        log_det = _batch_zeros(xp, _check_dim(y, "y", None))
        new = self._states(state)
        for i in reversed(range(len(self.bijectors))):
            y, ld, new[i] = inverse_and_update(self.bijectors[i], params[i], y, context, new[i])
            log_det = log_det + ld
        return y, log_det, new

    def data_pass(self, params, y, method, context=None):
        """New params: walking data -> noise, each layer that has ``method`` (``init_from_data``) gets
        ``layer.method(p, its input y)``; later inputs use the new params (and batch statistics, so a
        BatchNormFlow needs no state here)."""
        self._check_params(params)
        new = list(params)
        for i in reversed(range(len(self.bijectors))):
            b = self.bijectors[i]
            if isinstance(b, Chain):
                new[i] = b.data_pass(new[i], y, method, context)
            elif hasattr(b, method):
                new[i] = getattr(b, method)(new[i], y)
            y, _ = _call(b, "inverse", new[i], y, context, True)
        return new


class Invert(Bijector):
    """The inverse bijector: Invert(b).forward = b.inverse and Invert(b).inverse = b.forward.

    Shapes, params and state are b's.
    """

    takes_training = True
    takes_state = True

    def __init__(self, bijector):
        if not (hasattr(bijector, "forward") and hasattr(bijector, "inverse")):
            raise TypeError(f"bijector: expected a Bijector, got {type(bijector).__name__}")
        self.bijector = bijector

    def init(self, rng, dtype="float32"):
        return self.bijector.init(rng, dtype)

    def init_state(self, params=None, dtype="float32"):
        return init_state_of(self.bijector, params, dtype)

    def forward(self, params, x, context=None, *, training=False, state=None):
        return _call(self.bijector, "inverse", params, x, context, training, state)

    def inverse(self, params, y, context=None, *, training=False, state=None):
        return _call(self.bijector, "forward", params, y, context, training, state)


class InverseAutoregressive(Invert):
    """IAF = Invert(MaskedAutoregressive): one-pass sampling u -> x = (u - t(u)) exp(-s(u)), D-pass density.

    Same arguments as MaskedAutoregressive; u (..., dim) <-> x (..., dim); params = MADE params.
    """

    def __init__(self, dim, *, hidden=(64, 64), context_dim=0, activation="relu", order=None, log_scale_bound=3.0):
        super().__init__(MaskedAutoregressive(dim, hidden=hidden, context_dim=context_dim, activation=activation,
                                              order=order, log_scale_bound=log_scale_bound))
        self.dim = dim

    def __repr__(self):
        return "InverseAutoregressive" + repr(self.bijector)[len("MaskedAutoregressive"):]
