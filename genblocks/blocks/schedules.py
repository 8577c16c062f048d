"""Noise schedules: x_t = alpha_t x_0 + sigma_t eps, eps ~ N(0, I).

Every schedule answers the same questions, so every sampler works with every schedule:

- ``marginal(t)``: (alpha_t, sigma_t) for an array of times (on the array's backend, differentiable);
- ``marginal_host(t)``: the same for one host time, as Python floats (samplers read these in their loop,
  so nothing is synchronised with a device);
- ``t_min``, ``t_max``, ``timesteps(num_inference_steps)`` (descending host times), ``sample_t(rng, n)``
  (training times) and ``model_time(t)`` (the time value handed to the network).

``DiscreteSchedule`` is DDPM's beta table (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``,
``sigmoid``; diffusers' names) with host float64 tables stored as tuples of Python floats;
``RespacedSchedule`` keeps a subset of its steps (Improved DDPM), recomputing betas from
``alphas_cumprod`` so the respaced process is itself a valid diffusion. ``VPSDE``, ``subVPSDE`` and
``VESDE`` are Song et al.'s continuous-time processes on t in [eps, 1], with ``sde_host(t)`` giving the
drift coefficient f(t) and squared diffusion g(t)^2 of dx = f(t) x dt + g(t) dw.
"""

import math

from genblocks.backends import namespace
from genblocks.blocks.validate import check_positive_int, check_real

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

__all__ = [
    "BETA_SCHEDULES", "TIMESTEP_SPACINGS", "DiscreteSchedule", "RespacedSchedule", "VPSDE", "subVPSDE", "VESDE",
    "karras_sigmas", "space_timesteps", "spaced_timesteps", "multistep_timesteps", "cosine_alpha_bar",
    "rescale_zero_terminal_snr",
    "get_schedule", "check_discrete",
]


# ---------------------------------------------------------------------------------------------------
# host helpers (plain Python floats: schedules are tables, not arrays)


def _linspace(a, b, n):
    if n == 1:
        return [float(a)]
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def _cumprod(values):
    out, acc = [], 1.0
    for v in values:
        acc *= v
        out.append(acc)
    return out


def _sigmoid(z):
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))



def check_discrete(schedule, who):
    """``schedule`` if it has discrete steps (``DiscreteSchedule``, ``RespacedSchedule``), else a TypeError
    saying that ``who`` needs one."""
    if not getattr(schedule, "is_discrete", False):
        raise TypeError(f"schedule: {who} needs a DiscreteSchedule or RespacedSchedule, got {schedule!r}")
    return schedule


def cosine_alpha_bar(t, s=0.008):
    """Improved DDPM's f(t) = cos^2(((t + s) / (1 + s)) pi / 2) for t in [0, 1]; alpha_bar(t) = f(t) / f(0)."""
    return math.cos((t + s) / (1.0 + s) * math.pi / 2.0) ** 2


def rescale_zero_terminal_snr(betas):
    """Shift and scale sqrt(alpha_bar) so that its last value is 0 and its first is unchanged (Lin et al. 2024).

    betas: sequence of T floats -> list of T floats whose alpha_bar_{T-1} = 0 (zero terminal SNR).
    """
    root = [math.sqrt(a) for a in _cumprod([1.0 - b for b in betas])]
    first, last = root[0], root[-1]
    root = [(r - last) * first / (first - last) for r in root]
    abar = [r * r for r in root]
    alphas = [abar[0]] + [abar[i] / abar[i - 1] for i in range(1, len(abar))]
    return [1.0 - a for a in alphas]


def karras_sigmas(num_steps, sigma_min, sigma_max, rho=7.0):
    """EDM noise levels sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..n-1.

    Returns a descending list of ``num_steps`` Python floats from ``sigma_max`` to ``sigma_min``.
    """
    check_positive_int(num_steps, "num_steps")
    sigma_min = check_real(sigma_min, "sigma_min", low=0.0, low_open=True)
    sigma_max = check_real(sigma_max, "sigma_max", low=sigma_min, low_open=True)
    rho = check_real(rho, "rho", low=0.0, low_open=True)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    if num_steps == 1:
        return [sigma_max]
    return [(hi + i / (num_steps - 1) * (lo - hi)) ** rho for i in range(num_steps)]


