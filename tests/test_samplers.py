"""Samplers against a known truth: the exact denoiser of Gaussian-mixture data (genblocks.checks).

With the analytic oracle as model_fn, every sampler must reproduce the data distribution (mean, covariance,
mixture weights within a few standard errors; an MMD permutation test), the PF-ODE log-likelihood must equal
the analytic log-density, DDIM inversion must round-trip, and guidance must reduce to the right models.
"""

import math

import numpy as np
import pytest
from conftest import assert_backend
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import multivariate_normal, norm

from genblocks.backends import Rng, namespace, to_device, to_numpy
from genblocks.blocks import samplers as S
from genblocks.blocks.ops import logsumexp
from genblocks.blocks.schedules import VESDE, VPSDE, DiscreteSchedule, multistep_timesteps, subVPSDE
from genblocks.checks import analytic_gaussian_mixture_model, check_score
from genblocks.metrics import mmd_permutation_test

W = np.array([0.3, 0.7])
MU = np.array([[-1.5, 0.5], [1.0, -0.5]])
COV = np.array([[[0.2, 0.05], [0.05, 0.1]], [[0.1, 0.0], [0.0, 0.3]]])
LINEAR = DiscreteSchedule("linear", 1000)
VP = VPSDE()
N = 2000


def oracle(schedule=LINEAR, prediction_type="epsilon", means=MU):
    return analytic_gaussian_mixture_model(W, means, COV, schedule, prediction_type=prediction_type)


def responsibilities(x):
    """Posterior probability of each data component for points x (n, 2)."""
    logp = np.stack([np.log(W[k]) + multivariate_normal(MU[k], COV[k]).logpdf(x) for k in range(2)], axis=1)
    logp -= logp.max(axis=1, keepdims=True)
    p = np.exp(logp)
    return p / p.sum(axis=1, keepdims=True)


def assert_matches_data(x, data_rng_seed=123):
    """Mean, covariance and mixture weight within standard errors, and an MMD two-sample test."""
    x = to_numpy(x)
    assert x.shape == (N, 2) and np.all(np.isfinite(x))
    o = oracle()
    m, C = o.mean, o.covariance
    z_mean = (x.mean(0) - m) / np.sqrt(np.diag(C) / N)
    assert np.all(np.abs(z_mean) < 4.0), z_mean
    # Gaussian-approximation standard error of a sample covariance entry
    se = np.sqrt((np.outer(np.diag(C), np.diag(C)) + C ** 2) / N)
    z_cov = (np.cov(x.T) - C) / se
    assert np.all(np.abs(z_cov) < 5.0), z_cov
    # E[responsibility of component 0] = w_0 exactly under the data distribution; |r| <= 1 bounds its sd by 1/2
    z_w = (responsibilities(x)[:, 0].mean() - W[0]) / (0.5 / math.sqrt(N))
    assert abs(z_w) < 4.0, z_w
    data = o.sample(Rng(data_rng_seed), 400)
    p = mmd_permutation_test(x[:400], to_numpy(data), Rng(7), 100)
    assert p > 0.01, p


# ---------------------------------------------------------------------------------------------------
# the oracle itself


def test_oracle_density_matches_scipy_and_its_score_is_the_gradient():
    o = oracle()
    x = np.random.default_rng(0).normal(size=(50, 2))
    t = np.arange(50) * 20.0 + 3.0
    a = np.sqrt(np.array(LINEAR.alphas_cumprod)[t.astype(int)])
    s = np.sqrt(1 - a ** 2)
    want = np.log(sum(W[k] * np.array([multivariate_normal(a[i] * MU[k], a[i] ** 2 * COV[k] + s[i] ** 2 * np.eye(2))
                                                 .pdf(x[i]) for i in range(50)]) for k in range(2)))
    np.testing.assert_allclose(to_numpy(o.log_prob(x, t)), want, rtol=1e-10)
    np.testing.assert_allclose(to_numpy(o.log_prob(x)), np.log(sum(
        W[k] * multivariate_normal(MU[k], COV[k]).pdf(x) for k in range(2))), rtol=1e-10)
    report = check_score(o.score, x, t, log_prob=o.log_prob, rtol=1e-8, atol=1e-10)
    assert report["max_abs_error"] < 1e-8
    np.testing.assert_allclose(to_numpy(o.eps(x, t)), -s[:, None] * to_numpy(o.score(x, t)), rtol=1e-12)


def test_check_score_catches_a_wrong_score():
    o = oracle()
    x = np.random.default_rng(1).normal(size=(20, 2))
    with pytest.raises(AssertionError, match="differs"):
        check_score(lambda z: 1.01 * o.score(z), x, log_prob=o.log_prob)
    with pytest.raises(AssertionError, match="shape"):
        check_score(lambda z: o.score(z)[:, :1], x, log_prob=o.log_prob)
    with pytest.raises(ValueError, match="exactly one"):
        check_score(o.score, x)
    check_score(o.score, x, reference=o.score)


