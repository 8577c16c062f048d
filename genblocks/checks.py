"""Checks for users' own blocks, the same ones the genblocks tests use.

- ``check_normalized(log_prob_fn, low, high)``: integral of exp(log_prob_fn) over a box is 1 (1-D, 2-D,
  or a sum over integers).
- ``analytic_gaussian_mixture_model(weights, means, covs, schedule)``: the exact denoiser of Gaussian-mixture
  data under a diffusion schedule (known-truth ``model_fn`` for every sampler); ``check_score(score_fn, x,
  log_prob=... | reference=...)``: a score function equals grad log p.
- ``check_bijector(bijector, params, x)``: round trips, log_det = log|det| of autograd's Jacobian, shapes.
- ``check_autoregressive(fn, x, order)``: output i has a zero Jacobian w.r.t. every input not before i in
  ``order`` (and, with ``complete=True``, a nonzero one w.r.t. every input before it: no blind spot).
"""

import math

from genblocks.backends import namespace, record, to_numpy, use_backend

# ---------------------------------------------------------------------------------------------------
# check_normalized: densities integrate to one


def _bounds(low, high):
    """(lows, highs) as tuples of Python floats of length 1 or 2; ValueError otherwise."""
    def as_tuple(v, name):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (float(v),)
        try:
            out = tuple(float(e) for e in v)
        except TypeError:
            raise ValueError(f"{name}: expected a number or a length-2 sequence of numbers, got {v!r}") from None
        if len(out) not in (1, 2):
            raise ValueError(f"{name}: expected a number or a length-2 sequence of numbers, got {v!r}")
        return out

    lows, highs = as_tuple(low, "low"), as_tuple(high, "high")
    if len(lows) != len(highs):
        raise ValueError(f"low, high: expected the same length, got low={low!r} and high={high!r}")
    for lo, hi in zip(lows, highs):
        if not lo < hi or math.isnan(lo) or math.isnan(hi):
            raise ValueError(f"low, high: expected low < high on every axis, got low={low!r}, high={high!r}")
    return lows, highs


def _values(log_prob_fn, points):
    """exp(log_prob_fn(points)) on the host, as a flat numpy array; -inf log-densities give 0."""
    out = to_numpy(log_prob_fn(points))
    if out.shape != (points.shape[0],):
        raise ValueError(
            f"log_prob_fn: expected shape ({points.shape[0]},) for {tuple(points.shape)} points, got {out.shape}"
        )
    if (out != out).any() or (out == math.inf).any():
        raise AssertionError(f"log_prob_fn: returned NaN or +inf on points inside the box ({out[out != out][:3]})")
    return out


def check_normalized(log_prob_fn, low, high, *, n=None, atol=None, discrete=False, points=None, dtype="float64",
                     backend=None):
    """Integral of exp(log_prob_fn(x)) over [low, high] (a box in 1-D or 2-D) or its sum over integers.

    log_prob_fn: maps points (m,) in 1-D or (m, 2) in 2-D to log-densities (m,). 1-D uses adaptive
    ``scipy.integrate.quad`` (infinite bounds allowed; ``n`` = subinterval limit, default 200; pass the
    density's breakpoints or narrow bumps as ``points`` with finite bounds, or quad may step over them); 2-D a
    midpoint rule on an n x n grid (default 512; finite bounds); ``discrete=True`` sums the mass at
    the integers in [low, high] (1-D). Points are ``dtype`` arrays on ``backend`` (default: the
    current default backend). Returns the integral as a float; raises AssertionError when it is off
    from 1 by more than ``atol`` (default 1e-6 for 1-D and sums, 1e-3 for the 2-D grid).
    """
    lows, highs = _bounds(low, high)
    dim = len(lows)
    if discrete and dim != 1:
        raise ValueError(f"discrete: sums over integers are 1-D only, got low={low!r}, high={high!r}")
    if backend is None:
        return _integrate(namespace(), log_prob_fn, lows, highs, n, atol, discrete, points, dtype)
    with use_backend(backend) as xp:
        return _integrate(xp, log_prob_fn, lows, highs, n, atol, discrete, points, dtype)


