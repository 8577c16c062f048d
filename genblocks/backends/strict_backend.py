"""The strict backend: ``array_api_strict`` arrays on a non-CPU device, CI's stand-in for a GPU.

Arrays live on ``Device("device1")`` so that any accidental mix with host numpy arrays, any array
method outside the standard and any implicit host transfer fails loudly, as it would on a GPU.
"""

import types

import array_api_strict as _strict
import numpy as onp
from array_api_strict._array_object import Array as _Array

from .fused import install as install_fused
from .vocab import ARRAY_API, LINALG

DEVICE = _strict.Device("device1")
_CPU = _strict.Device("CPU_DEVICE")


def is_array(x):
    return isinstance(x, _Array)


def from_numpy(a, dtype=None):
    a = onp.asarray(a)
    if dtype is not None:
        a = a.astype(dtype)
    return _strict.asarray(a, device=DEVICE)


def to_numpy(a):
    return onp.asarray(a.to_device(_CPU))


def _on_device(fn):
    def wrapped(*args, device=None, **kw):
        return fn(*args, device=DEVICE if device is None else device, **kw)

    wrapped.__name__ = fn.__name__
    return wrapped


def _asarray(obj, /, *, dtype=None, device=None, copy=None):
    if isinstance(obj, _Array):
        return _strict.asarray(obj, dtype=dtype, device=device or obj.device, copy=copy)
    return _strict.asarray(onp.asarray(obj), dtype=dtype, device=device or DEVICE, copy=copy)


def _vector_norm(x, /, *, axis=None, keepdims=False, ord=2):
    return _strict.linalg.vector_norm(x, axis=axis, keepdims=keepdims, ord=ord)


def _diagonal(x, /, *, offset=0):
    return _strict.linalg.diagonal(x, offset=offset)


def _moveaxis(x, source, destination, /):
    return _strict.moveaxis(x, source, destination)


def _tensordot(x1, x2, /, *, axes=2):
    return _strict.tensordot(x1, x2, axes=axes)


def _device_of(x):
    return getattr(x, "device", DEVICE)


_CREATION = ("zeros", "ones", "full", "empty", "arange", "linspace", "eye")


def build_namespace():
    ns = types.SimpleNamespace()
    for name in ARRAY_API:
        if name == "linalg":
            continue
        value = getattr(_strict, name)
        if name in _CREATION:
            value = _on_device(value)
        setattr(ns, name, value)
    ns.asarray = _asarray
    ns.tensordot = _tensordot
    linalg = types.SimpleNamespace()
    for name in LINALG:
        setattr(linalg, name, getattr(_strict.linalg, name))
    ns.linalg = linalg
    ns.vector_norm = _vector_norm
    ns.linalg.diagonal = _diagonal
    ns.device_of = _device_of
    install_fused(ns, fused=False)
    ns.backend_name = "strict"
    return ns
