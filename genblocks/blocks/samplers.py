"""Samplers for diffusion models: x_T ~ N(0, sigma_T^2 I) -> x_0 through model_fn(x, t, **cond).

Every sampler is one small **step function**, x_t -> x_next, its equation in the docstring, driven by one
shared loop, ``sample_loop``. A step reads the model only through ``denoise(x, t)`` (the loop turns
``model_fn``'s prediction into x_0_hat and eps_hat) and returns its update as terms: x_next = sum_i c_i v_i,
a list of (c_i, v_i). The loop owns the rest: the starting noise, the grid the sampler's grid builder made,
guidance, ``callback(step, t, x)``, and adding the terms up. ``fast=False`` adds them out of place, the
textbook form; the default writes them into the sampler's own array in place, in the same order, and runs
the network inside ``reuse_buffers()`` (its large arrays recycled from step to step rather than faulted in
afresh), so the two agree bit for bit (tested). Reading a sampler: its grid builder, its step, its
five-line driver.

Shared arguments: ``model_fn(x, t, **cond) -> prediction`` (a network, an analytic oracle or a guided
wrapper), a schedule from ``genblocks.blocks.schedules``, an ``Rng`` (its backend is the backend of the
result), the batch ``shape``, ``num_inference_steps`` (default 50 everywhere), ``prediction_type``
("epsilon", "sample" or "v_prediction", v = alpha eps - sigma x_0), ``guidance`` (a wrapper
model_fn -> model_fn such as ``partial(classifier_free_guidance, guidance_weight=3.0, null_label=10)``),
``cond``, ``x_T``, ``dtype`` and ``callback``. Samplers that use x_0_hat (DDPM, DDIM, DPM-Solver++) take an
``x0_transform`` (``clip_sample(r)`` or ``thresholding(...)``, diffusers' options). ``t`` reaches
``model_fn`` as an array of shape (batch,) holding ``schedule.model_time``. Schedule coefficients are
Python floats, so no loop waits on a device. On the numpy and strict backends the same seed gives the same
samples; the noise and the state have x_T's dtype (``dtype`` when x_T is drawn), and predictions are cast
to it.

Buffers: the loop copies x_T once (the caller's array is never modified) and updates that array in place.
It never writes into what ``model_fn`` returns, but the ``x`` it hands to ``model_fn`` is the state,
overwritten on the next step: a model_fn must not keep a reference to its input (copy it if it records
inputs). ``callback(step, t, x)`` receives a snapshot that is not touched afterwards.

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

import contextlib
import math
from collections import namedtuple

from genblocks.backends import grad, namespace, record, reuse_buffers, to_device, to_numpy
from genblocks.blocks.schedules import check_discrete, karras_sigmas, multistep_timesteps
from genblocks.blocks.validate import (
    check_callable,
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_positive_real,
    check_real,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


class _DefaultSteps(int):
    """The default number of sampling steps: 50, or every step of a discrete schedule with fewer (the grid
    builders recognise this very object; an explicit 50 on a shorter schedule is still an error)."""

    def __repr__(self):
        return "50"


NUM_INFERENCE_STEPS = _DefaultSteps(50)  # every sampler's default

__all__ = [
    "PREDICTION_TYPES", "VARIANCE_TYPES", "NUM_INFERENCE_STEPS", "to_x0_eps", "from_x0_eps", "threshold_sample",
    "clip_sample", "thresholding", "Denoised", "sample_loop", "ddpm_timesteps", "ddim_timesteps",
    "dpm_solver_timesteps", "edm_timesteps", "sde_timesteps", "langevin_levels", "ddpm_step", "ddim_step",
    "dpm_solver_pp_step", "ode_step", "euler_maruyama_step", "langevin_step", "ddpm_sample", "ddim_sample",
    "ddim_invert", "dpm_solver_pp_sample", "ode_sample", "ode_solve_ivp_sample", "euler_maruyama_sample",
    "predictor_corrector_sample", "annealed_langevin_sample", "ode_log_likelihood", "classifier_free_guidance",
    "classifier_guidance", "pf_ode_drift", "sde_coefficients",
]


# ---------------------------------------------------------------------------------------------------
# predictions, x_0 transforms and argument checks


def check_prediction_type(prediction_type):
    return check_choice(prediction_type, "prediction_type", PREDICTION_TYPES)


def check_num_inference_steps(num_inference_steps, schedule=None):
    """A positive int; None (every step of the schedule) only where ``schedule`` is discrete; the default
    (``NUM_INFERENCE_STEPS``) is capped at a discrete schedule's number of steps."""
    discrete = getattr(schedule, "is_discrete", False)
    if num_inference_steps is NUM_INFERENCE_STEPS and discrete:
        return min(int(num_inference_steps), schedule.num_train_timesteps)
    if num_inference_steps is None and discrete:
        return None
    if num_inference_steps is None:
        raise ValueError("num_inference_steps: expected a positive int (None, every step, needs a "
                         f"DiscreteSchedule), got None with {schedule!r}")
    return check_positive_int(num_inference_steps, "num_inference_steps")


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


