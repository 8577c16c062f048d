"""Schedules: beta tables, continuous SDEs, Karras sigmas, timestep spacing and respacing."""

import math

import numpy as np
import pytest
from conftest import assert_backend
from hypothesis import given
from hypothesis import strategies as st

from genblocks.backends import Rng, to_device, to_numpy
from genblocks.blocks.schedules import (
    BETA_SCHEDULES,
    VESDE,
    VPSDE,
    DiscreteSchedule,
    RespacedSchedule,
    cosine_alpha_bar,
    get_schedule,
    karras_sigmas,
    space_timesteps,
    spaced_timesteps,
    subVPSDE,
)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name):
    s = DiscreteSchedule(name, 1000)
    abar = np.array(s.alphas_cumprod)
    assert abar.dtype == np.float64 and abar.shape == (1000,)
    assert np.all(abar > 0) and np.all(abar < 1)
    assert np.all(np.diff(abar) < 0)
    np.testing.assert_allclose(np.cumprod(1.0 - np.array(s.betas)), abar, rtol=1e-12)
    np.testing.assert_allclose(np.array(s.snr), abar / (1 - abar), rtol=1e-12)
    np.testing.assert_allclose(np.array(s.log_snr), np.log(abar / (1 - abar)), rtol=1e-10, atol=1e-12)
    assert all(isinstance(v, float) for v in s.betas[:3] + s.alphas_cumprod[:3])


def test_linear_and_scaled_linear_match_diffusers_formulas():
    lin = DiscreteSchedule("linear", 10, beta_start=1e-3, beta_end=0.1)
    np.testing.assert_allclose(lin.betas, np.linspace(1e-3, 0.1, 10), rtol=1e-13)
    sc = DiscreteSchedule("scaled_linear", 10, beta_start=1e-3, beta_end=0.1)
    np.testing.assert_allclose(sc.betas, np.linspace(1e-3 ** 0.5, 0.1 ** 0.5, 10) ** 2, rtol=1e-13)
    sig = DiscreteSchedule("sigmoid", 10, beta_start=1e-3, beta_end=0.1)
    z = np.linspace(-6, 6, 10)
    np.testing.assert_allclose(sig.betas, 1 / (1 + np.exp(-z)) * (0.1 - 1e-3) + 1e-3, rtol=1e-13)


def test_cosine_matches_closed_form():
    T = 1000
    s = DiscreteSchedule("squaredcos_cap_v2", T)
    f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    t = np.arange(1, T + 1) / T
    closed = f(t) / f(0.0)
    betas = np.array(s.betas)
    unclipped = np.cumprod(betas < 0.999) > 0  # before the first clipped beta
    assert unclipped.sum() > 990
    np.testing.assert_allclose(np.array(s.alphas_cumprod)[unclipped], closed[unclipped], rtol=1e-9)
    assert betas.max() <= 0.999 and betas[-1] == 0.999
    assert cosine_alpha_bar(0.0) == pytest.approx(f(0.0))


def test_zero_terminal_snr_rescale():
    s = DiscreteSchedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True)
    base = DiscreteSchedule("scaled_linear", 1000, beta_start=0.00085, beta_end=0.012)
    assert s.alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-20)
    assert s.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0], rel=1e-12)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    assert s.log_snr[-1] == -math.inf and s.snr[-1] == 0.0


def test_posterior_coefficients_match_gaussian_conditioning():
    s = DiscreteSchedule("linear", 50)
    for t in (1, 10, 49):
        abar, prev, beta = s.alphas_cumprod[t], s.alphas_cumprod_prev[t], s.betas[t]
        # q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0
        var_prev, cov = 1 - prev, math.sqrt(1 - beta) * (1 - prev)
        var_t = 1 - abar
        assert s.posterior_variance[t] == pytest.approx(var_prev - cov ** 2 / var_t, rel=1e-10)
        assert s.posterior_mean_coef2[t] == pytest.approx(cov / var_t, rel=1e-10)
        assert s.posterior_mean_coef1[t] == pytest.approx(math.sqrt(prev) - cov / var_t * math.sqrt(abar), rel=1e-10)
    assert s.posterior_variance[0] == 0.0
    assert s.posterior_log_variance_clipped[0] == pytest.approx(math.log(s.posterior_variance[1]))