def space_timesteps(num_timesteps, section_counts):
    """Improved DDPM's strided respacing: the set of original steps to keep.

    ``section_counts`` is "ddimN" (an even stride giving exactly N steps), a comma-separated string
    "10,15,20" or a list of ints: the T steps are cut into equal sections, and section i keeps
    ``section_counts[i]`` steps evenly spread over it (both ends included). Returns a sorted list of ints.
    """
    check_positive_int(num_timesteps, "num_timesteps")
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                wanted = int(section_counts[len("ddim"):])
            except ValueError:
                raise ValueError(f"section_counts: expected 'ddimN' with an int N, got {section_counts!r}") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"section_counts: no integer stride gives exactly {wanted} of {num_timesteps} steps "
                f"(got {section_counts!r}); use a comma-separated count such as '{wanted}'"
            )
        try:
            section_counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"section_counts: expected 'ddimN' or '10,15,20', got {section_counts!r}") from None
    counts = list(section_counts)
    if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts):
        raise ValueError(f"section_counts: expected positive ints, got {section_counts!r}")
    size, extra = divmod(num_timesteps, len(counts))
    kept, start = set(), 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if count > length:
            raise ValueError(f"section_counts: section {i} has {length} steps, cannot keep {count}")
        stride = (length - 1) / (count - 1) if count > 1 else 1.0
        kept.update(start + round(j * stride) for j in range(count))
        start += length
    return sorted(kept)


