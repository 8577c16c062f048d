"""The numpy backend: ``autograd.numpy`` with array-API names and correct gradients.

autograd 1.9 wraps numpy 2's array-API aliases (``concat``, ``permute_dims``, ``take`` ...) without
gradients, and ``var``/``std`` with ``correction`` get a wrong one. Each such name is re-defined here
from primitives autograd does differentiate, or as a new primitive with a hand-written VJP. Every patch
has a finite-difference gradient test in ``tests/test_backends.py``.
"""

import math
import types

import autograd.numpy as anp
import autograd.numpy.linalg as alinalg
import numpy as onp
from autograd.extend import SparseObject, defvjp, primitive, vspace
from autograd.numpy.numpy_boxes import ArrayBox
from autograd.numpy.numpy_vjps import untake as _autograd_untake

from .differentiable import astype, count, summed_shape, unbroadcast
from .fused import install as install_fused
from .vocab import ARRAY_API, EXTRAS, LINALG

# ---------------------------------------------------------------------------------------------------
# Patches (each differentiable by construction, or a primitive with its VJP)


def concat(arrays, /, *, axis=0):
    """Join arrays along an existing axis (array API ``concat``)."""
    if axis is None:
        arrays = [anp.reshape(a, (-1,)) for a in arrays]
        axis = 0
    return anp.concatenate(list(arrays), axis=axis)


def permute_dims(x, /, axes):
    return anp.transpose(x, tuple(axes))


def matrix_transpose(x, /):
    return anp.swapaxes(x, -1, -2)


def flip(x, /, *, axis=None):
    axes = range(anp.ndim(x)) if axis is None else ((axis,) if isinstance(axis, int) else axis)
    index = [slice(None)] * anp.ndim(x)
    for a in axes:
        index[a] = slice(None, None, -1)
    return x[tuple(index)]


def take(x, indices, /, *, axis=None):
    indices = onp.asarray(indices)
    if axis is None:
        if anp.ndim(x) != 1:
            raise ValueError(f"take: axis is required for a {anp.ndim(x)}-d array")
        axis = 0
    index = [slice(None)] * anp.ndim(x)
    index[axis] = indices
    return x[tuple(index)]


def _along_axis_index(indices, axis):
    idx = list(onp.indices(indices.shape, sparse=True))
    idx[axis] = indices
    return tuple(idx)


@primitive
def take_along_axis(x, indices, /, *, axis=-1):
    return onp.take_along_axis(x, onp.asarray(indices), axis=axis)


def _take_along_axis_vjp(ans, x, indices, axis=-1):
    def vjp(g):
        out = onp.zeros(onp.shape(x), dtype=onp.result_type(g))
        ind = onp.broadcast_to(onp.asarray(indices), onp.shape(g))
        onp.add.at(out, _along_axis_index(ind, axis % onp.ndim(x)), g)
        return out

    return vjp


defvjp(take_along_axis, _take_along_axis_vjp)


def cumulative_sum(x, /, *, axis=None, dtype=None, include_initial=False):
    if axis is None:
        if anp.ndim(x) != 1:
            raise ValueError("cumulative_sum: axis is required for arrays with more than one dimension")
        axis = 0
    out = anp.cumsum(x, axis=axis)
    if include_initial:
        shape = list(anp.shape(x))
        shape[axis] = 1
        out = concat([anp.zeros(shape, dtype=anp.result_type(x)), out], axis=axis)
    return out if dtype is None else astype(out, dtype)


def vector_norm(x, /, *, axis=None, keepdims=False, ord=2):
    if ord == 2:
        return anp.sqrt(anp.sum(x * x, axis=axis, keepdims=keepdims))
    if ord == 1:
        return anp.sum(anp.abs(x), axis=axis, keepdims=keepdims)
    if ord == math.inf:
        return anp.max(anp.abs(x), axis=axis, keepdims=keepdims)
    return anp.sum(anp.abs(x) ** ord, axis=axis, keepdims=keepdims) ** (1.0 / ord)


def matrix_norm(x, /, *, keepdims=False, ord="fro"):
    if ord != "fro":
        raise ValueError(f"matrix_norm: only ord='fro' is differentiable here, got ord={ord!r}")
    return vector_norm(x, axis=(-2, -1), keepdims=keepdims)


def _count(x, axis):
    return count(anp.shape(x), axis)


# The gradient of a sum: autograd broadcasts g back as ``reshape(g, shape with the summed axes set to 1) +
# zeros(shape)``, finding those shapes through three small numpy arrays per call (measured 32 us per VJP for a
# (1, 100, 64) float32 sum, against 13 us here). The same two array operations here, so the same bits; this
# replaces autograd's VJP for ``anp.sum`` in the whole process, as ``__getitem__``'s is replaced below.


def _sum_vjp(ans, x, axis=None, keepdims=False, dtype=None, **kwargs):
    shape, x_dtype = anp.shape(x), anp.result_type(x)
    if shape == ():
        return lambda g: g
    new_shape = summed_shape(shape, axis)
    return lambda g: anp.reshape(g, new_shape) + onp.zeros(shape, dtype=x_dtype)


