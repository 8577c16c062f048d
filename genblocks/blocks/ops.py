"""Stable math on any backend. Every function takes arrays and finds ``xp`` from them.

Log-space forms: softplus(x) = max(x, 0) + log1p(exp(-|x|)); log_sigmoid(x) = -softplus(-x);
logsumexp(x) = m + log(sum(exp(x - m))) with m = max(x); sigmoid/silu through tanh (no overflow).
"""

import math

from genblocks.backends import namespace
from genblocks.backends import stop_gradient as _stop_gradient
from genblocks.backends.activations import apply_activation, check_activation

LOG_2PI = math.log(2.0 * math.pi)
LOG_2 = math.log(2.0)


def softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))."""
    xp = namespace(x)
    return xp.maximum(x, 0.0) + xp.log1p(xp.exp(-xp.abs(x)))


def log_sigmoid(x):
    """log sigmoid(x) = min(x, 0) - log1p(exp(-|x|)).

    min and -|x| are written through ``where``: autograd's maximum/minimum VJPs return float64 for float32
    inputs, and abs has slope 0 at 0, which would give gradient 0 instead of 1/2 at x = 0.
    """
    xp = namespace(x)
    neg = x < 0.0
    return xp.where(neg, x, 0.0) - xp.log1p(xp.exp(xp.where(neg, x, -x)))


def sigmoid(x):
    """1 / (1 + exp(-x)), as e / (1 + e) with e = exp(-|x|) on the negative side: exact in both tails.

    (The hot-path activation in ``dense`` uses 0.5 (1 + tanh(x/2)), faster but with absolute, not
    relative, accuracy far in the negative tail.)
    """
    xp = namespace(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def logit(p):
    """log(p / (1 - p)) = log(p) - log1p(-p)."""
    xp = namespace(p)
    return xp.log(p) - xp.log1p(-p)


def silu(x):
    """x sigmoid(x), computed as 0.5 x (1 + tanh(x / 2)) (absolute accuracy: an activation, not a probability)."""
    return apply_activation(namespace(x), x, "silu")


def relu(x):
    return apply_activation(namespace(x), x, "relu")


def leaky_relu(x):
    """max(x, 0.01 x)."""
    return apply_activation(namespace(x), x, "leaky_relu")


def gelu(x):
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (the tanh approximation)."""
    return apply_activation(namespace(x), x, "gelu")


def tanh(x):
    return namespace(x).tanh(x)


def logsumexp(x, axis=-1, keepdims=False):
    """log sum_i exp(x_i) along ``axis``, shifted by the (gradient-free) max; -inf rows stay -inf."""
    xp = namespace(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    m = stop_gradient(m)
    out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else xp.squeeze(out, axis=axis)


def log_softmax(x, axis=-1):
    """x - logsumexp(x) along ``axis``."""
    return x - logsumexp(x, axis=axis, keepdims=True)


def softmax(x, axis=-1):
    """exp(log_softmax(x))."""
    return namespace(x).exp(log_softmax(x, axis=axis))


def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, stable on both sides of -log 2."""
    xp = namespace(x)
    return xp.where(x > -LOG_2, xp.log(-xp.expm1(xp.minimum(x, -1e-30))), xp.log1p(-xp.exp(xp.minimum(x, 0.0))))


def stop_gradient(x):
    """x with no gradient flowing through it (identity on forward-only backends)."""
    return _stop_gradient(x)


ACTIVATIONS = {
    "identity": lambda x: x, "relu": relu, "leaky_relu": leaky_relu, "silu": silu, "gelu": gelu,
    "tanh": tanh, "softplus": softplus, "sigmoid": lambda x: apply_activation(namespace(x), x, "sigmoid"),
}


def get_activation(activation):
    """An activation by name (one of ``ACTIVATIONS``) or a callable; ValueError otherwise."""
    if callable(activation):
        return activation
    return ACTIVATIONS[check_activation(activation)]
