"""One record per backend: what the rest of genblocks may ask of a backend, in one place.

A ``Backend`` record holds the backend's ``name``, a ``load`` function that builds its namespace (imported
lazily: cupy and array_api_strict are imported only when first asked for), whether it has gradients
(``differentiable``), ``to_host`` / ``from_host`` (one array to and from a ``numpy.ndarray``),
``stop_gradient`` (the value without its gradient tape) and ``is_traced`` (True for an array that autograd
is tracing). ``namespace_of(name)`` is the one way to get a namespace by name; ``record(name)`` the record.
"""

import os
from dataclasses import dataclass
from typing import Callable

import numpy as onp
from autograd.tracer import Box

__all__ = ["Backend", "BACKENDS", "get_backend", "namespace_of", "record", "backend_of", "is_traced", "stop_gradient"]


@dataclass(frozen=True)
class Backend:
    name: str
    load: Callable  # () -> namespace, imports its array library on first call
    differentiable: bool
    to_host: Callable  # array -> numpy.ndarray (a copy off the device)
    from_host: Callable  # numpy.ndarray -> array of this backend
    stop_gradient: Callable  # array -> the same values, no gradient
    is_traced: Callable  # array -> bool


def _identity(x):
    return x


def _never(x):
    return False


def _numpy_untraced(x):
    while isinstance(x, Box):  # nested boxes under higher-order derivatives
        x = x._value
    return x


def _load_numpy():
    from .numpy_backend import build_namespace

    return build_namespace()


def _load_strict():
    from .strict_backend import build_namespace

    return build_namespace()


def _load_cupy():
    from .cupy_backend import build_namespace

    return build_namespace()


def _strict_to_host(x):
    from .strict_backend import to_numpy

    return to_numpy(x)


def _strict_from_host(x):
    from .strict_backend import from_numpy

    return from_numpy(x)


def _cupy_from_host(x):
    from .cupy_backend import load_cupy

    return load_cupy().asarray(x)


_RECORDS = {
    r.name: r
    for r in (
        Backend("numpy", _load_numpy, True, lambda x: onp.asarray(_numpy_untraced(x)), _identity,
                _numpy_untraced, lambda x: isinstance(x, Box)),
        Backend("cupy", _load_cupy, False, lambda x: x.get(), _cupy_from_host, _identity, _never),
        Backend("strict", _load_strict, False, _strict_to_host, _strict_from_host, _identity, _never),
    )
}
BACKENDS = tuple(_RECORDS)
_namespaces = {}
# the default backend (for calls with no arrays); ``set_backend`` / ``use_backend`` change it
_default = [None]


def get_backend():
    """The default backend's name (used when a call has no arrays to look at).

    An unknown ``GENBLOCKS_BACKEND`` is reported here, at first use, naming the variable: importing
    genblocks (and ``genblocks --help`` / ``--version``) still works.
    """
    if _default[0] is None:
        raise ValueError(f"GENBLOCKS_BACKEND: expected one of {BACKENDS} (or unset, for numpy), got "
                         f"{os.environ.get('GENBLOCKS_BACKEND')!r}; fix or unset the environment variable")
    return _default[0]


def record(name):
    """The ``Backend`` record of backend ``name``; ValueError naming the choices otherwise."""
    try:
        return _RECORDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}") from None


_env_backend = os.environ.get("GENBLOCKS_BACKEND", "") or "numpy"
_default[0] = _env_backend if _env_backend in _RECORDS else None  # None: get_backend() says what is wrong


def namespace_of(name):
    """The namespace ``xp`` of backend ``name`` ("numpy", "cupy", "strict"), built once and cached.

    Unlike ``use_backend`` it does not touch the default backend.
    """
    ns = _namespaces.get(name)
    if ns is None:
        ns = _namespaces[name] = record(name).load()
    return ns


def backend_of(x):
    """The backend an array belongs to, by its type alone (nothing is imported); None for non-arrays."""
    if isinstance(x, (onp.ndarray, Box)):
        return "numpy"
    module = type(x).__module__
    if module.startswith("cupy"):
        return "cupy"
    if module.startswith("array_api_strict"):
        return "strict"
    if isinstance(x, onp.generic):
        return "numpy"
    return None


def is_traced(x):
    """True when ``x`` is being traced for gradients (its values must not be read, e.g. by validation)."""
    name = backend_of(x)
    return name is not None and _RECORDS[name].is_traced(x)


def stop_gradient(x):
    """``x`` with no gradient flowing through it (the identity on forward-only backends and non-arrays)."""
    name = backend_of(x)
    return x if name is None else _RECORDS[name].stop_gradient(x)