def clip_sample(clip_sample_range=1.0):
    """An ``x0_transform``: x_0_hat clipped to [-r, r] (diffusers' clip_sample=True, clip_sample_range=r)."""
    r = check_positive_real(clip_sample_range, "clip_sample_range")
    return lambda x0: threshold_sample(x0, clip_sample=True, clip_sample_range=r)


def thresholding(dynamic_thresholding_ratio=0.995, sample_max_value=1.0):
    """An ``x0_transform``: Imagen's dynamic thresholding (diffusers' thresholding=True with these options)."""
    p = check_real(dynamic_thresholding_ratio, "dynamic_thresholding_ratio", low=0.0, high=1.0, low_open=True)
    m = check_positive_real(sample_max_value, "sample_max_value")
    return lambda x0: threshold_sample(x0, thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=m)


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


# ---------------------------------------------------------------------------------------------------
# grids: one builder per method, each a list of host times (descending), or of tuples whose first entry is t


def ddpm_timesteps(schedule, num_inference_steps=None, timestep_spacing="leading"):
    """DDPM's grid: (schedule respaced to the visited steps, [T'-1, ..., 0] on it); None keeps every step."""
    schedule = check_discrete(schedule, "ddpm_sample")
    num_inference_steps = check_num_inference_steps(num_inference_steps, schedule)
    if num_inference_steps is not None:
        schedule = schedule.respace(schedule.timesteps(num_inference_steps, timestep_spacing))
    return schedule, list(range(schedule.num_train_timesteps - 1, -1, -1))


def ddim_timesteps(schedule, num_inference_steps=NUM_INFERENCE_STEPS, timestep_spacing="leading"):
    """DDIM's grid: ``spaced_timesteps`` on a discrete schedule (diffusers' DDIMScheduler), else n times 1 -> eps."""
    num_inference_steps = check_num_inference_steps(num_inference_steps, schedule)
    if schedule.is_discrete:
        return [float(t) for t in schedule.timesteps(num_inference_steps, timestep_spacing)]
    return schedule.timesteps(num_inference_steps, timestep_spacing)


def dpm_solver_timesteps(schedule, num_inference_steps=NUM_INFERENCE_STEPS, timestep_spacing="linspace",
                         lambda_min_clipped=-math.inf):
    """DPM-Solver++'s grid: n times on [t_min, t_clip], t_clip the last time with lambda >= ``lambda_min_clipped``.

    lambda_t = log(alpha_t / sigma_t). On a discrete schedule ``schedules.multistep_timesteps`` (diffusers'
    DPMSolverMultistep grid: n + 1 points spaced, the last, t = 0, dropped), so no model call is spent at t = 0.
    """
    check_positive_int(num_inference_steps, "num_inference_steps")
    t_max = schedule.t_max
    if lambda_min_clipped > -math.inf and _lam(schedule, t_max) < lambda_min_clipped:
        lo, hi = schedule.t_min, t_max  # lambda decreases in t: bisect for lambda(t) = lambda_min
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if _lam(schedule, mid) >= lambda_min_clipped else (lo, mid)
        t_max = math.floor(lo) if schedule.is_discrete else lo
    if schedule.is_discrete:
        T = int(t_max) + 1
        return [float(t) for t in multistep_timesteps(T, min(num_inference_steps, T), timestep_spacing)]
    if t_max == schedule.t_max:
        return schedule.timesteps(num_inference_steps, timestep_spacing)
    n = num_inference_steps
    return [t_max + (schedule.t_min - t_max) * k / max(n - 1, 1) for k in range(n)]


def edm_timesteps(schedule, num_inference_steps=NUM_INFERENCE_STEPS, sigma_spacing="karras", rho=7.0,
                  sigma_min=None, sigma_max=None):
    """The ODE samplers' grid: [(t_k, sigma_k)], sigma = sigma_t / alpha_t descending (EDM's noise levels).

    ``sigma_spacing`` "karras": Karras et al.'s rho-spacing between the schedule's ends (or ``sigma_min`` /
    ``sigma_max``); "timesteps": the schedule's own linspace times.
    """
    check_positive_int(num_inference_steps, "num_inference_steps")
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
    return list(zip(times, sigmas))


