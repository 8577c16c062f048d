"""Diffusion trained for likelihood on 17-level digits: the discretized decoder, the truncated cosine
schedule, the full-bound evaluation with its standard errors and the PF-ODE bound on the discrete scale."""

import math

import numpy as np
import pytest
from scipy.stats import norm

from genblocks.backends import Rng, grad, to_device, to_numpy
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.data import load_digits
from genblocks.models.diffusion import discretized_gaussian_log_likelihood
from genblocks.train.recipes import (
    diffusion_bound,
    digits_diffusion,
    digits_images,
    fit_diffusion,
    levels_to_unit,
    ode_discrete_nll,
    truncated_cosine_betas,
)

K = 17
GRID = np.linspace(-1.0, 1.0, K)


@pytest.mark.parametrize("mean,logvar", [(0.1, math.log(0.04)), (-0.9, math.log(0.5)), (0.99, math.log(1e-3)),
                                         (0.0, math.log(1e-6)), (3.0, math.log(1e4))])
def test_discretized_decoder_is_a_distribution_over_the_bins(mean, logvar):
    logp = discretized_gaussian_log_likelihood(GRID, np.full(K, mean), np.full(K, logvar), num_bins=K)
    assert np.all(np.isfinite(logp)) and np.all(logp <= 0.0)
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-12)  # a CDF difference over a partition: exactly 1


def test_discretized_decoder_is_close_to_the_exact_gaussian_bins_and_has_no_floor():
    mean, std = 0.05, 0.2
    logp = discretized_gaussian_log_likelihood(GRID, np.full(K, mean), np.full(K, 2 * math.log(std)), num_bins=K)
    edges = np.concatenate([[-np.inf], (GRID[:-1] + GRID[1:]) / 2, [np.inf]])
    exact = np.diff(norm.cdf(edges, mean, std))
    np.testing.assert_allclose(np.exp(logp), exact, atol=5e-4)  # the tanh form of Phi: within 2e-4 per edge
    # a bin 12 standard deviations away: far below the old clip at log 1e-12, and finite
    far = discretized_gaussian_log_likelihood(np.array([1.0]), np.array([-0.5]), np.array([2 * math.log(0.1)]), K)
    assert -1e6 < float(far[0]) < math.log(1e-12)


def test_discretized_decoder_gradients_are_finite_and_the_dtype_follows_the_inputs():
    x = np.tile(GRID, 3)
    f = lambda m, lv: np.sum(discretized_gaussian_log_likelihood(x, m, lv, num_bins=K))
    for mean, logvar in ((0.0, -12.0), (0.7, 3.0), (-0.3, -4.0)):
        m, lv = np.full(x.shape, mean), np.full(x.shape, logvar)
        assert np.all(np.isfinite(grad(f, 0)(m, lv))) and np.all(np.isfinite(grad(f, 1)(m, lv)))
    out = discretized_gaussian_log_likelihood(x.astype(np.float32), np.zeros(x.shape, np.float32),
                                              np.full(x.shape, -3.0, np.float32), num_bins=K)
    assert out.dtype == np.float32


def test_discretized_decoder_runs_on_the_strict_backend():
    x, m, lv = GRID, np.full(K, 0.2), np.full(K, -3.0)
    want = discretized_gaussian_log_likelihood(x, m, lv, num_bins=K)
    got = discretized_gaussian_log_likelihood(*(to_device(a, "strict") for a in (x, m, lv)), K)
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-12)


def test_truncated_cosine_betas_keep_the_chain_above_sigma_min():
    full = DiscreteSchedule("squaredcos_cap_v2", 1000)
    betas = truncated_cosine_betas(1000, 0.025)
    cut = DiscreteSchedule("squaredcos_cap_v2", len(betas), trained_betas=betas)
    k = 1000 - len(betas)
    assert math.sqrt(1.0 - cut.alphas_cumprod[0]) >= 0.025 > math.sqrt(1.0 - full.alphas_cumprod[k - 1])
    np.testing.assert_allclose(cut.alphas_cumprod, full.alphas_cumprod[k:], rtol=1e-9)


def test_levels_to_unit_puts_17_levels_on_the_decoders_grid():
    np.testing.assert_allclose(levels_to_unit(np.arange(K, dtype=float)), GRID, atol=1e-15)


@pytest.fixture(scope="module")
def tiny():
    """A tiny digits recipe trained a few steps, and 24 test digits in [-1, 1]."""
    digits = load_digits(backend="numpy")
    train = levels_to_unit(to_numpy(digits["train"][0])).astype(np.float32)
    test = levels_to_unit(to_numpy(digits["test"][0][:24])).astype(np.float32)
    model = digits_diffusion(hidden=(32,), time_embed_dim=16, num_timesteps=30)
    res = fit_diffusion(model, train, Rng(0), 40, batch_size=64)
    return model, res, test


