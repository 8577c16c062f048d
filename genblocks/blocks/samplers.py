"""Samplers for diffusion models: x_T ~ N(0, sigma_T^2 I) -> x_0 through model_fn(x, t, **cond).

Every sampler takes ``model_fn(x, t, **cond) -> prediction`` (a network, an analytic oracle or a guided
wrapper), a schedule from ``genblocks.blocks.schedules``, an ``Rng`` (its backend is the backend of
the result), the batch ``shape`` and ``callback(step, t, x)``. ``t`` reaches ``model_fn`` as an array of
shape (batch,) holding ``schedule.model_time``. ``prediction_type`` is "epsilon", "sample" or
"v_prediction" (v = alpha eps - sigma x_0). Schedule coefficients are read as Python floats, so no loop
waits on a device. On the numpy and strict backends the same seed gives the same samples.

Buffers: each sampler copies x_T once (the caller's array is never modified) and then updates its state in
place (``x *= a; x += b``, with work buffers allocated before the loop; the equation sits in a comment
beside each update). It never writes into what ``model_fn`` returns, but the ``x`` it hands to ``model_fn``
is that state, overwritten on the next step: a model_fn must not keep a reference to its input (copy it if
it records inputs). ``callback(step, t, x)`` receives a snapshot that is not touched afterwards.

- ``ddpm_sample``: ancestral sampling from p(x_{t-1} | x_t) (variance_type fixed_small / fixed_large /
  learned_range), on a schedule or any ``RespacedSchedule``.
- ``ddim_sample`` (eta in [0, 1]) and ``ddim_invert`` (x_0 -> x_T, optionally with fixed-point refinement).
- ``dpm_solver_pp_sample``: DPM-Solver++(2M).
- ``ode_sample``: probability-flow ODE in EDM coordinates, Euler or Heun, Karras or schedule spacing;
  ``ode_solve_ivp_sample``: the same ODE with scipy's adaptive ``solve_ivp`` (host).
- ``euler_maruyama_sample``, ``predictor_corrector_sample`` (Langevin corrector), ``annealed_langevin_sample``.
- ``ode_log_likelihood``: log p(x) through the probability-flow ODE, exact trace or Hutchinson.
- Guidance wrappers: ``classifier_free_guidance``, ``classifier_guidance``.
"""

import math

from genblocks.backends import grad, namespace, record, to_device, to_numpy
from genblocks.blocks.base import check_positive_int
from genblocks.blocks.schedules import karras_sigmas, multistep_timesteps

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")

__all__ = [
    "PREDICTION_TYPES", "VARIANCE_TYPES", "to_x0_eps", "from_x0_eps", "threshold_sample", "ddpm_sample",
    "ddim_sample", "ddim_invert", "dpm_solver_pp_sample", "ode_sample", "ode_solve_ivp_sample",
    "euler_maruyama_sample", "predictor_corrector_sample", "annealed_langevin_sample", "ode_log_likelihood",
    "classifier_free_guidance", "classifier_guidance", "pf_ode_drift", "sde_coefficients",
]


# ---------------------------------------------------------------------------------------------------
# small shared pieces


def check_prediction_type(prediction_type):
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def to_x0_eps(pred, x, alpha, sigma, prediction_type):
    """(x_0, eps) from a prediction of x_t = alpha x_0 + sigma eps.

    epsilon: x_0 = (x - sigma eps) / alpha; sample: eps = (x - alpha x_0) / sigma; v_prediction
    (v = alpha eps - sigma x_0): x_0 = (alpha x - sigma v) / r, eps = (sigma x + alpha v) / r, r = alpha^2 + sigma^2.
    ``alpha``, ``sigma``: floats or arrays broadcasting against x.
    """
    if prediction_type == "epsilon":
        return (x - sigma * pred) / alpha, pred
    if prediction_type == "sample":
        return pred, (x - alpha * pred) / sigma
    if prediction_type == "v_prediction":
        r = alpha * alpha + sigma * sigma
        return (alpha * x - sigma * pred) / r, (sigma * x + alpha * pred) / r
    return check_prediction_type(prediction_type)