def _integrate(xp, log_prob_fn, lows, highs, n, atol, discrete, points, dtype):
    dt = getattr(xp, str(dtype))
    if discrete:
        start, stop = math.ceil(lows[0]), math.floor(highs[0])
        points = xp.arange(start, stop + 1, dtype=dt)
        total = float(math.fsum(math.exp(v) for v in _values(log_prob_fn, points)))
        how, tol = f"sum over the integers {start}..{stop}", 1e-6 if atol is None else atol
    elif len(lows) == 1:
        from scipy.integrate import quad

        def density(t):
            return math.exp(float(_values(log_prob_fn, xp.asarray([t], dtype=dt))[0]))

        limit = 200 if n is None else int(n)
        breaks = None if points is None else [float(p) for p in points]
        if breaks is not None and not all(math.isfinite(v) for v in lows + highs):
            raise ValueError(f"points: scipy.integrate.quad takes points only with finite bounds, got {lows}, {highs}")
        total, err = quad(density, lows[0], highs[0], limit=limit, epsabs=1e-12, epsrel=1e-10, points=breaks)
        how, tol = f"scipy.integrate.quad over [{lows[0]}, {highs[0]}] (error estimate {err:.2g})", atol
        tol = 1e-6 if tol is None else tol
    else:
        if not all(math.isfinite(v) for v in lows + highs):
            raise ValueError(f"low, high: the 2-D grid needs finite bounds, got low={lows}, high={highs}")
        m = 512 if n is None else int(n)
        axes = []
        for lo, hi in zip(lows, highs):
            h = (hi - lo) / m
            axes.append((xp.arange(m, dtype=dt) + 0.5) * h + lo)
        gx = xp.reshape(xp.broadcast_to(xp.reshape(axes[0], (m, 1)), (m, m)), (m * m,))
        gy = xp.reshape(xp.broadcast_to(xp.reshape(axes[1], (1, m)), (m, m)), (m * m,))
        points = xp.stack([gx, gy], axis=-1)
        cell = (highs[0] - lows[0]) * (highs[1] - lows[1]) / (m * m)
        total = float(math.fsum(math.exp(v) for v in _values(log_prob_fn, points))) * cell
        how, tol = f"midpoint rule on a {m}x{m} grid over {lows}..{highs}", 1e-3 if atol is None else atol
    if not abs(total - 1.0) <= tol:
        raise AssertionError(f"check_normalized: integral {total!r} differs from 1 by {abs(total - 1.0):.3g} > "
                             f"atol={tol} ({how})")
    return total


# ---------------------------------------------------------------------------------------------------
# diffusion: the analytic Gaussian-mixture oracle and check_score


