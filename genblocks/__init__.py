"""genblocks: deep generative models from small, composable blocks (NumPy + autograd, CuPy on the GPU)."""

from genblocks.backends import (
    Rng,
    get_backend,
    namespace,
    namespace_of,
    set_backend,
    to_device,
    to_numpy,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "Rng", "get_backend", "namespace", "namespace_of", "set_backend", "to_device", "to_numpy", "use_backend",
    "__version__",
]
