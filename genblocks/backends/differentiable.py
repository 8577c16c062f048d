"""Autograd primitives shared by the numpy namespace and the fused layers (a leaf module: it imports
neither, so ``numpy_backend`` and ``fused`` need not import each other)."""

import numpy as onp
from autograd.extend import defvjp, primitive


@primitive
def astype(x, dtype, /, *, copy=True):
    """x cast to ``dtype``; its gradient is cast back to x's dtype."""
    return onp.asarray(x).astype(dtype, copy=copy)


defvjp(astype, lambda ans, x, dtype, copy=True: lambda g: onp.asarray(g).astype(onp.result_type(x)))
