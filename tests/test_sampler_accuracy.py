"""Samplers against the closed-form probability-flow map of Gaussian data, and their grids against diffusers'.

Data N(mu, s^2 I) under x_t = alpha_t x_0 + sigma_t eps has the exact noise prediction
eps(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s^2 + sigma_t^2), and the probability-flow ODE keeps
(x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) constant, so a deterministic sampler that starts at step
t0 should return mu + s (x_T - alpha_t0 mu) / sqrt(alpha_t0^2 s^2 + sigma_t0^2). The reference errors are
diffusers 0.42.1's schedulers (DPMSolverMultistepScheduler: dpmsolver++, order 2, final_sigmas_type="zero",
lambda_min_clipped=-inf; DDIMScheduler with clip_sample=False) on the same data, x_T and 4096 x 4 points.
"""

import math

import numpy as np
import pytest
from test_samplers import COV as COVS
from test_samplers import MU as MEANS
from test_samplers import W

from genblocks.backends import Rng
from genblocks.blocks import samplers as S
from genblocks.blocks.schedules import DiscreteSchedule, multistep_timesteps, spaced_timesteps

LINEAR = DiscreteSchedule("linear", 1000)
MU = np.array([0.5, -1.0, 0.25, 2.0])
S2 = 0.3

# diffusers 0.42.1 DPMSolverMultistepScheduler(...).timesteps after set_timesteps(n), T = 1000
DIFFUSERS_DPM_GRIDS = {
    ("linspace", 1): [999],
    ("linspace", 10): [999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
    ("linspace", 20): [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250, 200, 150,
                       100, 50],
    ("leading", 1): [500],
    ("leading", 10): [900, 810, 720, 630, 540, 450, 360, 270, 180, 90],
    ("leading", 20): [940, 893, 846, 799, 752, 705, 658, 611, 564, 517, 470, 423, 376, 329, 282, 235, 188, 141, 94,
                      47],
    ("trailing", 1): [999],
    ("trailing", 10): [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
    ("trailing", 20): [999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 499, 449, 399, 349, 299, 249, 199, 149, 99,
                       49],
}
# diffusers 0.42.1 DDIMScheduler / DDPMScheduler timesteps, n = 10
DIFFUSERS_DDIM_GRIDS = {
    "linspace": [999, 888, 777, 666, 555, 444, 333, 222, 111, 0],
    "leading": [900, 800, 700, 600, 500, 400, 300, 200, 100, 0],
    "trailing": [999, 899, 799, 699, 599, 499, 399, 299, 199, 99],
}
# max |x_0 - exact| of diffusers' DPMSolverMultistepScheduler on this problem (n -> spacing -> error)
DIFFUSERS_DPM_ERROR = {10: {"linspace": 0.372, "leading": 0.309, "trailing": 0.367},
                       20: {"linspace": 0.0782, "leading": 0.0651, "trailing": 0.0731}}


def exact_eps(schedule=LINEAR):
    def model_fn(x, t):
        a, s = schedule.marginal_host(float(t[0]))
        return s * (x - a * MU) / (a * a * S2 + s * s)
    return model_fn


def exact_x0(x_T, t0, schedule=LINEAR):
    a, s = schedule.marginal_host(float(t0))
    return MU + math.sqrt(S2) * (x_T - a * MU) / math.sqrt(a * a * S2 + s * s)


def x_T():
    return np.random.default_rng(0).standard_normal((4096, 4))


@pytest.mark.parametrize("spacing,n", sorted(DIFFUSERS_DPM_GRIDS))
def test_dpm_solver_grid_is_diffusers(spacing, n):
    assert multistep_timesteps(1000, n, spacing) == DIFFUSERS_DPM_GRIDS[spacing, n]
    seen = []
    S.dpm_solver_pp_sample(exact_eps(), LINEAR, Rng(0), (3, 4), num_inference_steps=n, timestep_spacing=spacing,
                           lambda_min_clipped=-math.inf, dtype="float64",
                           callback=lambda step, t, x: seen.append(int(t)))
    assert seen == DIFFUSERS_DPM_GRIDS[spacing, n]


@pytest.mark.parametrize("spacing", sorted(DIFFUSERS_DDIM_GRIDS))
def test_ddim_grid_is_diffusers(spacing):
    assert spaced_timesteps(1000, 10, spacing) == DIFFUSERS_DDIM_GRIDS[spacing]


@pytest.mark.parametrize("n", [10, 20])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_matches_the_exact_flow_map_as_well_as_diffusers(spacing, n):
    xT = x_T()
    seen = []
    out = S.dpm_solver_pp_sample(exact_eps(), LINEAR, Rng(0), xT.shape, num_inference_steps=n,
                                 timestep_spacing=spacing, lambda_min_clipped=-math.inf, x_T=xT, dtype="float64",
                                 callback=lambda step, t, x: seen.append(t))
    err = np.max(np.abs(out - exact_x0(xT, seen[0])))
    assert err <= 1.02 * DIFFUSERS_DPM_ERROR[n][spacing] + 1e-3, err


def test_one_step_dpm_solver_moves_from_noise_to_data():
    # the old grid visited only t = 0 and returned x_T unchanged (within 0.005)
    xT = x_T()
    out = S.dpm_solver_pp_sample(exact_eps(), LINEAR, Rng(0), xT.shape, num_inference_steps=1,
                                 lambda_min_clipped=-math.inf, x_T=xT, dtype="float64")
    assert np.max(np.abs(out - xT)) > 1.0
    np.testing.assert_allclose(out.mean(axis=0), MU, atol=0.05)  # one x0 prediction from t = 999: the data mean


@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_second_order_dpm_solver_beats_ddim_at_ten_steps(spacing):
    xT = x_T()
    errs = {}
    for name, fn in (("dpm", S.dpm_solver_pp_sample), ("ddim", S.ddim_sample)):
        seen = []
        kw = {"lambda_min_clipped": -math.inf} if name == "dpm" else {}
        out = fn(exact_eps(), LINEAR, Rng(0), xT.shape, num_inference_steps=10, timestep_spacing=spacing, x_T=xT,
                 dtype="float64", callback=lambda step, t, x: seen.append(t), **kw)
        errs[name] = np.max(np.abs(out - exact_x0(xT, seen[0])))
    assert errs["dpm"] < errs["ddim"], errs


# -- zero terminal SNR: alpha = 0 at t = T-1 ------------------------------------------------------------

ZSNR = DiscreteSchedule("linear", 1000, rescale_betas_zero_snr=True)
ZSNR_SAMPLERS = {  # name -> (sampler call, None or the text of the error it must raise for every prediction type)
    "ddpm": (lambda o, pt: S.ddpm_sample(o, ZSNR, Rng(0), (2000, 2), prediction_type=pt, num_inference_steps=100,
                                         timestep_spacing="trailing", dtype="float64"), None),
    "ddim": (lambda o, pt: S.ddim_sample(o, ZSNR, Rng(0), (2000, 2), prediction_type=pt, num_inference_steps=50,
                                         timestep_spacing="trailing", dtype="float64"), None),
    "dpm_solver_pp": (lambda o, pt: S.dpm_solver_pp_sample(o, ZSNR, Rng(0), (2000, 2), prediction_type=pt,
                                                           timestep_spacing="trailing", lambda_min_clipped=-math.inf,
                                                           dtype="float64"), None),
    "euler_maruyama": (lambda o, pt: S.euler_maruyama_sample(o, ZSNR, Rng(0), (2000, 2), prediction_type=pt,
                                                             num_inference_steps=50, dtype="float64"),
                       "schedule: the reverse-SDE samplers"),
    "predictor_corrector": (lambda o, pt: S.predictor_corrector_sample(o, ZSNR, Rng(0), (2000, 2), prediction_type=pt,
                                                                       num_inference_steps=50, dtype="float64"),
                            "schedule: the reverse-SDE samplers"),
    "ode": (lambda o, pt: S.ode_sample(o, ZSNR, Rng(0), (2000, 2), prediction_type=pt, dtype="float64"),
            "schedule: alpha at t_max is 0"),
    "ode_solve_ivp": (lambda o, pt: S.ode_solve_ivp_sample(o, ZSNR, Rng(0), (20, 2), prediction_type=pt,
                                                           dtype="float64"), "schedule: alpha at t_max is 0"),
    "annealed_langevin": (lambda o, pt: S.annealed_langevin_sample(o, ZSNR, Rng(0), (20, 2), prediction_type=pt,
                                                                   dtype="float64"),
                          "schedule: annealed_langevin_sample cannot start where alpha = 0"),
}


def test_zero_snr_oracle_is_finite_at_every_t():
    from genblocks.checks import analytic_gaussian_mixture_model

    x = np.random.default_rng(0).standard_normal((1000, 2)) * 3.0
    t = np.arange(1000, dtype=np.float64)
    for pt in ("epsilon", "v_prediction", "sample"):
        out = analytic_gaussian_mixture_model(W, MEANS, COVS, ZSNR, prediction_type=pt)(x, t)
        assert np.all(np.isfinite(out)), pt
    # at alpha = 0 the best x_0 guess is the data mean, and v = alpha eps - sigma x_0 = -mean
    o = analytic_gaussian_mixture_model(W, MEANS, COVS, ZSNR, prediction_type="v_prediction")
    np.testing.assert_allclose(o(x[:3], np.full(3, 999.0)), -np.broadcast_to(o.mean, (3, 2)), atol=1e-12)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", sorted(ZSNR_SAMPLERS))
def test_every_sampler_on_a_zero_snr_schedule_samples_right_or_names_the_problem(name, pt):
    from genblocks.checks import analytic_gaussian_mixture_model

    oracle = analytic_gaussian_mixture_model(W, MEANS, COVS, ZSNR, prediction_type=pt)
    call, refusal = ZSNR_SAMPLERS[name]
    if refusal is None and pt == "epsilon":
        refusal = "prediction_type: .* rescale_betas_zero_snr=True.* use prediction_type='v_prediction'"
    if refusal is not None:
        with pytest.raises(ValueError, match=refusal):
            call(oracle, pt)
        return
    x = call(oracle, pt)
    assert np.all(np.isfinite(x))
    std = np.sqrt(np.diag(oracle.covariance))
    se_mean, se_std = std / math.sqrt(len(x)), std / math.sqrt(2 * len(x))
    np.testing.assert_allclose(x.mean(axis=0), oracle.mean, atol=float(np.max(5 * se_mean)) + 0.03)
    np.testing.assert_allclose(x.std(axis=0), std, atol=float(np.max(5 * se_std)) + 0.03)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_one_step_ode_sampler_starts_at_t_max(method):
    # with one Karras level the grid's only time was overwritten by t_min: it started at the wrong end (error 26.6)
    xT = x_T()
    seen = []
    out = S.ode_sample(exact_eps(), LINEAR, Rng(0), xT.shape, method=method, num_inference_steps=1, x_T=xT,
                       dtype="float64", callback=lambda step, t, x: seen.append(t))
    assert seen == [float(LINEAR.t_max)]
    np.testing.assert_allclose(out.mean(axis=0), MU, atol=0.05)  # one x0 prediction from t = 999: the data mean
