"""Autograd primitives shared by the numpy namespace and the fused layers (a leaf module: it imports
neither, so ``numpy_backend`` and ``fused`` need not import each other)."""

import math

import numpy as onp
from autograd.extend import defvjp, primitive


@primitive
def astype(x, dtype, /, *, copy=True):
    """x cast to ``dtype``; its gradient is cast back to x's dtype."""
    return onp.asarray(x).astype(dtype, copy=copy)


defvjp(astype, lambda ans, x, dtype, copy=True: lambda g: onp.asarray(g).astype(onp.result_type(x)))


# Shapes of reductions and broadcasts, for hand-written VJPs on both sides (plain numpy, no tracing)


def count(shape, axis):
    """How many elements a reduction over ``axis`` (None: all, an int or a tuple of ints) of ``shape`` combines."""
    if axis is None:
        return math.prod(shape)
    axes = (axis,) if isinstance(axis, int) else axis
    return math.prod(shape[a] for a in axes)


def summed_shape(shape, axis):
    """``shape`` with the axes a sum over ``axis`` removed set to 1 (what its cotangent is reshaped to)."""
    if axis is None:
        return (1,) * len(shape)
    new = list(shape)
    for a in (tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)):
        new[a] = 1
    return tuple(new)


def unbroadcast(g, shape):
    """g summed back to ``shape`` after broadcasting: the extra leading axes, then each axis that was 1."""
    while onp.ndim(g) > len(shape):
        g = onp.sum(g, axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and g.shape[axis] != 1:
            g = onp.sum(g, axis=axis, keepdims=True)
    return g