defvjp(anp.sum, _sum_vjp)


@primitive
def _mean(x, axis, keepdims):
    return onp.sum(x, axis=axis, keepdims=keepdims) / float(_count(x, axis))


def _mean_vjp(ans, x, axis, keepdims):
    # what sum / n composed gave: divide's VJP g / n (its unbroadcast is a no-op: g has the sum's shape), then
    # sum's; one node instead of two
    n = float(_count(x, axis))
    sum_vjp = _sum_vjp(None, x, axis)
    return lambda g: sum_vjp(g / n)


defvjp(_mean, _mean_vjp)


def mean(x, /, *, axis=None, keepdims=False):
    """sum / n (one primitive: autograd's mean VJP upcasts float32 gradients through a float64 count)."""
    return _mean(x, axis, keepdims)


def var(x, /, *, axis=None, correction=0.0, keepdims=False):
    centred = x - mean(x, axis=axis, keepdims=True)
    n = _count(x, axis)
    return anp.sum(centred * centred, axis=axis, keepdims=keepdims) / float(max(n - correction, 0))


def std(x, /, *, axis=None, correction=0.0, keepdims=False):
    return anp.sqrt(var(x, axis=axis, correction=correction, keepdims=keepdims))




def _extremum(reduce):
    """max/min with the gradient shared equally among ties, in x's dtype (autograd's VJPs upcast)."""

    @primitive
    def extremum(x, /, *, axis=None, keepdims=False):
        return reduce(x, axis=axis, keepdims=keepdims)

    def make_vjp(ans, x, axis=None, keepdims=False):
        full = ans if keepdims or axis is None else onp.expand_dims(ans, axis)
        hits = (x == full).astype(onp.result_type(x))
        hits /= onp.sum(hits, axis=axis, keepdims=True)

        def vjp(g):
            g = g if keepdims or axis is None else onp.expand_dims(g, axis)
            return (g * hits).astype(onp.result_type(x), copy=False)

        return vjp

    defvjp(extremum, make_vjp)
    extremum.__name__ = reduce.__name__
    return extremum


max_ = _extremum(onp.max)
min_ = _extremum(onp.min)


def maximum(x1, x2, /):
    """Elementwise max with NumPy's NaN rule: a NaN in either operand gives NaN.

    Ties return x2, as NumPy's does (so maximum(0.0, -0.0) is -0.0). Gradient: to the operand that is
    returned, so on ties to x2 (a valid subgradient); where either is NaN, to the NaN operand (to x1 if both
    are). Each operand's dtype is kept.
    """
    # ``x1 != x1`` is True exactly where x1 is NaN; a NaN x2 fails ``x1 > x2`` and is returned as is
    return where((x1 > x2) | (x1 != x1), x1, x2)


def minimum(x1, x2, /):
    """Elementwise min; NaN and gradient rules as ``maximum``."""
    return where((x1 < x2) | (x1 != x1), x1, x2)


@primitive
def broadcast_to(x, /, shape):
    return onp.broadcast_to(x, shape)


defvjp(broadcast_to, lambda ans, x, shape: lambda g: unbroadcast(g, onp.shape(x)).astype(
    onp.result_type(x), copy=False))


def copysign(x1, x2, /):
    sign = onp.where(onp.signbit(_value(x2)), -1.0, 1.0).astype(onp.result_type(x1))
    return anp.abs(x1) * sign


@primitive
def diagonal(x, /, *, offset=0):
    return onp.diagonal(x, offset, -2, -1).copy()


def _diagonal_vjp(ans, x, offset=0):
    def vjp(g):
        out = onp.zeros(onp.shape(x), dtype=onp.result_type(x, g))
        idx = onp.arange(onp.shape(g)[-1])
        out[..., idx + max(-offset, 0), idx + max(offset, 0)] = g
        return out

    return vjp


defvjp(diagonal, _diagonal_vjp)


def where(condition, x1, x2, /):
    # autograd's where VJP builds float64 zeros; keep the gradient in the operands' dtype
    return _where(condition, x1, x2)


@primitive
def _where(condition, x1, x2):
    return onp.where(condition, x1, x2)


def _where_vjp(argnum):
    def make(ans, condition, x1, x2):
        operand = x1 if argnum == 1 else x2
        keep = condition if argnum == 1 else onp.logical_not(condition)

        def vjp(g):
            out = onp.where(keep, g, onp.zeros((), dtype=onp.result_type(g)))
            out = unbroadcast(out, onp.shape(operand))
            return out.astype(onp.result_type(operand, g), copy=False)

        return vjp

    return make


defvjp(_where, None, _where_vjp(1), _where_vjp(2))


# The gradient of x[idx]. autograd scatters it back with ``numpy.add.at``, which is right for any index
# but slow for the slices every model takes (measured 12x slower than a slice add for (64, 8, 8, 64)
# float32, 24x for (256, 64)). A basic index (ints, slices, ``...``, ``None``) names every element at most
# once, so ``A[idx] += g`` is the same sum; other indices (integer or boolean arrays, where an element may
# repeat) keep autograd's own ``add.at``. This replaces autograd's VJP for ``ArrayBox.__getitem__`` in the
# whole process: the same gradient, sooner (``tests/test_backends.py`` checks both paths against finite
# differences and against autograd's scatter).