def from_x0_eps(x0, eps, alpha, sigma, prediction_type):
    """The prediction of ``prediction_type`` for given (x_0, eps): eps, x_0 or v = alpha eps - sigma x_0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    return check_prediction_type(prediction_type)


def threshold_sample(x0, *, clip_sample=False, clip_sample_range=1.0, thresholding=False,
                     dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """x_0 clipped to [-r, r], or dynamic thresholding: s = clip(quantile_p |x_0|, 1, max), x_0 <- clip(x_0, -s, s) / s.

    x0: (batch, ...). The quantile is taken per sample over all other axes (sorting, no host sync).
    """
    xp = namespace(x0)
    if thresholding:
        n = x0.shape[0]
        flat = xp.reshape(xp.abs(x0), (n, -1))
        d = flat.shape[1]
        k = min(max(int(math.ceil(dynamic_thresholding_ratio * d)) - 1, 0), d - 1)
        s = xp.sort(flat, axis=1)[:, k:k + 1]
        s = xp.clip(s, 1.0, sample_max_value)
        s = xp.reshape(s, (n,) + (1,) * (x0.ndim - 1))
        return xp.clip(x0, -s, s) / s
    if clip_sample:
        return xp.clip(x0, -clip_sample_range, clip_sample_range)
    return x0


def _setup(rng, shape, dtype, x_T, scale=1.0):
    """Starting noise x_T = scale z (or a copy of the given x_T), its namespace, and a t-array factory.

    The returned x is the sampler's own array, free to be updated in place.
    """
    if x_T is None:
        if isinstance(shape, int):
            shape = (shape,)
        shape = tuple(shape)
        if not shape:
            raise ValueError("shape: expected (batch, ...), got ()")
        x = rng.normal(shape, dtype=dtype)  # a fresh draw: ours
        if scale != 1.0:
            x *= scale
    else:
        x = namespace(x_T).asarray(x_T, copy=True)  # never write into the caller's array
    xp = namespace(x)
    n = x.shape[0]

    def t_array(t):
        return xp.full((n,), float(t), dtype=x.dtype, device=xp.device_of(x))

    return x, xp, t_array


def _check_callback(callback):
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: expected a callable callback(step, t, x), got {type(callback).__name__}")


def _buffer(xp, x):
    """An uninitialised work array like x (same shape, dtype and device), allocated once per sampling run."""
    return xp.empty(x.shape, dtype=x.dtype, device=xp.device_of(x))


def _snapshot(xp, x):
    """A copy of the in-place state for ``callback`` (the sampler keeps overwriting x)."""
    return xp.asarray(x, copy=True)


def _discrete(schedule, who):
    if not getattr(schedule, "is_discrete", False):
        raise TypeError(f"schedule: {who} needs a DiscreteSchedule or RespacedSchedule, got {schedule!r}")
    return schedule


# ---------------------------------------------------------------------------------------------------
# DDPM


def _zero_snr_guard(schedule, t_first, prediction_type, who, *, refuse=None):
    """Refuse what a zero-terminal-SNR start (alpha = 0 at the first time visited) cannot do, with a clear error.

    At alpha = 0, x_0 = (x - sigma eps) / alpha is undefined, so an epsilon prediction cannot be turned into a
    sample there (v and x0 predictions are finite). ``refuse`` names why a sampler cannot start there at all.
    """
    if schedule.marginal_host(t_first)[0] > 0.0:
        return
    if refuse is not None:
        raise ValueError(f"schedule: {who} cannot start where alpha = 0 (a zero-terminal-SNR schedule, "
                         f"rescale_betas_zero_snr=True): {refuse}")
    if prediction_type == "epsilon":
        raise ValueError(f"prediction_type: {who} starts at alpha = 0 (a zero-terminal-SNR schedule, "
                         "rescale_betas_zero_snr=True), where x_0 = (x - sigma eps) / alpha is undefined for an "
                         "epsilon prediction; use prediction_type='v_prediction' or 'sample'")


def ddpm_sample(model_fn, schedule, rng, shape, *, prediction_type="epsilon", variance_type="fixed_small",
                clip_sample=False, clip_sample_range=1.0, thresholding=False, dynamic_thresholding_ratio=0.995,
                sample_max_value=1.0, num_inference_steps=None, timestep_spacing="leading", cond=None,
                x_T=None, dtype="float32", callback=None):
    """Ancestral sampling x_{t-1} = mu(x_t, x_0_hat) + sqrt(var_t) z, z ~ N(0, I), from t = T-1 to 0.

    mu = c1_t x_0_hat + c2_t x_t (posterior mean). var_t: fixed_small = beta_tilde_t, fixed_large = beta_t
    (beta_tilde_1 at t = 0), learned_range = exp(f log beta_t + (1 - f) log beta_tilde_t) with f = (v + 1) / 2
    where model_fn returns (prediction, v) concatenated on the last axis. ``num_inference_steps`` respaces
    the schedule (Improved DDPM) with ``timestep_spacing``. Returns x_0 with ``shape`` (batch, ...).
    """
    schedule = _discrete(schedule, "ddpm_sample")
    check_prediction_type(prediction_type)
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"variance_type: expected one of {VARIANCE_TYPES}, got {variance_type!r}")
    _check_callback(callback)
    if num_inference_steps is not None:
        schedule = schedule.respace(schedule.timesteps(num_inference_steps, timestep_spacing))
    _zero_snr_guard(schedule, schedule.num_train_timesteps - 1, prediction_type, "ddpm_sample")
    cond = cond or {}
    x, xp, t_array = _setup(rng, shape, dtype, x_T)
    buf = _buffer(xp, x)
    T = schedule.num_train_timesteps
    large = (schedule.posterior_variance[1] if T > 1 else schedule.betas[0],) + schedule.betas[1:]
    for step, i in enumerate(range(T - 1, -1, -1)):
        t_model = schedule.model_time(i)
        out = model_fn(x, t_array(t_model), **cond)
        if variance_type == "learned_range":
            half = out.shape[-1] // 2
            out, v = out[..., :half], out[..., half:]
        a = math.sqrt(schedule.alphas_cumprod[i])
        s = math.sqrt(1.0 - schedule.alphas_cumprod[i])
        x0, _ = to_x0_eps(out, x, a, s, prediction_type)
        x0 = threshold_sample(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                              thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                              sample_max_value=sample_max_value)
        # mean = c1_t x0_hat + c2_t x_t, in place (x0_hat is read into buf before x changes: it may alias x)
        buf[...] = x0
        buf *= schedule.posterior_mean_coef1[i]
        x *= schedule.posterior_mean_coef2[i]
        x += buf
        if i > 0:
            # x_{t-1} = mean + sqrt(var_t) z, z ~ N(0, I) (a fresh draw, so it is scaled in place)
            z = rng.normal(x.shape, dtype=dtype)
            if variance_type == "learned_range":
                lo, hi = schedule.posterior_log_variance_clipped[i], math.log(schedule.betas[i])
                frac = 0.5 * (v + 1.0)
                x += xp.exp(0.5 * (frac * hi + (1.0 - frac) * lo)) * z  # an array factor in x's dtype
            else:
                z *= math.sqrt(schedule.posterior_variance[i] if variance_type == "fixed_small" else large[i])
                x += z
        if callback is not None:
            callback(step, t_model, _snapshot(xp, x))
    return x


# ---------------------------------------------------------------------------------------------------
# DDIM


def _ddim_grid(schedule, num_inference_steps, timestep_spacing):
    if schedule.is_discrete:
        return [float(t) for t in schedule.timesteps(num_inference_steps, timestep_spacing)]
    return schedule.timesteps(num_inference_steps or 50, timestep_spacing)


def ddim_sample(model_fn, schedule, rng, shape, *, num_inference_steps=50, eta=0.0, prediction_type="epsilon",
                timestep_spacing="leading", clip_sample=False, clip_sample_range=1.0, thresholding=False,
                dynamic_thresholding_ratio=0.995, sample_max_value=1.0, cond=None, x_T=None, dtype="float32",
                callback=None):
    """DDIM: x_s = alpha_s x_0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z, with noise c = eta * posterior std.

    c = eta (sigma_s / sigma_t) sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2) (for VP schedules DDIM's
    eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t / abar_s)).

    eta = 0 is deterministic, eta = 1 is DDPM's posterior on the visited steps. The last step lands on
    alpha = 1, sigma = 0 (x_0_hat). ``num_inference_steps=None`` visits every step of the schedule (use it
    with a ``RespacedSchedule``). Works with any schedule. Returns x_0 of ``shape``.
    """
    check_prediction_type(prediction_type)
    if not 0.0 <= float(eta):
        raise ValueError(f"eta: expected eta >= 0, got {eta!r}")
    _check_callback(callback)
    cond = cond or {}
    grid = _ddim_grid(schedule, num_inference_steps, timestep_spacing)
    _zero_snr_guard(schedule, grid[0], prediction_type, "ddim_sample")
    x, xp, t_array = _setup(rng, shape, dtype, x_T)
    buf = _buffer(xp, x)
    for step, t in enumerate(grid):
        t_model = schedule.model_time(t)
        a, s = schedule.marginal_host(t)
        a_prev, s_prev = schedule.marginal_host(grid[step + 1]) if step + 1 < len(grid) else (1.0, 0.0)
        out = model_fn(x, t_array(t_model), **cond)
        x0, eps = to_x0_eps(out, x, a, s, prediction_type)
        x0 = threshold_sample(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                              thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                              sample_max_value=sample_max_value)
        c = 0.0
        if eta > 0.0 and s_prev > 0.0:
            shrunk = a * s_prev / a_prev
            c = float(eta) * s_prev / s * math.sqrt(max(s * s - shrunk * shrunk, 0.0))
        # x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat (+ c z), in place: eps_hat goes to buf first
        # (it may be x itself, e.g. an identity model), then x <- alpha_s x0_hat + buf
        buf[...] = eps
        buf *= math.sqrt(max(s_prev * s_prev - c * c, 0.0))
        x[...] = x0
        x *= a_prev
        x += buf
        if c > 0.0:
            z = rng.normal(x.shape, dtype=dtype)
            z *= c
            x += z
        if callback is not None:
            callback(step, t_model, _snapshot(xp, x))
    return x


def ddim_invert(model_fn, schedule, x0, *, num_inference_steps=50, prediction_type="epsilon",
                timestep_spacing="leading", fixed_point_iterations=0, cond=None, callback=None):
    """Deterministic DDIM encoding x_0 -> x_T: x_t = alpha_t x_0_hat(x_s) + sigma_t eps_hat(x_t, t), steps ascending.

    The implicit eps_hat(x_t, t) is first approximated by eps_hat(x_s, t) (the usual DDIM inversion);
    ``fixed_point_iterations`` > 0 then iterates x_t <- the exact inverse of the DDIM step, which makes
    ``ddim_sample(..., eta=0, x_T=ddim_invert(...))`` return x_0 to solver precision. x0: (batch, ...).
    """
    check_prediction_type(prediction_type)
    _check_callback(callback)
    cond = cond or {}
    grid = list(reversed(_ddim_grid(schedule, num_inference_steps, timestep_spacing)))
    xp = namespace(x0)
    n = x0.shape[0]
    x = x0
    a_prev, s_prev = 1.0, 0.0
    for step, t in enumerate(grid):
        t_arr = xp.full((n,), schedule.model_time(t), dtype=x0.dtype, device=xp.device_of(x0))
        a, s = schedule.marginal_host(t)
        # sampling maps x_t -> x_prev = a_prev x0_hat(x_t) + s_prev eps_hat(x_t); solve it for x_t, with
        # eps_hat(x_t) first read at the point we have (x_prev), then refined by fixed-point iteration
        eps = to_x0_eps(model_fn(x, t_arr, **cond), x, a, s, prediction_type)[1]
        x_new = (a / a_prev) * (x - s_prev * eps) + s * eps
        for _ in range(int(fixed_point_iterations)):
            eps = to_x0_eps(model_fn(x_new, t_arr, **cond), x_new, a, s, prediction_type)[1]
            x_new = (a / a_prev) * (x - s_prev * eps) + s * eps
        x = x_new
        a_prev, s_prev = a, s
        if callback is not None:
            callback(step, schedule.model_time(t), x)
    return x


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++(2M)


class _LambdaClipped:
    """A schedule's time grid restricted to lambda_t = log(alpha_t / sigma_t) >= lambda_min (diffusers' clipping)."""

    def __init__(self, schedule, lambda_min):
        self.schedule = schedule
        self.is_discrete = schedule.is_discrete
        t_max = schedule.t_max
        if lambda_min > -math.inf and _lam(schedule, t_max) < lambda_min:
            lo, hi = schedule.t_min, t_max  # lambda decreases in t: bisect for lambda(t) = lambda_min
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if _lam(schedule, mid) >= lambda_min else (lo, mid)
            t_max = math.floor(lo) if schedule.is_discrete else lo
        self.t_max = t_max

    def timesteps(self, n, spacing):
        if self.is_discrete:  # the multistep grid (no model call at t = 0) on the steps 0..t_max
            T = int(self.t_max) + 1
            return [float(t) for t in multistep_timesteps(T, min(n, T), spacing)]
        if self.t_max == self.schedule.t_max:
            return self.schedule.timesteps(n, spacing)
        return [self.t_max + (self.schedule.t_min - self.t_max) * k / max(n - 1, 1) for k in range(n)]


def _lam(schedule, t):
    a, s = schedule.marginal_host(t)
    return math.log(a) - math.log(s) if a > 0.0 else -math.inf


def dpm_solver_pp_sample(model_fn, schedule, rng, shape, *, num_inference_steps=20, prediction_type="epsilon",
                         timestep_spacing="linspace", clip_sample=False, clip_sample_range=1.0, thresholding=False,
                         dynamic_thresholding_ratio=0.995, sample_max_value=1.0, lambda_min_clipped=-5.1,
                         cond=None, x_T=None, dtype="float32", callback=None):
    """DPM-Solver++(2M): x_s = (sigma_s/sigma_t) x_t - alpha_s (e^{-h} - 1) D, h = lambda_s - lambda_t.

    lambda = log(alpha / sigma).
    D = x_0_hat on the first step, (1 + 1/(2r)) x_0_hat_t - 1/(2r) x_0_hat_prev with r = h_prev / h after
    it; the last step goes to sigma = 0 (first order: x_0 = x_0_hat). Any schedule. Returns x_0 of ``shape``.
    On a discrete schedule the grid is ``schedules.multistep_timesteps`` (diffusers' DPMSolverMultistep grid:
    n + 1 points spaced, the last, t = 0, dropped), so no model call is spent at t = 0.
    Sampling starts at the last time with lambda >= ``lambda_min_clipped`` (diffusers' option; its default
    is -inf, ours -5.1): at lower lambda an x_0 prediction divides model errors by alpha ~ 0, which the
    second-order term then carries forward (cosine schedules reach lambda = -9.7). -inf disables it.
    """
    check_prediction_type(prediction_type)
    _check_callback(callback)
    cond = cond or {}
    grid = _LambdaClipped(schedule, lambda_min_clipped).timesteps(num_inference_steps, timestep_spacing)
    _zero_snr_guard(schedule, grid[0], prediction_type, "dpm_solver_pp_sample")
    x, xp, t_array = _setup(rng, shape, dtype, x_T)
    D, x0_prev = _buffer(xp, x), _buffer(xp, x)  # D, and a copy of the previous step's x0_hat
    h_prev = None
    for step, t in enumerate(grid):
        t_model = schedule.model_time(t)
        a, s = schedule.marginal_host(t)
        out = model_fn(x, t_array(t_model), **cond)
        x0 = to_x0_eps(out, x, a, s, prediction_type)[0]
        x0 = threshold_sample(x0, clip_sample=clip_sample, clip_sample_range=clip_sample_range,
                              thresholding=thresholding, dynamic_thresholding_ratio=dynamic_thresholding_ratio,
                              sample_max_value=sample_max_value)
        if step + 1 == len(grid):
            x[...] = x0  # the last step lands on sigma = 0: x_0 = x0_hat
        else:
            a_next, s_next = schedule.marginal_host(grid[step + 1])
            # from alpha = 0 (lambda = -inf) h is inf: e^{-h} = 0 and the step is DDIM's, first order
            h = math.log(a_next / s_next) - math.log(a / s) if a > 0.0 else math.inf
            # D = x0_hat (first step), else (1 + 1/(2r)) x0_hat - 1/(2r) x0_hat_prev with r = h_prev / h
            D[...] = x0
            if h_prev is not None:
                r = h_prev / h
                D *= 1.0 + 0.5 / r
                x0_prev *= 0.5 / r
                D -= x0_prev
            x0_prev[...] = x0
            # x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D
            D *= -(a_next * math.expm1(-h))
            x *= s_next / s
            x += D
            h_prev = h
        if callback is not None:
            callback(step, t_model, _snapshot(xp, x))
    return x


# ---------------------------------------------------------------------------------------------------
# probability-flow ODE and reverse SDE


def sde_coefficients(schedule, t):
    """(f(t), g(t)^2) of the forward SDE dx = f x dt + g dw matching the schedule's marginals.

    From the schedule's ``sde_host`` when it has one, else from alpha_t, sigma_t by central differences:
    f = d log alpha / dt, g^2 = d sigma^2 / dt - 2 f sigma^2. Host floats.
    """
    if hasattr(schedule, "sde_host"):
        return schedule.sde_host(t)
    span = schedule.t_max - schedule.t_min
    h = 1e-3 * span
    lo, hi = max(t - h, schedule.t_min), min(t + h, schedule.t_max)
    (a0, s0), (a1, s1) = schedule.marginal_host(lo), schedule.marginal_host(hi)
    a, s = schedule.marginal_host(t)
    f = (math.log(a1) - math.log(a0)) / (hi - lo)
    return f, (s1 * s1 - s0 * s0) / (hi - lo) - 2.0 * f * s * s


def pf_ode_drift(model_fn, schedule, x, t, *, prediction_type="epsilon", cond=None):
    """Probability-flow velocity dx/dt = f(t) x - g(t)^2 / 2 score = f x + g^2 eps_hat / (2 sigma_t) at host time t."""
    xp = namespace(x)
    f, g2 = sde_coefficients(schedule, t)
    a, s = schedule.marginal_host(t)
    t_arr = xp.full((x.shape[0],), schedule.model_time_any(t), dtype=x.dtype, device=xp.device_of(x))
    eps = to_x0_eps(model_fn(x, t_arr, **(cond or {})), x, a, s, prediction_type)[1]
    return f * x + (0.5 * g2 / s) * eps


def _edm_grid(schedule, num_inference_steps, sigma_spacing, rho, sigma_min=None, sigma_max=None):
    t_hi, t_lo = schedule.t_max, schedule.t_min
    (a_hi, s_hi), (a_lo, s_lo) = schedule.marginal_host(t_hi), schedule.marginal_host(t_lo)
    if a_hi <= 0.0 and sigma_max is None:
        raise ValueError("schedule: alpha at t_max is 0 (a zero-terminal-SNR schedule, rescale_betas_zero_snr=True); "
                         "ODE samplers need alpha_T > 0 or a finite sigma_max")
    lo, hi = s_lo / a_lo, (s_hi / a_hi if a_hi > 0.0 else math.inf)
    if sigma_min is not None:
        lo = max(lo, float(sigma_min))
    if sigma_max is not None:
        hi = min(hi, float(sigma_max))
    if not hi > lo:
        raise ValueError(f"sigma_max: expected sigma_max > sigma_min, got {hi} <= {lo}")
    if sigma_spacing == "karras":
        sigmas = karras_sigmas(num_inference_steps, lo, hi, rho)
        times = [schedule.t_from_sigma_ratio(v) for v in sigmas]
        if sigma_max is None:
            times[0] = t_hi
        if sigma_min is None and len(times) > 1:  # (one step: its one point is the start, t_max)
            times[-1] = t_lo
    elif sigma_spacing == "timesteps":
        times = [float(t) for t in schedule.timesteps(num_inference_steps, "linspace")]
        sigmas = [schedule.marginal_host(t)[1] / schedule.marginal_host(t)[0] for t in times]
    else:
        raise ValueError(f"sigma_spacing: expected 'karras' or 'timesteps', got {sigma_spacing!r}")
    return sigmas, times


def ode_sample(model_fn, schedule, rng, shape, *, method="heun", num_inference_steps=18, sigma_spacing="karras",
               rho=7.0, sigma_min=None, sigma_max=None, prediction_type="epsilon", cond=None, x_T=None,
               dtype="float32", callback=None):
    """Probability-flow ODE in EDM coordinates: y = x / alpha_t, sigma = sigma_t / alpha_t, dy/dsigma = eps_hat.

    ``method`` "euler" or "heun" (EDM's second order: Euler predictor, trapezoid corrector except on the
    last step to sigma = 0). Noise levels: Karras spacing with ``rho`` between the schedule's ends (or
    ``sigma_min`` / ``sigma_max``, e.g. EDM's 80, which skips the near-zero-SNR start where an eps model's
    errors are divided by alpha), or the schedule's own ``timesteps``. Any schedule. Returns x_0 of ``shape``.
    """
    check_prediction_type(prediction_type)
    if method not in ("euler", "heun"):
        raise ValueError(f"method: expected 'euler' or 'heun', got {method!r}")
    _check_callback(callback)
    cond = cond or {}
    sigmas, times = _edm_grid(schedule, num_inference_steps, sigma_spacing, rho, sigma_min, sigma_max)
    x, xp, t_array = _setup(rng, shape, dtype, x_T, scale=schedule.marginal_host(times[0])[1])

    def eps_at(y, t):
        a, s = schedule.marginal_host(t)
        xt = a * y
        return to_x0_eps(model_fn(xt, t_array(schedule.model_time_any(t)), **cond), xt, a, s, prediction_type)[1]

    y = x  # our own array: y = x / alpha, updated in place from here on
    y /= schedule.marginal_host(times[0])[0]
    d, y_next = _buffer(xp, y), (_buffer(xp, y) if method == "heun" else None)
    for step, (sig, t) in enumerate(zip(sigmas, times)):
        last = step + 1 == len(sigmas)
        sig_next = 0.0 if last else sigmas[step + 1]
        d[...] = eps_at(y, t)  # a copy: the model may reuse its output array on the next call
        if method == "heun" and not last:
            # Euler predictor y_next = y + (sigma_next - sigma) d, then the trapezoid
            # y <- y + (sigma_next - sigma) (d + d2) / 2 with d2 = eps_hat(y_next, t_next)
            y_next[...] = d
            y_next *= sig_next - sig
            y_next += y
            d += eps_at(y_next, times[step + 1])
            d *= 0.5
        # Euler: y <- y + (sigma_next - sigma) d  (d is the trapezoid's average after a Heun correction)
        d *= sig_next - sig
        y += d
        if callback is not None:
            a_next = 1.0 if last else schedule.marginal_host(times[step + 1])[0]
            callback(step, schedule.model_time_any(t), a_next * y)
    return y


def ode_solve_ivp_sample(model_fn, schedule, rng, shape, *, method="RK45", rtol=1e-5, atol=1e-5,
                         prediction_type="epsilon", cond=None, x_T=None, dtype="float32", denoise_final=True):
    """The probability-flow ODE dy/dsigma = eps_hat (y = x / alpha) solved by scipy ``solve_ivp`` (adaptive).

    Integrates from sigma(t_max) to sigma(t_min) on the host (one transfer per function evaluation), then
    returns x_0_hat at t_min (``denoise_final``) or y there. Any schedule, any backend. Returns (x_0, nfev).
    """
    from scipy.integrate import solve_ivp

    check_prediction_type(prediction_type)
    cond = cond or {}
    sigmas, times = _edm_grid(schedule, 2, "karras", 7.0)
    x, dev, t_array = _setup(rng, shape, dtype, x_T, scale=schedule.marginal_host(schedule.t_max)[1])
    backend = dev.backend_name
    y0 = to_numpy(x / schedule.marginal_host(times[0])[0])
    x_shape, x_dtype = tuple(x.shape), y0.dtype

    def model_at(y, sig):
        t = schedule.t_from_sigma_ratio(sig)
        a, s = schedule.marginal_host(t)
        xt = a * y
        return to_x0_eps(model_fn(xt, t_array(schedule.model_time_any(t)), **cond), xt, a, s, prediction_type)

    def rhs(sig, y_flat):
        _, eps = model_at(to_device(_unflatten(y_flat, x_shape, x_dtype), backend), sig)
        return _flatten64(to_numpy(eps))

    sol = solve_ivp(rhs, (sigmas[0], sigmas[-1]), _flatten64(y0), method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y = to_device(_unflatten(sol.y[:, -1], x_shape, x_dtype), backend)
    if denoise_final:
        return model_at(y, sigmas[-1])[0], int(sol.nfev) + 1
    return y * schedule.marginal_host(times[-1])[0], int(sol.nfev)


def _flatten64(host):
    """A host array as a flat float64 vector (what scipy's solvers integrate)."""
    xp = namespace(host)
    return xp.reshape(xp.astype(host, xp.float64), (-1,))


def _unflatten(flat, shape, dtype):
    xp = namespace(flat)
    return xp.astype(xp.reshape(xp.asarray(flat), shape), dtype)


def _sde_grid(schedule, num_steps):
    return [schedule.t_max + (schedule.t_min - schedule.t_max) * k / num_steps for k in range(num_steps + 1)]


def euler_maruyama_sample(model_fn, schedule, rng, shape, *, num_inference_steps=500, prediction_type="epsilon",
                          denoise_final=True, cond=None, x_T=None, dtype="float32", callback=None):
    """Reverse SDE dx = [f x - g^2 score] dt + g dw_bar, score = -eps_hat / sigma_t, Euler-Maruyama from t_max to t_min.

    x_{k+1} = x_k + (f x_k + g^2 eps_hat / sigma) dt + sqrt(g^2 |dt|) z (no noise on the last step); then
    x_0_hat at t_min (``denoise_final``, Tweedie). Any schedule (f, g^2 from ``sde_coefficients``).
    """
    # Euler-Maruyama is predictor-corrector with no corrector moves: one loop serves both
    return predictor_corrector_sample(model_fn, schedule, rng, shape, num_inference_steps=num_inference_steps,
                                      corrector_steps=0, prediction_type=prediction_type,
                                      denoise_final=denoise_final, cond=cond, x_T=x_T, dtype=dtype, callback=callback)


def _eps_hat(model_fn, schedule, x, t, t_array, prediction_type, cond):
    a, s = schedule.marginal_host(t)
    return to_x0_eps(model_fn(x, t_array(schedule.model_time_any(t)), **cond), x, a, s, prediction_type)


def _em_step(model_fn, schedule, rng, x, buf, t, t_next, t_array, prediction_type, cond, dtype, noise=True):
    """One reverse Euler-Maruyama step from t to t_next, written into x in place (buf: a work array like x)."""
    f, g2 = sde_coefficients(schedule, t)
    s = schedule.marginal_host(t)[1]
    eps = _eps_hat(model_fn, schedule, x, t, t_array, prediction_type, cond)[1]
    dt = t_next - t
    # x <- x + (f x + g^2 eps_hat / sigma) dt = (1 + f dt) x + (g^2 dt / sigma) eps_hat
    buf[...] = eps  # read before x changes (eps_hat may alias x)
    buf *= g2 * dt / s
    x *= 1.0 + f * dt
    x += buf
    if noise:
        # x <- x + sqrt(g^2 |dt|) z
        z = rng.normal(x.shape, dtype=dtype)
        z *= math.sqrt(g2 * abs(dt))
        x += z
    return x


def _denoise(model_fn, schedule, x, t, t_array, prediction_type, cond):
    return _eps_hat(model_fn, schedule, x, t, t_array, prediction_type, cond)[0]


def _langevin(model_fn, schedule, rng, x, score, t, t_array, prediction_type, cond, dtype, snr, steps, xp):
    """Langevin corrector at time t: x <- x + e score + sqrt(2 e) z, e = 2 (snr |z| / |score|)^2 (batch means).

    Updates x in place; ``score`` is a work array like x. e stays on the device (no host sync).
    """
    s = schedule.marginal_host(t)[1]
    n = x.shape[0]
    for _ in range(steps):
        eps = _eps_hat(model_fn, schedule, x, t, t_array, prediction_type, cond)[1]
        score[...] = eps  # score = -eps_hat / sigma
        score *= -1.0 / s
        z = rng.normal(x.shape, dtype=dtype)
        score_norm = xp.mean(xp.vector_norm(xp.reshape(score, (n, -1)), axis=-1))
        noise_norm = xp.mean(xp.vector_norm(xp.reshape(z, (n, -1)), axis=-1))
        e = 2.0 * xp.square(snr * noise_norm / score_norm)
        # x <- x + e score + sqrt(2 e) z
        score *= e
        x += score
        x += xp.sqrt(2.0 * e) * z  # e has x's dtype, which the noise (``dtype``) may not
    return x


def predictor_corrector_sample(model_fn, schedule, rng, shape, *, num_inference_steps=500, corrector_steps=1,
                               snr=0.16, prediction_type="epsilon", denoise_final=True, cond=None, x_T=None,
                               dtype="float32", callback=None):
    """Predictor-corrector (Song et al. 2021): per t, ``corrector_steps`` Langevin moves then an Euler-Maruyama step.

    Langevin step size e = 2 (snr ||z|| / ||score||)^2 (norms averaged over the batch); x_0_hat at the end.
    Any schedule. Returns x_0 of ``shape``. ``corrector_steps=0`` is plain Euler-Maruyama.
    """
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"corrector_steps: expected a non-negative int, got {corrector_steps!r}")
    check_prediction_type(prediction_type)
    check_positive_int(num_inference_steps, "num_inference_steps")
    _check_callback(callback)
    cond = cond or {}
    grid = _sde_grid(schedule, num_inference_steps)
    _zero_snr_guard(schedule, grid[0], prediction_type, "the reverse-SDE samplers (euler_maruyama_sample, "
                    "predictor_corrector_sample)", refuse="the drift f = d log alpha / dt is infinite there; use "
                    "ddpm_sample, ddim_sample or dpm_solver_pp_sample with v_prediction")
    x, xp, t_array = _setup(rng, shape, dtype, x_T, scale=schedule.marginal_host(schedule.t_max)[1])
    buf = _buffer(xp, x)
    for step in range(num_inference_steps):
        t, t_next = grid[step], grid[step + 1]
        if corrector_steps:
            _langevin(model_fn, schedule, rng, x, buf, t, t_array, prediction_type, cond, dtype, snr, corrector_steps,
                      xp)
        _em_step(model_fn, schedule, rng, x, buf, t, t_next, t_array, prediction_type, cond, dtype,
                 noise=step + 1 < num_inference_steps)
        if callback is not None:
            callback(step, schedule.model_time_any(t), _snapshot(xp, x))
    if denoise_final:
        x = _denoise(model_fn, schedule, x, grid[-1], t_array, prediction_type, cond)
    return x