def spaced_timesteps(num_train_timesteps, num_inference_steps=None, timestep_spacing="leading", steps_offset=0):
    """The descending integer steps of 0..T-1 that a sampler visits (diffusers' ``set_timesteps``).

    linspace: round(linspace(0, T-1, n)); leading: arange(n) * (T // n) + steps_offset; trailing:
    round(arange(T, 0, -T / n)) - 1. ``None`` means every step. Returns a list of ints, descending.
    """
    T = check_positive_int(num_train_timesteps, "num_train_timesteps")
    if num_inference_steps is None:
        return list(range(T - 1, -1, -1))
    check_positive_int(num_inference_steps, "num_inference_steps")
    if num_inference_steps > T:
        raise ValueError(f"num_inference_steps: expected at most num_train_timesteps={T}, "
                         f"got {num_inference_steps}")
    n = num_inference_steps
    if timestep_spacing == "linspace":
        steps = [int(round(v)) for v in _linspace(0.0, T - 1.0, n)]
    elif timestep_spacing == "leading":
        ratio = T // n
        steps = [i * ratio + int(steps_offset) for i in range(n)]
    elif timestep_spacing == "trailing":
        ratio = T / n
        steps = [int(round(T - i * ratio)) - 1 for i in range(n)]
        steps.reverse()
    else:
        raise ValueError(f"timestep_spacing: expected one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    if any(not 0 <= s < T for s in steps):
        raise ValueError(f"steps_offset: steps fall outside [0, {T - 1}] with steps_offset={steps_offset}")
    return sorted(set(steps), reverse=True)


def multistep_timesteps(num_train_timesteps, num_inference_steps, timestep_spacing="linspace", steps_offset=0):
    """The n descending steps a multistep solver visits before its last step to sigma = 0 (DPM-Solver++).

    Unlike ``spaced_timesteps`` no model call is spent at t = 0: n + 1 points are spaced and the last (0) is
    dropped, then the solver steps from the lowest point straight to the clean sample. linspace:
    round(linspace(0, T-1, n+1)) without 0; leading: arange(n+1) * (T // (n+1)) + steps_offset without the
    lowest; trailing: round(arange(T, 0, -T/n)) - 1 (as ``spaced_timesteps``). These are the grids of
    diffusers' ``DPMSolverMultistepScheduler``. Returns a list of ints, descending, without repeats.
    """
    T = check_positive_int(num_train_timesteps, "num_train_timesteps")
    n = check_positive_int(num_inference_steps, "num_inference_steps")
    if n > T:
        raise ValueError(f"num_inference_steps: expected at most num_train_timesteps={T}, got {n}")
    if timestep_spacing == "linspace":
        steps = [int(round(v)) for v in _linspace(0.0, T - 1.0, n + 1)][1:]
    elif timestep_spacing == "leading":
        ratio = T // (n + 1)
        steps = [i * ratio + int(steps_offset) for i in range(1, n + 1)]
    elif timestep_spacing == "trailing":
        return spaced_timesteps(T, n, "trailing")
    else:
        raise ValueError(f"timestep_spacing: expected one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    if any(not 0 <= s < T for s in steps):
        raise ValueError(f"steps_offset: steps fall outside [0, {T - 1}] with steps_offset={steps_offset}")
    return sorted(set(steps), reverse=True)


# ---------------------------------------------------------------------------------------------------
# discrete (DDPM) schedules


class _Discrete:
    """Shared machinery of tables indexed by t = 0..T-1 (``alphas_cumprod`` holds T Python floats)."""

    is_discrete = True

    def _set_tables(self, alphas_cumprod, timestep_map, betas=None):
        abar = tuple(float(a) for a in alphas_cumprod)
        prev = (1.0,) + abar[:-1]
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = prev
        if betas is None:
            self.alphas = tuple(a / p for a, p in zip(abar, prev))
            self.betas = tuple(1.0 - a for a in self.alphas)
        else:
            self.betas = tuple(float(b) for b in betas)
            self.alphas = tuple(1.0 - b for b in self.betas)
        self.snr = tuple(a / (1.0 - a) if a < 1.0 else math.inf for a in abar)
        self.log_snr = tuple(math.log(a) - math.log1p(-a) if 0.0 < a < 1.0 else (math.inf if a >= 1 else -math.inf)
                             for a in abar)
        # Karras / EDM noise level of each step: sigma / alpha
        self.sigmas = tuple(math.sqrt((1.0 - a) / a) if a > 0.0 else math.inf for a in abar)
        # posterior q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, beta_tilde)
        self.posterior_variance = tuple(b * (1.0 - p) / (1.0 - a) if a < 1.0 else 0.0
                                        for b, a, p in zip(self.betas, abar, prev))
        pv = self.posterior_variance
        # log variance clipped at t = 0 (where it is 0) to the value at t = 1, as in Improved DDPM
        first = pv[1] if len(pv) > 1 else self.betas[0]
        self.posterior_log_variance_clipped = tuple(math.log(v if v > 0.0 else first) for v in pv)
        self.posterior_mean_coef1 = tuple(b * math.sqrt(p) / (1.0 - a) if a < 1.0 else 1.0
                                          for b, a, p in zip(self.betas, abar, prev))
        self.posterior_mean_coef2 = tuple((1.0 - p) * math.sqrt(al) / (1.0 - a) if a < 1.0 else 0.0
                                          for al, a, p in zip(self.alphas, abar, prev))
        self.timestep_map = tuple(int(t) for t in timestep_map)
        self.num_train_timesteps = len(abar)
        self.t_min, self.t_max = 0.0, float(len(abar) - 1)

    # -- marginals -------------------------------------------------------------------------------
    def alpha_bar_host(self, t):
        """alpha_bar at host time t in [0, T-1], linear between integer steps (exact at integers)."""
        t = float(t)
        if not 0.0 <= t <= self.t_max:
            raise ValueError(f"t: expected a time in [0, {self.t_max:g}], got {t!r}")
        i = min(int(math.floor(t)), max(self.num_train_timesteps - 2, 0))
        f = t - i
        a = self.alphas_cumprod
        return a[i] if f == 0.0 else (1.0 - f) * a[i] + f * a[i + 1]

    def marginal_host(self, t):
        """(alpha_t, sigma_t) = (sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) as Python floats."""
        abar = self.alpha_bar_host(t)
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def marginal(self, t):
        """(alpha_t, sigma_t) for an array of times t (...,) in [0, T-1], linear in alpha_bar between steps."""
        xp = namespace(t)
        table = xp.asarray(self.alphas_cumprod, dtype=t.dtype, device=xp.device_of(t))
        last = max(self.num_train_timesteps - 2, 0)
        i = xp.clip(xp.floor(t), 0.0, float(last))
        frac = t - i
        idx = xp.astype(i, xp.int64)
        lo = xp.take(table, xp.reshape(idx, (-1,)), axis=0)
        hi = xp.take(table, xp.reshape(xp.minimum(idx + 1, self.num_train_timesteps - 1), (-1,)), axis=0)
        abar = xp.reshape(lo, t.shape) * (1.0 - frac) + xp.reshape(hi, t.shape) * frac
        abar = xp.clip(abar, 0.0, 1.0)
        return xp.sqrt(abar), xp.sqrt(1.0 - abar)

    def model_time(self, t):
        """The time value the network sees for step t: the original training step (respacing keeps it)."""
        return float(self.timestep_map[int(t)])

    def model_time_any(self, t):
        """``model_time`` for a fractional step t (linear between the kept steps' original times)."""
        t = float(t)
        i = min(int(math.floor(t)), self.num_train_timesteps - 1)
        f = t - i
        m = self.timestep_map
        return float(m[i]) if f == 0.0 else (1.0 - f) * m[i] + f * m[i + 1]

    def sample_t(self, rng, n, dtype="float32"):
        """Training times: n integers uniform on {0, ..., T-1}, as a float array of ``dtype``."""
        t = rng.integers(0, self.num_train_timesteps, shape=(n,))
        xp = namespace(t)
        return xp.astype(t, getattr(xp, dtype))

    def timesteps(self, num_inference_steps=None, timestep_spacing="leading", steps_offset=0):
        """The descending integer steps a sampler visits: ``spaced_timesteps`` on this schedule's T."""
        return spaced_timesteps(self.num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset)

    def respace(self, use_timesteps):
        """A ``RespacedSchedule`` keeping the steps in ``use_timesteps`` (ints, or a ``space_timesteps`` spec)."""
        if isinstance(use_timesteps, str):
            use_timesteps = space_timesteps(self.num_train_timesteps, use_timesteps)
        return RespacedSchedule(self, use_timesteps)

    def t_from_sigma_ratio(self, ratio):
        """The (fractional) step whose sigma_t / alpha_t equals ``ratio`` (host bisection)."""
        return _bisect_ratio(self, ratio)


class DiscreteSchedule(_Discrete):
    """DDPM betas: alpha_bar_t = prod_{s<=t} (1 - beta_s); x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    ``beta_schedule``: "linear" (linspace(beta_start, beta_end, T)), "scaled_linear" (linspace of square roots,
    squared), "squaredcos_cap_v2" (Improved DDPM cosine, s = 0.008, betas clipped at ``max_beta`` = 0.999),
    "sigmoid" (sigmoid(linspace(-6, 6, T)) scaled to [beta_start, beta_end]); or ``trained_betas``.
    ``rescale_betas_zero_snr`` makes alpha_bar_{T-1} = 0 (then use ``prediction_type="v_prediction"``).
    Tables (tuples of T Python floats): betas, alphas, alphas_cumprod, alphas_cumprod_prev, snr, log_snr,
    sigmas, posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1/2.
    """

    def __init__(self, beta_schedule="linear", num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, *,
                 trained_betas=None, rescale_betas_zero_snr=False, max_beta=0.999):
        check_positive_int(num_train_timesteps, "num_train_timesteps")
        self.beta_schedule = beta_schedule
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = check_real(beta_start, "beta_start", low=0.0, low_open=True)
        self.beta_end = check_real(beta_end, "beta_end", low=0.0, high=1.0, low_open=True)
        self.max_beta = check_real(max_beta, "max_beta", low=0.0, high=1.0, low_open=True)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.trained_betas = trained_betas
        T = num_train_timesteps
        if trained_betas is not None:
            betas = [float(b) for b in trained_betas]
            if len(betas) != T:
                raise ValueError(f"trained_betas: expected {T} values (num_train_timesteps), got {len(betas)}")
        elif beta_schedule == "linear":
            betas = _linspace(self.beta_start, self.beta_end, T)
        elif beta_schedule == "scaled_linear":
            betas = [v * v for v in _linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), T)]
        elif beta_schedule == "squaredcos_cap_v2":
            betas = [min(1.0 - cosine_alpha_bar((i + 1) / T) / cosine_alpha_bar(i / T), self.max_beta)
                     for i in range(T)]
        elif beta_schedule == "sigmoid":
            betas = [_sigmoid(z) * (self.beta_end - self.beta_start) + self.beta_start
                     for z in _linspace(-6.0, 6.0, T)]
        else:
            raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {beta_schedule!r}")
        if any(not 0.0 < b < 1.0 for b in betas):
            raise ValueError(f"betas: expected every beta in (0, 1), got values in [{min(betas)}, {max(betas)}]")
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        self._set_tables(_cumprod([1.0 - b for b in betas]), range(T), betas=betas)

    def _repr_args(self):
        out = [f"beta_schedule={self.beta_schedule!r}", f"num_train_timesteps={self.num_train_timesteps}"]
        if self.beta_schedule in ("linear", "scaled_linear", "sigmoid"):
            out += [f"beta_start={self.beta_start}", f"beta_end={self.beta_end}"]
        if self.rescale_betas_zero_snr:
            out.append("rescale_betas_zero_snr=True")
        return out

    def __repr__(self):
        return f"DiscreteSchedule({', '.join(self._repr_args())})"