class AnalyticGaussianMixture:
    """Data p_0 = sum_k w_k N(mu_k, S_k) seen through x_t = alpha_t x_0 + sigma_t eps: exact at every t.

    p_t = sum_k w_k N(alpha_t mu_k, alpha_t^2 S_k + sigma_t^2 I), score = grad log p_t, optimal
    eps*(x, t) = -sigma_t score and x_0*(x, t) = E[x_0 | x_t] = (x - sigma_t eps*) / alpha_t. Calling the
    object, ``oracle(x, t, **cond)``, returns the ``prediction_type`` prediction, so it plugs into every
    sampler as ``model_fn``. weights (K,), means (K, D), covs (K, D, D); x (n, D), t (n,) on any backend.
    """

    def __init__(self, weights, means, covs, schedule, *, prediction_type="epsilon"):
        from genblocks.blocks.samplers import check_prediction_type

        host = to_numpy({"w": weights, "mu": means, "cov": covs})
        w_shape, mu_shape, cov_shape = (tuple(getattr(host[k], "shape", ())) for k in ("w", "mu", "cov"))
        if len(mu_shape) != 2:
            raise ValueError(f"means: expected shape (K, D), got {mu_shape}")
        K, D = mu_shape
        if w_shape != (K,):
            raise ValueError(f"weights: expected shape ({K},) to match means {mu_shape}, got {w_shape}")
        if cov_shape != (K, D, D):
            raise ValueError(f"covs: expected shape ({K}, {D}, {D}) to match means {mu_shape}, got {cov_shape}")
        hxp = namespace(host)
        if not bool(hxp.all(host["w"] > 0.0)):
            raise ValueError("weights: expected positive mixture weights")
        host["w"] = host["w"] / hxp.sum(host["w"])
        self._host = host
        self._cache = {}
        self.schedule = schedule
        self.prediction_type = check_prediction_type(prediction_type)
        self.num_components, self.dim = K, D

    def __repr__(self):
        return (f"AnalyticGaussianMixture(K={self.num_components}, D={self.dim}, schedule={self.schedule!r}, "
                f"prediction_type={self.prediction_type!r})")

    def _params(self, ref):
        from genblocks.backends import to_device

        xp = namespace(ref)
        key = (xp.backend_name, str(ref.dtype))
        if key not in self._cache:
            dtype = "float64" if "64" in str(ref.dtype) else "float32"
            p = to_device(self._host, xp.backend_name, dtype=dtype)
            p["log_w"] = xp.log(p["w"])
            p["chol"] = xp.linalg.cholesky(p["cov"])
            self._cache[key] = p
        return self._cache[key]

    @property
    def mean(self):
        """E[x_0] = sum_k w_k mu_k: host array (D,)."""
        h = self._host
        return namespace(h).sum(h["w"][:, None] * h["mu"], axis=0)

    @property
    def covariance(self):
        """Cov[x_0] = sum_k w_k (S_k + mu_k mu_k^T) - m m^T: host array (D, D)."""
        h = self._host
        xp = namespace(h)
        m = self.mean
        second = xp.sum(h["w"][:, None, None] * (h["cov"] + h["mu"][:, :, None] * h["mu"][:, None, :]), axis=0)
        return second - m[:, None] * m[None, :]

    def sample(self, rng, n):
        """n draws of x_0 on ``rng``'s backend: array (n, D)."""
        probe = rng.normal((1,), dtype="float64")
        p = self._params(probe)
        xp = namespace(probe)
        k = rng.categorical(xp.broadcast_to(p["log_w"], (n, self.num_components)))
        z = rng.normal((n, self.dim, 1), dtype="float64")
        L = xp.take(p["chol"], k, axis=0)
        return xp.take(p["mu"], k, axis=0) + xp.matmul(L, z)[..., 0]

    def _components(self, x, t):
        xp = namespace(x, t)
        p = self._params(x)
        n, D = x.shape
        if t is None:
            cov = xp.broadcast_to(p["cov"], (n,) + tuple(p["cov"].shape))
            mu = xp.broadcast_to(p["mu"], (n,) + tuple(p["mu"].shape))
        else:
            a, s = self.schedule.marginal(t)
            a = xp.reshape(a, (n, 1, 1, 1))
            s = xp.reshape(s, (n, 1, 1, 1))
            cov = a * a * p["cov"] + (s * s) * xp.eye(D, dtype=x.dtype, device=xp.device_of(x))
            mu = a[..., 0] * p["mu"]
        diff = x[:, None, :] - mu  # (n, K, D)
        sol = xp.linalg.solve(cov, diff[..., None])[..., 0]
        quad = xp.sum(diff * sol, axis=-1)
        logdet = xp.linalg.slogdet(cov)[1]
        logp = p["log_w"] - 0.5 * quad - 0.5 * logdet - 0.5 * D * math.log(2.0 * math.pi)
        return logp, sol

    def log_prob(self, x, t=None):
        """log p_t(x) (t=None: the data density p_0): x (n, D), t (n,) -> (n,)."""
        from genblocks.blocks.ops import logsumexp

        return logsumexp(self._components(x, t)[0], axis=-1)

    def score(self, x, t=None):
        """grad_x log p_t(x) = -sum_k r_k(x) C_k^{-1} (x - alpha mu_k), r = posterior responsibilities: (n, D)."""
        from genblocks.blocks.ops import softmax

        logp, sol = self._components(x, t)
        r = softmax(logp, axis=-1)
        return -namespace(x).sum(r[..., None] * sol, axis=1)

    def eps(self, x, t):
        """Optimal noise prediction eps* = -sigma_t score: (n, D)."""
        s = self.schedule.marginal(t)[1]
        return -namespace(x).reshape(s, (-1, 1)) * self.score(x, t)

    def x0(self, x, t):
        """Optimal data prediction E[x_0 | x_t] = sum_k r_k (mu_k + alpha_t S_k C_k^{-1} (x - alpha_t mu_k)): (n, D).

        Written without dividing by alpha_t, so it is finite at alpha_t = 0 (zero terminal SNR: the data mean).
        """
        from genblocks.blocks.ops import softmax

        xp = namespace(x)
        p = self._params(x)
        logp, sol = self._components(x, t)
        r = softmax(logp, axis=-1)
        a = xp.reshape(self.schedule.marginal(t)[0], (-1, 1, 1))
        post = p["mu"] + a * xp.matmul(p["cov"], sol[..., None])[..., 0]  # (n, K, D)
        return xp.sum(r[..., None] * post, axis=1)

    def __call__(self, x, t, **cond):
        from genblocks.blocks.samplers import from_x0_eps

        xp = namespace(x)
        a, s = self.schedule.marginal(t)
        a, s = xp.reshape(a, (-1, 1)), xp.reshape(s, (-1, 1))
        eps = -s * self.score(x, t)  # both exact; neither divides by alpha_t or sigma_t
        return from_x0_eps(self.x0(x, t), eps, a, s, self.prediction_type)