@pytest.mark.parametrize("spacing,expected", [
    ("linspace", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
    ("leading", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
    ("trailing", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]),
])
def test_every_step_when_n_equals_T(spacing, expected):
    assert DiscreteSchedule("linear", 10).timesteps(10, spacing) == expected


def test_spacing_arrays_match_diffusers():
    s = DiscreteSchedule("linear", 1000)
    assert s.timesteps(10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert s.timesteps(10, "leading", steps_offset=1) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert s.timesteps(10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps(10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert s.timesteps(3, "leading") == list(np.arange(0, 3)[::-1] * (1000 // 3))
    assert s.timesteps() == list(range(999, -1, -1))


@given(T=st.integers(2, 400), n=st.integers(1, 400), spacing=st.sampled_from(["leading", "trailing", "linspace"]))
def test_spacing_properties(T, n, spacing):
    n = min(n, T)
    ts = DiscreteSchedule("linear", T).timesteps(n, spacing)
    assert ts == spaced_timesteps(T, n, spacing)  # the schedule method is the module function on its T
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == len(ts)
    assert all(0 <= t < T for t in ts)
    assert len(ts) == n
    if spacing == "trailing":
        assert ts[0] == T - 1
    if spacing in ("linspace", "leading"):
        assert ts[-1] == 0


def test_space_timesteps_improved_ddpm():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10") == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    kept = space_timesteps(100, [10, 5])
    assert len(kept) == 15 and kept[:10] == [0, 5, 11, 16, 22, 27, 33, 38, 44, 49] and kept[10:] == [50, 62, 74, 87, 99]
    assert space_timesteps(30, "3,3,3") == [0, 4, 9, 10, 14, 19, 20, 24, 29]
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(100, "ddim30")
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(10, "20")


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_respacing_keeps_alphas_cumprod_and_is_a_valid_diffusion(name):
    s = DiscreteSchedule(name, 1000)
    r = s.respace("ddim25")
    assert isinstance(r, RespacedSchedule) and r.num_train_timesteps == 25
    kept = list(r.timestep_map)
    assert kept == list(range(0, 1000, 40))
    np.testing.assert_array_equal(r.alphas_cumprod, [s.alphas_cumprod[t] for t in kept])
    betas = np.array(r.betas)
    assert np.all(betas > 0) and np.all(betas < 1)
    np.testing.assert_allclose(np.cumprod(1 - betas), np.array(r.alphas_cumprod), rtol=1e-12)
    assert r.model_time(3) == 120.0
    r2 = s.respace([999, 500, 0, 500])
    assert r2.timestep_map == (0, 500, 999)
    assert r2.betas[2] == pytest.approx(1 - s.alphas_cumprod[999] / s.alphas_cumprod[500])


def test_discrete_marginal_array_matches_host_and_interpolates(backend):
    s = DiscreteSchedule("linear", 100)
    t = np.array([0.0, 1.0, 10.5, 98.25, 99.0])
    a, sig = s.marginal(to_device(t, backend))
    assert_backend(a, backend)
    host = np.array([s.marginal_host(v) for v in t])
    np.testing.assert_allclose(to_numpy(a), host[:, 0], rtol=1e-12)
    np.testing.assert_allclose(to_numpy(sig), host[:, 1], rtol=1e-12)
    assert s.marginal_host(10)[0] == math.sqrt(s.alphas_cumprod[10])
    abar = 0.5 * (s.alphas_cumprod[10] + s.alphas_cumprod[11])
    assert s.marginal_host(10.5)[0] == pytest.approx(math.sqrt(abar), rel=1e-14)
    t32 = to_device(np.array([3.0, 7.0], dtype=np.float32), backend)
    assert "float32" in str(s.marginal(t32)[0].dtype)


@pytest.mark.parametrize("sde", [VPSDE(), subVPSDE(), VESDE()], ids=repr)
def test_continuous_marginals_and_sde_coefficients_agree(sde, backend):
    t = np.array([1e-3, 0.1, 0.5, 1.0])
    a, s = sde.marginal(to_device(t, backend))
    host = np.array([sde.marginal_host(v) for v in t])
    np.testing.assert_allclose(to_numpy(a), host[:, 0], rtol=1e-12)
    np.testing.assert_allclose(to_numpy(s), host[:, 1], rtol=1e-12)
    # f = d log alpha/dt and g^2 = d sigma^2/dt - 2 f sigma^2 (the marginals of dx = f x dt + g dw)
    for v in (0.2, 0.7):
        h = 1e-6
        (a0, s0), (a1, s1) = sde.marginal_host(v - h), sde.marginal_host(v + h)
        f, g2 = sde.sde_host(v)
        assert f == pytest.approx((math.log(a1) - math.log(a0)) / (2 * h), rel=1e-6, abs=1e-9)
        _, s = sde.marginal_host(v)
        assert g2 == pytest.approx((s1 ** 2 - s0 ** 2) / (2 * h) - 2 * f * s ** 2, rel=1e-5)


def test_vp_sde_is_variance_preserving_and_subvp_below_it():
    vp, sub = VPSDE(), subVPSDE()
    for t in (0.01, 0.3, 1.0):
        a, s = vp.marginal_host(t)
        assert a * a + s * s == pytest.approx(1.0, rel=1e-12)
        assert sub.marginal_host(t)[1] <= s
    assert VESDE(sigma_min=0.01, sigma_max=50.0).marginal_host(1.0) == (1.0, pytest.approx(50.0))


@pytest.mark.parametrize("sched", [DiscreteSchedule("linear", 1000), VPSDE(), VESDE()], ids=repr)
def test_t_from_sigma_ratio_inverts_the_marginal(sched):
    for t in (sched.t_min + 0.3 * (sched.t_max - sched.t_min), sched.t_min + 0.9 * (sched.t_max - sched.t_min)):
        a, s = sched.marginal_host(t)
        assert sched.t_from_sigma_ratio(s / a) == pytest.approx(t, rel=1e-7)


def test_karras_sigmas():
    s = karras_sigmas(10, 0.002, 80.0, rho=7.0)
    assert len(s) == 10 and s[0] == pytest.approx(80.0) and s[-1] == pytest.approx(0.002)
    assert all(a > b for a, b in zip(s, s[1:]))
    r = np.arange(10) / 9
    np.testing.assert_allclose(s, (80 ** (1 / 7) + r * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rtol=1e-12)
    assert karras_sigmas(5, 0.1, 10.0, rho=1.0) == pytest.approx(list(np.linspace(10.0, 0.1, 5)))


def test_sample_t(backend):
    rng = Rng(0, backend)
    t = DiscreteSchedule("linear", 7).sample_t(rng, 500)
    assert_backend(t, backend)
    h = to_numpy(t)
    assert h.dtype == np.float32 and set(np.unique(h)) == set(range(7))
    u = to_numpy(VPSDE(eps=0.01).sample_t(Rng(0, backend), 500, dtype="float64"))
    assert u.dtype == np.float64 and u.min() >= 0.01 and u.max() < 1.0


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="beta_schedule"):
        DiscreteSchedule("cosine")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DiscreteSchedule("linear", 0)
    with pytest.raises(ValueError, match="timestep_spacing"):
        DiscreteSchedule("linear", 10).timesteps(5, "middle")
    with pytest.raises(ValueError, match="num_inference_steps"):
        DiscreteSchedule("linear", 10).timesteps(11)
    with pytest.raises(ValueError, match="trained_betas"):
        DiscreteSchedule(num_train_timesteps=3, trained_betas=[0.1, 0.2])
    with pytest.raises(ValueError, match="betas"):
        DiscreteSchedule("linear", 10, beta_start=0.5, beta_end=1.0)
    with pytest.raises(ValueError, match="sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="name"):
        get_schedule("foo")
    with pytest.raises(ValueError, match="t:"):
        DiscreteSchedule("linear", 10).marginal_host(10)
    with pytest.raises(TypeError, match="parent"):
        RespacedSchedule(VPSDE(), [1, 2])
    assert "squaredcos_cap_v2" in repr(get_schedule("squaredcos_cap_v2"))
    assert repr(VPSDE()).startswith("VPSDE(")