def sde_timesteps(schedule, num_inference_steps=NUM_INFERENCE_STEPS):
    """The reverse-SDE grid: n + 1 evenly spaced times t_max -> t_min (n steps between them)."""
    n = check_positive_int(num_inference_steps, "num_inference_steps")
    return [schedule.t_max + (schedule.t_min - schedule.t_max) * k / n for k in range(n + 1)]


def langevin_levels(schedule, num_inference_steps=NUM_INFERENCE_STEPS, steps_per_level=20, step_lr=2e-5):
    """Annealed Langevin's grid: [(t_i, sigma_i, e_i)] repeated ``steps_per_level`` times per level.

    sigma_i = sigma_t / alpha_t geometric from t_max to t_min over ``num_inference_steps`` levels; step size
    e_i = step_lr sigma_i^2 / sigma_L^2 (NCSN).
    """
    levels = check_positive_int(num_inference_steps, "num_inference_steps")
    check_positive_int(steps_per_level, "steps_per_level")
    (a_hi, s_hi), (a_lo, s_lo) = schedule.marginal_host(schedule.t_max), schedule.marginal_host(schedule.t_min)
    hi, lo = s_hi / a_hi, s_lo / a_lo
    sigmas = [hi * (lo / hi) ** (i / max(levels - 1, 1)) for i in range(levels)]
    grid = []
    for sig in sigmas:
        grid += [(schedule.t_from_sigma_ratio(sig), sig, step_lr * (sig / sigmas[-1]) ** 2)] * steps_per_level
    return grid


def _lam(schedule, t):
    a, s = schedule.marginal_host(t)
    return math.log(a) - math.log(s) if a > 0.0 else -math.inf


# ---------------------------------------------------------------------------------------------------
# the loop every sampler shares

Denoised = namedtuple("Denoised", ["x0", "eps", "extra"])
Denoised.__doc__ = """What ``denoise(x, t)`` returns: x_0_hat (after the x0_transform), eps_hat, and ``extra``,
the second half of the model's last axis when the loop splits it (learned variances), else None."""


def _time(point):
    return point[0] if isinstance(point, tuple) else point


def combine(update):
    """sum_i c_i v_i out of place, left to right: the textbook form of a step's update [(c_i, v_i), ...]."""
    (c, v), *rest = update
    out = c * v
    for c, v in rest:
        out = out + c * v
    return out


def _combine_into(x, update, scratch, fresh):
    """``combine(update)`` written into x in place, with the same roundings (bit for bit).

    Every term but x's own is scaled before x changes (a term may alias x: an identity model returns its
    input), in a scratch buffer or, for fresh noise, in place. When x is the first or second term it is
    scaled in place and the first addition swaps its operands, which IEEE addition allows exactly.
    """
    xp = namespace(x)
    own = next((k for k, (_, v) in enumerate(update[:2]) if v is x), None)
    scaled = []
    for k, (c, v) in enumerate(update):
        if k == own or (own is None and k == 0):
            continue
        if any(v is f for f in fresh):
            buf = v  # a draw of this step's: ours to scale
        else:
            while len(scratch) <= len(scaled):
                scratch.append(xp.empty(x.shape, dtype=x.dtype, device=xp.device_of(x)))
            buf = scratch[len(scaled)]
            buf[...] = v
        buf *= c
        scaled.append(buf)
    if own is None:
        x[...] = update[0][1]  # x <- c_0 v_0, now that every other term is read
    x *= update[0 if own is None else own][0]
    for buf in scaled:
        x += buf
    return x


def _start(rng, shape, dtype, x_T, scale=1.0):
    """The sampler's own starting array: scale z with z ~ N(0, I) of ``shape``, or a copy of ``x_T``."""
    if x_T is not None:
        return namespace(x_T).asarray(x_T, copy=True)  # never write into the caller's array
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape:
        raise ValueError("shape: expected (batch, ...), got ()")
    x = rng.normal(shape, dtype=dtype)  # a fresh draw: ours
    if scale != 1.0:
        x *= scale
    return x