def annealed_langevin_sample(model_fn, schedule, rng, shape, *, num_levels=10, steps_per_level=100, step_lr=2e-5,
                             prediction_type="epsilon", denoise_final=True, cond=None, x_T=None, dtype="float32",
                             callback=None):
    """Annealed Langevin dynamics (NCSN): for geometric sigma_1 > ... > sigma_L, y <- y + e_i score + sqrt(2 e_i) z.

    Works on y = x / alpha with sigma = sigma_t / alpha_t (so any schedule), e_i = step_lr sigma_i^2 / sigma_L^2,
    score = -eps_hat / sigma; the last step adds Tweedie's denoising y + sigma_L^2 score. Returns x_0 of ``shape``.
    """
    check_prediction_type(prediction_type)
    check_positive_int(num_levels, "num_levels")
    check_positive_int(steps_per_level, "steps_per_level")
    _check_callback(callback)
    cond = cond or {}
    _zero_snr_guard(schedule, schedule.t_max, prediction_type, "annealed_langevin_sample",
                    refuse="its noise levels sigma_t / alpha_t start at t_max, where the ratio is infinite; use "
                    "ddpm_sample, ddim_sample or dpm_solver_pp_sample with v_prediction")
    (a_hi, s_hi), (a_lo, s_lo) = schedule.marginal_host(schedule.t_max), schedule.marginal_host(schedule.t_min)
    hi, lo = s_hi / a_hi, s_lo / a_lo
    levels = [hi * (lo / hi) ** (i / max(num_levels - 1, 1)) for i in range(num_levels)]
    x, xp, t_array = _setup(rng, shape, dtype, x_T, scale=s_hi)
    y = x  # our own array: y = x / alpha, updated in place from here on
    y /= a_hi
    xt, buf = _buffer(xp, y), _buffer(xp, y)
    step = 0
    for sig in levels:
        t = schedule.t_from_sigma_ratio(sig)
        a, s = schedule.marginal_host(t)
        e = step_lr * (sig / levels[-1]) ** 2
        for _ in range(steps_per_level):
            xt[...] = y  # x_t = alpha y
            xt *= a
            eps = to_x0_eps(model_fn(xt, t_array(schedule.model_time_any(t)), **cond), xt, a, s, prediction_type)[1]
            # y <- y + e score + sqrt(2 e) z with score = -eps_hat / sigma
            buf[...] = eps
            buf *= e / sig
            y -= buf
            z = rng.normal(y.shape, dtype=dtype)
            z *= math.sqrt(2.0 * e)
            y += z
            if callback is not None:
                callback(step, schedule.model_time_any(t), a * y)
            step += 1
    if denoise_final:
        t = schedule.t_from_sigma_ratio(levels[-1])
        a, s = schedule.marginal_host(t)
        xt = a * y
        y = to_x0_eps(model_fn(xt, t_array(schedule.model_time_any(t)), **cond), xt, a, s, prediction_type)[0]
    return y


