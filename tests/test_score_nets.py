"""Score networks: shapes, dtypes, conditioning (time, class, null token), gradients, backends."""

import numpy as np
import pytest
from autograd.test_util import check_grads
from conftest import assert_backend

from genblocks.backends import Rng, to_device, to_numpy
from genblocks.blocks.nn import upsample_nearest
from genblocks.blocks.ops import silu
from genblocks.blocks.score_nets import ClassEmbedding, FiLM, MLPScoreNet, TimeEmbedding, UNet
from genblocks.train.tree import tree_map


def perturbed(params, seed=0, scale=0.1):
    """Params with every leaf moved randomly (zero-initialised layers would hide bugs)."""
    rng = np.random.default_rng(seed)
    return tree_map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), params)


def test_mlp_score_net_shapes_and_dtypes():
    for dtype in ("float32", "float64"):
        net = MLPScoreNet(3, (16, 16), time_embed_dim=8)
        p = net.init(Rng(0), dtype)
        x = np.random.default_rng(0).normal(size=(5, 3)).astype(dtype)
        out = net.apply(p, x, np.arange(5, dtype=dtype))
        assert out.shape == (5, 3) and out.dtype == np.dtype(dtype)
    wide = MLPScoreNet(2, (8,), out_dim=4)
    assert wide.apply(wide.init(Rng(0)), np.zeros((3, 2), np.float32), np.zeros(3, np.float32)).shape == (3, 4)
    assert "MLPScoreNet(dim=3" in repr(net)


def test_time_and_class_conditioning_change_the_output():
    net = MLPScoreNet(2, (16, 16), num_classes=3)
    p = perturbed(net.init(Rng(1), "float64"))
    x = np.ones((4, 2))
    t = np.full(4, 10.0)
    y = np.array([0, 1, 2, 3])
    out = net.apply(p, x, t, y)
    assert np.abs(out[0] - out[1]).max() > 1e-3 and np.abs(out[1] - out[2]).max() > 1e-3
    # y=None is the null token, index num_classes
    np.testing.assert_allclose(net.apply(p, x, t, None), net.apply(p, x, t, np.full(4, 3)), rtol=1e-12)
    np.testing.assert_allclose(out[3], net.apply(p, x, t)[3], rtol=1e-12)
    assert np.abs(net.apply(p, x, t + 50.0, y) - out).max() > 1e-3


def test_film_is_the_identity_at_init_and_h_gamma_plus_beta():
    film = FiLM(3, 4)
    p = film.init(Rng(0), "float64")
    assert p["W"].shape == (3, 8) and p["b"].tolist() == [1.0] * 4 + [0.0] * 4
    h, e = np.random.default_rng(1).normal(size=(5, 4)), np.random.default_rng(2).normal(size=(5, 3))
    np.testing.assert_array_equal(film.apply(p, h, e), h)
    q = perturbed(p)
    gb = e @ q["W"] + q["b"]
    np.testing.assert_allclose(film.apply(q, h, e), h * gb[:, :4] + gb[:, 4:], rtol=1e-12)
    images = np.random.default_rng(3).normal(size=(5, 2, 2, 4))  # (n, H, W, c): one (gamma, beta) per example
    np.testing.assert_allclose(film.apply(q, images, e), images * gb[:, None, None, :4] + gb[:, None, None, 4:],
                               rtol=1e-12)
    assert film.init(Rng(0), "float32")["b"].dtype == np.float32


def test_embeddings():
    te = TimeEmbedding(8, time_scale=1000.0)
    p = te.init(Rng(0), "float64")
    e = te.apply(p, np.array([0.0, 0.5]))
    assert e.shape == (2, 8)
    e2 = TimeEmbedding(8).apply(p, np.array([0.0, 500.0]))
    np.testing.assert_allclose(e, e2, rtol=1e-12)
    # silu fused into the last layer is silu of the output, untraced and under autograd alike
    np.testing.assert_allclose(te.apply(p, np.array([0.0, 0.5]), activation="silu"), silu(e), rtol=1e-12)
    check_grads(lambda q: te.apply(q, np.array([0.1, 0.7]), activation="silu"), modes=["rev"], order=1)(
        perturbed(p))
    with pytest.raises(ValueError, match="activation"):
        te.apply(p, np.array([0.0]), activation="relu")
    ce = ClassEmbedding(4, 6)
    table = ce.init(Rng(0))["table"]
    assert table.shape == (5, 6)
    np.testing.assert_array_equal(ce.apply({"table": table}, np.array([2, 4])), table[[2, 4]])
    with pytest.raises(ValueError, match="n"):
        ce.apply({"table": table}, None)
    with pytest.raises(TypeError, match="integer"):
        ce.apply({"table": table}, np.array([1.0]))


