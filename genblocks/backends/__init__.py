"""Backends: one block code base, three array worlds.

==========  ==========================================  =========  ===========================
backend     arrays                                      gradients  for
==========  ==========================================  =========  ===========================
numpy       ``np.ndarray`` and autograd's traced boxes  yes        training, reference
cupy        ``cupy.ndarray``                            no         GPU sampling, log-densities
strict      ``array_api_strict.Array`` on "device1"     no         CI portability check
==========  ==========================================  =========  ===========================

Block code asks its arguments for the namespace: ``xp = namespace(x, params)``. The default backend
(used when no arrays are given) comes from ``set_backend``, ``use_backend`` or the environment
variable ``GENBLOCKS_BACKEND``.
"""

import contextlib

import numpy as onp
from autograd import jacobian

from . import registry as _registry
from .fused import reuse_buffers
from .random import Rng, float_dtype_name
from .registry import BACKENDS, Backend, backend_of, get_backend, is_traced, namespace_of, record, stop_gradient
from .treegrad import grad, value_and_grad  # autograd's, minus its per-leaf container copies
from .vocab import VOCAB

__all__ = [
    "BACKENDS", "VOCAB", "Rng", "namespace", "get_backend", "set_backend", "use_backend", "to_device",
    "to_numpy", "backend_of", "resolve_dtype", "float_dtype_name", "grad", "value_and_grad", "jacobian",
    "namespace_of", "Backend", "record", "is_traced", "stop_gradient", "reuse_buffers",
]



def _check_backend_name(name):
    record(name)
    return name


_default = _registry._default  # one list, shared: set_backend writes what get_backend reads


def set_backend(name):
    """Set the default backend: "numpy", "cupy" or "strict"."""
    _check_backend_name(name)
    if name != "numpy":
        _get_namespace(name)  # fail now, with the install hint, rather than at first use
    _default[0] = name


@contextlib.contextmanager
def use_backend(name):
    """``with use_backend("strict"): ...`` sets the default backend for the block, then restores it."""
    previous = get_backend()
    set_backend(name)
    try:
        yield _get_namespace(name)
    finally:
        _default[0] = previous


_get_namespace = namespace_of


_CONTAINERS = (dict, list, tuple)
_type_backend = {}  # leaf type -> backend name or None: backend_of's answer depends on the type alone


def namespace(*trees):
    """The array namespace ``xp`` of the arrays in ``trees`` (arrays, dicts, lists, tuples).

    With no arrays, the default backend's namespace. Arrays of two backends raise TypeError.
    (Called at the top of every block method, so it walks the trees with a plain loop and a per-type
    cache rather than a recursive generator.)
    """
    found = {}  # backend name -> the type name of its first array, for the error message
    stack = list(reversed(trees))
    while stack:
        leaf = stack.pop()
        cls = type(leaf)
        if cls is dict:
            stack.extend(reversed(list(leaf.values())))
            continue
        if cls is list or cls is tuple:
            stack.extend(reversed(leaf))
            continue
        try:
            name = _type_backend[cls]
        except KeyError:
            if isinstance(leaf, _CONTAINERS):  # subclasses of dict, list, tuple
                stack.extend(reversed(list(leaf.values() if isinstance(leaf, dict) else leaf)))
                continue
            name = _type_backend[cls] = backend_of(leaf)
        if name is not None and name not in found:
            found[name] = cls.__name__
    if len(found) > 1:
        kinds = ", ".join(f"{k} ({v})" for k, v in found.items())
        raise TypeError(
            f"arrays from several backends in one call: {kinds}; "
            "move them to one backend first with genblocks.backends.to_device(tree, name)"
        )
    return _get_namespace(next(iter(found)) if found else get_backend())


def resolve_dtype(xp, dtype):
    """The backend dtype object for "float32"/"float64" (or such a dtype); ValueError otherwise."""
    return getattr(xp, float_dtype_name(dtype))


def _map(tree, fn):
    if isinstance(tree, dict):
        return {k: _map(v, fn) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_map(v, fn) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_map(v, fn) for v in tree)
    return fn(tree)


def _leaf_to_numpy(x):
    name = backend_of(x)
    return x if name is None else record(name).to_host(x)


def to_numpy(tree):
    """Copy every array leaf of ``tree`` to a host ``numpy.ndarray`` (the one host transfer point)."""
    return _map(tree, _leaf_to_numpy)


def to_device(tree, name, dtype=None):
    """Move every array leaf of ``tree`` to backend ``name``, optionally casting floats to ``dtype``."""
    _check_backend_name(name)
    if dtype is not None:
        dtype = onp.dtype(resolve_dtype(onp, dtype))
    namespace_of(name)  # fail now, with the install hint, rather than at the first leaf
    from_host = record(name).from_host

    def move(x):
        if backend_of(x) is None:
            return x
        if backend_of(x) == name and dtype is None:
            return x
        host = _leaf_to_numpy(x)
        if dtype is not None and onp.issubdtype(host.dtype, onp.floating):
            host = host.astype(dtype)
        return from_host(host)

    return _map(tree, move)