def _is_basic_index(idx):
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, slice)
               or (isinstance(i, (int, onp.integer)) and not isinstance(i, bool)) for i in items)


@primitive
def _untake_basic(g, idx, vs):
    """The cotangent of x[idx] as a sparse object that adds g into the slice: ``A[idx] += g``."""
    def mut_add(A):
        A[idx] += g
        return A
    return SparseObject(vs, mut_add)


defvjp(_untake_basic, lambda ans, g, idx, vs: lambda gg: gg[idx])


def _getitem_vjp(ans, A, idx):
    vs = vspace(A)
    if _is_basic_index(idx):
        return lambda g: _untake_basic(g, idx, vs)
    return lambda g: _autograd_untake(g, idx, vs)


defvjp(ArrayBox.__getitem__, _getitem_vjp)


def searchsorted(x1, x2, /, *, side="left", sorter=None):
    return onp.searchsorted(_value(x1), _value(x2), side=side, sorter=sorter)


def _value(x):
    return getattr(x, "_value", x)


def device_of(x):
    """Arrays on the numpy backend live on the host: ``None``."""
    return None


def tensordot(x1, x2, /, *, axes=2):
    return anp.tensordot(x1, x2, axes=axes)


def vecdot(x1, x2, /, *, axis=-1):
    return anp.sum(x1 * x2, axis=axis)


def asarray(obj, /, *, dtype=None, device=None, copy=None):
    if device not in (None, "cpu"):
        raise ValueError(f"asarray: the numpy backend has only the host device, got device={device!r}")
    if hasattr(obj, "_value"):  # a traced box: keep it traced
        return obj if dtype is None else astype(obj, dtype)
    return onp.array(obj, dtype=dtype, copy=True) if copy else onp.asarray(obj, dtype=dtype)


def _creation(fn):
    def wrapped(*args, device=None, **kw):
        if device not in (None, "cpu"):
            raise ValueError(f"{fn.__name__}: the numpy backend has only the host device, got {device!r}")
        return fn(*args, **kw)

    wrapped.__name__ = fn.__name__
    return wrapped


def _like(fn):
    def wrapped(x, *args, dtype=None, device=None, **kw):
        return fn(_value(x), *args, dtype=dtype, **kw)

    wrapped.__name__ = fn.__name__
    return wrapped


_RENAMED = {
    "asin": anp.arcsin, "acos": anp.arccos, "atan": anp.arctan, "atan2": anp.arctan2,
    "asinh": anp.arcsinh, "acosh": anp.arccosh, "atanh": anp.arctanh, "pow": anp.power,
}

_PATCHED = {
    "concat": concat, "permute_dims": permute_dims, "matrix_transpose": matrix_transpose, "flip": flip,
    "take": take, "take_along_axis": take_along_axis, "cumulative_sum": cumulative_sum,
    "vector_norm": vector_norm, "mean": mean, "var": var, "std": std, "astype": astype, "max": max_, "min": min_,
    "maximum": maximum, "minimum": minimum, "broadcast_to": broadcast_to,
    "copysign": copysign, "where": where, "searchsorted": searchsorted, "device_of": device_of,
    "tensordot": tensordot, "vecdot": vecdot, "asarray": asarray,
    "zeros": _creation(onp.zeros), "ones": _creation(onp.ones), "full": _creation(onp.full),
    "empty": _creation(onp.empty), "arange": _creation(onp.arange), "linspace": _creation(onp.linspace),
    "eye": _creation(onp.eye),
    "zeros_like": _like(onp.zeros_like), "ones_like": _like(onp.ones_like), "full_like": _like(onp.full_like),
    "isdtype": onp.isdtype, "finfo": onp.finfo, "iinfo": onp.iinfo, "result_type": onp.result_type,
    "bool": onp.bool_,
}

_LINALG_PATCHED = {"diagonal": diagonal, "matrix_norm": matrix_norm, "vector_norm": vector_norm}


def build_namespace():
    """The numpy backend namespace: exactly the VOCAB names, each differentiable where it makes sense."""
    ns = types.SimpleNamespace()
    for name in ARRAY_API:
        if name == "linalg":
            continue
        if name in _PATCHED:
            value = _PATCHED[name]
        elif name in _RENAMED:
            value = _RENAMED[name]
        else:
            value = getattr(anp, name)
        setattr(ns, name, value)
    linalg = types.SimpleNamespace()
    for name in LINALG:
        setattr(linalg, name, _LINALG_PATCHED.get(name) or getattr(alinalg, name))
    ns.linalg = linalg
    install_fused(ns, fused=True)
    ns.vector_norm = vector_norm
    ns.device_of = device_of
    ns.backend_name = "numpy"
    missing = [n for n in EXTRAS if not hasattr(ns, n)]
    if missing:
        raise RuntimeError(f"numpy backend is missing extras {missing}")
    return ns