def sample_loop(step, grid, model_fn, schedule, rng, shape, *, prediction_type="epsilon", x0_transform=None,
                guidance=None, cond=None, x_T=None, dtype="float32", callback=None, init_scale=1.0,
                split_output=False, fast=True):
    """x = init_scale z (or a copy of x_T), then x <- step(x, grid[k], grid[k+1]) for every grid point.

    ``step(x, t, t_next, denoise, noise) -> [(c_i, v_i), ...]`` with x_next = sum_i c_i v_i; t_next is None
    after the last point. ``denoise(x, t) -> Denoised(x0, eps, extra)`` calls the (guided) model at host time
    t; ``noise()`` draws z ~ N(0, I) like x. ``callback(k, model time of t, snapshot of x)`` after each step.
    ``fast=False`` adds the terms out of place and runs the network without ``reuse_buffers()``. Returns the
    final x (batch, ...).
    """
    check_prediction_type(prediction_type)
    if callback is not None:
        check_callable(callback, "callback", "a callable callback(step, t, x)")
    if x0_transform is not None:
        check_callable(x0_transform, "x0_transform", "a callable x0 -> x0 such as clip_sample(1.0)")
    if guidance is not None:
        model_fn = check_callable(guidance, "guidance", "a wrapper model_fn -> model_fn")(model_fn)
    cond = cond or {}
    x = _start(rng, shape, dtype, x_T, init_scale)
    xp = namespace(x)
    n, fresh, scratch = x.shape[0], [], []

    def denoise(z, t):
        out = model_fn(z, xp.full((n,), schedule.model_time_any(t), dtype=z.dtype, device=xp.device_of(z)), **cond)
        if out.dtype != z.dtype:
            out = xp.astype(out, z.dtype)
        extra = None
        if split_output:
            half = out.shape[-1] // 2
            out, extra = out[..., :half], out[..., half:]
        a, s = schedule.marginal_host(t)
        x0, eps = to_x0_eps(out, z, a, s, prediction_type)
        return Denoised(x0 if x0_transform is None else x0_transform(x0), eps, extra)

    def noise():
        z = rng.normal(x.shape, dtype=x.dtype)
        fresh.append(z)
        return z

    with reuse_buffers() if fast else contextlib.nullcontext():  # the network's large arrays, step after step
        for k, point in enumerate(grid):
            fresh.clear()
            update = step(x, point, grid[k + 1] if k + 1 < len(grid) else None, denoise, noise)
            x = _combine_into(x, update, scratch, fresh) if fast else combine(update)
            if callback is not None:
                callback(k, schedule.model_time_any(_time(point)), xp.asarray(x, copy=True))
    return x


# ---------------------------------------------------------------------------------------------------
# DDPM


def ddpm_step(x, t, t_next, denoise, noise, *, schedule, variance_type="fixed_small"):
    """x_{t-1} = c1_t x_0_hat + c2_t x_t + sqrt(var_t) z, z ~ N(0, I) (no noise at t = 0).

    c1, c2: the posterior mean's coefficients. var_t: fixed_small beta_tilde_t, fixed_large beta_t
    (beta_tilde_1 at t = 0), learned_range exp(f log beta_t + (1 - f) log beta_tilde_t), f = (v + 1) / 2
    with v the model's second half (``Denoised.extra``). x (batch, ...) -> the same shape.
    """
    i = int(t)
    pred = denoise(x, t)
    update = [(schedule.posterior_mean_coef1[i], pred.x0), (schedule.posterior_mean_coef2[i], x)]
    if i > 0:
        if variance_type == "learned_range":
            lo, hi = schedule.posterior_log_variance_clipped[i], math.log(schedule.betas[i])
            f = 0.5 * (pred.extra + 1.0)
            std = namespace(x).exp(0.5 * (f * hi + (1.0 - f) * lo))  # an array in x's dtype
        elif variance_type == "fixed_large":
            std = math.sqrt(schedule.betas[i])
        else:
            std = math.sqrt(schedule.posterior_variance[i])
        update.append((std, noise()))
    return update


def ddpm_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS, timestep_spacing="leading",
                variance_type="fixed_small", prediction_type="epsilon", x0_transform=None, guidance=None, cond=None,
                x_T=None, dtype="float32", callback=None, fast=True):
    """Ancestral sampling (``ddpm_step``) from t = T-1 to 0 on the schedule respaced to ``num_inference_steps``.

    Respacing with ``timestep_spacing`` is Improved DDPM's; None visits every step. ``variance_type``
    "learned_range" reads v from the second half of model_fn's last axis. Returns x_0 with ``shape``.
    """
    check_choice(variance_type, "variance_type", VARIANCE_TYPES)
    schedule, grid = ddpm_timesteps(schedule, num_inference_steps, timestep_spacing)
    _zero_snr_guard(schedule, grid[0], prediction_type, "ddpm_sample")

    def step(x, t, t_next, denoise, noise):
        return ddpm_step(x, t, t_next, denoise, noise, schedule=schedule, variance_type=variance_type)

    return sample_loop(step, grid, model_fn, schedule, rng, shape, prediction_type=prediction_type,
                       x0_transform=x0_transform, guidance=guidance, cond=cond, x_T=x_T, dtype=dtype,
                       callback=callback, split_output=variance_type == "learned_range", fast=fast)


