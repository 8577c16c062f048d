"""The fused conv2d primitive: values and gradients (first and second order) equal the composed im2col + dense
path for every padding form, stride, kernel shape and dtype; masks, blocks, backends, bad arguments."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads

from genblocks.backends import Rng, fused, namespace, to_device, to_numpy
from genblocks.blocks import nn

xp = namespace(np.zeros(1))

CASES = [  # (x shape, kernel (kh, kw), stride, pads ((top, bottom), (left, right)))
    ((2, 5, 6, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),  # "same", odd and even sizes
    ((2, 6, 6, 2), (3, 3), (2, 2), ((0, 1), (0, 1))),  # "same" at stride 2 on an even size: extra zeros after
    ((2, 7, 5, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),  # stride 2, odd sizes
    ((1, 7, 5, 2), (2, 3), (2, 1), ((1, 0), (2, 0))),  # non-square kernel, per-axis strides, causal pads
    ((2, 5, 5, 2), (5, 5), (1, 1), ((2, 2), (2, 2))),
    ((2, 4, 4, 3), (1, 1), (2, 2), ((0, 0), (0, 0))),  # 1x1 at stride 2: every other pixel gets no gradient
    ((1, 4, 5, 2), (1, 1), (1, 1), ((0, 0), (0, 0))),
    ((2, 6, 6, 2), (3, 3), (3, 2), ((3, 0), (0, 4))),  # pads wider than the kernel: rows that see only zeros
    ((2, 6, 5, 1), (3, 3), (1, 1), ((2, 0), (1, 1))),  # one channel, PixelCNN-style causal rows above
    ((2, 4, 6, 2), (2, 3), (1, 1), ((0, 0), (0, 0))),  # "valid"
]


def _data(shape, k, c_out=4, dtype="float64", seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=shape).astype(dtype)
    W = r.normal(size=tuple(k) + (shape[3], c_out)).astype(dtype)
    b = r.normal(size=(c_out,)).astype(dtype)
    return x, W, b


def _composed(x, W, b, s, p, name):
    """Today's path before the primitive: im2col then dense (both numpy primitives)."""
    kh, kw, c_in, c_out = W.shape
    return xp.dense(xp.im2col(x, (kh, kw), s, p), anp.reshape(W, (kh * kw * c_in, c_out)), b, name)


def _loss(f, c, s, p, name):
    return lambda x, W, b: anp.sum(f(x, W, b, s, p, name) * c)


@pytest.mark.parametrize("shape, k, s, p", CASES)
@pytest.mark.parametrize("name", ["identity", "relu", "silu"])
def test_values_and_gradients_equal_the_composed_path(shape, k, s, p, name):
    x, W, b = _data(shape, k, seed=1)
    want = _composed(x, W, b, s, p, name)
    np.testing.assert_allclose(xp.conv2d(x, W, b, s, p, name), want, rtol=1e-12, atol=1e-12)
    c = np.random.default_rng(2).normal(size=want.shape)  # a non-constant cotangent
    for i in range(3):
        got = grad(_loss(xp.conv2d, c, s, p, name), i)(x, W, b)
        ref = grad(_loss(_composed, c, s, p, name), i)(x, W, b)
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape, k, s, p", CASES[:4])
def test_gradients_against_finite_differences_first_and_second_order(shape, k, s, p):
    x, W, b = _data(shape, k, c_out=2, seed=3)
    for name in ("tanh", "gelu"):
        check_grads(lambda x, W, b: anp.sum(anp.sin(xp.conv2d(x, W, b, s, p, name))), modes=["rev"], order=2)(
            x, W, b)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dtype_preserved_and_inputs_untouched(dtype):
    shape, k, s, p = CASES[1]
    x, W, b = _data(shape, k, dtype=dtype, seed=4)
    saved = [a.copy() for a in (x, W, b)]
    y = xp.conv2d(x, W, b, s, p, "relu")
    grads = grad(lambda args: anp.sum(anp.sin(xp.conv2d(*args, s, p, "silu"))))((x, W, b))
    assert y.dtype == np.dtype(dtype) and all(g.dtype == np.dtype(dtype) for g in grads)
    ref = grad(lambda args: anp.sum(anp.sin(_composed(*args, s, p, "silu"))))((x, W, b))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, **tol)
    for a, before in zip((x, W, b), saved):
        np.testing.assert_array_equal(a, before)
    assert getattr(fused._conv_slot, "entry", None) is None  # the pre-activation kept for silu was taken


def test_without_bias_non_contiguous_input_and_untraced_call():
    shape, k, s, p = CASES[0]
    x, W, _ = _data(shape, k, seed=5)
    xt = np.swapaxes(np.swapaxes(x, 1, 2).copy(), 1, 2)  # the same values, a strided layout
    assert not xt.flags.c_contiguous
    want = _composed(x, W, None, s, p, "tanh")
    np.testing.assert_allclose(xp.conv2d(xt, W, None, s, p, "tanh"), want, rtol=1e-12, atol=1e-12)
    c = np.random.default_rng(6).normal(size=want.shape)
    for i in range(2):
        np.testing.assert_allclose(grad(lambda x, W: anp.sum(xp.conv2d(x, W, None, s, p, "tanh") * c), i)(xt, W),
                                   grad(lambda x, W: anp.sum(_composed(x, W, None, s, p, "tanh") * c), i)(x, W),
                                   rtol=1e-11, atol=1e-11)