def test_the_recipe_trains_with_learned_variances_importance_sampling_and_an_ema(tiny):
    model, res, _ = tiny
    assert model.variance_type == "learned_range" and model.timestep_sampling == "importance"
    assert model.decoder == "discretized" and model.num_bins == K and model.network.out_dim == 128
    assert res.ema_params is not None and int(np.sum(to_numpy(res.state["counts"]))) == 40 * 64
    assert all(np.isfinite(res.history["loss"]))


def test_the_bound_adds_up_and_its_standard_errors_are_sane(tiny):
    model, res, test = tiny
    b = diffusion_bound(model, res.ema_params, test, Rng(1), passes=3, batch_size=10)
    assert len(b["L_t"]) == model.schedule.num_train_timesteps and len(b["per_example"]) == len(test)
    assert b["nats"] == pytest.approx(b["L_T"] + sum(b["L_t"]), rel=1e-5)
    assert b["nats"] == pytest.approx(np.mean(b["per_example"]), rel=1e-9)
    assert b["bits_per_dim"] == pytest.approx(b["nats"] / (64 * math.log(2.0)), rel=1e-12)
    assert 0.0 < b["se_mc"] < b["nats"] and 0.0 < b["se_images"] < b["nats"]
    # the same noise draws give the same bound; batching does not change the per-example estimates' law
    again = diffusion_bound(model, res.ema_params, test, Rng(1), passes=3, batch_size=10)
    assert again["nats"] == b["nats"]
    other = diffusion_bound(model, res.ema_params, test, Rng(2), passes=3)
    assert abs(other["nats"] - b["nats"]) < 6.0 * math.hypot(b["se_mc"], other["se_mc"])


def test_loss_terms_per_example_sums_are_the_vlb(tiny):
    model, res, test = tiny
    terms = model.loss_terms(res.ema_params, test, Rng(3))
    assert terms["vlb_per_example"].shape == (len(test),)
    assert float(np.mean(terms["vlb_per_example"])) == pytest.approx(float(terms["vlb"]), rel=1e-5)


def test_ode_discrete_nll_is_a_finite_bound_on_the_discrete_scale(tiny):
    model, res, test = tiny
    out = ode_discrete_nll(model, res.ema_params, test[:4], Rng(4), rtol=1e-3, atol=1e-3)
    # an untrained-ish model: far from good, but a positive finite number of nats with a standard error
    assert math.isfinite(out["nats"]) and out["nats"] > 0.0 and out["se"] >= 0.0


def test_digits_images_is_the_row_major_8x8_view_and_names_a_bad_argument():
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 64)
    img = digits_images(x)
    assert img.shape == (2, 8, 8, 1) and img[1, 2, 3, 0] == x[1, 2 * 8 + 3]
    with pytest.raises(ValueError, match="x: expected 64 pixels"):
        digits_images(np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="network"):
        digits_diffusion(network="transformer")


def test_the_unet_recipe_trains_on_images_and_its_bound_adds_up():
    digits = load_digits(backend="numpy")
    train = digits_images(levels_to_unit(to_numpy(digits["train"][0][:256])).astype(np.float32))
    test = digits_images(levels_to_unit(to_numpy(digits["test"][0][:6])).astype(np.float32))
    model = digits_diffusion(network="unet", base_channels=8, num_res_blocks=1, time_embed_dim=16, num_timesteps=12)
    assert model.network.out_channels == 2 and model.variance_type == "learned_range"
    res = fit_diffusion(model, train, Rng(0), 6, batch_size=32)
    assert all(np.isfinite(res.history["loss"]))
    b = diffusion_bound(model, res.ema_params, test, Rng(1), passes=2)
    assert len(b["L_t"]) == model.schedule.num_train_timesteps and len(b["per_example"]) == 6
    assert b["nats"] == pytest.approx(b["L_T"] + sum(b["L_t"]), rel=1e-5)
    assert b["bits_per_dim"] == pytest.approx(b["nats"] / (64 * math.log(2.0)), rel=1e-12)


def test_fit_diffusion_weight_decay_and_cosine_lr_are_adamw_and_the_cosine_schedule():
    from genblocks.train import optim

    digits = load_digits(backend="numpy")
    train = levels_to_unit(to_numpy(digits["train"][0][:128])).astype(np.float32)
    model = digits_diffusion(hidden=(16,), time_embed_dim=8, num_timesteps=10)
    kw = dict(batch_size=32, lr=1e-2, ema_decay=None)
    plain = fit_diffusion(model, train, Rng(0), 3, weight_decay=0.0, **kw).params
    decayed = fit_diffusion(model, train, Rng(0), 3, weight_decay=0.5, lr_decay_steps=3, final_lr=1e-3, **kw).params
    # the same run by hand: init and root rng as fit_diffusion draws them, AdamW on the cosine schedule
    r_init, r_fit = Rng(0).split(2)
    p0 = model.init(r_init, "float32")
    opt = optim.adamw(optim.cosine_decay(1e-2, 3, 1e-3), weight_decay=0.5)
    from genblocks.train.loop import fit

    want = fit(model.loss_and_state, p0, train, r_fit, opt, 3, state=model.init_state(p0), batch_size=32,
               progress=False, clip_norm=1.0).params
    np.testing.assert_allclose(to_numpy(decayed["out"]["W"]), to_numpy(want["out"]["W"]), rtol=1e-6, atol=1e-7)
    r_fit = Rng(0).split(2)[1]  # a fresh root: fit draws from the one it is given
    adam = fit(model.loss_and_state, p0, train, r_fit, optim.adam(1e-2), 3, state=model.init_state(p0),
               batch_size=32, progress=False, clip_norm=1.0).params  # weight_decay=0 is plain Adam
    np.testing.assert_allclose(to_numpy(plain["out"]["W"]), to_numpy(adam["out"]["W"]), rtol=1e-6, atol=1e-7)
    assert not np.allclose(to_numpy(decayed["out"]["W"]), to_numpy(plain["out"]["W"]))