class RespacedSchedule(_Discrete):
    """The steps ``use_timesteps`` of ``parent``, as a diffusion of its own (Improved DDPM respacing).

    alpha_bar'_k = alpha_bar_{t_k} (copied, so exact), beta'_k = 1 - alpha_bar_{t_k} / alpha_bar_{t_{k-1}}.
    ``timestep_map[k] = t_k`` is the time the network is called with.
    """

    def __init__(self, parent, use_timesteps):
        if not isinstance(parent, _Discrete):
            raise TypeError(f"parent: expected a DiscreteSchedule, got {type(parent).__name__}")
        kept = sorted(set(int(t) for t in use_timesteps))
        if not kept or kept[0] < 0 or kept[-1] >= parent.num_train_timesteps:
            raise ValueError(f"use_timesteps: expected steps in [0, {parent.num_train_timesteps - 1}], got {kept}")
        self.parent = parent
        self.use_timesteps = tuple(kept)
        self._set_tables([parent.alphas_cumprod[t] for t in kept], [parent.timestep_map[t] for t in kept])

    def __repr__(self):
        return f"RespacedSchedule({self.parent!r}, {len(self.use_timesteps)} steps)"


# ---------------------------------------------------------------------------------------------------
# continuous-time SDEs (Song et al. 2021), t in [eps, 1]