# ---------------------------------------------------------------------------------------------------
# DDIM


def ddim_step(x, t, t_next, denoise, noise, *, schedule, eta=0.0):
    """x_s = alpha_s x_0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z, z ~ N(0, I), from time t to s = t_next.

    c = eta (sigma_s / sigma_t) sqrt(sigma_t^2 - (alpha_t sigma_s / alpha_s)^2), for VP schedules DDIM's
    eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s): eta = 0 is deterministic, eta = 1 DDPM's
    posterior. After the last time s is the end: alpha = 1, sigma = 0.
    """
    a, s = schedule.marginal_host(t)
    a_next, s_next = schedule.marginal_host(t_next) if t_next is not None else (1.0, 0.0)
    pred = denoise(x, t)
    c = 0.0
    if eta > 0.0 and s_next > 0.0:
        shrunk = a * s_next / a_next
        c = eta * s_next / s * math.sqrt(max(s * s - shrunk * shrunk, 0.0))
    update = [(a_next, pred.x0), (math.sqrt(max(s_next * s_next - c * c, 0.0)), pred.eps)]
    if c > 0.0:
        update.append((c, noise()))
    return update


def ddim_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS, timestep_spacing="leading",
                eta=0.0, prediction_type="epsilon", x0_transform=None, guidance=None, cond=None, x_T=None,
                dtype="float32", callback=None, fast=True):
    """DDIM (``ddim_step``) on ``ddim_timesteps``: any schedule; None steps visit every step of a discrete one.

    Returns x_0 of ``shape``.
    """
    eta = check_real(eta, "eta", low=0.0)
    grid = ddim_timesteps(schedule, num_inference_steps, timestep_spacing)
    _zero_snr_guard(schedule, grid[0], prediction_type, "ddim_sample")

    def step(x, t, t_next, denoise, noise):
        return ddim_step(x, t, t_next, denoise, noise, schedule=schedule, eta=float(eta))

    return sample_loop(step, grid, model_fn, schedule, rng, shape, prediction_type=prediction_type,
                       x0_transform=x0_transform, guidance=guidance, cond=cond, x_T=x_T, dtype=dtype,
                       callback=callback, fast=fast)


def ddim_invert(model_fn, schedule, x0, *, num_inference_steps=NUM_INFERENCE_STEPS, prediction_type="epsilon",
                timestep_spacing="leading", fixed_point_iterations=0, cond=None, callback=None):
    """Deterministic DDIM encoding x_0 -> x_T: x_t = alpha_t x_0_hat(x_s) + sigma_t eps_hat(x_t, t), steps ascending.

    The implicit eps_hat(x_t, t) is first approximated by eps_hat(x_s, t) (the usual DDIM inversion);
    ``fixed_point_iterations`` > 0 then iterates x_t <- the exact inverse of the DDIM step, which makes
    ``ddim_sample(..., eta=0, x_T=ddim_invert(...))`` return x_0 to solver precision. x0: (batch, ...).
    """
    check_prediction_type(prediction_type)
    if callback is not None:
        check_callable(callback, "callback", "a callable callback(step, t, x)")
    cond = cond or {}
    grid = list(reversed(ddim_timesteps(schedule, num_inference_steps, timestep_spacing)))
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


def dpm_solver_pp_step(x, t, t_next, denoise, noise, *, schedule, history):
    """x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, h = lambda_s - lambda_t, lambda = log(alpha / sigma).

    D = x_0_hat on the first step, (1 + 1/(2r)) x_0_hat - 1/(2r) x_0_hat_prev after it (r = h_prev / h); the
    last step lands on sigma = 0: x_0 = x_0_hat. ``history`` (a dict, empty at the start) keeps x_0_hat_prev
    and h_prev between steps (its D and x_0_hat_prev buffers are rewritten in place from step to step).
    From alpha = 0 (lambda = -inf) h is inf: e^{-h} = 0, a first-order step.
    """
    a, s = schedule.marginal_host(t)
    x0 = denoise(x, t).x0
    if t_next is None:
        return [(1.0, x0)]
    a_next, s_next = schedule.marginal_host(t_next)
    h = math.log(a_next / s_next) - math.log(a / s) if a > 0.0 else math.inf
    xp = namespace(x0)
    prev = history.get("x0")
    if prev is None:
        D = x0
        # a copy: x0_hat can be the model's output, which a model may reuse on its next call
        history["x0"] = xp.asarray(x0, copy=True)
    else:
        r = history["h"] / h
        # D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev, written into buffers kept in ``history`` (no fresh arrays per
        # step; same roundings as the expression): D is read by the loop before the next step rewrites it
        D = history.get("D")
        if D is None:
            D = history["D"] = xp.asarray(x0, copy=True)
        else:
            D[...] = x0
        D *= 1.0 + 0.5 / r
        prev *= 0.5 / r
        D -= prev
        prev[...] = x0  # x0_hat_prev for the next step
    history["h"] = h
    return [(s_next / s, x), (-(a_next * math.expm1(-h)), D)]


