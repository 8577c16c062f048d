"""The cupy backend: ``array_api_compat.cupy`` on an NVIDIA GPU. Forward only (no gradients).

Imported lazily: ``import genblocks`` never needs cupy. A missing cupy, or a cupy with no GPU, raises
an ImportError that says what to install or what is missing.
"""

import types

from .fused import make_dense, make_im2col
from .vocab import ARRAY_API, LINALG

INSTALL_HINT = 'pip install "genblocks[gpu]"'


def load_cupy():
    """Import cupy and check that a GPU is visible; clear errors otherwise."""
    try:
        import cupy
    except ImportError as err:
        raise ImportError(f"the cupy backend needs cupy: {INSTALL_HINT} (import failed: {err})") from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # cupy raises its own CUDARuntimeError without a driver
        raise ImportError(f"the cupy backend needs an NVIDIA GPU with a CUDA driver; none found ({err})") from err
    if count == 0:
        raise ImportError("the cupy backend needs an NVIDIA GPU; cupy sees 0 devices")
    return cupy


def build_namespace():
    cupy = load_cupy()
    try:
        import array_api_compat.cupy as cxp
    except ImportError as err:
        raise ImportError(f"the cupy backend needs array-api-compat: {INSTALL_HINT}") from err
    ns = types.SimpleNamespace()
    for name in ARRAY_API:
        if name != "linalg":
            setattr(ns, name, getattr(cxp, name))
    linalg = types.SimpleNamespace()
    for name in LINALG:
        setattr(linalg, name, getattr(cxp.linalg, name))
    ns.linalg = linalg
    ns.vector_norm = cxp.linalg.vector_norm
    ns.device_of = lambda x: x.device
    ns.dense = make_dense(ns, fused=False)
    ns.im2col = make_im2col(ns, fused=False)
    ns.backend_name = "cupy"
    ns._cupy = cupy
    return ns
