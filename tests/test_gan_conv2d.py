"""ConvDiscriminator and ConvGenerator on the fused xp.conv2d: their outputs, input gradients and parameter
gradients (WGAN-GP's penalty, a gradient of a gradient, included) equal those of the composed im2col + dense
formula they used before, in float64."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from genblocks.backends import Rng, fused, namespace
from genblocks.blocks.discriminators import ConvDiscriminator, ConvGenerator, gradient_penalty
from genblocks.models.gan import GAN

TOL = dict(rtol=1e-10, atol=1e-10)


def _both(monkeypatch, f):
    """(f() on the fused conv2d, f() on the composed formula), checking the fused primitive ran under gradients."""
    xp = namespace(np.zeros(1))
    calls = []
    primitive = fused._conv2d_numpy

    def counted(*args):
        calls.append(1)
        return primitive(*args)

    with monkeypatch.context() as m:
        m.setattr(fused, "_conv2d_numpy", counted)
        got = f()
    assert calls, "the blocks did not go through the fused conv2d primitive"
    with monkeypatch.context() as m:
        # the plain formula the blocks computed before: dense(im2col(x), reshape(W, (kh kw c_in, c_out)), b)
        m.setattr(xp, "conv2d", fused.make_conv2d(xp, fused=False))
        want = f()
    return got, want


def _assert_close_trees(got, want):
    if isinstance(got, dict):
        assert got.keys() == want.keys()
        for k in got:
            _assert_close_trees(got[k], want[k])
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_close_trees(a, b)
    else:
        assert np.shape(got) == np.shape(want)
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("kw", [dict(spectral_norm=True), dict(activation="silu", minibatch_std=True),
                                dict(spectral_norm=True, minibatch_std=True, n_power_iterations=2)])
def test_conv_discriminator_values_and_gradients_equal_the_composed_formula(monkeypatch, kw):
    """D(x), the power iteration's new u, dD/dx and dD/dparams (spectral norm normalises W before the conv)."""
    disc = ConvDiscriminator((7, 8, 2), (3, 5), **kw)  # an odd height: "same" pads differ above and below
    params = disc.init(Rng(0), "float64")
    params = [{k: v + 0.05 for k, v in p.items()} for p in params]  # non-zero biases
    state = disc.init_state(params, "float64")
    x = np.random.default_rng(1).normal(size=(5, 7, 8, 2))

    def run():
        out, new_state = disc.apply(params, state, x)
        loss = lambda p, v: anp.sum(anp.sin(disc.apply(p, state, v)[0]))  # noqa: E731
        g_params, g_x = grad(loss, (0, 1))(params, x)
        return out, new_state, g_params, g_x

    got, want = _both(monkeypatch, run)
    _assert_close_trees(got, want)


def test_gradient_penalty_parameter_gradient_equals_the_composed_formula(monkeypatch):
    """d/dparams E (||dD/dx(x_hat)|| - 1)^2, a gradient of a gradient through the conv critic."""
    disc = ConvDiscriminator((8, 8, 1), (4, 6), spectral_norm=True)
    params = disc.init(Rng(2), "float64")
    state = disc.init_state(params, "float64")
    r = np.random.default_rng(3)
    x_real, x_fake, eps = r.uniform(size=(4, 8, 8, 1)), r.normal(size=(4, 8, 8, 1)), r.uniform(size=(4,))

    def penalty(p):
        return gradient_penalty(lambda v: disc.apply(p, state, v)[0], x_real, x_fake, eps)

    got, want = _both(monkeypatch, lambda: (penalty(params), grad(penalty)(params)))
    assert float(got[0]) > 0.0
    _assert_close_trees(got, want)


def test_wgan_gp_losses_of_a_conv_gan_equal_the_composed_formula(monkeypatch):
    """Both players' losses and gradients: the critic's with its penalty, the conv generator's through D."""
    gan = GAN(ConvGenerator(4, (8, 8, 1), (6, 6, 4)), ConvDiscriminator((8, 8, 1), (4, 6)), loss="wasserstein",
              penalty="gp")
    params = gan.init(Rng(4), "float64")
    state = gan.init_state(params)
    x = np.random.default_rng(5).uniform(size=(6, 8, 8, 1))

    def run():
        out = {}
        for name, loss in (("disc", gan.loss_d_and_state), ("gen", gan.loss_g_and_state)):
            f = lambda own, name=name, loss=loss: loss({**params, name: own}, state, x, Rng(6))[0]  # noqa: E731
            out[name] = (f(params[name]), grad(f)(params[name]))
        out["sample"] = gan.sample(params, Rng(7), 3)
        return out

    got, want = _both(monkeypatch, run)
    _assert_close_trees(got, want)


def test_benchmark_times_both_versions_and_puts_the_fused_conv2d_back(capsys):
    import pathlib
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_gan_conv

    xp = namespace(np.zeros(1))
    before = xp.conv2d
    bench_gan_conv.main(["--quick", "--losses", "non_saturating"])
    assert xp.conv2d is before
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| non_saturating")]
    assert [r.split(" | ")[1] for r in rows] == ["xp.conv2d", "im2col + dense"]
