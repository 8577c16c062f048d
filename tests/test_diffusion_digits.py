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
    assert model.decoder == "categorical" and model.num_bins == K and model.network.out_dim == 128
    assert model.decoder_network.image_shape == (8, 8, 1) and model.decoder_network.num_levels == K
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
    model = digits_diffusion(hidden=(16,), time_embed_dim=8, num_timesteps=10, decoder="discretized")
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
                                 vlb_trains_mean=flag, decoder="discretized")
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


# ---------------------------------------------------------------------------------------------------
# the categorical decoder p(x_0 = v_k | x_1) = softmax_k(-(x_1 - a_0 v_k)^2 / (2 s_0^2) + g_k(x_1))


def test_the_categorical_decoder_without_a_network_is_the_exact_posterior_over_the_levels(backend):
    model = digits_diffusion(hidden=(8,), time_embed_dim=8, num_timesteps=50, sigma_min=0.1, decoder="categorical",
                             decoder_channels=0)
    assert model.decoder_network is None
    a0, s0 = model.schedule.marginal_host(0)
    gen = np.random.default_rng(0)
    x0 = GRID[gen.integers(0, K, size=(5, 64))]
    x1 = a0 * x0 + s0 * gen.normal(size=x0.shape)
    # Bayes with a uniform prior over the levels: p(k | x_1) proportional to N(x_1; a_0 v_k, s_0^2)
    dens = norm.pdf(x1[..., None], a0 * GRID, s0)
    want = -np.log(np.take_along_axis(dens / dens.sum(-1, keepdims=True), np.rint((x0 + 1) * 8).astype(int)[..., None],
                                      -1)[..., 0])
    params = to_device(model.init(Rng(0), "float64"), backend)
    got = model.decoder_nll(params, to_device(x0, backend), to_device(x1, backend))
    np.testing.assert_allclose(to_numpy(got), want, rtol=1e-9, atol=1e-12)
    logits = to_numpy(model.decoder_logits(params, to_device(x1, backend)))
    assert logits.shape == (5, 64, K)
    # its L_0 in the bound is the decoder's, and the score network's L_vlb at t = 0 is 0
    terms = model.loss_terms(params, to_device(x0, backend), Rng(1, backend=backend))
    a, s = model.schedule.marginal_host(0)
    first = Rng(1, backend=backend).split(model.schedule.num_train_timesteps)[0]
    x1_drawn = a * x0 + s * to_numpy(first.normal(x0.shape, "float64"))
    assert float(to_numpy(terms["L_t"])[0]) == pytest.approx(float(np.mean(np.sum(
        to_numpy(model.decoder_nll(params, to_device(x0, backend), to_device(x1_drawn, backend))), axis=1))), rel=1e-9)
    zeros = to_device(np.zeros((5, 64)), backend)
    vb = model._vb_terms(zeros, zeros, to_device(x0, backend), to_device(x1, backend), to_device(np.zeros(5), backend))
    assert np.all(to_numpy(vb) == 0.0)


def test_level_decoder_starts_at_zero_keeps_the_data_layout_and_names_a_bad_shape():
    from genblocks.blocks.score_nets import LevelDecoder

    dec = LevelDecoder((8, 8, 1), K, channels=4)
    params = dec.init(Rng(0), "float64")
    x = np.random.default_rng(0).normal(size=(3, 64))
    assert np.all(dec.apply(params, x) == 0.0) and dec.apply(params, x).shape == (3, 64, K)
    assert dec.apply(params, x.reshape(3, 8, 8, 1)).shape == (3, 8, 8, 1, K)
    assert dec.apply(params, x.astype(np.float32)).dtype == np.float64  # params in float64 win
    assert dec.apply(dec.init(Rng(0), "float32"), x.astype(np.float32)).dtype == np.float32
    params["out"]["W"] = np.random.default_rng(1).normal(size=params["out"]["W"].shape)
    flat, image = dec.apply(params, x), dec.apply(params, x.reshape(3, 8, 8, 1))
    np.testing.assert_allclose(flat.reshape(3, 8, 8, 1, K), image, rtol=1e-12)
    with pytest.raises(ValueError, match="x: expected"):
        dec.apply(params, x.reshape(3, 4, 16, 1))
    with pytest.raises(ValueError, match="image_shape"):
        LevelDecoder((8, 8), K)
    with pytest.raises(ValueError, match="num_levels"):
        LevelDecoder((8, 8, 1), 1)