@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (8, (1, 2, 2)), (28, (1, 2))])
def test_unet_shapes(size, mults):
    net = UNet(1, base_channels=8, channel_mults=mults, time_embed_dim=16, num_classes=10, out_channels=2)
    p = net.init(Rng(0))
    x = np.random.default_rng(0).normal(size=(2, size, size, 1)).astype(np.float32)
    out = net.apply(p, x, np.array([3.0, 700.0], np.float32), np.array([1, 10]))
    assert out.shape == (2, size, size, 2) and out.dtype == np.float32
    # the zero-initialised output convolution makes the initial prediction 0
    assert np.all(out == 0)


def test_unet_is_translation_equivariant_in_its_interior_and_depends_on_t():
    net = UNet(1, base_channels=4, channel_mults=(1,), time_embed_dim=8)
    p = perturbed(net.init(Rng(2), "float64"))
    x = np.zeros((1, 30, 30, 1))
    x[0, 14, 14, 0] = 1.0
    shifted = np.roll(x, 1, axis=2)
    t = np.array([5.0])
    a, b = net.apply(p, x, t), net.apply(p, shifted, t)
    # 8 convolutions of radius 1: pixels 9 or more from the border never see the zero padding
    np.testing.assert_allclose(np.roll(a, 1, axis=2)[:, 10:20, 10:20], b[:, 10:20, 10:20], rtol=1e-10, atol=1e-12)
    assert np.abs(net.apply(p, x, t + 100.0) - a).max() > 1e-4


def test_upsample_nearest():
    x = np.arange(8.0).reshape(1, 2, 2, 2)
    y = upsample_nearest(x)
    np.testing.assert_array_equal(y, x.repeat(2, axis=1).repeat(2, axis=2))


def test_gradients_float64():
    net = MLPScoreNet(2, (6, 6), time_embed_dim=4, num_classes=2)
    p = perturbed(net.init(Rng(3), "float64"))
    t = np.array([1.0, 20.0, 300.0])
    y = np.array([0, 1, 2])
    check_grads(lambda x: net.apply(p, x, t, y), modes=["rev"], order=1)(np.random.default_rng(0).normal(size=(3, 2)))
    check_grads(lambda W: net.apply({**p, "out": {**p["out"], "W": W}}, np.ones((3, 2)), t, y),
                modes=["rev"], order=1)(p["out"]["W"])
    check_grads(lambda tab: net.apply({**p, "cond": {**p["cond"], "class": {"table": tab}}}, np.ones((3, 2)), t, y),
                modes=["rev"], order=1)(p["cond"]["class"]["table"])
    unet = UNet(1, base_channels=2, channel_mults=(1, 2), time_embed_dim=4)
    pu = perturbed(unet.init(Rng(4), "float64"))
    check_grads(lambda x: unet.apply(pu, x, np.array([3.0])), modes=["rev"], order=1)(
        np.random.default_rng(1).normal(size=(1, 4, 4, 1)))


def test_forward_on_every_backend(backend):
    net = MLPScoreNet(2, (8, 8), num_classes=3)
    p = perturbed(net.init(Rng(0)))
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    t, y = np.array([0.0, 1.0, 2.0, 3.0], np.float32), np.array([0, 1, 2, 3])
    got = net.apply(to_device(p, backend), to_device(x, backend), to_device(t, backend), to_device(y, backend))
    assert_backend(got, backend)
    np.testing.assert_allclose(to_numpy(got), net.apply(p, x, t, y), rtol=1e-5, atol=1e-5)
    unet = UNet(1, base_channels=4, channel_mults=(1, 2), time_embed_dim=8, num_classes=2)
    pu = perturbed(unet.init(Rng(1)))
    xi = np.random.default_rng(1).normal(size=(2, 8, 8, 1)).astype(np.float32)
    ti, yi = np.array([5.0, 9.0], np.float32), np.array([0, 2])
    got = unet.apply(to_device(pu, backend), to_device(xi, backend), to_device(ti, backend), to_device(yi, backend))
    assert_backend(got, backend)
    np.testing.assert_allclose(to_numpy(got), unet.apply(pu, xi, ti, yi), rtol=1e-4, atol=1e-4)


def test_bad_inputs():
    net = MLPScoreNet(2, (8,))
    p = net.init(Rng(0))
    with pytest.raises(ValueError, match="x"):
        net.apply(p, np.zeros((3, 3), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="t"):
        net.apply(p, np.zeros((3, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="y"):
        net.apply(p, np.zeros((3, 2), np.float32), np.zeros(3, np.float32), np.zeros(3, np.int64))
    unet = UNet(1, channel_mults=(1, 2, 2), base_channels=4)
    with pytest.raises(ValueError, match="divisible"):
        unet.apply(unet.init(Rng(0)), np.zeros((1, 6, 6, 1), np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="hidden"):
        MLPScoreNet(2, ())
