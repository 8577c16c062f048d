"""GAN blocks: D* = p / (p + q), penalties against finite differences, spectral norm against an SVD, backends."""

import math

import numpy as np
import pytest

from genblocks.backends import Rng, grad, to_device, to_numpy
from genblocks.blocks.discriminators import (
    LOSSES,
    ConvDiscriminator,
    ConvGenerator,
    MLPDiscriminator,
    MLPGenerator,
    ProjectionDiscriminator,
    d_loss,
    g_loss,
    gradient_penalty,
    minibatch_std,
    r1_penalty,
    spectral_normalize,
)
from genblocks.train import adam, fit


def test_discriminator_trained_alone_reaches_the_optimal_p_over_p_plus_q():
    """x ~ p = N(-1, 1) labelled real, x ~ q = N(1, 1.5^2) fake: sigmoid(D*(x)) = p(x) / (p(x) + q(x))."""
    r = np.random.default_rng(0)
    n = 8192
    real, fake = r.normal(-1.0, 1.0, (n, 1)), r.normal(1.0, 1.5, (n, 1))
    D = MLPDiscriminator(1, (16, 16), activation="tanh")

    def loss(params, batch, rng):
        x, f = batch
        return d_loss("minimax", D.apply(params, {}, x)[0], D.apply(params, {}, f)[0])

    params = fit(loss, D.init(Rng(0), "float64"), (real, fake), Rng(1), adam(1e-2), 400, batch_size=1024,
                 progress=False).params
    x = np.linspace(-2.5, 2.5, 41)[:, None]
    log_p = -0.5 * (x[:, 0] + 1.0) ** 2
    log_q = -0.5 * ((x[:, 0] - 1.0) / 1.5) ** 2 - math.log(1.5)
    want = 1.0 / (1.0 + np.exp(log_q - log_p))
    got = 1.0 / (1.0 + np.exp(-D.apply(params, {}, x)[0]))
    # 8192 samples of each: the fitted logit's sampling error is a few hundredths where both densities live
    assert np.max(np.abs(got - want)) < 0.05, np.max(np.abs(got - want))


def _critic(seed=0, **kw):
    D = MLPDiscriminator(3, (8, 8), activation="tanh", **kw)
    return D, D.init(Rng(seed), "float64")


def _fd_input_grad(f, x, h=1e-6):
    """Central differences of sum_i f(x)_i w.r.t. every entry of x."""
    g = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (np.sum(f(x + e)) - np.sum(f(x - e))) / (2 * h)
    return g


def test_gradient_penalty_equals_its_definition_by_finite_differences():
    D, params = _critic()
    r = np.random.default_rng(1)
    real, fake, eps = r.normal(size=(5, 3)), r.normal(size=(5, 3)), r.uniform(size=5)

    def critic(v):
        return D.apply(params, {}, v)[0]

    x_hat = eps[:, None] * real + (1 - eps[:, None]) * fake
    norms = np.linalg.norm(_fd_input_grad(critic, x_hat), axis=1)
    want = np.mean((norms - 1.0) ** 2)
    np.testing.assert_allclose(gradient_penalty(critic, real, fake, eps), want, rtol=1e-6)
    np.testing.assert_allclose(r1_penalty(critic, real), np.mean(np.sum(_fd_input_grad(critic, real) ** 2, 1)),
                               rtol=1e-6)


@pytest.mark.parametrize("which", ["gp", "r1"])
def test_the_penalty_gradient_w_r_t_the_params_second_order_matches_finite_differences(which):
    D, params = _critic(2)
    r = np.random.default_rng(3)
    real, fake, eps = r.normal(size=(4, 3)), r.normal(size=(4, 3)), r.uniform(size=4)

    def penalty(p):
        def critic(v):
            return D.apply(p, {}, v)[0]
        return gradient_penalty(critic, real, fake, eps) if which == "gp" else r1_penalty(critic, real)

    g = grad(penalty)(params)
    h = 1e-6
    for layer, name, idx in [(0, "W", (1, 2)), (1, "W", (3, 0)), (0, "b", (4,)), (2, "W", (5, 0))]:
        plus = [dict(p) for p in params]
        minus = [dict(p) for p in params]
        plus[layer][name] = params[layer][name].copy()
        minus[layer][name] = params[layer][name].copy()
        plus[layer][name][idx] += h
        minus[layer][name][idx] -= h
        fd = (penalty(plus) - penalty(minus)) / (2 * h)
        np.testing.assert_allclose(g[layer][name][idx], fd, rtol=1e-5, atol=1e-8)