def dpm_solver_pp_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS,
                         timestep_spacing="linspace", lambda_min_clipped=-5.1, prediction_type="epsilon",
                         x0_transform=None, guidance=None, cond=None, x_T=None, dtype="float32", callback=None,
                         fast=True):
    """DPM-Solver++(2M) (``dpm_solver_pp_step``) on ``dpm_solver_timesteps``. Any schedule. Returns x_0 of ``shape``.

    Sampling starts at the last time with lambda >= ``lambda_min_clipped`` (diffusers' option; its default
    is -inf, ours -5.1): at lower lambda an x_0 prediction divides model errors by alpha ~ 0, which the
    second-order term then carries forward (cosine schedules reach lambda = -9.7). -inf disables it.
    """
    grid = dpm_solver_timesteps(schedule, num_inference_steps, timestep_spacing, lambda_min_clipped)
    _zero_snr_guard(schedule, grid[0], prediction_type, "dpm_solver_pp_sample")
    history = {}

    def step(x, t, t_next, denoise, noise):
        return dpm_solver_pp_step(x, t, t_next, denoise, noise, schedule=schedule, history=history)

    return sample_loop(step, grid, model_fn, schedule, rng, shape, prediction_type=prediction_type,
                       x0_transform=x0_transform, guidance=guidance, cond=cond, x_T=x_T, dtype=dtype,
                       callback=callback, fast=fast)


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


def ode_step(x, point, next_point, denoise, noise, *, schedule, method="heun"):
    """The PF-ODE dy/dsigma = eps_hat in y = x / alpha, sigma = sigma_t / alpha_t, one Euler or Heun step:

    x_next = (alpha_next / alpha) x + alpha_next (sigma_next - sigma) d, with d = eps_hat(x, t) (Euler) or,
    for Heun (EDM's second order, except on the last step to sigma = 0), the trapezoid (d + d') / 2 with
    d' = eps_hat at the Euler prediction. Points are (t, sigma); after the last, sigma = 0 and alpha = 1.
    """
    t, sig = point
    t_next, sig_next = next_point if next_point is not None else (None, 0.0)
    a = schedule.marginal_host(t)[0]
    a_next = schedule.marginal_host(t_next)[0] if t_next is not None else 1.0
    d = denoise(x, t).eps
    k = a_next * (sig_next - sig)
    if method == "euler" or t_next is None:
        return [(a_next / a, x), (k, d)]
    d = namespace(d).asarray(d, copy=True)  # the model may reuse its output array on the next call
    d2 = denoise((a_next / a) * x + k * d, t_next).eps  # eps_hat at the Euler prediction
    return [(a_next / a, x), (0.5 * k, d), (0.5 * k, d2)]


def ode_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS, method="heun",
               sigma_spacing="karras", rho=7.0, sigma_min=None, sigma_max=None, prediction_type="epsilon",
               guidance=None, cond=None, x_T=None, dtype="float32", callback=None, fast=True):
    """The probability-flow ODE (``ode_step``, "euler" or "heun") on ``edm_timesteps``. Any schedule.

    ``sigma_max`` (e.g. EDM's 80) skips the near-zero-SNR start where an eps model's errors are divided by
    alpha. Returns x_0 of ``shape``.
    """
    check_choice(method, "method", ("euler", "heun"))
    grid = edm_timesteps(schedule, num_inference_steps, sigma_spacing, rho, sigma_min, sigma_max)

    def step(x, point, next_point, denoise, noise):
        return ode_step(x, point, next_point, denoise, noise, schedule=schedule, method=method)

    return sample_loop(step, grid, model_fn, schedule, rng, shape, prediction_type=prediction_type,
                       guidance=guidance, cond=cond, x_T=x_T, dtype=dtype, callback=callback,
                       init_scale=schedule.marginal_host(grid[0][0])[1], fast=fast)


