"""The cupy backend: ``array_api_compat.cupy`` on an NVIDIA GPU. Forward only (no gradients).

Imported lazily: ``import genblocks`` never needs cupy. A missing cupy, or a cupy with no GPU, raises
an ImportError that says what to install or what is missing.
"""

import types

from .activations import GELU_A as _GELU_A
from .activations import GELU_C as _GELU_C
from .activations import LEAKY_SLOPE
from .fused import install as install_fused
from .vocab import ARRAY_API, LINALG

# activation(z + b) as one CUDA elementwise kernel each (T is float or double); the same formulas as
# fused.apply_activation, written so that no finite input gives inf * 0 or inf - inf
_EPILOGUE_CODE = {
    "identity": "y = z + b",
    "relu": "T v = z + b; y = v > (T)0 ? v : (T)0",
    "leaky_relu": f"T v = z + b; y = v > (T)0 ? v : (T){LEAKY_SLOPE!r} * v",
    "silu": "T v = z + b; y = v / ((T)1 + exp(-v))",
    "gelu": f"T v = z + b; y = (T)0.5 * v * ((T)1 + tanh((T){_GELU_C!r} * (v + (T){_GELU_A!r} * v * v * v)))",
    "tanh": "y = tanh(z + b)",
    "softplus": "T v = z + b; y = fmax(v, (T)0) + log1p(exp(-fabs(v)))",
    "sigmoid": "T v = z + b; y = (T)0.5 * ((T)1 + tanh((T)0.5 * v))",
}

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

    def clip(x, /, min=None, max=None):
        """The array API's clip as one cupy kernel: array_api_compat's generic version assigns through
        boolean masks, and every masked assignment waits for the GPU (a host sync per call)."""
        if min is None and max is None:
            return x.copy()
        if max is None:
            out = cupy.maximum(x, min)
        elif min is None:
            out = cupy.minimum(x, max)
        else:
            out = cupy.clip(x, min, max)
        return out.astype(x.dtype, copy=False)

    ns.clip = clip
    ns.vector_norm = cxp.linalg.vector_norm
    ns.device_of = lambda x: x.device
    kernels = {}

    def epilogue(z, b, name):
        """activation(z + b) in place in z (the matmul's fresh output): one kernel instead of several."""
        kernel = kernels.get(name)
        if kernel is None:
            kernel = kernels[name] = cupy.ElementwiseKernel("T z, T b", "T y", _EPILOGUE_CODE[name],
                                                            f"genblocks_dense_{name}")
        return kernel(z, b if b is not None else z.dtype.type(0), z)

    install_fused(ns, fused=False, epilogue=epilogue)
    ns.backend_name = "cupy"
    ns._cupy = cupy
    return ns