def analytic_gaussian_mixture_model(weights, means, covs, schedule, *, prediction_type="epsilon"):
    """The exact denoiser of Gaussian-mixture data under ``schedule``: an ``AnalyticGaussianMixture``.

    Use it as ``model_fn`` in any sampler (it returns ``prediction_type`` predictions), or call its
    ``score``, ``eps``, ``log_prob(x, t)`` (the noised marginal), ``sample``, ``mean``, ``covariance``.
    weights (K,), means (K, D), covs (K, D, D).
    """
    return AnalyticGaussianMixture(weights, means, covs, schedule, prediction_type=prediction_type)


def check_score(score_fn, x, *args, log_prob=None, reference=None, rtol=1e-4, atol=1e-6):
    """Check score_fn(x, *args) = grad_x log p(x, *args), the gradient taken by autograd, or = reference(x, *args).

    Also checks shape, dtype and finiteness. ``log_prob`` needs the numpy backend (autograd); ``reference``
    works on any. Returns {"max_abs_error", "max_rel_error"} as floats; AssertionError names the failure.
    """
    from genblocks.backends import grad

    if (log_prob is None) == (reference is None):
        raise ValueError("check_score: give exactly one of log_prob= (autograd reference) or reference=")
    got = score_fn(x, *args)
    if tuple(got.shape) != tuple(x.shape):
        raise AssertionError(f"score_fn: expected output shape {tuple(x.shape)} (that of x), got {tuple(got.shape)}")
    if str(got.dtype) != str(x.dtype):
        raise AssertionError(f"score_fn: expected dtype {x.dtype} (that of x), got {got.dtype}")
    if log_prob is not None:
        if not record(namespace(x).backend_name).differentiable:
            raise TypeError("x: check_score with log_prob= needs the numpy backend (autograd)")
        want = grad(lambda z: namespace(z).sum(log_prob(z, *args)))(x)
    else:
        want = reference(x, *args)
    g, w = to_numpy(got), to_numpy(want)
    hxp = namespace(g)
    if not bool(hxp.all(hxp.isfinite(g))):
        raise AssertionError("score_fn: returned NaN or inf")
    err = hxp.abs(g - w)
    max_abs = float(hxp.max(err))
    max_rel = float(hxp.max(err / (hxp.abs(w) + atol)))
    if not bool(hxp.all(err <= atol + rtol * hxp.abs(w))):
        raise AssertionError(f"score_fn: differs from the reference score (max abs error {max_abs:.3g}, "
                             f"max rel error {max_rel:.3g}, rtol={rtol}, atol={atol})")
    return {"max_abs_error": max_abs, "max_rel_error": max_rel}


# ---------------------------------------------------------------------------------------------------
# check_bijector: invertible maps with correct log-determinants