def test_the_decoder_network_trains_on_its_own_term_and_beats_the_uniform_prior():
    digits = load_digits(backend="numpy")
    train = levels_to_unit(to_numpy(digits["train"][0])).astype(np.float32)
    valid = levels_to_unit(to_numpy(digits["valid"][0][:100])).astype(np.float32)
    model = digits_diffusion(hidden=(16,), time_embed_dim=8, num_timesteps=20, sigma_min=0.1, decoder="categorical",
                             decoder_channels=8)
    params = model.init(Rng(0))
    assert set(params) == {"network", "decoder"}
    model.check_params(params)
    # the decoder's gradient comes from its own term; the score network's from the hybrid loss
    state = model.init_state(params)
    g = grad(lambda p: model.loss_and_state(p, state, train[:64], Rng(1))[0])(params)
    assert np.all(np.isfinite(to_numpy(g["decoder"]["out"]["W"]))) and np.any(g["decoder"]["out"]["W"] != 0.0)
    res = fit_diffusion(model, train, Rng(0), 150, batch_size=128, ema_decay=None)
    a0, s0 = model.schedule.marginal_host(0)
    x1 = (a0 * valid + s0 * np.random.default_rng(2).normal(size=valid.shape)).astype(np.float32)
    learned = float(np.mean(np.sum(to_numpy(model.decoder_nll(res.params, valid, x1)), axis=1)))
    uniform = float(np.mean(np.sum(to_numpy(model.decoder_nll(params, valid, x1)), axis=1)))
    # the fresh decoder is the uniform-prior posterior (about 45 nats per digit at sigma 0.1); 150 steps learn
    # where the levels sit and take well over 5 nats off (measured: about 10)
    assert uniform > 30.0 and learned < uniform - 5.0


def test_categorical_sampling_draws_x0_from_the_decoder_given_the_chains_x1():
    model = digits_diffusion(hidden=(8,), time_embed_dim=8, num_timesteps=12, sigma_min=0.1, decoder="categorical",
                             decoder_channels=4)
    params = model.init(Rng(0), "float64")
    params["network"]["out"]["W"] = 0.01 * params["network"]["out"]["W"]  # a tame chain (v near 0)
    params["decoder"]["bias"] = np.random.default_rng(0).normal(size=params["decoder"]["bias"].shape)
    seen = []
    out = model.sample(params, Rng(5), 6, callback=lambda k, t, x: seen.append((float(t), x)), dtype="float64")
    assert seen[-1][0] == 0.0 and len(seen) == model.schedule.num_train_timesteps
    assert np.all(np.isin(out, GRID))
    # the same draw by hand: the chain with the first half of the generator, the decoder with the second
    r_loop, r_dec = Rng(5).split(2)
    from genblocks.models.diffusion import SAMPLERS

    snaps = []
    SAMPLERS["ddpm"](model.model_fn(params, full=True, shared_time=True), model.schedule, r_loop, (6, 64),
                     variance_type="learned_range", dtype="float64", callback=lambda k, t, x: snaps.append(x))
    np.testing.assert_array_equal(snaps[-2], seen[-2][1])
    want = GRID[to_numpy(r_dec.categorical(model.decoder_logits(params, snaps[-2])))]
    np.testing.assert_array_equal(out, want)
    assert np.all(np.isin(model.sample(params, Rng(5), 3, sampler="ddim", num_inference_steps=4), GRID))
    # a chain that blows up shows as NaN where x_1 is not finite, not as a level the decoder picked from NaN logits
    x_T = np.zeros((2, 64))
    x_T[0, 3] = np.inf
    with np.errstate(invalid="ignore", over="ignore"):
        bad = model.sample(params, Rng(5), 2, sampler="ddim", num_inference_steps=2, x_T=x_T, dtype="float64")
    assert np.isnan(bad[0, 3]) and np.all(np.isin(bad[1], GRID))
    with pytest.raises(ValueError, match="sampler"):
        model.sample(params, Rng(5), 3, sampler="dpm_solver_pp")
    with pytest.raises(ValueError, match="t = 0"):
        model.sample(params, Rng(5), 3, sampler="ddim", num_inference_steps=4, timestep_spacing="trailing")


def test_the_categorical_decoder_names_its_bad_arguments():
    from genblocks.blocks.score_nets import LevelDecoder, MLPScoreNet
    from genblocks.models.diffusion import Diffusion

    sched = DiscreteSchedule("squaredcos_cap_v2", 10)
    net = MLPScoreNet(64, (8,))
    with pytest.raises(ValueError, match="decoder_network"):
        Diffusion(net, sched, decoder="discretized", num_bins=K, decoder_network=LevelDecoder((8, 8, 1), K))
    with pytest.raises(ValueError, match="decoder_network"):
        Diffusion(net, sched, decoder="categorical", num_bins=K, decoder_network=object())
    with pytest.raises(ValueError, match="decoder"):
        digits_diffusion(decoder="logistic")
    wrong = Diffusion(net, sched, decoder="categorical", num_bins=K, decoder_network=LevelDecoder((8, 8, 1), 5))
    params = wrong.init(Rng(0))
    with pytest.raises(ValueError, match="decoder_network: expected logits of shape"):
        wrong.decoder_logits(params, np.zeros((2, 64), np.float32))
    model = Diffusion(net, sched, decoder="categorical", num_bins=K)
    with pytest.raises(ValueError, match="17 levels"):
        model.loss_terms(model.init(Rng(0)), np.full((2, 64), 0.03, np.float32), Rng(0))
    with pytest.raises(ValueError, match="decoder_logits"):
        Diffusion(net, sched, decoder="discretized", num_bins=K).decoder_logits({}, np.zeros((2, 64)))