def test_oracle_moments_and_samples(backend):
    o = oracle()
    np.testing.assert_allclose(o.mean, W @ MU)
    d = o.sample(Rng(0, backend), 4000)
    assert_backend(d, backend)
    h = to_numpy(d)
    np.testing.assert_allclose(h.mean(0), o.mean, atol=4 * np.sqrt(np.diag(o.covariance) / 4000).max())
    with pytest.raises(ValueError, match="covs"):
        analytic_gaussian_mixture_model(W, MU, COV[:, :1], LINEAR)
    with pytest.raises(ValueError, match="weights"):
        analytic_gaussian_mixture_model(W[:1], MU, COV, LINEAR)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_oracle_prediction_types_describe_the_same_denoiser(prediction_type):
    x = np.random.default_rng(2).normal(size=(30, 2))
    t = np.full(30, 400.0)
    a, s = LINEAR.marginal_host(400)
    eps = to_numpy(oracle()(x, t))
    x0, eps2 = S.to_x0_eps(to_numpy(oracle(prediction_type=prediction_type)(x, t)), x, a, s, prediction_type)
    np.testing.assert_allclose(eps2, eps, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(x0, (x - s * eps) / a, rtol=1e-9, atol=1e-12)


@given(a=st.floats(0.01, 1.0), s=st.floats(0.01, 50.0), pt=st.sampled_from(S.PREDICTION_TYPES))
def test_prediction_conversions_round_trip(a, s, pt):
    rng = np.random.default_rng(0)
    x0, eps = rng.normal(size=4), rng.normal(size=4)
    x = a * x0 + s * eps
    back = S.to_x0_eps(S.from_x0_eps(x0, eps, a, s, pt), x, a, s, pt)
    np.testing.assert_allclose(back[0], x0, atol=1e-8 * (1 + s / a))
    np.testing.assert_allclose(back[1], eps, atol=1e-8 * (1 + a / s))


# ---------------------------------------------------------------------------------------------------
# every sampler reproduces the data distribution


SAMPLERS = {
    "ddpm": lambda o, r: S.ddpm_sample(o(), LINEAR, r, (N, 2), num_inference_steps=250, dtype="float64"),
    "ddim_eta0": lambda o, r: S.ddim_sample(o(), LINEAR, r, (N, 2), num_inference_steps=100, dtype="float64"),
    "ddim_eta1": lambda o, r: S.ddim_sample(o(), LINEAR, r, (N, 2), num_inference_steps=200, eta=1.0,
                                            dtype="float64"),
    "ddim_respaced": lambda o, r: S.ddim_sample(o(), LINEAR.respace("ddim100"), r, (N, 2), num_inference_steps=None,
                                                dtype="float64"),
    "dpm_solver_pp": lambda o, r: S.dpm_solver_pp_sample(o(), LINEAR, r, (N, 2), num_inference_steps=30,
                                                         timestep_spacing="trailing", dtype="float64"),
    "heun": lambda o, r: S.ode_sample(o(), LINEAR, r, (N, 2), num_inference_steps=30, dtype="float64"),
    "heun_vp": lambda o, r: S.ode_sample(o(VP), VP, r, (N, 2), num_inference_steps=30, dtype="float64"),
    "heun_sigma_max": lambda o, r: S.ode_sample(o(), LINEAR, r, (N, 2), num_inference_steps=30, sigma_max=80.0,
                                                dtype="float64"),
    "euler_maruyama": lambda o, r: S.euler_maruyama_sample(o(VP), VP, r, (N, 2), num_inference_steps=400,
                                                           dtype="float64"),
    "predictor_corrector": lambda o, r: S.predictor_corrector_sample(o(VP), VP, r, (N, 2), num_inference_steps=100,
                                                                     dtype="float64"),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_reproduces_gaussian_mixture(name):
    assert_matches_data(SAMPLERS[name](oracle, Rng(0)))


def test_the_distribution_check_rejects_a_wrong_model():
    shifted = lambda schedule=LINEAR: oracle(schedule, means=MU + np.array([0.3, 0.0]))
    with pytest.raises(AssertionError):
        assert_matches_data(SAMPLERS["ddim_eta0"](shifted, Rng(0)))


def test_v_and_sample_prediction_give_the_same_ddim_samples():
    xs = [S.ddim_sample(oracle(prediction_type=pt), LINEAR, Rng(3), (64, 2), num_inference_steps=20,
                        prediction_type=pt, dtype="float64") for pt in S.PREDICTION_TYPES]
    for other in xs[1:]:
        np.testing.assert_allclose(other, xs[0], rtol=1e-8, atol=1e-8)


def test_ddim_eta1_is_ddpm_on_the_respaced_schedule():
    a = S.ddim_sample(oracle(), LINEAR, Rng(4), (64, 2), num_inference_steps=20, eta=1.0, dtype="float64")
    b = S.ddpm_sample(oracle(), LINEAR, Rng(4), (64, 2), num_inference_steps=20, dtype="float64")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_learned_range_endpoints_are_the_fixed_variances():
    o = oracle()

    def with_v(v):
        return lambda x, t: np.concatenate([o(x, t), np.full_like(x, v)], axis=-1)

    for v, fixed in ((-1.0, "fixed_small"), (1.0, "fixed_large")):
        a = S.ddpm_sample(with_v(v), LINEAR, Rng(5), (32, 2), variance_type="learned_range", num_inference_steps=25,
                          dtype="float64")
        b = S.ddpm_sample(o, LINEAR, Rng(5), (32, 2), variance_type=fixed, num_inference_steps=25, dtype="float64")
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_adaptive_ode_and_annealed_langevin_run_and_land_near_the_data():
    x, nfev = S.ode_solve_ivp_sample(oracle(VP), VP, Rng(0), (500, 2), rtol=1e-4, atol=1e-4, dtype="float64")
    assert nfev > 10
    assert np.abs(x.mean(0) - oracle().mean).max() < 0.15
    y = S.annealed_langevin_sample(oracle(VESDE()), VESDE(), Rng(0), (500, 2), num_inference_steps=10,
                                   steps_per_level=30,
                                   step_lr=1e-4, dtype="float64")
    assert np.abs(y.mean(0) - oracle().mean).max() < 0.25
    assert np.abs(np.cov(y.T) - oracle().covariance).max() < 0.3


# ---------------------------------------------------------------------------------------------------
# numpy and strict: identical results for identical noise


BACKEND_RUNS = {
    "ddpm": lambda o, s, r: S.ddpm_sample(o, s, r, (16, 2), num_inference_steps=10,
                                          x0_transform=S.clip_sample()),
    "ddpm_learned": lambda o, s, r: S.ddpm_sample(
        lambda x, t: _concat(o(x, t), x), s, r, (16, 2), num_inference_steps=10, variance_type="learned_range"),
    "ddim": lambda o, s, r: S.ddim_sample(o, s, r, (16, 2), num_inference_steps=10, eta=0.5,
                                          x0_transform=S.thresholding()),
    "dpm": lambda o, s, r: S.dpm_solver_pp_sample(o, s, r, (16, 2), num_inference_steps=10),
    "heun": lambda o, s, r: S.ode_sample(o, s, r, (16, 2), num_inference_steps=6),
    "euler": lambda o, s, r: S.ode_sample(o, s, r, (16, 2), num_inference_steps=6, method="euler",
                                          sigma_spacing="timesteps"),
    "em": lambda o, s, r: S.euler_maruyama_sample(o, s, r, (16, 2), num_inference_steps=10),
    "pc": lambda o, s, r: S.predictor_corrector_sample(o, s, r, (16, 2), num_inference_steps=5, corrector_steps=2),
    "langevin": lambda o, s, r: S.annealed_langevin_sample(o, s, r, (16, 2), num_inference_steps=3,
                                                       steps_per_level=3),
    "ivp": lambda o, s, r: S.ode_solve_ivp_sample(o, s, r, (16, 2), rtol=1e-3, atol=1e-3)[0],
}


def _concat(a, b):
    xp = namespace(a)
    return xp.concat([a, xp.tanh(b)], axis=-1)


@pytest.mark.parametrize("name", list(BACKEND_RUNS))
def test_same_noise_same_samples_on_every_backend(name, backend):
    o = oracle()
    ref = BACKEND_RUNS[name](o, LINEAR, Rng(11, "numpy"))
    got = BACKEND_RUNS[name](o, LINEAR, Rng(11, backend, host_draws=True))
    assert_backend(got, backend)
    assert "float32" in str(got.dtype)
    np.testing.assert_allclose(to_numpy(got), to_numpy(ref), rtol=1e-5, atol=1e-5)


def test_callback_sees_every_step():
    seen = []
    S.ddim_sample(oracle(), LINEAR, Rng(0), (4, 2), num_inference_steps=7,
                  callback=lambda step, t, x: seen.append((step, t, x.shape)))
    assert [s for s, _, _ in seen] == list(range(7))
    assert [t for _, t, _ in seen] == [float(v) for v in LINEAR.timesteps(7)]
    assert all(shape == (4, 2) for _, _, shape in seen)


# ---------------------------------------------------------------------------------------------------
# DDIM inversion, thresholding


def test_ddim_inversion_round_trip():
    x0 = to_numpy(oracle().sample(Rng(8), 32))
    o = oracle()
    kw = dict(num_inference_steps=50, timestep_spacing="linspace")
    xT = S.ddim_invert(o, LINEAR, x0, fixed_point_iterations=30, **kw)
    back = S.ddim_sample(o, LINEAR, Rng(0), None, x_T=xT, **kw)
    np.testing.assert_allclose(back, x0, rtol=0, atol=1e-12)
    # the classic one-evaluation inversion is only approximate
    approx = S.ddim_sample(o, LINEAR, Rng(0), None, x_T=S.ddim_invert(o, LINEAR, x0, **kw), **kw)
    assert 1e-6 < np.abs(approx - x0).max() < 0.5
    # and the encodings look like noise
    big = S.ddim_invert(o, LINEAR, to_numpy(oracle().sample(Rng(9), 2000)), **kw)
    assert np.abs(big.mean(0)).max() < 0.1 and np.abs(np.cov(big.T) - np.eye(2)).max() < 0.15


def test_threshold_sample(backend):
    x = to_device(np.array([[0.5, -3.0, 2.0, 0.1], [0.2, 0.3, -0.1, 0.0]]), backend)
    clipped = to_numpy(S.threshold_sample(x, clip_sample=True, clip_sample_range=1.0))
    np.testing.assert_array_equal(clipped[0], [0.5, -1.0, 1.0, 0.1])
    dyn = to_numpy(S.threshold_sample(x, thresholding=True, dynamic_thresholding_ratio=0.75, sample_max_value=2.5))
    # row 0: the 75% quantile of |x| is 2.0 -> clip to [-2, 2] then divide by 2; row 1: s clips up to 1
    np.testing.assert_allclose(dyn[0], [0.25, -1.0, 1.0, 0.05])
    np.testing.assert_allclose(dyn[1], to_numpy(x)[1])


# ---------------------------------------------------------------------------------------------------
# likelihood


@pytest.mark.parametrize("sde", [VP, subVPSDE()], ids=repr)
def test_pf_ode_log_likelihood_equals_analytic_density(sde):
    o = oracle(sde)
    x = to_numpy(o.sample(Rng(3), 12))
    exact_prior = lambda xT: o.log_prob(xT, np.full(12, sde.t_max))
    got = S.ode_log_likelihood(o, sde, x, rtol=1e-7, atol=1e-7, prior_log_prob=exact_prior)
    want = to_numpy(o.log_prob(x, np.full(12, sde.t_min)))
    np.testing.assert_allclose(got, want, atol=2e-4)
    # the default N(0, (alpha_T^2 + sigma_T^2) I) prior ignores alpha_T mu_k: a small, bounded error
    default = S.ode_log_likelihood(o, sde, x, rtol=1e-5, atol=1e-5)
    assert np.abs(default - want).max() < 0.05


def test_pf_ode_log_likelihood_1d_discrete_schedule_and_hutchinson():
    sched = DiscreteSchedule("linear", 1000)
    o = analytic_gaussian_mixture_model(np.array([0.5, 0.5]), np.array([[-1.0], [1.0]]),
                                        np.array([[[0.09]], [[0.25]]]), sched)
    x = np.linspace(-1.5, 1.5, 7)[:, None]
    want = np.log(0.5 * norm.pdf(x[:, 0], -1, math.sqrt(0.09 * (1 - 1e-4) + 1e-4))
                  + 0.5 * norm.pdf(x[:, 0], 1, math.sqrt(0.25 * (1 - 1e-4) + 1e-4)))
    exact = S.ode_log_likelihood(o, sched, x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(exact, want, atol=5e-3)
    # in 1-D the Rademacher probe gives the exact trace: z^T J z = J
    hutch = S.ode_log_likelihood(o, sched, x, trace="hutchinson", rng=Rng(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hutch, exact, atol=1e-6)


def test_hutchinson_is_unbiased_in_2d():
    o = oracle(VP)
    x = to_numpy(o.sample(Rng(4), 4))
    exact = S.ode_log_likelihood(o, VP, x, rtol=1e-5, atol=1e-5)
    hutch = S.ode_log_likelihood(o, VP, np.repeat(x, 50, axis=0), trace="hutchinson", rng=Rng(1), rtol=1e-4,
                                 atol=1e-4)
    est = hutch.reshape(4, 50).mean(1)
    se = hutch.reshape(4, 50).std(1) / math.sqrt(50)
    assert np.all(np.abs(est - exact) < 4 * se + 1e-3), (est, exact, se)


def test_likelihood_needs_numpy():
    with pytest.raises(TypeError, match="numpy"):
        S.ode_log_likelihood(oracle(), LINEAR, to_device(np.zeros((2, 2)), "strict"))
    with pytest.raises(ValueError, match="rng"):
        S.ode_log_likelihood(oracle(), LINEAR, np.zeros((2, 2)), trace="hutchinson")


# ---------------------------------------------------------------------------------------------------
# guidance


def class_conditional_oracle(schedule=LINEAR):
    """model(x, t, y): component y's exact denoiser for y in {0, 1}; the mixture's for the null label 2."""
    parts = [analytic_gaussian_mixture_model(np.ones(1), MU[k:k + 1], COV[k:k + 1], schedule) for k in range(2)]
    mix = oracle(schedule)

    def model(x, t, y):
        y = y[:, None]
        return np.where(y == 0, parts[0](x, t), np.where(y == 1, parts[1](x, t), mix(x, t)))

    return model, parts, mix


def test_cfg_w0_is_conditional_and_w_minus1_unconditional():
    model, parts, mix = class_conditional_oracle()
    x = np.random.default_rng(0).normal(size=(40, 2))
    t = np.full(40, 300.0)
    y = np.arange(40) % 2
    cond = model(x, t, y=y)
    np.testing.assert_allclose(S.classifier_free_guidance(model, 0.0, null_label=2)(x, t, y=y), cond, rtol=1e-12)
    np.testing.assert_allclose(S.classifier_free_guidance(model, -1.0, null_label=2)(x, t, y=y), mix(x, t),
                               rtol=1e-10, atol=1e-12)
    g = S.classifier_free_guidance(model, 3.0, null_label=2)(x, t, y=y)
    np.testing.assert_allclose(g, mix(x, t) + 4.0 * (cond - mix(x, t)), rtol=1e-10, atol=1e-12)
    r = S.classifier_free_guidance(model, 3.0, null_label=2, guidance_rescale=1.0)(x, t, y=y)
    np.testing.assert_allclose(r.std(axis=1), cond.std(axis=1), rtol=1e-10)
    # samplers: CFG w=0 gives exactly the conditional samples
    yy = np.zeros(64, dtype=np.int64)
    a = S.ddim_sample(S.classifier_free_guidance(model, 0.0, null_label=2), LINEAR, Rng(1), (64, 2),
                      num_inference_steps=10, cond={"y": yy}, dtype="float64")
    b = S.ddim_sample(model, LINEAR, Rng(1), (64, 2), num_inference_steps=10, cond={"y": yy}, dtype="float64")
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_classifier_guidance_zero_classifier_is_unguided_and_bayes_classifier_is_conditional():
    o = oracle()
    zero = lambda x, t, y: 0.0 * np.sum(x, axis=-1)
    for sampler in (S.ddim_sample, S.ddpm_sample, S.dpm_solver_pp_sample):
        a = sampler(S.classifier_guidance(o, zero, LINEAR, 5.0), LINEAR, Rng(2), (32, 2), num_inference_steps=10,
                    cond={"y": np.zeros(32, dtype=np.int64)}, dtype="float64")
        b = sampler(o, LINEAR, Rng(2), (32, 2), num_inference_steps=10, dtype="float64")
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # the exact noisy classifier log p(y | x_t) = log w_y N_y(x_t) - log p_t(x_t) turns the unconditional
    # denoiser into the conditional one (scale 1), in every prediction type
    model, parts, _ = class_conditional_oracle()

    def log_p_y(x, t, y):
        xp = namespace(x)
        comps = xp.stack([math.log(W[k]) + parts[k].log_prob(x, t) for k in range(2)], axis=-1)
        return xp.where(y == 0, comps[:, 0], comps[:, 1]) - logsumexp(comps, axis=-1)

    x = np.random.default_rng(3).normal(size=(30, 2))
    t = np.full(30, 250.0)
    y = np.arange(30) % 2
    for pt in S.PREDICTION_TYPES:
        guided = S.classifier_guidance(oracle(prediction_type=pt), log_p_y, LINEAR, 1.0, prediction_type=pt)
        want = S.from_x0_eps(*S.to_x0_eps(model(x, t, y=y), x, *LINEAR.marginal_host(250), "epsilon"),
                             *LINEAR.marginal_host(250), pt)
        np.testing.assert_allclose(guided(x, t, y=y), want, rtol=1e-7, atol=1e-9)


def test_guidance_argument_errors():
    with pytest.raises(ValueError, match="guidance_rescale"):
        S.classifier_free_guidance(oracle(), 1.0, null_label=2, guidance_rescale=2.0)
    with pytest.raises(ValueError, match="labels"):
        S.classifier_free_guidance(oracle(), 1.0, null_label=2)(np.zeros((2, 2)), np.zeros(2))
    with pytest.raises(TypeError, match="numpy"):
        g = S.classifier_guidance(lambda x, t: x, lambda x, t, y: x[:, 0], LINEAR, 1.0)
        g(to_device(np.zeros((2, 2)), "strict"), to_device(np.zeros(2), "strict"), y=None)


def test_sampler_argument_errors():
    o = oracle()
    with pytest.raises(ValueError, match="prediction_type"):
        S.ddim_sample(o, LINEAR, Rng(0), (2, 2), prediction_type="score")
    with pytest.raises(ValueError, match="variance_type"):
        S.ddpm_sample(o, LINEAR, Rng(0), (2, 2), variance_type="learned")
    with pytest.raises(TypeError, match="DiscreteSchedule"):
        S.ddpm_sample(o, VP, Rng(0), (2, 2))
    with pytest.raises(ValueError, match="method"):
        S.ode_sample(o, LINEAR, Rng(0), (2, 2), method="rk4")
    with pytest.raises(TypeError, match="callback"):
        S.ddim_sample(o, LINEAR, Rng(0), (2, 2), callback=3)
    with pytest.raises(ValueError, match="num_inference_steps"):
        S.euler_maruyama_sample(o, VP, Rng(0), (2, 2), num_inference_steps=0)


def test_pf_ode_drift_and_sde_coefficients():
    o = oracle(VP)
    x = np.random.default_rng(5).normal(size=(6, 2))
    for t in (0.05, 0.5):
        f, g2 = S.sde_coefficients(VP, t)
        beta = VP.beta_host(t)
        assert (f, g2) == (pytest.approx(-0.5 * beta), pytest.approx(beta))
        want = f * x - 0.5 * g2 * to_numpy(o.score(x, np.full(6, t)))
        np.testing.assert_allclose(S.pf_ode_drift(o, VP, x, t), want, rtol=1e-10)
    # schedules without sde_host get (f, g^2) from their marginals: for DDPM tables g^2 = -d abar/dt / abar
    f, g2 = S.sde_coefficients(LINEAR, 500.5)
    abar0, abar1 = LINEAR.alphas_cumprod[500], LINEAR.alphas_cumprod[501]
    slope = abar1 - abar0
    abar = 0.5 * (abar0 + abar1)
    assert f == pytest.approx(0.5 * slope / abar, rel=1e-3)
    assert g2 == pytest.approx(-slope / abar, rel=1e-3)


def test_dpm_solver_lambda_clipping_skips_the_near_zero_snr_start():
    cosine = DiscreteSchedule("squaredcos_cap_v2", 1000)
    o = oracle(cosine)
    for lam, first in ((-5.1, 995.0), (-math.inf, 999.0)):
        seen = []
        S.dpm_solver_pp_sample(o, cosine, Rng(0), (4, 2), num_inference_steps=10, lambda_min_clipped=lam,
                               callback=lambda step, t, x: seen.append(t))
        # the multistep grid spends no model call at t = 0 (the last step goes to sigma = 0 from its lowest point)
        assert seen == [float(t) for t in multistep_timesteps(int(first) + 1, 10)] and seen[-1] > 0.0
    a, s = cosine.marginal_host(995)
    assert math.log(a / s) >= -5.1 > math.log(cosine.marginal_host(996)[0] / cosine.marginal_host(996)[1])
    # on the linear schedule lambda never goes below -5.1: nothing is clipped
    seen = []
    S.dpm_solver_pp_sample(oracle(), LINEAR, Rng(0), (4, 2), num_inference_steps=10,
                           callback=lambda step, t, x: seen.append(t))
    assert seen[0] == 999.0


# ---------------------------------------------------------------------------------------------------
# in-place updates: same numbers as the textbook (out-of-place) loops, inputs and snapshots untouched


def _ref_ddim(model_fn, schedule, x, steps, eta, rng, prediction_type="epsilon"):
    """DDIM written out of place, as in the paper (the reference for the in-place loop)."""
    grid = [float(t) for t in schedule.timesteps(steps, "leading")]
    for k, t in enumerate(grid):
        a, s = schedule.marginal_host(t)
        a_prev, s_prev = schedule.marginal_host(grid[k + 1]) if k + 1 < len(grid) else (1.0, 0.0)
        x0, eps = S.to_x0_eps(model_fn(x, np.full(x.shape[0], t)), x, a, s, prediction_type)
        c = eta * s_prev / s * math.sqrt(max(s * s - (a * s_prev / a_prev) ** 2, 0.0)) if s_prev > 0 else 0.0
        x = a_prev * x0 + math.sqrt(max(s_prev * s_prev - c * c, 0.0)) * eps
        if c > 0.0:
            x = x + c * rng.normal(x.shape, dtype="float64")
    return x


def _ref_dpm_solver_pp(model_fn, schedule, x, steps, prediction_type="epsilon"):
    grid = [float(t) for t in multistep_timesteps(schedule.num_train_timesteps, steps, "linspace")]
    x0_prev = h_prev = None
    for k, t in enumerate(grid):
        a, s = schedule.marginal_host(t)
        x0 = S.to_x0_eps(model_fn(x, np.full(x.shape[0], t)), x, a, s, prediction_type)[0]
        if k + 1 == len(grid):
            return x0
        a_next, s_next = schedule.marginal_host(grid[k + 1])
        h = math.log(a_next / s_next) - math.log(a / s)
        r = None if h_prev is None else h_prev / h
        D = x0 if x0_prev is None else (1.0 + 0.5 / r) * x0 - (0.5 / r) * x0_prev
        x = (s_next / s) * x - a_next * math.expm1(-h) * D
        x0_prev, h_prev = x0, h


def _ref_euler_maruyama(model_fn, schedule, x, steps, rng):
    grid = [schedule.t_max + (schedule.t_min - schedule.t_max) * k / steps for k in range(steps + 1)]
    for k in range(steps):
        t, dt = grid[k], grid[k + 1] - grid[k]
        f, g2 = S.sde_coefficients(schedule, t)
        a, s = schedule.marginal_host(t)
        eps = model_fn(x, np.full(x.shape[0], t))
        x = x + dt * (f * x + (g2 / s) * eps)
        if k + 1 < steps:
            x = x + math.sqrt(g2 * abs(dt)) * rng.normal(x.shape, dtype="float64")
    a, s = schedule.marginal_host(grid[-1])
    return (x - s * model_fn(x, np.full(x.shape[0], grid[-1]))) / a


def _identity_denoiser(x, t):
    """x_0_hat = x_t: its output IS its input, the worst case for an in-place update."""
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_in_place_loops_equal_the_out_of_place_equations(prediction_type):
    model = oracle(prediction_type=prediction_type) if prediction_type == "epsilon" else _identity_denoiser
    x_T = to_numpy(Rng(1).normal((32, 2), dtype="float64"))
    for eta in (0.0, 0.7):  # the same operations in the same order: bit for bit
        want = _ref_ddim(model, LINEAR, x_T, 12, eta, Rng(2), prediction_type)
        got = S.ddim_sample(model, LINEAR, Rng(2), None, num_inference_steps=12, eta=eta, x_T=x_T,
                            prediction_type=prediction_type, dtype="float64")
        np.testing.assert_array_equal(got, want)
    want = _ref_dpm_solver_pp(model, LINEAR, x_T, 12, prediction_type)
    got = S.dpm_solver_pp_sample(model, LINEAR, Rng(0), None, num_inference_steps=12, x_T=x_T,
                                 prediction_type=prediction_type)
    np.testing.assert_array_equal(got, want)


def test_in_place_euler_maruyama_equals_the_out_of_place_step():
    # (1 + f dt) x + (g^2 dt / sigma) eps regroups x + dt (f x + g^2 eps / sigma): equal to rounding
    x_T = to_numpy(Rng(1).normal((32, 2), dtype="float64"))
    want = _ref_euler_maruyama(oracle(VP), VP, x_T, 20, Rng(2))
    got = S.euler_maruyama_sample(oracle(VP), VP, Rng(2), None, num_inference_steps=20, x_T=x_T, dtype="float64")
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


IN_PLACE_RUNS = {
    "ddpm": lambda m, x, cb, r: S.ddpm_sample(m, LINEAR, r, None, num_inference_steps=5, x_T=x, callback=cb),
    "ddpm_learned": lambda m, x, cb, r: S.ddpm_sample(lambda z, t: _concat(m(z, t), z), LINEAR, r, None,
                                                   num_inference_steps=5, variance_type="learned_range", x_T=x,
                                                   callback=cb),
    "ddim": lambda m, x, cb, r: S.ddim_sample(m, LINEAR, r, None, num_inference_steps=5, eta=0.5, x_T=x,
                                           callback=cb),
    "dpm": lambda m, x, cb, r: S.dpm_solver_pp_sample(m, LINEAR, r, None, num_inference_steps=5, x_T=x,
                                                   callback=cb),
    "heun": lambda m, x, cb, r: S.ode_sample(m, LINEAR, r, None, num_inference_steps=5, x_T=x, callback=cb),
    "euler": lambda m, x, cb, r: S.ode_sample(m, LINEAR, r, None, num_inference_steps=5, method="euler",
                                           x_T=x, callback=cb),
    "em": lambda m, x, cb, r: S.euler_maruyama_sample(m, LINEAR, r, None, num_inference_steps=5, x_T=x,
                                                   callback=cb),
    "pc": lambda m, x, cb, r: S.predictor_corrector_sample(m, LINEAR, r, None, num_inference_steps=4, x_T=x,
                                                        corrector_steps=2, callback=cb),
    "langevin": lambda m, x, cb, r: S.annealed_langevin_sample(m, LINEAR, r, None, num_inference_steps=2,
                                                            steps_per_level=3, x_T=x, callback=cb),
}


@pytest.mark.parametrize("name", list(IN_PLACE_RUNS))
def test_samplers_touch_neither_inputs_nor_model_outputs_and_callbacks_get_snapshots(name, backend):
    o = oracle()
    outputs = []

    def model(x, t):  # records what it returns, to check the sampler never writes into it
        out = o(x, t)
        outputs.append((out, to_numpy(out).copy()))
        return out

    x_T = to_device(to_numpy(Rng(3).normal((8, 2), dtype="float32")), backend)
    x_T_before = to_numpy(x_T).copy()
    seen = []
    result = IN_PLACE_RUNS[name](model, x_T, lambda step, t, x: seen.append((x, to_numpy(x).copy())),
                                 Rng(0, backend))
    np.testing.assert_array_equal(to_numpy(x_T), x_T_before)
    assert outputs and all(np.array_equal(to_numpy(out), copy) for out, copy in outputs)
    assert len(seen) >= 2 and all(np.array_equal(to_numpy(x), copy) for x, copy in seen)
    assert all(x is not result for x, _ in seen)
    assert_backend(result, backend)
    assert "float32" in str(result.dtype)


@pytest.mark.parametrize("name", list(IN_PLACE_RUNS))
def test_sampling_loops_never_read_device_values_on_the_host(name, monkeypatch):
    """No float(x), bool(x), .item() or host copy of a device array inside a loop (the schedules are host floats)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("a sampling loop read a device array on the host")

    x_T = to_device(to_numpy(Rng(3).normal((8, 2), dtype="float32")), "strict")
    model = lambda x, t: 0.5 * x  # noqa: E731  (a linear eps model that itself stays on the device)
    for method in ("__float__", "__bool__", "__int__", "__index__", "__array__", "__dlpack__"):
        monkeypatch.setattr(type(x_T), method, refuse)
    seen = []
    x = IN_PLACE_RUNS[name](model, x_T, lambda step, t, x: seen.append(t), Rng(0, "strict"))
    monkeypatch.undo()
    assert seen and np.all(np.isfinite(to_numpy(x)))


# ---------------------------------------------------------------------------------------------------
# one loop, one step function per sampler (issue 9.2)

SAMPLER_FNS = {
    "ddpm": S.ddpm_sample, "ddim": S.ddim_sample, "dpm": S.dpm_solver_pp_sample, "ode": S.ode_sample,
    "em": S.euler_maruyama_sample, "pc": S.predictor_corrector_sample, "langevin": S.annealed_langevin_sample,
}
STEP_FNS = [S.ddpm_step, S.ddim_step, S.dpm_solver_pp_step, S.ode_step, S.euler_maruyama_step, S.langevin_step]


def _with_fast(run, fast):
    """An IN_PLACE_RUNS entry with ``fast`` passed through to the sampler."""
    import functools

    def patched(m, x, cb, r):
        originals = {name: getattr(S, name) for name in ("ddpm_sample", "ddim_sample", "dpm_solver_pp_sample",
                                                         "ode_sample", "euler_maruyama_sample",
                                                         "predictor_corrector_sample", "annealed_langevin_sample")}
        try:
            for name, fn in originals.items():
                setattr(S, name, functools.partial(fn, fast=fast))
            return run(m, x, cb, r)
        finally:
            for name, fn in originals.items():
                setattr(S, name, fn)
    return patched


@pytest.mark.parametrize("model_name", ["oracle", "identity"])
@pytest.mark.parametrize("name", list(IN_PLACE_RUNS))
def test_fast_path_equals_the_out_of_place_terms_bit_for_bit(name, model_name, backend):
    """The loop's in-place path adds each step's terms in the same order as ``combine``: identical arrays,
    also when the model returns its input (every term then aliases the state)."""
    model = oracle() if model_name == "oracle" else _identity_denoiser
    x_T = to_device(to_numpy(Rng(3).normal((8, 2), dtype="float64")), backend)
    plain, fast = [], []
    got_plain = _with_fast(IN_PLACE_RUNS[name], False)(model, x_T, lambda k, t, x: plain.append(to_numpy(x)),
                                                       Rng(4, backend))
    got_fast = _with_fast(IN_PLACE_RUNS[name], True)(model, x_T, lambda k, t, x: fast.append(to_numpy(x)),
                                                     Rng(4, backend))
    np.testing.assert_array_equal(to_numpy(got_fast), to_numpy(got_plain))
    assert len(plain) == len(fast) >= 2
    for a, b in zip(plain, fast):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm", "pc"])
def test_fast_path_with_a_network_equals_the_plain_path_bit_for_bit(name):
    """With a real network (dense layers, silu, FiLM) the fast loop also recycles the network's buffers
    (``reuse_buffers``) from step to step: the same arrays as the plain loop, every step."""
    from genblocks.blocks.score_nets import MLPScoreNet

    net = MLPScoreNet(2, (32, 32), time_embed_dim=16)
    params = net.init(Rng(0), "float32")
    model = lambda x, t: net.apply(params, x, t)
    x_T = to_numpy(Rng(3).normal((512, 2), dtype="float32"))  # (512, 32) float32 hidden arrays: pooled
    runs = {}
    for fast in (False, True):
        steps = []
        got = _with_fast(IN_PLACE_RUNS[name], fast)(model, x_T, lambda k, t, x: steps.append(to_numpy(x)), Rng(4))
        runs[fast] = [to_numpy(got)] + steps
    assert len(runs[True]) >= 3
    for a, b in zip(runs[False], runs[True], strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_step_function_fits_on_a_screen_and_states_its_equation():
    import inspect

    for fn in STEP_FNS:
        lines = inspect.getsource(fn).splitlines()
        assert len(lines) <= 40, (fn.__name__, len(lines))
        assert "=" in fn.__doc__.splitlines()[0], fn.__name__  # the first docstring line is the update


@pytest.mark.parametrize("name", list(SAMPLER_FNS))
def test_num_inference_steps_one_name_one_default_one_check(name):
    import inspect

    fn = SAMPLER_FNS[name]
    assert inspect.signature(fn).parameters["num_inference_steps"].default == S.NUM_INFERENCE_STEPS == 50
    assert "num_steps" not in inspect.signature(fn).parameters and "num_levels" not in inspect.signature(fn).parameters
    for bad in (0, -3, 2.5, True, "10"):
        with pytest.raises(ValueError, match=rf"num_inference_steps: expected a positive int, got {bad!r}"):
            fn(oracle(), LINEAR, Rng(0), (2, 2), num_inference_steps=bad)
    if name in ("ddpm", "ddim"):  # None: every step of a discrete schedule
        seen = []
        fn(oracle(), DiscreteSchedule("linear", 12), Rng(0), (2, 2), num_inference_steps=None,
           callback=lambda k, t, x: seen.append(t))
        assert seen == [float(t) for t in range(11, -1, -1)]
    else:
        with pytest.raises(ValueError, match="num_inference_steps"):
            fn(oracle(), LINEAR, Rng(0), (2, 2), num_inference_steps=None)


def test_annealed_langevin_counts_noise_levels_in_num_inference_steps():
    seen = []
    S.annealed_langevin_sample(oracle(), LINEAR, Rng(0), (4, 2), num_inference_steps=5, steps_per_level=2,
                               callback=lambda k, t, x: seen.append(t))
    assert len(seen) == 10 and len(set(seen)) == 5 and seen == sorted(seen, reverse=True)


def test_x0_transform_replaces_the_five_thresholding_options():
    x = np.random.default_rng(0).normal(0.0, 3.0, size=(64, 2))
    np.testing.assert_array_equal(S.clip_sample(1.5)(x), np.clip(x, -1.5, 1.5))
    np.testing.assert_array_equal(S.thresholding(0.9, 2.0)(x), S.threshold_sample(
        x, thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0))
    # through a sampler: the same x_0 clipping whichever way the transform is built
    a = S.ddim_sample(oracle(), LINEAR, Rng(1), (16, 2), num_inference_steps=5, x0_transform=S.clip_sample(0.5))
    b = S.ddim_sample(oracle(), LINEAR, Rng(1), (16, 2), num_inference_steps=5,
                      x0_transform=lambda x0: namespace(x0).clip(x0, -0.5, 0.5))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() <= 0.5 + 1e-6  # the last DDIM step returns the clipped x_0_hat
    for fn in (S.ddpm_sample, S.ddim_sample, S.dpm_solver_pp_sample):
        with pytest.raises(TypeError, match="x0_transform: expected a callable"):
            fn(oracle(), LINEAR, Rng(0), (2, 2), num_inference_steps=3, x0_transform=1.0)
        with pytest.raises(TypeError, match="clip_sample"):  # the old options are gone, not ignored
            fn(oracle(), LINEAR, Rng(0), (2, 2), num_inference_steps=3, clip_sample=True)
    with pytest.raises(ValueError, match=r"clip_sample_range: expected a value in \(0.0, inf\), got 0.0"):
        S.clip_sample(0.0)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio"):
        S.thresholding(1.5)
    with pytest.raises(TypeError, match="x0_transform"):  # ODE and SDE steps read eps_hat only: no silent no-op
        S.ode_sample(oracle(), LINEAR, Rng(0), (2, 2), x0_transform=S.clip_sample())


@pytest.mark.parametrize("name", list(SAMPLER_FNS))
def test_guidance_is_applied_by_the_loop(name):
    fn = SAMPLER_FNS[name]
    wrap = lambda model: (lambda x, t, **c: 0.5 * model(x, t, **c))  # noqa: E731
    kw = dict(num_inference_steps=3) if name != "langevin" else dict(num_inference_steps=2, steps_per_level=2)
    a = fn(oracle(), LINEAR, Rng(5), (4, 2), guidance=wrap, **kw)
    b = fn(wrap(oracle()), LINEAR, Rng(5), (4, 2), **kw)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="guidance: expected a wrapper"):
        fn(oracle(), LINEAR, Rng(5), (4, 2), guidance=2.0, **kw)


@pytest.mark.parametrize("name", list(SAMPLER_FNS))
def test_predictions_in_another_dtype_are_cast_to_the_samples_dtype(name, backend):
    """float64 params with the default float32 samples: strict refused mixed dtypes (TypeError) before."""
    o = oracle()
    model = lambda x, t: namespace(x).astype(o(x, t), namespace(x).float64)  # noqa: E731
    kw = dict(num_inference_steps=3) if name != "langevin" else dict(num_inference_steps=2, steps_per_level=2)
    x = SAMPLER_FNS[name](model, LINEAR, Rng(5, backend), (4, 2), **kw)
    assert_backend(x, backend)
    assert "float32" in str(x.dtype) and np.isfinite(to_numpy(x)).all()


def test_the_default_step_count_fits_a_short_schedule_and_an_explicit_one_must():
    short = DiscreteSchedule("linear", 20)
    expected = {S.ddpm_sample: 20, S.ddim_sample: 20,  # the default 50 becomes all 20 steps
                S.dpm_solver_pp_sample: len(S.dpm_solver_timesteps(short, 20, "linspace", -5.1))}
    for fn, count in expected.items():
        seen = []
        fn(oracle(short), short, Rng(0), (2, 2), callback=lambda k, t, x: seen.append(t))
        assert len(seen) == count, fn.__name__
    with pytest.raises(ValueError, match="num_inference_steps: expected at most num_train_timesteps=20, got 50"):
        S.ddim_sample(oracle(short), short, Rng(0), (2, 2), num_inference_steps=50)
    assert repr(S.NUM_INFERENCE_STEPS) == "50" and S.NUM_INFERENCE_STEPS + 1 == 51


def test_dpm_solver_pp_step_reuses_its_buffers_and_keeps_the_textbook_roundings():
    """The step writes D and x0_hat_prev into buffers kept in ``history``; each D equals the out-of-place
    expression (1 + 1/(2r)) x0 - 1/(2r) x0_prev bit for bit."""
    rng = np.random.default_rng(5)
    x0s = [rng.normal(size=(6, 3)).astype("float32") for _ in range(4)]
    grid = S.dpm_solver_timesteps(LINEAR, 4)
    history, buffers, prev, h_prev = {}, [], None, None
    x = rng.normal(size=(6, 3)).astype("float32")
    for k in range(3):
        t, t_next = grid[k], grid[k + 1]
        x0 = x0s[k]
        terms = S.dpm_solver_pp_step(x, t, t_next, lambda z, tt, x0=x0: S.Denoised(x0, None, None), None,
                                     schedule=LINEAR, history=history)
        a, s = LINEAR.marginal_host(t)
        a_next, s_next = LINEAR.marginal_host(t_next)
        h = math.log(a_next / s_next) - math.log(a / s)
        want = x0 if prev is None else (1.0 + 0.5 / (h_prev / h)) * x0 - (0.5 / (h_prev / h)) * prev
        np.testing.assert_array_equal(terms[1][1], want)
        assert terms[1][1].dtype == np.float32
        np.testing.assert_array_equal(history["x0"], x0)
        buffers.append((id(history["x0"]), id(history.get("D"))))
        prev, h_prev = x0.copy(), h
    assert buffers[1] == buffers[2]  # the same two arrays on every step after the first
    assert x0s[0] is not history["x0"]  # never the model's own array
