"""Stable math: finite at extreme inputs, exact against references, float32 stays float32, every backend."""

import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from scipy import special

from genblocks.backends import to_device, to_numpy
from genblocks.blocks import ops

X = np.array([-1e4, -50.0, -3.0, -1e-3, 0.0, 2.5, 40.0, 1e4])

REFERENCES = {
    "softplus": lambda x: np.logaddexp(0.0, x),
    "log_sigmoid": lambda x: -np.logaddexp(0.0, -x),
    "sigmoid": special.expit,
    "silu": lambda x: x * special.expit(x),
    "relu": lambda x: np.maximum(x, 0.0),
    "leaky_relu": lambda x: np.where(x > 0, x, 0.01 * x),
    "tanh": np.tanh,
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_matches_reference_and_is_finite(name):
    got = getattr(ops, name)(X)
    assert np.all(np.isfinite(got))
    # probabilities are exact in relative terms; activations (tanh forms) to absolute 1e-15
    atol = 1e-15 if name in ("silu",) else 1e-300
    np.testing.assert_allclose(got, REFERENCES[name](X), rtol=1e-12, atol=atol)


def test_gelu_is_the_tanh_approximation():
    x = np.linspace(-6, 6, 101)
    exact = 0.5 * x * (1 + special.erf(x / np.sqrt(2)))
    assert np.max(np.abs(ops.gelu(x) - exact)) < 1e-3


def test_logsumexp_and_softmax():
    x = np.array([[1.0, 2.0, 3.0], [-np.inf, -np.inf, -np.inf], [1e4, -1e4, 0.0]])
    with np.errstate(divide="ignore"):
        got = ops.logsumexp(x, axis=-1)
    np.testing.assert_allclose(got[[0, 2]], special.logsumexp(x[[0, 2]], axis=-1), rtol=1e-12)
    assert got[1] == -np.inf
    np.testing.assert_allclose(ops.softmax(x[[0, 2]]).sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(ops.logsumexp(x[:1], axis=0, keepdims=True), x[:1])


def test_logit_and_log1mexp():
    p = np.array([1e-12, 0.3, 0.5, 1 - 1e-12])
    np.testing.assert_allclose(ops.sigmoid(ops.logit(p)), p, rtol=1e-6)
    x = np.array([-1e-10, -0.1, -0.69, -0.7, -5.0, -800.0])
    np.testing.assert_allclose(ops.log1mexp(x), np.log(-np.expm1(x)), rtol=1e-10)


@pytest.mark.parametrize("name", ["softplus", "log_sigmoid", "sigmoid", "silu", "gelu", "leaky_relu", "tanh",
                                  "logsumexp", "log_softmax", "logit"])
def test_gradients(name):
    fn = getattr(ops, name)
    x = np.array([0.2, 0.4, 0.7]) if name == "logit" else np.array([-2.0, -0.3, 0.5, 3.0])
    check_grads(fn, modes=["rev"], order=1)(x)


@pytest.mark.parametrize("name", ["softplus", "log_sigmoid", "sigmoid", "silu", "gelu", "relu", "logsumexp"])
def test_float32_in_float32_out(name):
    x = np.array([-2.0, 0.5, 3.0], dtype=np.float32)
    fn = getattr(ops, name)
    assert fn(x).dtype == np.float32
    assert grad(lambda a: ops.logsumexp(fn(a) * 1.0, axis=-1))(x).dtype == np.float32


def test_backends_agree(backend):
    x32 = X.astype(np.float32)
    for name in ["softplus", "log_sigmoid", "silu", "gelu", "sigmoid"]:
        got = getattr(ops, name)(to_device(x32, backend))
        # the GPU's float32 exp/log may differ from the CPU's in the last bits
        tol = dict(rtol=1e-5, atol=2e-7) if backend == "cupy" else dict(rtol=1e-6)
        np.testing.assert_allclose(to_numpy(got), getattr(ops, name)(x32), **tol)


def test_get_activation():
    assert ops.get_activation("silu") is ops.silu
    np.testing.assert_allclose(ops.get_activation("sigmoid")(X[1:-1]), special.expit(X[1:-1]), atol=1e-15)
    f = lambda x: x  # noqa: E731
    assert ops.get_activation(f) is f
    with pytest.raises(ValueError, match="activation"):
        ops.get_activation("swish")


def test_log_sigmoid_float32_gradient_stays_float32_and_is_exact():
    # the old ops.log_sigmoid went through maximum, whose autograd VJP returns float64 for float32 inputs
    import autograd
    import numpy as np

    from genblocks.blocks.ops import log_sigmoid

    x = np.array([-50.0, -1.0, 0.0, 2.0, 40.0], dtype=np.float32)
    g = autograd.grad(lambda v: log_sigmoid(v).sum())(x)
    assert g.dtype == np.float32
    np.testing.assert_allclose(g, 1.0 / (1.0 + np.exp(x.astype(np.float64))), rtol=1e-6)
    np.testing.assert_allclose(log_sigmoid(np.array([-800.0, 800.0])), [-800.0, 0.0])