def check_bijector(bijector, params, x, *, atol=None, context=None):
    """Checks y = f(x) against the bijector protocol, on the numpy backend with autograd's Jacobian.

    - shapes: y has x's shape, each log_det has the batch shape x.shape[:-1]; everything finite;
    - log_det = log|det df/dx| of autograd's Jacobian for every example, and the Jacobian has no entries
      across examples (examples are transformed independently);
    - x == inverse(forward(x)), y == forward(inverse(y)), forward + inverse log-dets sum to 0.
    A bijector whose ``inverse`` raises NotImplementedError (forward-only, e.g. Planar) skips the inverse
    checks. x (..., d) with at least one batch axis; tolerances |a - b| <= atol (1 + |b|), atol defaulting to
    1e-8 for float64 and 1e-4 for float32. Returns a dict of the measured errors; raises AssertionError
    listing every failed check.
    """
    from genblocks.backends import jacobian, to_device

    if getattr(x, "shape", None) is None or len(x.shape) < 2:
        raise ValueError(f"x: expected an array (..., d) with at least one batch axis, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if not hasattr(bijector, "forward") or not hasattr(bijector, "inverse"):
        raise TypeError(f"bijector: expected an object with forward and inverse, got {type(bijector).__name__}")
    params, x, context = to_device((params, x, context), "numpy")
    xp = namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"x: expected a float32 or float64 array, got dtype {x.dtype}")
    if atol is None:
        atol = 1e-8 if x.dtype == xp.float64 else 1e-4
    batch, d = tuple(x.shape[:-1]), x.shape[-1]
    failures, report = [], {}

    def err(a, b):
        """max |a - b| / (1 + |b|), as a Python float (inf when either side is not finite)."""
        a, b = to_numpy(a), to_numpy(b)
        if not (bool(xp.all(xp.isfinite(a))) and bool(xp.all(xp.isfinite(b)))):
            return math.inf
        return float(xp.max(xp.abs(a - b) / (1.0 + xp.abs(b)))) if a.size else 0.0

    def expect(name, value, limit):
        report[name] = value
        if not value <= limit:
            failures.append(f"{name} = {value:.3g} > {limit:.3g}")

    y, log_det = bijector.forward(params, x, context)
    if tuple(y.shape) != tuple(x.shape):
        failures.append(f"forward: y has shape {tuple(y.shape)}, expected x's shape {tuple(x.shape)}")
    if tuple(log_det.shape) != batch:
        failures.append(f"forward: log_det has shape {tuple(log_det.shape)}, expected the batch shape {batch}")
    if failures:
        raise AssertionError("check_bijector: " + "; ".join(failures))
    if not (bool(xp.all(xp.isfinite(y))) and bool(xp.all(xp.isfinite(log_det)))):
        raise AssertionError("check_bijector: forward returned NaN or inf for a finite x")

    # log|det J| per example from the full Jacobian of the flattened batch
    n = math.prod(batch)
    flat = xp.reshape(x, (n * d,))

    def f(v):
        return xp.reshape(bijector.forward(params, xp.reshape(v, x.shape), context)[0], (n * d,))

    jac = xp.reshape(jacobian(f)(flat), (n, d, n, d))
    eye = xp.reshape(xp.eye(n, dtype=jac.dtype), (n, 1, n, 1))
    blocks = xp.sum(jac * eye, axis=2)  # (n, d, d): the diagonal blocks
    expect("max_cross_example_jacobian", float(xp.max(xp.abs(jac * (1.0 - eye)))), atol)
    _, logabsdet = xp.linalg.slogdet(blocks)
    expect("max_log_det_error", err(xp.reshape(log_det, (n,)), logabsdet), atol)
    # conditioning, to tell a defect from arithmetic: a round trip cannot beat about eps |y| / sigma_min(J)
    # in the inverse's input, so an error near that bound is ill-conditioning, not a bug
    s_max = xp.linalg.matrix_norm(blocks, ord="fro")
    inv_norm = xp.linalg.matrix_norm(xp.linalg.inv(blocks), ord="fro")  # >= 1 / sigma_min
    eps = 2.2e-16 if x.dtype == xp.float64 else 1.2e-7
    report["max_jacobian_condition"] = float(xp.max(s_max * inv_norm))
    report["roundtrip_error_floor"] = float(xp.max(eps * (1.0 + xp.max(xp.abs(xp.reshape(y, (n, d))), axis=-1))
                                                   * inv_norm))

    try:
        x_back, inv_log_det = bijector.inverse(params, y, context)
    except NotImplementedError:
        report["inverse"] = "not implemented"
    else:
        if tuple(x_back.shape) != tuple(x.shape) or tuple(inv_log_det.shape) != batch:
            failures.append(f"inverse: shapes {tuple(x_back.shape)} and {tuple(inv_log_det.shape)}, expected "
                            f"{tuple(x.shape)} and {batch}")
        else:
            expect("max_roundtrip_error", err(x_back, x), atol)
            expect("max_log_det_sum", err(log_det + inv_log_det, xp.zeros_like(log_det)), atol)
            y_again, _ = bijector.forward(params, x_back, context)
            expect("max_forward_of_inverse_error", err(y_again, y), atol)
    if failures:
        note = ""
        if report["roundtrip_error_floor"] > atol:
            note = (f" (Jacobian condition number {report['max_jacobian_condition']:.3g}: round-trip errors up to "
                    f"about {report['roundtrip_error_floor']:.3g} are ill-conditioning, not a defect)")
        raise AssertionError(f"check_bijector: {type(bijector).__name__} failed: " + "; ".join(failures) + note)
    return report


