"""The activations as formulas over any array namespace: backend-neutral (no array library imported).

Used by every backend's dense layer (``fused.py`` fast paths check against these) and by ``blocks.ops``.
"""

import math

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu", "tanh", "softplus", "sigmoid")
LEAKY_SLOPE = 0.01
GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


def check_activation(activation):
    """Return the canonical activation name; raise ValueError for unknown names."""
    name = "identity" if activation is None else activation
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS} or None, got {activation!r}")
    return name


def apply_activation(xp, z, name):
    """The activations in array-API form (used by every backend and by ``blocks.ops``).

    relu max(z, 0); leaky_relu max(z, 0.01 z); silu z sigmoid(z); gelu (tanh form)
    0.5 z (1 + tanh(sqrt(2/pi)(z + 0.044715 z^3))); softplus max(z, 0) + log1p(exp(-|z|));
    sigmoid 0.5 (1 + tanh(z / 2)).
    """
    if name == "identity":
        return z
    if name == "relu":
        return xp.maximum(z, 0.0)
    if name == "leaky_relu":
        return xp.where(z > 0, z, LEAKY_SLOPE * z)
    if name == "silu":
        return 0.5 * z * (1.0 + xp.tanh(0.5 * z))
    if name == "gelu":
        return 0.5 * z * (1.0 + xp.tanh(GELU_C * (z + GELU_A * z * z * z)))
    if name == "tanh":
        return xp.tanh(z)
    if name == "softplus":
        return xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z)))
    if name == "sigmoid":
        return 0.5 * (1.0 + xp.tanh(0.5 * z))
    raise ValueError(f"activation: unknown {name!r}")