def test_vlb_trains_mean_sends_the_bounds_gradient_to_the_mean_outputs_only():
    digits = load_digits(backend="numpy")
    x = levels_to_unit(to_numpy(digits["train"][0][:16])).astype(np.float64)
    grads = {}
    for flag in (False, True):
        model = digits_diffusion(hidden=(16,), time_embed_dim=8, num_timesteps=10, timestep_sampling="uniform",
                                 vlb_trains_mean=flag)
        params = model.init(Rng(0), "float64")
        params["out"]["W"] = 0.1 * np.random.default_rng(0).normal(size=params["out"]["W"].shape)
        grads[flag] = grad(lambda p: model.loss(p, x, Rng(1)))(params)["out"]["W"]
    # the variance outputs (columns 64:) see the same gradient; the mean outputs (columns :64) get L_vlb's too
    np.testing.assert_allclose(grads[True][:, 64:], grads[False][:, 64:], rtol=1e-10, atol=1e-14)
    assert not np.allclose(grads[True][:, :64], grads[False][:, :64])
    with pytest.raises(ValueError, match="vlb_trains_mean"):
        from genblocks.models.diffusion import Diffusion

        Diffusion(model.network, model.schedule, vlb_trains_mean=True)


def test_decoder_variance_beta_learns_the_decoders_variance_between_the_posterior_and_beta_0():
    x_t = np.zeros((3, 64))
    pred = np.zeros((3, 64))
    t = np.zeros(3)
    logvars = {}
    for kind in ("posterior", "beta"):
        model = digits_diffusion(hidden=(8,), time_embed_dim=8, num_timesteps=100, sigma_min=0.025,
                                 decoder_variance=kind)
        sched = model.schedule
        logvars[kind] = [model.p_mean_logvar(pred, np.full((3, 64), v), x_t, t)[1] for v in (-1.0, 1.0)]
    small = math.log(sched.posterior_variance[1])
    # DDPM's table: at t = 0 both ends of the range are sigma~^2_1, so v has no effect on the decoder
    np.testing.assert_allclose(logvars["posterior"][0], small, rtol=1e-10)
    np.testing.assert_allclose(logvars["posterior"][1], small, rtol=1e-10)
    # "beta": v = -1 gives sigma~^2_1, v = 1 gives beta_0 = 1 - alpha_bar_0 = sigma_min^2 (the merged first step)
    np.testing.assert_allclose(logvars["beta"][0], small, rtol=1e-10)
    np.testing.assert_allclose(logvars["beta"][1], math.log(sched.betas[0]), rtol=1e-10)
    assert math.sqrt(sched.betas[0]) == pytest.approx(0.025, rel=0.2) and sched.betas[0] > sched.posterior_variance[1]
    with pytest.raises(ValueError, match="decoder_variance"):
        digits_diffusion(decoder_variance="large")


@pytest.mark.parametrize("n,T,H", [(20, 5, 3), (7, 50, 10), (1, 3, 2), (64, 4, 2)])
def test_importance_history_update_is_a_shift_register_per_t(n, T, H, backend):
    from genblocks.models.diffusion import LossSecondMomentSampler

    gen = np.random.default_rng(n + T)
    sampler = LossSecondMomentSampler(T, history=H)
    old = gen.normal(size=(T, H))
    counts = gen.integers(0, 5, size=T)
    t, losses = gen.integers(0, T, size=n).astype(np.float64), gen.normal(size=n)
    state = {"loss_history": to_device(old, backend), "counts": to_device(counts, backend)}
    new = sampler.update(state, to_device(t, backend), to_device(losses, backend))
    want, want_counts = old.copy(), counts.copy()
    for ti, v in zip(t.astype(int), losses):  # the reference: one push per loss, in batch order
        want[ti] = np.concatenate([want[ti, 1:], [v]])
        want_counts[ti] += 1
    np.testing.assert_allclose(to_numpy(new["loss_history"]), want, rtol=0, atol=0)
    np.testing.assert_array_equal(to_numpy(new["counts"]), want_counts)