class _Continuous:
    is_discrete = False
    t_max = 1.0

    def marginal_host(self, t):
        raise NotImplementedError

    def model_time(self, t):
        """Continuous schedules hand the network t itself."""
        return float(t)

    model_time_any = model_time

    def sample_t(self, rng, n, dtype="float32"):
        """Training times uniform on [eps, 1]: array (n,) of ``dtype``."""
        return rng.uniform((n,), dtype=dtype, low=self.t_min, high=1.0)

    def timesteps(self, num_inference_steps=1000, timestep_spacing="linspace", steps_offset=0):
        """n descending times from 1 to eps (uniform grid)."""
        check_positive_int(num_inference_steps, "num_inference_steps")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        return _linspace(1.0, self.t_min, num_inference_steps)

    def t_from_sigma_ratio(self, ratio):
        """The time whose sigma_t / alpha_t equals ``ratio`` (host bisection)."""
        return _bisect_ratio(self, ratio)

    def prior_std_host(self):
        """Standard deviation of the Gaussian prior at t = 1 (per coordinate)."""
        return self.marginal_host(1.0)[1]


def _vp_integral(beta_min, beta_max, t):
    return beta_min * t + 0.5 * (beta_max - beta_min) * t * t


class VPSDE(_Continuous):
    """Variance preserving SDE dx = -beta(t)/2 x dt + sqrt(beta(t)) dw, beta(t) = b_min + t (b_max - b_min).

    Marginal: alpha_t = exp(-B(t)/2), sigma_t = sqrt(1 - exp(-B(t))) with B(t) = int_0^t beta.
    """

    def __init__(self, beta_min=0.1, beta_max=20.0, *, eps=1e-3):
        self.beta_min = check_real(beta_min, "beta_min", low=0.0, low_open=True)
        self.beta_max = check_real(beta_max, "beta_max", low=self.beta_min, low_open=True)
        self.eps = self.t_min = check_real(eps, "eps", low=0.0, high=1.0, low_open=True)

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, eps={self.eps})"

    def beta_host(self, t):
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def marginal_host(self, t):
        B = _vp_integral(self.beta_min, self.beta_max, float(t))
        return math.exp(-0.5 * B), math.sqrt(-math.expm1(-B))

    def marginal(self, t):
        """(alpha_t, sigma_t) for an array of times."""
        xp = namespace(t)
        B = _vp_integral(self.beta_min, self.beta_max, t)
        return xp.exp(-0.5 * B), xp.sqrt(-xp.expm1(-B))

    def sde_host(self, t):
        """(f(t), g(t)^2) with dx = f(t) x dt + g(t) dw: (-beta/2, beta)."""
        beta = self.beta_host(float(t))
        return -0.5 * beta, beta


