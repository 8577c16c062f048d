"""``dense(x, W, b, activation)``: y = activation(x @ W + b), one call on every backend.

On the numpy backend it is a single autograd primitive with a hand-written VJP: the affine map and
the activation run in plain numpy and the backward pass reuses the forward output, which measured
1.05-1.1x of PyTorch CPU against 1.2-1.3x for op-by-op autograd (ARCHITECTURE.md section 5).
Elsewhere it is the same formula written with the backend's own array-API calls.
"""

import math

import numpy as onp
from autograd.extend import defvjp_argnums, primitive

ACTIVATIONS = ("identity", "relu", "leaky_relu", "silu", "gelu", "tanh", "softplus", "sigmoid")
LEAKY_SLOPE = 0.01
_GELU_C = math.sqrt(2.0 / math.pi)


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
        return 0.5 * z * (1.0 + xp.tanh(_GELU_C * (z + 0.044715 * z * z * z)))
    if name == "tanh":
        return xp.tanh(z)
    if name == "softplus":
        return xp.maximum(z, 0.0) + xp.log1p(xp.exp(-xp.abs(z)))
    if name == "sigmoid":
        return 0.5 * (1.0 + xp.tanh(0.5 * z))
    raise ValueError(f"activation: unknown {name!r}")


def _activation_grad(z, y, name):
    """d activation / dz from the pre-activation z and the output y (plain numpy)."""
    if name == "identity":
        return None
    if name == "relu":
        return (z > 0).astype(z.dtype)
    if name == "leaky_relu":
        return onp.where(z > 0, 1.0, LEAKY_SLOPE).astype(z.dtype)
    if name == "silu":
        s = 0.5 * (1.0 + onp.tanh(0.5 * z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        u = _GELU_C * (z + 0.044715 * z * z * z)
        t = onp.tanh(u)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * z * z)
    if name == "tanh":
        return 1.0 - y * y
    if name == "softplus":
        return 0.5 * (1.0 + onp.tanh(0.5 * z))
    if name == "sigmoid":
        return y * (1.0 - y)
    raise ValueError(name)


def _affine(x, W, b):
    z = x @ W
    if b is not None:
        z += b
    return z


@primitive
def _dense_numpy(x, W, b, name):
    z = _affine(x, W, b)
    return z if name == "identity" else apply_activation(onp, z, name)


def _dense_vjp(argnums, ans, args, kwargs):
    x, W, b, name = args
    if name == "identity":
        dz_factor = None
    else:
        z = _affine(x, W, b) if name in ("silu", "gelu", "softplus", "relu", "leaky_relu") else None
        dz_factor = _activation_grad(z, ans, name)

    def vjp(g):
        dz = g if dz_factor is None else g * dz_factor
        grads = []
        for argnum in argnums:
            if argnum == 0:
                grads.append(dz @ onp.swapaxes(W, -1, -2))
            elif argnum == 1:
                x2 = onp.reshape(x, (-1, x.shape[-1]))
                grads.append(x2.T @ onp.reshape(dz, (-1, dz.shape[-1])))
            elif argnum == 2:
                grads.append(onp.reshape(dz, (-1, dz.shape[-1])).sum(axis=0).reshape(onp.shape(b)))
            else:
                grads.append(None)
        return tuple(grads)

    return vjp


defvjp_argnums(_dense_numpy, _dense_vjp)


def make_dense(xp, fused):
    """Build ``dense(x, W, b=None, activation=None)`` for the namespace ``xp``.

    Math: y = activation(x @ W + b); x (..., d_in), W (d_in, d_out), b (d_out,) -> y (..., d_out).
    """

    if fused:

        def dense(x, W, b=None, activation=None):
            name = check_activation(activation)
            if onp.ndim(W) != 2:
                raise ValueError(f"dense: W must be 2-d (d_in, d_out), got shape {onp.shape(W)}")
            return _dense_numpy(x, W, b, name)

    else:

        def dense(x, W, b=None, activation=None):
            name = check_activation(activation)
            z = xp.matmul(x, W)
            if b is not None:
                z = z + b
            return apply_activation(xp, z, name)

    return dense