def ode_solve_ivp_sample(model_fn, schedule, rng, shape, *, method="RK45", rtol=1e-5, atol=1e-5,
                         prediction_type="epsilon", cond=None, x_T=None, dtype="float32", denoise_final=True):
    """The probability-flow ODE dy/dsigma = eps_hat (y = x / alpha) solved by scipy ``solve_ivp`` (adaptive).

    Integrates from sigma(t_max) to sigma(t_min) on the host (one transfer per function evaluation), then
    returns x_0_hat at t_min (``denoise_final``) or y there. Any schedule, any backend. Returns (x_0, nfev).
    """
    from scipy.integrate import solve_ivp

    check_prediction_type(prediction_type)
    cond = cond or {}
    (t_start, sig_start), (t_end, sig_end) = edm_timesteps(schedule, 2, "karras", 7.0)
    x = _start(rng, shape, dtype, x_T, scale=schedule.marginal_host(schedule.t_max)[1])
    dev = namespace(x)
    backend = dev.backend_name
    y0 = to_numpy(x / schedule.marginal_host(t_start)[0])

    def t_array(t):
        return dev.full((x.shape[0],), float(t), dtype=x.dtype, device=dev.device_of(x))
    x_shape, x_dtype = tuple(x.shape), y0.dtype

    def model_at(y, sig):
        t = schedule.t_from_sigma_ratio(sig)
        a, s = schedule.marginal_host(t)
        xt = a * y
        return to_x0_eps(model_fn(xt, t_array(schedule.model_time_any(t)), **cond), xt, a, s, prediction_type)

    def rhs(sig, y_flat):
        _, eps = model_at(to_device(_unflatten(y_flat, x_shape, x_dtype), backend), sig)
        return _flatten64(to_numpy(eps))

    sol = solve_ivp(rhs, (sig_start, sig_end), _flatten64(y0), method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    y = to_device(_unflatten(sol.y[:, -1], x_shape, x_dtype), backend)
    if denoise_final:
        return model_at(y, sig_end)[0], int(sol.nfev) + 1
    return y * schedule.marginal_host(t_end)[0], int(sol.nfev)


def _flatten64(host):
    """A host array as a flat float64 vector (what scipy's solvers integrate)."""
    xp = namespace(host)
    return xp.reshape(xp.astype(host, xp.float64), (-1,))


def _unflatten(flat, shape, dtype):
    xp = namespace(flat)
    return xp.astype(xp.reshape(xp.asarray(flat), shape), dtype)


def euler_maruyama_step(x, t, t_next, denoise, noise, *, schedule, last=False):
    """Reverse SDE dx = [f x - g^2 score] dt + g dw_bar with score = -eps_hat / sigma_t, one Euler-Maruyama step:

    x_next = (1 + f dt) x + (g^2 dt / sigma_t) eps_hat + sqrt(g^2 |dt|) z, dt = t_next - t < 0 (no noise when
    ``last``). f, g^2 from ``sde_coefficients``.
    """
    f, g2 = sde_coefficients(schedule, t)
    s = schedule.marginal_host(t)[1]
    dt = t_next - t
    update = [(1.0 + f * dt, x), (g2 * dt / s, denoise(x, t).eps)]
    if not last:
        update.append((math.sqrt(g2 * abs(dt)), noise()))
    return update


def langevin_step(x, t, sigma, e, denoise, noise, *, schedule, t_next=None):
    """A Langevin move at noise level sigma: y <- y + e score + sqrt(2 e) z, y = x / alpha_t, score = -eps_hat / sigma.

    Written in x at the next point's alpha (within a level the same alpha):
    x_next = (alpha' / alpha) x - alpha' (e / sigma) eps_hat + alpha' sqrt(2 e) z.
    """
    a = schedule.marginal_host(t)[0]
    a_next = schedule.marginal_host(t_next)[0] if t_next is not None else a
    eps = denoise(x, t).eps
    return [(a_next / a, x), (-a_next * e / sigma, eps), (a_next * math.sqrt(2.0 * e), noise())]


def euler_maruyama_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS,
                          denoise_final=True, prediction_type="epsilon", guidance=None, cond=None, x_T=None,
                          dtype="float32", callback=None, fast=True):
    """The reverse SDE by Euler-Maruyama (``euler_maruyama_step``) on ``sde_timesteps``, then x_0_hat at t_min.

    ``denoise_final``: Tweedie's x_0_hat at the end. Any schedule. Returns x_0 of ``shape``.
    """
    return predictor_corrector_sample(model_fn, schedule, rng, shape, num_inference_steps=num_inference_steps,
                                      corrector_steps=0, denoise_final=denoise_final, prediction_type=prediction_type,
                                      guidance=guidance, cond=cond, x_T=x_T, dtype=dtype, callback=callback, fast=fast)