class subVPSDE(VPSDE):
    """sub-VP SDE dx = -beta/2 x dt + sqrt(beta (1 - exp(-2 B(t)))) dw.

    Marginal: alpha_t = exp(-B/2), sigma_t = 1 - exp(-B) (never above the VP one).
    """

    def __repr__(self):
        return f"subVPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, eps={self.eps})"

    def marginal_host(self, t):
        B = _vp_integral(self.beta_min, self.beta_max, float(t))
        return math.exp(-0.5 * B), -math.expm1(-B)

    def marginal(self, t):
        xp = namespace(t)
        B = _vp_integral(self.beta_min, self.beta_max, t)
        return xp.exp(-0.5 * B), -xp.expm1(-B)

    def sde_host(self, t):
        t = float(t)
        beta = self.beta_host(t)
        B = _vp_integral(self.beta_min, self.beta_max, t)
        return -0.5 * beta, beta * -math.expm1(-2.0 * B)


class VESDE(_Continuous):
    """Variance exploding SDE dx = sqrt(d sigma^2/dt) dw, sigma(t) = s_min (s_max / s_min)^t.

    Marginal: alpha_t = 1, sigma_t = sigma(t) (the data are seen with noise s_min at t = 0).
    """

    def __init__(self, sigma_min=0.01, sigma_max=50.0, *, eps=1e-5):
        self.sigma_min = check_real(sigma_min, "sigma_min", low=0.0, low_open=True)
        self.sigma_max = check_real(sigma_max, "sigma_max", low=self.sigma_min, low_open=True)
        self.eps = self.t_min = check_real(eps, "eps", low=0.0, high=1.0, low_open=True)

    def __repr__(self):
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, eps={self.eps})"

    def sigma_host(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** float(t)

    def marginal_host(self, t):
        return 1.0, self.sigma_host(t)

    def marginal(self, t):
        xp = namespace(t)
        sigma = self.sigma_min * xp.exp(t * math.log(self.sigma_max / self.sigma_min))
        return xp.ones_like(t), sigma

    def sde_host(self, t):
        sigma = self.sigma_host(t)
        return 0.0, 2.0 * sigma * sigma * math.log(self.sigma_max / self.sigma_min)

    def t_from_sigma_ratio(self, ratio):
        return math.log(ratio / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)


def _bisect_ratio(schedule, ratio, iters=100):
    """t in [t_min, t_max] with sigma_t / alpha_t = ratio (monotone increasing in t); clipped at the ends."""
    def r(t):
        a, s = schedule.marginal_host(t)
        return s / a if a > 0.0 else math.inf

    lo, hi = schedule.t_min, schedule.t_max
    if ratio <= r(lo):
        return lo
    if ratio >= r(hi):
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if r(mid) < ratio:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def get_schedule(name, **kw):
    """A schedule by name: one of BETA_SCHEDULES (a DiscreteSchedule), "vp", "subvp" or "ve"."""
    if name in BETA_SCHEDULES:
        return DiscreteSchedule(name, **kw)
    table = {"vp": VPSDE, "subvp": subVPSDE, "ve": VESDE}
    if name not in table:
        raise ValueError(f"name: expected one of {BETA_SCHEDULES + tuple(table)}, got {name!r}")
    return table[name](**kw)