def test_spectral_norm_estimate_matches_the_largest_singular_value():
    W = np.random.default_rng(4).normal(size=(20, 10))
    u = np.full(10, 1 / math.sqrt(10))
    for _ in range(60):  # the vector is carried call to call, as the state does in training
        Wn, u, sigma = spectral_normalize(W, u)
    top = np.linalg.svd(W, compute_uv=False)
    np.testing.assert_allclose(sigma, top[0], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.svd(Wn, compute_uv=False)[0], 1.0, rtol=1e-6)


def test_spectral_norm_vectors_are_state_not_params_and_advance_each_call():
    D, params = _critic(spectral_norm=True)
    assert all(set(p) == {"W", "b"} for p in params)  # no u among the trained leaves
    state = D.init_state(params)
    assert [u.shape for u in state["u"]] == [(8,), (8,), (1,)]
    x = np.random.default_rng(5).normal(size=(6, 3))
    for _ in range(40):
        _, state = D.apply(params, state, x)
    # after the iteration converged, each layer acts with spectral norm 1
    sig = [np.linalg.svd(spectral_normalize(p["W"], u)[0], compute_uv=False)[0] for p, u in zip(params, state["u"])]
    np.testing.assert_allclose(sig, 1.0, rtol=1e-4)
    g = grad(lambda p: np.sum(D.apply(p, state, x)[0]))(params)
    assert [set(p) for p in g] == [{"W", "b"}] * 3
    with pytest.raises(ValueError, match="state: MLPDiscriminator with spectral_norm"):
        D.apply(params, {}, x)


def test_minibatch_std_feature_is_the_mean_feature_std_and_zero_for_a_collapsed_batch():
    h = np.random.default_rng(6).normal(size=(7, 4))
    out = minibatch_std(h)
    assert out.shape == (7, 5)
    np.testing.assert_allclose(out[:, 4], np.mean(np.sqrt(np.var(h, axis=0) + 1e-8)))
    assert np.all(minibatch_std(np.ones((5, 3)))[:, 3] < 1e-3)


def test_losses_equal_their_formulas():
    r = np.random.default_rng(7)
    dr, df = r.normal(size=9), r.normal(size=9)
    sig = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    want_d = {
        "minimax": -np.mean(np.log(sig(dr))) - np.mean(np.log(1 - sig(df))),
        "non_saturating": -np.mean(np.log(sig(dr))) - np.mean(np.log(1 - sig(df))),
        "wasserstein": np.mean(df) - np.mean(dr),
        "hinge": np.mean(np.maximum(1 - dr, 0)) + np.mean(np.maximum(1 + df, 0)),
        "least_squares": 0.5 * np.mean((dr - 1) ** 2) + 0.5 * np.mean(df ** 2),
    }
    want_g = {
        "minimax": np.mean(np.log(1 - sig(df))), "non_saturating": -np.mean(np.log(sig(df))),
        "wasserstein": -np.mean(df), "hinge": -np.mean(df), "least_squares": 0.5 * np.mean((df - 1) ** 2),
    }
    for kind in LOSSES:
        np.testing.assert_allclose(d_loss(kind, dr, df), want_d[kind], rtol=1e-12)
        np.testing.assert_allclose(g_loss(kind, df), want_g[kind], rtol=1e-12)
    with pytest.raises(ValueError, match="loss: expected one of"):
        d_loss("wgan", dr, df)