def predictor_corrector_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS,
                               corrector_steps=1, snr=0.16, denoise_final=True, prediction_type="epsilon",
                               guidance=None, cond=None, x_T=None, dtype="float32", callback=None, fast=True):
    """Predictor-corrector (Song et al. 2021): per t, ``corrector_steps`` Langevin moves then an Euler-Maruyama step.

    Langevin step size e = 2 (snr ||z|| / ||score||)^2 (norms averaged over the batch, kept on the device);
    the corrector moves run out of place, the predictor through the loop. ``corrector_steps=0`` is plain
    Euler-Maruyama. Any schedule. Returns x_0 of ``shape``.
    """
    check_nonnegative_int(corrector_steps, "corrector_steps")
    grid = sde_timesteps(schedule, num_inference_steps)
    _zero_snr_guard(schedule, grid[0], prediction_type, "the reverse-SDE samplers (euler_maruyama_sample, "
                    "predictor_corrector_sample)", refuse="the drift f = d log alpha / dt is infinite there; use "
                    "ddpm_sample, ddim_sample or dpm_solver_pp_sample with v_prediction")
    steps = grid[:-1]
    end = grid[-1]

    def step(x, t, t_next, denoise, noise):
        s = schedule.marginal_host(t)[1]
        xp = namespace(x)
        n = x.shape[0]
        for _ in range(corrector_steps):
            # x <- x + e score + sqrt(2 e) z, score = -eps_hat / sigma, e = 2 (snr |z| / |score|)^2
            score = (-1.0 / s) * denoise(x, t).eps
            z = noise()
            score_norm = xp.mean(xp.vector_norm(xp.reshape(score, (n, -1)), axis=-1))
            noise_norm = xp.mean(xp.vector_norm(xp.reshape(z, (n, -1)), axis=-1))
            e = 2.0 * xp.square(snr * noise_norm / score_norm)
            x = x + e * score + xp.sqrt(2.0 * e) * z
        return euler_maruyama_step(x, t, end if t_next is None else t_next, denoise, noise, schedule=schedule,
                                   last=t_next is None)

    x = sample_loop(step, steps, model_fn, schedule, rng, shape, prediction_type=prediction_type,
                    guidance=guidance, cond=cond, x_T=x_T, dtype=dtype, callback=callback,
                    init_scale=schedule.marginal_host(schedule.t_max)[1], fast=fast)
    if denoise_final:
        x = _final_x0(model_fn, schedule, x, end, prediction_type, guidance, cond)
    return x


def _final_x0(model_fn, schedule, x, t, prediction_type, guidance, cond):
    """Tweedie's x_0_hat = (x - sigma_t eps_hat) / alpha_t at the grid's last time."""
    if guidance is not None:
        model_fn = guidance(model_fn)
    xp = namespace(x)
    a, s = schedule.marginal_host(t)
    t_arr = xp.full((x.shape[0],), schedule.model_time_any(t), dtype=x.dtype, device=xp.device_of(x))
    out = model_fn(x, t_arr, **(cond or {}))
    return to_x0_eps(xp.astype(out, x.dtype) if out.dtype != x.dtype else out, x, a, s, prediction_type)[0]


def annealed_langevin_sample(model_fn, schedule, rng, shape, *, num_inference_steps=NUM_INFERENCE_STEPS,
                             steps_per_level=20, step_lr=2e-5, denoise_final=True, prediction_type="epsilon",
                             guidance=None, cond=None, x_T=None, dtype="float32", callback=None, fast=True):
    """Annealed Langevin dynamics (NCSN): ``steps_per_level`` moves (``langevin_step``) per noise level.

    ``num_inference_steps`` noise levels from ``langevin_levels``; the last step adds Tweedie's denoising
    (``denoise_final``). Works on y = x / alpha, so any schedule. Returns x_0 of ``shape``.
    """
    _zero_snr_guard(schedule, schedule.t_max, prediction_type, "annealed_langevin_sample",
                    refuse="its noise levels sigma_t / alpha_t start at t_max, where the ratio is infinite; use "
                    "ddpm_sample, ddim_sample or dpm_solver_pp_sample with v_prediction")
    grid = langevin_levels(schedule, num_inference_steps, steps_per_level, step_lr)

    def step(x, point, next_point, denoise, noise):
        t, sigma, e = point
        return langevin_step(x, t, sigma, e, denoise, noise, schedule=schedule,
                             t_next=next_point[0] if next_point is not None else None)

    x = sample_loop(step, grid, model_fn, schedule, rng, shape, prediction_type=prediction_type,
                    guidance=guidance, cond=cond, x_T=x_T, dtype=dtype, callback=callback,
                    init_scale=schedule.marginal_host(schedule.t_max)[1], fast=fast)
    if denoise_final:
        x = _final_x0(model_fn, schedule, x, grid[-1][0], prediction_type, guidance, cond)
    return x


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
    check_choice(trace, "trace", ("exact", "hutchinson"))
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