# ---------------------------------------------------------------------------------------------------
# likelihood through the probability-flow ODE


def ode_log_likelihood(model_fn, schedule, x, *, prediction_type="epsilon", trace="exact", rng=None,
                       hutchinson_samples=1, method="RK45", rtol=1e-5, atol=1e-5, prior_log_prob=None, cond=None):
    """log p_{t_min}(x) = log N(x_T; 0, (alpha_T^2 + sigma_T^2) I) + int_{t_min}^{t_max} div v(x_t, t) dt.

    v is the probability-flow velocity (``pf_ode_drift``); div v = f D + g^2 / (2 sigma) div eps_hat.
    ``trace="exact"`` takes D reverse passes of autograd (small D); "hutchinson" uses z^T (d eps_hat/dx) z
    with Rademacher z fixed along the path (``rng`` required). scipy ``solve_ivp`` integrates x and the
    log-density together. ``prior_log_prob(x_T) -> (n,)`` replaces the Gaussian prior (e.g. with the exact
    p_T of an oracle). Numpy backend only (autograd). x: (n, ...) -> log-likelihoods (n,) in nats.
    """
    from scipy.integrate import solve_ivp

    xp = namespace(x)
    if not record(xp.backend_name).differentiable:
        raise TypeError(f"x: ode_log_likelihood needs gradients (numpy backend), got a {xp.backend_name} array; "
                        "move it with genblocks.backends.to_device(x, 'numpy')")
    check_prediction_type(prediction_type)
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"trace: expected 'exact' or 'hutchinson', got {trace!r}")
    cond = cond or {}
    n = x.shape[0]
    shape = tuple(x.shape)
    D = math.prod(shape[1:])
    dtype = x.dtype
    probes = None
    if trace == "hutchinson":
        if rng is None:
            raise ValueError("rng: the Hutchinson estimator needs an Rng for its probe vectors")
        check_positive_int(hutchinson_samples, "hutchinson_samples")
        probes = [2.0 * rng.bernoulli(0.5, shape=shape, dtype="float64") - 1.0 for _ in range(hutchinson_samples)]
        probes = [xp.astype(to_device(p, "numpy"), dtype) for p in probes]

    def rhs(t, state):
        xt = xp.astype(xp.reshape(state[:-n], shape), dtype)
        f, g2 = sde_coefficients(schedule, t)
        a, s = schedule.marginal_host(t)
        t_arr = xp.full((n,), schedule.model_time_any(t), dtype=dtype)

        def eps_fn(z):
            return to_x0_eps(model_fn(z, t_arr, **cond), z, a, s, prediction_type)[1]

        eps = eps_fn(xt)
        if trace == "exact":
            div = 0.0
            for i in range(D):
                def component(z, i=i):
                    return xp.sum(xp.reshape(eps_fn(z), (n, D))[:, i])
                div = div + xp.reshape(grad(component)(xt), (n, D))[:, i]
        else:
            div = 0.0
            for p in probes:
                gz = grad(lambda z, p=p: xp.sum(eps_fn(z) * p))(xt)
                div = div + xp.sum(xp.reshape(gz * p, (n, D)), axis=-1)
            div = div / float(len(probes))
        v = f * xt + (0.5 * g2 / s) * eps
        ddiv = f * D + (0.5 * g2 / s) * div
        return xp.concat([xp.reshape(xp.astype(v, xp.float64), (-1,)), xp.astype(ddiv, xp.float64)])

    state0 = xp.concat([xp.reshape(xp.astype(x, xp.float64), (-1,)), xp.zeros((n,), dtype=xp.float64)])
    sol = solve_ivp(rhs, (schedule.t_min, schedule.t_max), state0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    end = sol.y[:, -1]
    xT = xp.reshape(end[:-n], (n, D))
    if prior_log_prob is not None:
        prior = xp.astype(prior_log_prob(xp.astype(xp.reshape(xT, shape), dtype)), xp.float64)
    else:
        a_T, s_T = schedule.marginal_host(schedule.t_max)
        var = a_T * a_T + s_T * s_T
        prior = -0.5 * xp.sum(xT * xT, axis=-1) / var - 0.5 * D * math.log(2.0 * math.pi * var)
    return xp.astype(prior + end[-n:], dtype)


# ---------------------------------------------------------------------------------------------------
# guidance wrappers (each returns a model_fn usable by every sampler)


def classifier_free_guidance(model_fn, guidance_weight, *, null_label, guidance_rescale=0.0, label_key="y"):
    """eps = eps_u + (1 + w)(eps_c - eps_u) (Ho & Salimans' w; diffusers' guidance_scale is 1 + w).

    w = 0 is the conditional model, w = -1 the unconditional one. ``guidance_rescale`` phi (Lin et al.
    2024) blends in eps * std(eps_c) / std(eps) (std per sample). The conditional and unconditional
    passes share one batch: model_fn sees 2n rows with labels (y, null_label). Labels: model_fn's
    ``label_key`` keyword, an int array (n,). Returns model_fn(x, t, **cond) -> prediction.
    """
    w = float(guidance_weight)
    phi = float(guidance_rescale)
    if not 0.0 <= phi <= 1.0:
        raise ValueError(f"guidance_rescale: expected a value in [0, 1], got {guidance_rescale!r}")

    def guided(x, t, **cond):
        if label_key not in cond:
            raise ValueError(f"cond: classifier-free guidance needs the labels as {label_key}=..., got {sorted(cond)}")
        xp = namespace(x)
        y = cond.pop(label_key)
        n = x.shape[0]
        out = model_fn(xp.concat([x, x], axis=0), xp.concat([t, t], axis=0),
                       **{label_key: xp.concat([y, xp.full_like(y, null_label)], axis=0)}, **cond)
        out_c, out_u = out[:n, ...], out[n:, ...]
        g = out_u + (1.0 + w) * (out_c - out_u)
        if phi > 0.0:
            axes = tuple(range(1, x.ndim))
            ratio = xp.std(out_c, axis=axes, keepdims=True) / xp.std(g, axis=axes, keepdims=True)
            g = phi * (g * ratio) + (1.0 - phi) * g
        return g

    return guided


def classifier_guidance(model_fn, classifier_log_prob, schedule, guidance_scale, *, prediction_type="epsilon",
                        label_key="y", pass_label=False):
    """eps_tilde = eps_hat - s sigma_t grad_x log p(y | x_t, t) (Dhariwal & Nichol), in any prediction type.

    ``classifier_log_prob(x, t, y) -> (n,)`` log-probabilities of labels y for noisy inputs. The gradient
    comes from autograd, so the wrapper runs on the numpy backend. ``pass_label`` hands the labels to
    model_fn as well (a conditional model). Returns model_fn(x, t, **cond) -> prediction.
    """
    check_prediction_type(prediction_type)
    scale = float(guidance_scale)

    def guided(x, t, **cond):
        if label_key not in cond:
            raise ValueError(f"cond: classifier guidance needs the labels as {label_key}=..., got {sorted(cond)}")
        y = cond[label_key] if pass_label else cond.pop(label_key)
        out = model_fn(x, t, **cond)
        if scale == 0.0:
            return out
        xp = namespace(x)
        if not record(xp.backend_name).differentiable:
            raise TypeError(f"x: classifier guidance needs gradients (numpy backend), got a {xp.backend_name} array")
        g = grad(lambda z: xp.sum(classifier_log_prob(z, t, y)))(x)
        a, s = schedule.marginal(t)
        bshape = (x.shape[0],) + (1,) * (x.ndim - 1)
        a, s = xp.reshape(a, bshape), xp.reshape(s, bshape)
        x0, eps = to_x0_eps(out, x, a, s, prediction_type)
        eps = eps - scale * s * g
        return from_x0_eps((x - s * eps) / a, eps, a, s, prediction_type)

    return guided