# ---------------------------------------------------------------------------------------------------
# check_autoregressive: output i sees only the inputs before i


def check_autoregressive(fn, x, order=None, *, atol=0.0, complete=False):
    """d fn(x)[n, i, ...] / d x[n, j] = 0 unless order[j] < order[i], with autograd's Jacobian on numpy.

    fn maps x (n, D) to (n, D) or (n, D, P) (P parameters per dimension, e.g. logits); ``order[j]`` is the
    step at which x_j is generated (a permutation of range(D); None = natural order 0..D-1, raster order
    for a flattened image). Examples are assumed independent: the Jacobian of the sum over the batch is
    taken, one reverse pass per output (i, p). A dependency counts when |J| > ``atol`` for any example and
    parameter. With ``complete=True`` every input before i must also reach output i (for some example): a
    missing one is a *blind spot* (the masked-convolution PixelCNN's upper-right corner).

    Returns {"dependencies": D x D list of bools (row i: the inputs output i depends on), "violations":
    [(i, j), ...], "blind_spots": [(i, j), ...], "max_violation": largest |J| at a violating pair}; raises
    AssertionError listing the violating (i, j) pairs (and the blind spots with ``complete=True``).
    """
    from genblocks.backends import jacobian, to_device

    if not callable(fn):
        raise TypeError(f"fn: expected a callable x (n, D) -> (n, D) or (n, D, P), got {type(fn).__name__}")
    if getattr(x, "shape", None) is None or len(x.shape) != 2:
        raise ValueError(f"x: expected an array (n, D), got {getattr(x, 'shape', type(x).__name__)}")
    x = to_device(x, "numpy")
    xp = namespace(x)
    if not xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"x: expected a float32 or float64 array, got dtype {x.dtype}")
    n, d = (int(s) for s in x.shape)
    if order is None:
        ranks = list(range(d))
    else:
        try:
            ranks = [int(v) for v in (to_numpy(order) if hasattr(order, "shape") else order)]
        except (TypeError, ValueError):
            raise ValueError(f"order: expected a permutation of range({d}), got {order!r}") from None
        if sorted(ranks) != list(range(d)):
            raise ValueError(f"order: expected a permutation of range({d}) (each of 0..{d - 1} once), got {ranks}")
    out = fn(x)
    shape = tuple(getattr(out, "shape", ()))
    if len(shape) not in (2, 3) or shape[:2] != (n, d):
        raise ValueError(f"fn: expected an output of shape ({n}, {d}) or ({n}, {d}, P), got {shape}")

    def summed(v):  # (n, D) -> (D, P): the batch summed, so one reverse pass per output serves every example
        y = fn(v)
        return xp.sum(xp.reshape(y, (n, d, -1)), axis=0)

    jac = to_numpy(jacobian(summed)(x))  # (D, P, n, D)
    size = xp.max(xp.max(xp.abs(jac), axis=1), axis=1)  # (D_out, D_in): largest |J| over P and examples
    depends = size > atol
    before = xp.asarray([[ranks[j] < ranks[i] for j in range(d)] for i in range(d)])
    violations = [(i, j) for i in range(d) for j in range(d) if bool(depends[i, j]) and not bool(before[i, j])]
    blind = [(i, j) for i in range(d) for j in range(d) if bool(before[i, j]) and not bool(depends[i, j])]
    report = {"dependencies": [[bool(v) for v in row] for row in depends], "violations": violations,
              "blind_spots": blind,
              "max_violation": max((float(size[i, j]) for i, j in violations), default=0.0)}
    problems = []
    if violations:
        problems.append(f"{len(violations)} outputs depend on inputs not before them (output i, input j): "
                        f"{violations[:20]}{' ...' if len(violations) > 20 else ''} (largest |J| "
                        f"{report['max_violation']:.3g})")
    if complete and blind:
        problems.append(f"{len(blind)} blind spots: inputs before the output that never reach it (output i, "
                        f"input j): {blind[:20]}{' ...' if len(blind) > 20 else ''}")
    if problems:
        raise AssertionError("check_autoregressive: " + "; ".join(problems))
    return report