def test_empty_batch():
    x, W, b = _data((0, 5, 4, 2), (3, 3))
    s, p = (2, 1), ((1, 1), (1, 1))
    assert xp.conv2d(x, W, b, s, p, "relu").shape == (0, 3, 4, 4)
    gx, gW, gb = grad(lambda args: anp.sum(xp.conv2d(*args, s, p, "relu")))((x, W, b))
    assert gx.shape == x.shape and not np.any(gW) and not np.any(gb) and gW.shape == W.shape


def test_blocks_and_large_scratch_give_the_same_results(monkeypatch):
    """The patches go through BLAS in blocks of images (``_CHUNK_BYTES``) held in reused scratch buffers up to
    ``_SCRATCH_MAX``: one image per block, fresh arrays and the default all compute the same thing."""
    shape, k, s, p = (5, 6, 7, 3), (3, 3), (2, 1), ((1, 1), (0, 2))
    x, W, b = _data(shape, k, seed=7)
    c = np.random.default_rng(8).normal(size=_composed(x, W, b, s, p, "relu").shape)

    def run():
        return [xp.conv2d(x, W, b, s, p, "relu")] + list(grad(lambda a: _loss(xp.conv2d, c, s, p, "relu")(*a))(
            (x, W, b)))

    default = run()
    monkeypatch.setattr(fused, "_CHUNK_BYTES", 1)  # one image per block
    one_by_one = run()
    monkeypatch.setattr(fused, "_SCRATCH_MAX", 1)  # nothing kept: fresh arrays
    fresh = run()
    for a, b1, b2 in zip(default, one_by_one, fresh):
        np.testing.assert_allclose(b1, a, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(b2, a, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [nn.Conv2d(2, 3, 3, mask=np.array([1.0, 0.0, 1.0])[:, None, None, None]),
                                   nn.MaskedConv2d(2, 3, 5, mask_type="A", activation="relu"),
                                   nn.Conv2d(2, 3, (3, 2), stride=2, activation=anp.tanh)])
def test_conv2d_layers_equal_the_composed_path(block):
    """Conv2d (kernel mask, callable activation) and MaskedConv2d go through xp.conv2d: the same values and
    gradients as im2col + dense with the masked kernel."""
    params = block.init(Rng(0, backend="numpy"), "float64")
    params["b"] = params["b"] + 0.1
    x = np.random.default_rng(9).normal(size=(2, 5, 6, 2))

    def composed(params, x):
        pads = nn.conv_pads(x.shape, block.kernel_size, block.stride, block.padding)
        act = block.activation
        z = _composed(x, block._kernel(xp, params["W"]), params["b"], block.stride, pads,
                      None if callable(act) else act)
        return act(z) if callable(act) else z

    np.testing.assert_allclose(block.apply(params, x), composed(params, x), rtol=1e-12, atol=1e-12)
    loss = lambda f: lambda params, x: anp.sum(anp.sin(f(params, x)))  # noqa: E731
    g, g_ref = grad(loss(block.apply), (0, 1))(params, x), grad(loss(composed), (0, 1))(params, x)
    for key in ("W", "b"):
        np.testing.assert_allclose(g[0][key], g_ref[0][key], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-11, atol=1e-11)


def test_gradient_penalty_through_conv2d_matches_the_composed_path():
    """A gradient of a gradient (WGAN-GP's penalty on dD/dx): the same as through im2col + dense."""
    shape, k, s, p = CASES[1]
    x, W, b = _data(shape, k, c_out=3, seed=10)

    def penalty(f):
        def pen(W):
            dx = grad(lambda x: anp.sum(f(x, W, b, s, p, "silu")))(x)
            return anp.sum(dx * dx)
        return pen

    np.testing.assert_allclose(grad(penalty(xp.conv2d))(W), grad(penalty(_composed))(W), rtol=1e-10, atol=1e-10)


def test_bad_arguments():
    x, W, b = _data((2, 5, 5, 3), (3, 3))
    with pytest.raises(ValueError, match=r"conv2d: W must be 4-d"):
        xp.conv2d(x, W[0], b)
    with pytest.raises(ValueError, match=r"conv2d: x must be NHWC with c_in = 3"):
        xp.conv2d(x[..., :2], W, b)
    with pytest.raises(ValueError, match=r"conv2d: b must have a last axis of c_out = 4"):
        xp.conv2d(x, W, b[:3])
    with pytest.raises(ValueError, match=r"conv2d: expected positive kernel sizes and strides"):
        xp.conv2d(x, W, b, (0, 1))
    with pytest.raises(ValueError, match=r"x: spatial size \(2, 2\)"):
        xp.conv2d(x[:, :2, :2], W, b)
    with pytest.raises(ValueError, match=r"activation"):
        xp.conv2d(x, W, b, activation="nope")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_backend_computes_the_same_conv2d(dtype, backend):
    """numpy's primitive and the composed calls of strict (and cupy) agree, and keep the dtype."""
    for shape, k, s, p in CASES[1:4]:
        x, W, b = _data(shape, k, dtype=dtype, seed=11)
        xs, Ws, bs = to_device((x, W, b), backend)
        got = namespace(xs).conv2d(xs, Ws, bs, s, p, "relu")
        assert str(got.dtype).endswith(dtype)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(to_numpy(got), xp.conv2d(x, W, b, s, p, "relu"), **tol)