def _blocks():
    r = np.random.default_rng(8)
    x2, img, y = r.normal(size=(6, 2)), r.uniform(size=(6, 8, 8, 1)), np.array([0, 1, 2, 0, 1, 2])
    z = r.normal(size=(6, 4))
    return [
        ("mlp", MLPDiscriminator(2, (8, 8), spectral_norm=True, minibatch_std=True), (x2,)),
        ("projection", ProjectionDiscriminator(2, 3, (8,), spectral_norm=True), (x2, y)),
        ("conv", ConvDiscriminator((8, 8, 1), (4, 8), spectral_norm=True, minibatch_std=True), (img,)),
        ("mlp_gen", MLPGenerator(4, 2, (8,)), (z,)),
        ("cond_gen", MLPGenerator(4, 2, (8,), num_classes=3), (z, y)),
        ("conv_gen", ConvGenerator(4, (8, 8, 1), (8, 8, 4)), (z,)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_forward_on_every_backend_equals_numpy(index, backend):
    name, block, args = _blocks()[index]
    params = block.init(Rng(0), "float64")
    dev = to_device(params, backend)
    dev_args = tuple(to_device(a, backend) for a in args)
    if name.endswith("gen"):
        want, got = block.apply(params, *args), block.apply(dev, *dev_args)
    else:
        state = block.init_state(params, "float64")
        want, want_state = block.apply(params, state, *args)
        got, got_state = block.apply(dev, to_device(state, backend), *dev_args)
        for a, b in zip(want_state["u"], got_state["u"]):
            np.testing.assert_allclose(to_numpy(b), a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-10, atol=1e-12)


def test_shapes_labels_and_errors():
    _, proj, (x, y) = _blocks()[1]
    params = proj.init(Rng(0), "float64")
    state = proj.init_state(params, "float64")
    a, _ = proj.apply(params, state, x, y)
    b, _ = proj.apply(params, state, x, (y + 1) % 3)
    assert a.shape == (6,) and not np.allclose(a, b)  # the label enters through the projection
    with pytest.raises(ValueError, match="y: ProjectionDiscriminator needs class labels"):
        proj.apply(params, state, x)
    _, conv, (img,) = _blocks()[2]
    cp = conv.init(Rng(0), "float64")
    out, _ = conv.apply(cp, conv.init_state(cp, "float64"), img.reshape(6, 64))  # flat images are reshaped
    assert out.shape == (6,)
    gen = ConvGenerator(4, (8, 8, 3), (8, 8, 4))
    assert gen.apply(gen.init(Rng(0)), np.zeros((2, 4), np.float32)).shape == (2, 8, 8, 3)
    with pytest.raises(ValueError, match="image_shape: H and W must be divisible by 2"):
        ConvGenerator(4, (6, 6, 1), (8, 8, 4))
    with pytest.raises(ValueError, match="y: this generator is class-conditional"):
        MLPGenerator(4, 2, (8,), num_classes=3).apply(MLPGenerator(4, 2, (8,), num_classes=3).init(Rng(0)),
                                                      np.zeros((2, 4), np.float32))


def test_input_range_puts_the_first_layers_kinks_inside_the_data_box():
    s = 4.0
    disc = MLPDiscriminator(2, (256, 16), input_range=s)
    params = disc.init(Rng(0), "float64")
    W, b = np.asarray(params[0]["W"]), np.asarray(params[0]["b"])
    # unit j's kink is the line w_j . x + b_j = 0; it passes through a point of [-s, s]^2, so its distance
    # to the origin is at most s sqrt(2), and the points spread over the box (not all through the origin)
    dist = np.abs(b) / np.linalg.norm(W, axis=0)
    assert dist.max() <= s * np.sqrt(2) and dist.mean() > 0.25 * s
    # the other layers are the default ones; without input_range the biases start at zero
    assert not np.asarray(MLPDiscriminator(2, (256, 16)).init(Rng(0), "float64")[0]["b"]).any()
    again = disc.init(Rng(0), "float64")
    np.testing.assert_array_equal(np.asarray(again[0]["b"]), b)
    with pytest.raises(ValueError, match="input_range"):
        MLPDiscriminator(2, (8,), input_range=0.0)
