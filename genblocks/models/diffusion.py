"""Diffusion models: DDPM (Ho et al. 2020), DDIM sampling, Improved DDPM (Nichol & Dhariwal 2021).

The forward process adds Gaussian noise, x_t = alpha_t x_0 + sigma_t eps, along a schedule
(``genblocks.blocks.schedules``). A network learns to undo it by predicting eps, x_0 or
v = alpha_t eps - sigma_t x_0 (``prediction_type``) from (x_t, t[, y]). Read this file top to bottom:

1. the training loss: L_simple = E_{t, x_0, eps} w(t) |f_theta(x_t, t) - target|^2, with optional min-SNR
   weighting (``snr_gamma``), importance sampling of t (``timestep_sampling="importance"``), learned
   variances (``variance_type="learned_range"``, hybrid loss L_simple + lambda L_vlb) and label dropout
   for classifier-free guidance (``cond_drop_prob``);
2. the variational bound: ``loss_terms`` gives L_T (prior), L_{T-1}..L_1 (KL terms) and L_0 (decoder),
   ``nll_bound`` their sum in bits/dim; the decoder p(x_0 | x_1) of discrete data is a Gaussian
   discretized over the bins, or a categorical over the levels (``decoder="categorical"``, with an optional
   decoder network of its own);
3. the probability-flow ODE likelihood (``log_prob``), sampling with any sampler of
   ``genblocks.blocks.samplers`` (``sample``), and the noise-aware classifier for classifier guidance.
"""

import math
from functools import partial

from genblocks.backends import namespace
from genblocks.blocks import samplers as S
from genblocks.blocks.base import Block, check_array, warn_if_far_from_unit_scale
from genblocks.blocks.ops import LOG_2, log_sigmoid, log_softmax, stop_gradient
from genblocks.blocks.schedules import check_discrete

__all__ = ["Diffusion", "LossSecondMomentSampler", "NoisyClassifier", "normal_kl",
           "discretized_gaussian_log_likelihood", "SAMPLERS"]

SAMPLERS = {
    "ddpm": S.ddpm_sample,
    "ddim": S.ddim_sample,
    "dpm_solver_pp": S.dpm_solver_pp_sample,
    "heun": lambda *a, **k: S.ode_sample(*a, method="heun", **k),
    "euler": lambda *a, **k: S.ode_sample(*a, method="euler", **k),
    "euler_maruyama": S.euler_maruyama_sample,
    "predictor_corrector": S.predictor_corrector_sample,
    "annealed_langevin": S.annealed_langevin_sample,
}


# ---------------------------------------------------------------------------------------------------
# Gaussian pieces of the variational bound


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, e^{v1}) || N(m2, e^{v2})) = (v2 - v1 + e^{v1 - v2} + (m1 - m2)^2 e^{-v2} - 1) / 2, elementwise."""
    xp = namespace(mean1, logvar1, mean2, logvar2)
    return 0.5 * (logvar2 - logvar1 + xp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * xp.exp(-logvar2) - 1.0)


def _approx_probit_logit(xp, z):
    # Improved DDPM's tanh form of Phi: Phi(z) ~ 0.5 (1 + tanh(g(z))) = sigmoid(2 g(z)),
    # g(z) = sqrt(2/pi) (z + 0.044715 z^3) increasing from -inf to inf, so it is itself an exact CDF
    # (erf is not in every array namespace); returns 2 g(z), the logit of that CDF
    return (2.0 * math.sqrt(2.0 / math.pi)) * (z + 0.044715 * z * z * z)


def _log_one_minus_exp_neg(xp, d):
    """log(1 - e^{-d}) for d > 0, each branch fed only inputs where it is finite (so gradients stay finite)."""
    small = d < LOG_2
    d_small = xp.where(small, d, LOG_2)
    d_big = xp.where(small, LOG_2, d)
    tiny = xp.where(d_small > 1e-30, d_small, 1e-30)
    return xp.where(small, xp.log(-xp.expm1(-tiny)), xp.log1p(-xp.exp(-d_big)))


def discretized_gaussian_log_likelihood(x, mean, logvar, num_bins=256):
    """log P(bin of x) under N(mean, e^logvar) for data on num_bins levels scaled to [-1, 1], elementwise.

    P = F((x + 1/(K-1) - m)/s) - F((x - 1/(K-1) - m)/s), the edge bins taking the whole tail, with
    F(z) = sigmoid(u(z)), u(z) = 2 sqrt(2/pi) (z + 0.044715 z^3): Improved DDPM's tanh approximation of
    the normal CDF (within 2e-4 of it), an exact CDF in its own right, so the K probabilities sum to 1
    and -log P is a proper discrete decoder. Computed in log space without clipping:
    sigmoid(u) - sigmoid(v) = sigmoid(u) sigmoid(-v) (1 - e^{v - u}), so
    log P = log_sigmoid(u) + log_sigmoid(-v) + log(1 - e^{-(u - v)}) for the inner bins.
    """
    xp = namespace(x, mean, logvar)
    half = 1.0 / (num_bins - 1)
    inv_std = xp.exp(-0.5 * logvar)
    centred = x - mean
    u = _approx_probit_logit(xp, inv_std * (centred + half))
    v = _approx_probit_logit(xp, inv_std * (centred - half))
    log_cdf_plus = log_sigmoid(u)
    log_one_minus_cdf_min = log_sigmoid(-v)
    log_delta = log_cdf_plus + log_one_minus_cdf_min + _log_one_minus_exp_neg(xp, u - v)
    edge = 1.0 - half
    return xp.where(x < -edge, log_cdf_plus, xp.where(x > edge, log_one_minus_cdf_min, log_delta))


# ---------------------------------------------------------------------------------------------------
# Improved DDPM's importance sampling of t


class LossSecondMomentSampler:
    """Sample t with p_t proportional to sqrt(E[L_t^2]) over the last ``history`` losses at t (uniform until filled).

    p is mixed with ``uniform_prob`` of the uniform law; losses are reweighted by 1 / (T p_t) so the
    objective stays unbiased. The class only holds the constants; the loss history is a state tree
    ``{"loss_history": (T, history) float64, "counts": (T,) int64}`` (``init_state``) that ``update``
    returns anew and never changes in place, so it travels with the params through ``fit`` and its
    checkpoints (a resume into a fresh model object continues exactly). ``loss_history[t, -1]`` is the
    newest loss recorded at t; ``counts[t]`` how many were recorded there in all.
    """

    def __init__(self, num_timesteps, *, history=10, uniform_prob=0.001):
        self.num_timesteps = int(num_timesteps)
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)

    def __repr__(self):
        return f"LossSecondMomentSampler(num_timesteps={self.num_timesteps}, history={self.history})"

    def init_state(self, xp=None):
        """The empty history: zeros (T, history) float64 and zero counts (T,) int64."""
        xp = namespace() if xp is None else xp
        return {"loss_history": xp.zeros((self.num_timesteps, self.history), dtype=xp.float64),
                "counts": xp.zeros((self.num_timesteps,), dtype=xp.int64)}

    def check_state(self, state, name="state"):
        if not isinstance(state, dict) or set(state) != {"loss_history", "counts"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{name}: expected {{'loss_history', 'counts'}} from Diffusion.init_state(), got {got}")
        want = {"loss_history": (self.num_timesteps, self.history), "counts": (self.num_timesteps,)}
        for key, shape in want.items():
            got = tuple(getattr(state[key], "shape", ()))
            if got != shape:
                raise ValueError(f"{name}['{key}']: expected shape {shape} (num_timesteps, history), got {got}")
        return state

    def warmed_up(self, state):
        xp = namespace(state)
        return bool(xp.all(state["counts"] >= self.history))

    def probabilities(self, state):
        """p_t as a float64 array (T,) on the state's backend (uniform until every t has ``history`` losses)."""
        xp = namespace(state)
        T = self.num_timesteps
        h = state["loss_history"]
        uniform = xp.full((T,), 1.0 / T, dtype=h.dtype)
        if not self.warmed_up(state):
            return uniform
        root = xp.sqrt(xp.mean(h * h, axis=1))
        total = xp.sum(root)
        if not float(total) > 0.0:
            return uniform
        return (1.0 - self.uniform_prob) * root / total + self.uniform_prob / T

    def sample(self, state, rng, n, dtype="float32"):
        """(t, weights): t float array (n,) drawn from p, weights 1 / (T p_t) (n,) on ``rng``'s backend."""
        p = self.probabilities(state)
        xp = namespace(p)
        idx = rng.categorical(xp.log(p), shape=(n,))
        table = xp.astype(1.0 / (self.num_timesteps * p), getattr(xp, dtype))
        return xp.astype(idx, getattr(xp, dtype)), xp.take(table, idx, axis=0)

    def update(self, state, t, losses):
        """The state after recording per-example losses (n,) at their steps t (n,), in batch order.

        Each row is a shift register: the c_t new losses at t push out its c_t oldest, e.g. with
        history 3, row [a, b, c] and new losses (d, e) at t gives [c, d, e]. Pure: ``state`` is unchanged.
        """
        xp = namespace(state)
        T, H = self.num_timesteps, self.history
        old = state["loss_history"]
        ti = xp.astype(t, xp.int64)
        vals = xp.astype(stop_gradient(losses), old.dtype)
        n = ti.shape[0]
        # the examples grouped by t, in batch order within each t (unique keys t n + i make any sort stable)
        order = xp.argsort(ti * n + xp.arange(n, dtype=xp.int64))
        sorted_t = xp.take(ti, order, axis=0)
        sorted_vals = xp.take(vals, order, axis=0)
        steps = xp.arange(T, dtype=xp.int64)
        start = xp.searchsorted(sorted_t, steps, side="left")  # (T,) first sorted example at t
        c = xp.astype(xp.searchsorted(sorted_t, steps, side="right"), xp.int64) - xp.astype(start, xp.int64)
        k = xp.arange(H, dtype=xp.int64)[None, :] + c[:, None]  # (T, H): index into [old row, new losses]
        rows = xp.arange(T, dtype=xp.int64)[:, None]
        kept = xp.take(xp.reshape(old, (T * H,)), xp.reshape(rows * H + xp.where(k < H, k, H - 1), (T * H,)), axis=0)
        kept = xp.reshape(kept, (T, H))
        pos = xp.astype(start, xp.int64)[:, None] + k - H  # the new loss that lands in each slot (when k >= H)
        pos = xp.where(k < H, 0, xp.where(pos < n, pos, n - 1))
        fresh = xp.reshape(xp.take(sorted_vals, xp.reshape(pos, (T * H,)), axis=0), (T, H))
        return {"loss_history": xp.where(k < H, kept, fresh), "counts": state["counts"] + c}


# ---------------------------------------------------------------------------------------------------
# the model


class Diffusion(Block):
    """Denoising diffusion model: minimise E_{t, x_0, eps} w(t) |f_theta(alpha_t x_0 + sigma_t eps, t, y) - target|^2.

    target: eps ("epsilon"), x_0 ("sample") or v = alpha_t eps - sigma_t x_0 ("v_prediction").
    ``snr_gamma`` (min-SNR-gamma): w = min(SNR, gamma) / SNR for eps, / (SNR + 1) for v, min(SNR, gamma) for x_0.
    ``variance_type="learned_range"``: the network outputs twice the channels (prediction, v in [-1, 1]) and the
    loss adds ``vlb_weight`` * T * L_t (nats per dim, mean prediction held fixed): Improved DDPM's hybrid loss.
    ``vlb_trains_mean=True`` lets L_t's gradient reach the mean prediction too (L_t's mean part is
    |mu_tilde(x_t, x_0) - mu_theta(x_t, t)|^2 / (2 sigma_theta^2), an eps-loss weighted as the bound weighs it), so the
    loss is L_simple + ``vlb_weight`` T L_vlb with both parts training the mean: a direct push on the bound.
    ``decoder_variance``: the top of the learned variance range at t = 0 (the decoder p(x_0 | x_1)).
    "posterior" (DDPM's table): sigma~^2_1, the bottom of the range too, so the decoder's variance is fixed;
    "beta": beta_0 = 1 - alpha_bar_0, the first forward step's variance, so the decoder learns
    log sigma^2 = f log beta_0 + (1 - f) log sigma~^2_1, f = (v + 1) / 2 (useful when the first step is large,
    e.g. the merged first step of a truncated schedule).
    ``timestep_sampling="importance"`` draws t by ``LossSecondMomentSampler`` from a loss history kept in a
    state tree (``init_state``, ``loss_and_state``), not on the model object. ``cond_drop_prob`` replaces labels by
    the null token (``num_classes``) for classifier-free guidance. ``decoder``: "gaussian" (continuous data) or
    "discretized" (data on ``num_bins`` levels scaled to [-1, 1]) or "categorical" (the same data; see below).
    Batches: x (n, *data_shape) or (x, y).

    ``decoder="categorical"``: p(x_0 = v_k | x_1) = softmax_k(-(x_1 - a_0 v_k)^2 / (2 s_0^2) + g_k(x_1)) per
    dimension, v_k = -1 + 2k / (K - 1) the K = ``num_bins`` levels, (a_0, s_0) the first step's marginal.
    With g = 0 this is the exact posterior of the levels under a uniform prior; ``decoder_network`` (a block
    x_1 (n, *data_shape) -> g (n, *data_shape, K), e.g. ``LevelDecoder``) learns g from the whole of x_1 (its
    params sit beside the network's: {"network": ..., "decoder": ...}) and trains on its own term,
    -log p(x_0 | x_1) per dimension on every example of every batch. The score network then has no share
    in L_0: its L_vlb at t = 0 is 0. Sampling ("ddpm" or "ddim", a grid ending at t = 0) draws x_0 from
    the decoder given the x that enters the last step.
    """

    def __init__(self, network, schedule, *, prediction_type="epsilon", variance_type="fixed_small", snr_gamma=None,
                 timestep_sampling="uniform", vlb_weight=0.001, cond_drop_prob=0.0, num_classes=None,
                 data_shape=None, decoder="gaussian", num_bins=256, vlb_trains_mean=False,
                 decoder_variance="posterior", decoder_network=None):
        self.network = network
        self.schedule = schedule
        self.prediction_type = S.check_prediction_type(prediction_type)
        if variance_type not in S.VARIANCE_TYPES:
            raise ValueError(f"variance_type: expected one of {S.VARIANCE_TYPES}, got {variance_type!r}")
        self.variance_type = variance_type
        if snr_gamma is not None and not float(snr_gamma) > 0.0:
            raise ValueError(f"snr_gamma: expected a positive float or None, got {snr_gamma!r}")
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        if timestep_sampling not in ("uniform", "importance"):
            raise ValueError(f"timestep_sampling: expected 'uniform' or 'importance', got {timestep_sampling!r}")
        self.timestep_sampling = timestep_sampling
        self.vlb_weight = float(vlb_weight)
        if vlb_trains_mean and variance_type != "learned_range":
            raise ValueError("vlb_trains_mean: needs variance_type='learned_range' (the loss has no L_vlb otherwise)")
        self.vlb_trains_mean = bool(vlb_trains_mean)
        if decoder_variance not in ("posterior", "beta"):
            raise ValueError(f"decoder_variance: expected 'posterior' or 'beta', got {decoder_variance!r}")
        self.decoder_variance = decoder_variance
        if not 0.0 <= float(cond_drop_prob) < 1.0:
            raise ValueError(f"cond_drop_prob: expected a probability in [0, 1), got {cond_drop_prob!r}")
        self.cond_drop_prob = float(cond_drop_prob)
        self.num_classes = num_classes if num_classes is not None else getattr(network, "num_classes", None)
        if self.cond_drop_prob > 0.0 and self.num_classes is None:
            raise ValueError("cond_drop_prob: label dropout needs a class-conditional network (num_classes)")
        if decoder not in ("gaussian", "discretized", "categorical"):
            raise ValueError(f"decoder: expected 'gaussian', 'discretized' or 'categorical', got {decoder!r}")
        self.decoder = decoder
        self.num_bins = int(num_bins)
        if decoder in ("discretized", "categorical") and self.num_bins < 2:
            raise ValueError(f"num_bins: expected at least 2 levels, got {num_bins!r}")
        if decoder == "categorical" and not getattr(schedule, "is_discrete", False):
            raise ValueError(f"schedule: decoder='categorical' needs a DiscreteSchedule (its first step gives "
                             f"x_1), got {schedule!r}")
        if decoder_network is not None:
            if decoder != "categorical":
                raise ValueError(f"decoder_network: only decoder='categorical' has a decoder network, "
                                 f"got decoder={decoder!r}")
            if not (callable(getattr(decoder_network, "init", None)) and callable(getattr(decoder_network, "apply",
                                                                                        None))):
                raise ValueError(f"decoder_network: expected a block with init(rng, dtype) and apply(params, x_1), "
                                 f"got {decoder_network!r}")
        self.decoder_network = decoder_network
        if data_shape is None and hasattr(network, "dim"):
            data_shape = (network.dim,)
        self.data_shape = None if data_shape is None else tuple(data_shape)
        needs_table = variance_type == "learned_range" or timestep_sampling == "importance"
        if needs_table and not getattr(schedule, "is_discrete", False):
            raise ValueError(f"schedule: variance_type={variance_type!r} / timestep_sampling={timestep_sampling!r} "
                             f"need a DiscreteSchedule, got {schedule!r}")
        if getattr(schedule, "is_discrete", False) and schedule.timestep_map != tuple(range(len(schedule.betas))):
            raise ValueError("schedule: train on the full schedule; respace it only for sampling")
        self.timestep_sampler = (LossSecondMomentSampler(schedule.num_train_timesteps)
                                 if timestep_sampling == "importance" else None)

    def __repr__(self):
        return (f"Diffusion({self.network!r}, {self.schedule!r}, prediction_type={self.prediction_type!r}, "
                f"variance_type={self.variance_type!r}, snr_gamma={self.snr_gamma}, "
                f"timestep_sampling={self.timestep_sampling!r}, cond_drop_prob={self.cond_drop_prob}, "
                f"decoder={self.decoder!r}, decoder_network={self.decoder_network!r})")

    def init(self, rng, dtype="float32"):
        """The network's params, or {"network": ..., "decoder": ...} with a ``decoder_network``."""
        if self.decoder_network is None:
            return self.network.init(rng, dtype)
        r_net, r_dec = rng.split(2)
        return {"network": self.network.init(r_net, dtype), "decoder": self.decoder_network.init(r_dec, dtype)}

    # -- the network as a model_fn -------------------------------------------------------------------
    def _apply(self, params, x, t, y=None):
        if self.decoder_network is not None:
            params = params["network"]
        if self.num_classes is None:
            if y is not None:
                raise ValueError("y: this model is unconditional (num_classes=None), got labels")
            return self.network.apply(params, x, t)
        return self.network.apply(params, x, t, y)

    def _split(self, out, x):
        if self.variance_type != "learned_range":
            return out, None
        c = x.shape[-1]
        if out.shape[-1] != 2 * c:
            raise ValueError(f"network: learned_range needs 2 x {c} output channels, got {out.shape[-1]}")
        return out[..., :c], out[..., c:]

    def model_fn(self, params, *, full=False, shared_time=False):
        """model_fn(x, t, y=None) -> prediction (with ``full``, the learned-range outputs too) for the samplers.

        ``shared_time=True`` promises that every call passes one time for the whole batch (every sampler in
        ``genblocks.blocks.samplers`` does). A network that says it can use that (``accepts_shared_time``:
        ``MLPScoreNet``, ``UNet``) then gets t[:1], embeds it once and broadcasts it, instead of embedding the
        same time n times (for ``MLPScoreNet`` over half of the forward's arithmetic); others get t as it is.
        """
        shared = shared_time and getattr(self.network, "accepts_shared_time", False)

        def fn(x, t, y=None):
            out = self._apply(params, x, t[:1] if shared else t, y)
            return out if full else self._split(out, x)[0]

        return fn

    # -- 1. the training loss ------------------------------------------------------------------------
    def _unpack(self, batch):
        if isinstance(batch, dict):
            return batch["x"], batch.get("y")
        if isinstance(batch, (tuple, list)):
            if len(batch) == 1:
                return batch[0], None
            return batch[0], batch[1]
        return batch, None

    def _bshape(self, v, x):
        xp = namespace(v)
        return xp.reshape(v, (x.shape[0],) + (1,) * (x.ndim - 1))

    def init_state(self, params=None, dtype="float32"):
        """The model's non-trained state: the importance sampler's loss history, else ``{}``.

        ``{"loss_history": (T, history) float64 zeros, "counts": (T,) int64 zeros}`` when
        ``timestep_sampling="importance"``, on the backend of ``params`` (default backend without them);
        ``dtype`` is accepted for the common ``init_state`` signature (the history is always float64).
        The state comes from ``init_state`` beside ``init``'s params (rather than being returned by
        ``init``) so that ``init -> params`` stays the protocol of every block; train with
        ``fit(model.loss_and_state, params, data, rng, opt, steps, state=model.init_state(params))``.
        """
        if self.timestep_sampler is None:
            return {}
        return self.timestep_sampler.init_state(namespace(params) if params is not None else None)

    def loss_and_state(self, params, state, batch, rng):
        """(loss, new_state): the denoising loss with t drawn from ``state``'s probabilities, and the state
        with this batch's per-example losses recorded. Pure: neither ``state`` nor the model changes, so a
        run resumed from a checkpoint (params and state) matches one that never stopped, bit for bit.
        With ``timestep_sampling="uniform"`` the state is ``{}`` and comes back unchanged."""
        if self.timestep_sampler is None:
            if state not in (None, {}):
                raise ValueError(f"state: timestep_sampling='uniform' keeps no state, expected {{}}, got {state!r}")
            return self._loss(params, batch, rng, None)
        self.timestep_sampler.check_state(state)
        return self._loss(params, batch, rng, state)

    def loss(self, params, batch, rng):
        """Mean over the batch of the (weighted) denoising loss; a scalar.

        With ``timestep_sampling="importance"`` the loss depends on a loss history that must travel with
        the params, so this raises: use ``loss_and_state`` (``fit(model.loss_and_state, ...,
        state=model.init_state(params))``).
        """
        if self.timestep_sampler is not None:
            raise ValueError(
                "loss: timestep_sampling='importance' keeps a loss history in a state tree; call "
                "model.loss_and_state(params, state, batch, rng) -> (loss, new_state) and train with "
                "fit(model.loss_and_state, params, data, rng, optimizer, steps, state=model.init_state(params))"
            )
        return self._loss(params, batch, rng, None)[0]

    def _loss(self, params, batch, rng, state):
        self.check_params(params)
        x0, y = self._unpack(batch)
        check_array(x0, "x", min_ndim=2)
        warn_if_far_from_unit_scale(x0, "Diffusion (its noise schedule ends at x_T ~ N(0, I))")
        xp = namespace(x0, params)
        n = x0.shape[0]
        dtype = "float64" if "64" in str(x0.dtype) else "float32"
        if self.decoder_network is None:
            r_t, r_eps, r_drop = rng.split(3)
        else:
            r_t, r_eps, r_drop, r_dec = rng.split(4)
        if state is not None:
            t, weights = self.timestep_sampler.sample(state, r_t, n, dtype)
        else:
            t, weights = self.schedule.sample_t(r_t, n, dtype), None
        a, s = self.schedule.marginal(t)
        a, s = self._bshape(a, x0), self._bshape(s, x0)
        eps = r_eps.normal(tuple(x0.shape), dtype=dtype)
        x_t = a * x0 + s * eps
        if y is not None and self.cond_drop_prob > 0.0:
            drop = r_drop.bernoulli(self.cond_drop_prob, shape=(n,)) > 0.5
            y = xp.where(drop, xp.full_like(y, self.num_classes), y)
        pred, v = self._split(self._apply(params, x_t, t, y), x0)
        target = S.from_x0_eps(x0, eps, a, s, self.prediction_type)
        axes = tuple(range(1, x0.ndim))
        per = xp.mean((pred - target) ** 2, axis=axes)
        if self.snr_gamma is not None:
            snr = xp.reshape(a * a / (s * s), (n,))
            clipped = xp.minimum(snr, self.snr_gamma)
            per = per * {"epsilon": clipped / snr, "v_prediction": clipped / (snr + 1.0),
                         "sample": clipped}[self.prediction_type]
        tracked = per
        if self.variance_type == "learned_range":
            vb = xp.mean(self._vb_terms(pred if self.vlb_trains_mean else stop_gradient(pred), v, x0, x_t, t),
                         axis=axes)
            per = per + (self.vlb_weight * self.schedule.num_train_timesteps) * vb
            tracked = vb
        if state is not None:
            state = self.timestep_sampler.update(state, t, stop_gradient(tracked))
            per = per * weights
        loss = xp.mean(per)
        if self.decoder_network is not None:  # the decoder's own term: -log p(x_0 | x_1) per dimension
            a0, s0 = self.schedule.marginal_host(0)
            x1 = a0 * x0 + s0 * r_dec.normal(tuple(x0.shape), dtype=dtype)
            loss = loss + xp.mean(self.decoder_nll(params, x0, x1))
        return loss, ({} if state is None else state)

    # -- 2. the variational bound --------------------------------------------------------------------
    def _table(self, name, t, ref):
        xp = namespace(ref)
        table = xp.asarray(getattr(self.schedule, name), dtype=ref.dtype, device=xp.device_of(ref))
        return self._bshape(xp.take(table, xp.astype(t, xp.int64), axis=0), ref)

    def p_mean_logvar(self, pred, v, x_t, t, clip_denoised=False):
        """p(x_{t-1} | x_t) = N(c1_t x0_hat + c2_t x_t, e^{logvar}): (mean, logvar, x0_hat), arrays like x_t.

        ``clip_denoised`` clips x0_hat to [-1, 1] (data known to lie there) before forming the mean.
        """
        sched = check_discrete(self.schedule, "the variational bound")
        xp = namespace(pred, x_t)
        a, s = self._table_sqrt(t, x_t)
        x0_hat = S.to_x0_eps(pred, x_t, a, s, self.prediction_type)[0]
        if clip_denoised:
            x0_hat = xp.clip(x0_hat, -1.0, 1.0)
        mean = self._table("posterior_mean_coef1", t, x_t) * x0_hat + self._table("posterior_mean_coef2", t, x_t) * x_t
        small = self._table("posterior_log_variance_clipped", t, x_t)
        if self.variance_type == "fixed_small":
            logvar = small
        else:
            big = xp.log(self._large_variance(t, x_t, sched))
            if self.variance_type == "fixed_large":
                logvar = big
            else:
                frac = 0.5 * (v + 1.0)
                logvar = frac * big + (1.0 - frac) * small
        return mean, logvar, x0_hat

    def _table_sqrt(self, t, ref):
        xp = namespace(ref)
        abar = self._table("alphas_cumprod", t, ref)
        return xp.sqrt(abar), xp.sqrt(1.0 - abar)

    def _large_variance(self, t, ref, sched):
        xp = namespace(ref)
        first = sched.posterior_variance[1] if self.decoder_variance == "posterior" else sched.betas[0]
        large = (first,) + tuple(sched.betas[1:])
        table = xp.asarray(large, dtype=ref.dtype, device=xp.device_of(ref))
        return self._bshape(xp.take(table, xp.astype(t, xp.int64), axis=0), ref)

    def _vb_terms(self, pred, v, x0, x_t, t, clip_denoised=False):
        """Elementwise L_t: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, -log p(x_0 | x_1) at t = 0
        (0 there with the categorical decoder, which does not use the score network's prediction)."""
        xp = namespace(pred, x0)
        true_mean = self._table("posterior_mean_coef1", t, x0) * x0 + self._table("posterior_mean_coef2", t, x0) * x_t
        true_logvar = self._table("posterior_log_variance_clipped", t, x0)
        mean, logvar, _ = self.p_mean_logvar(pred, v, x_t, t, clip_denoised)
        kl = normal_kl(true_mean, true_logvar, mean, logvar)
        if self.decoder == "categorical":  # L_0 is the decoder's alone (``decoder_nll``)
            return xp.where(self._bshape(t, x0) == 0.0, 0.0, kl)
        if self.decoder == "discretized":
            nll = -discretized_gaussian_log_likelihood(x0, mean, logvar, self.num_bins)
        else:
            nll = 0.5 * (math.log(2.0 * math.pi) + logvar + (x0 - mean) ** 2 * xp.exp(-logvar))
        return xp.where(self._bshape(t, x0) == 0.0, nll, kl)

    def _levels(self, ref):
        xp = namespace(ref)
        K = self.num_bins
        return xp.asarray(tuple(-1.0 + 2.0 * k / (K - 1) for k in range(K)), dtype=ref.dtype, device=xp.device_of(ref))

    def decoder_logits(self, params, x1):
        """-(x_1 - a_0 v_k)^2 / (2 s_0^2) + g_k(x_1): the categorical decoder's logits, x_1 (n, ...) -> (n, ..., K)."""
        if self.decoder != "categorical":
            raise ValueError(f"decoder_logits: needs decoder='categorical', this model has {self.decoder!r}")
        a0, s0 = self.schedule.marginal_host(0)
        logits = (-0.5 / (s0 * s0)) * (x1[..., None] - a0 * self._levels(x1)) ** 2
        if self.decoder_network is not None:
            g = self.decoder_network.apply(params["decoder"], x1)
            if tuple(g.shape) != tuple(logits.shape):
                raise ValueError(f"decoder_network: expected logits of shape {tuple(logits.shape)} (x_1's shape and "
                                 f"num_bins), got {tuple(g.shape)}")
            logits = logits + g
        return logits

    def _level_position(self, x0):
        """(k, nearest): x0 on the level scale, k = (x0 + 1)(K - 1) / 2, and the nearest level's index in [0, K-1]."""
        xp = namespace(x0)
        K = self.num_bins
        scaled = (x0 + 1.0) * (0.5 * (K - 1))
        return scaled, xp.clip(xp.round(scaled), 0, K - 1)

    def decoder_nll(self, params, x0, x1):
        """-log p(x_0 | x_1) of the categorical decoder, elementwise: x_0 on the levels, x_1 (n, ...) -> (n, ...)."""
        xp = namespace(x0, x1)
        index = xp.astype(self._level_position(stop_gradient(x0))[1], xp.int64)
        return -xp.log_softmax_take(self.decoder_logits(params, x1), index)

    def _check_levels(self, x0):
        """ValueError unless x0 lies on the decoder's num_bins levels in [-1, 1] (within 1e-3 of a level)."""
        xp = namespace(x0)
        K = self.num_bins
        scaled, nearest = self._level_position(x0)
        off = float(xp.max(xp.abs(scaled - nearest)))
        if off > 1e-3 * (K - 1):
            raise ValueError(f"x: expected data on the {K} levels -1 + 2k/{K - 1} (decoder={self.decoder!r}), "
                             f"got values up to {off * 2.0 / (K - 1):.3g} away from the nearest level")

    def prior_kl(self, x0):
        """L_T = KL(q(x_{T-1} | x_0) || N(0, I)) summed over dimensions: (n,)."""
        xp = namespace(x0)
        sched = check_discrete(self.schedule, "the variational bound")
        abar = sched.alphas_cumprod[-1]
        zero = xp.zeros_like(x0)
        kl = normal_kl(math.sqrt(abar) * x0, zero + math.log(1.0 - abar), zero, zero)
        return xp.sum(xp.reshape(kl, (x0.shape[0], -1)), axis=-1)

    def loss_terms(self, params, x0, rng, y=None, *, clip_denoised=None):
        """The variational bound term by term, each summed over dimensions and averaged over the batch (nats).

        Returns {"L_T": prior KL (0-d), "L_t": (T,) array with L_0 (decoder NLL) at index 0 and the KL terms
        after it, "vlb": L_T + sum_t L_t, "bits_per_dim": vlb / (D log 2), "vlb_per_example": (n,) each
        example's own sum (one noise draw per t: an unbiased estimate of its bound)}. Costs T network
        evaluations.
        ``clip_denoised`` (default: True with a discretized or categorical decoder, whose data lie in [-1, 1])
        evaluates the bound of the model that clips x0_hat, as Improved DDPM's evaluation does; near t = T an eps
        model's x0_hat = (x_t - sigma eps_hat) / alpha amplifies small errors by 1 / alpha otherwise.
        """
        self.check_params(params)
        if clip_denoised is None:
            clip_denoised = self.decoder in ("discretized", "categorical")
        sched = check_discrete(self.schedule, "the variational bound")
        xp = namespace(x0, params)
        n = x0.shape[0]
        D = math.prod(tuple(x0.shape[1:]))
        dtype = "float64" if "64" in str(x0.dtype) else "float32"
        if self.decoder == "categorical":
            self._check_levels(x0)
        terms = []
        for i, r in enumerate(rng.split(sched.num_train_timesteps)):
            t = xp.full((n,), float(i), dtype=x0.dtype, device=xp.device_of(x0))
            a, s = sched.marginal_host(i)
            x_t = a * x0 + s * r.normal(tuple(x0.shape), dtype=dtype)
            if i == 0 and self.decoder == "categorical":
                terms.append(xp.sum(xp.reshape(self.decoder_nll(params, x0, x_t), (n, -1)), axis=-1))
                continue
            pred, v = self._split(self._apply(params, x_t, t, y), x0)
            vb = self._vb_terms(pred, v, x0, x_t, t, clip_denoised)
            terms.append(xp.sum(xp.reshape(vb, (n, -1)), axis=-1))
        per_t = xp.stack(terms)  # (T, n)
        prior = self.prior_kl(x0)
        per_example = prior + xp.sum(per_t, axis=0)
        L_t = xp.mean(per_t, axis=1)
        L_T = xp.mean(prior)
        vlb = L_T + xp.sum(L_t)
        return {"L_T": L_T, "L_t": L_t, "vlb": vlb, "bits_per_dim": vlb / (D * math.log(2.0)),
                "vlb_per_example": per_example}

    def nll_bound(self, params, x0, rng, y=None, *, clip_denoised=None):
        """Variational upper bound on -log p(x_0) in bits/dim (batch mean): ``loss_terms(...)["bits_per_dim"]``."""
        return self.loss_terms(params, x0, rng, y, clip_denoised=clip_denoised)["bits_per_dim"]

    # -- 3. likelihood and sampling ------------------------------------------------------------------
    def log_prob(self, params, x, *, y=None, trace="exact", rng=None, **kw):
        """log p(x) (nats, (n,)) through the probability-flow ODE (``samplers.ode_log_likelihood``); numpy only."""
        self.check_params(params)
        cond = {} if y is None else {"y": y}
        fn = self.model_fn(params, shared_time=True)  # the ODE solver passes one time per call
        return S.ode_log_likelihood(fn, self.schedule, x, prediction_type=self.prediction_type,
                                    trace=trace, rng=rng, cond=cond, **kw)

    def sample(self, params, rng, n, *, sampler="ddpm", y=None, guidance_weight=None, guidance_rescale=0.0,
               data_shape=None, dtype="float32", **kw):
        """n samples (n, *data_shape) with ``sampler`` (a key of ``SAMPLERS``) and its keyword options.

        ``y`` (n,) labels for a class-conditional model; ``guidance_weight`` w turns on classifier-free guidance
        eps_u + (1 + w)(eps_c - eps_u). Learned variances are used by "ddpm"; other samplers use the mean.
        With ``decoder="categorical"`` the last step is a draw from the decoder (``callback`` still sees the
        chain's own last x).
        """
        self.check_params(params)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)}, got {sampler!r}")
        shape = data_shape or self.data_shape
        if shape is None:
            raise ValueError("data_shape: unknown for this network; pass data_shape=(H, W, C) or similar")
        learned = self.variance_type == "learned_range" and sampler == "ddpm"
        model_fn = self.model_fn(params, full=learned, shared_time=True)  # samplers pass one time per call
        cond = {}
        if y is not None:
            cond["y"] = y
        if guidance_weight is not None:
            if self.num_classes is None or y is None:
                raise ValueError("guidance_weight: classifier-free guidance needs a class-conditional model and y")
            kw["guidance"] = partial(S.classifier_free_guidance, guidance_weight=guidance_weight,
                                     null_label=self.num_classes, guidance_rescale=guidance_rescale)
        if learned:
            kw.setdefault("variance_type", "learned_range")
        if self.decoder != "categorical":
            return SAMPLERS[sampler](model_fn, self.schedule, rng, (n,) + tuple(shape),
                                     prediction_type=self.prediction_type, cond=cond, dtype=dtype, **kw)
        return self._sample_categorical(params, sampler, model_fn, rng, (n,) + tuple(shape), cond, dtype, kw)

    def _sample_categorical(self, params, sampler, model_fn, rng, shape, cond, dtype, kw):
        """The chain down to the x that enters the last step (t = 0: x_1), then x_0 ~ p(x_0 | x_1)."""
        if sampler not in ("ddpm", "ddim"):
            raise ValueError(f"sampler: decoder='categorical' draws x_0 from the x that enters the step at t = 0, "
                             f"which only 'ddpm' and 'ddim' visit; got {sampler!r}")
        user_callback = kw.pop("callback", None)
        seen = []  # the last two (step, t, x) snapshots: the second to last is x_1 when the last step is at t = 0

        def keep(k, t, x):
            seen[:] = seen[-1:] + [(k, t, x)]
            if user_callback is not None:
                user_callback(k, t, x)

        r_loop, r_dec = rng.split(2)
        SAMPLERS[sampler](model_fn, self.schedule, r_loop, shape, prediction_type=self.prediction_type, cond=cond,
                          dtype=dtype, callback=keep, **kw)
        steps, t_last = seen[-1][0] + 1, float(seen[-1][1])
        if t_last != 0.0 or steps < 2:
            raise ValueError(f"{sampler}: decoder='categorical' needs a grid of at least 2 steps ending at t = 0 "
                             f"(e.g. timestep_spacing='leading'); this one ends at t = {t_last:g} after {steps} "
                             f"step(s)")
        x1 = seen[0][2]
        xp = namespace(x1)
        index = r_dec.categorical(self.decoder_logits(params, x1))
        levels = self._levels(x1)
        x0 = xp.reshape(xp.take(levels, xp.reshape(index, (-1,)), axis=0), tuple(x1.shape))
        return xp.where(xp.isfinite(x1), x0, float("nan"))  # a chain that diverged shows as NaN, not as a level


# ---------------------------------------------------------------------------------------------------
# a noise-aware classifier for classifier guidance


class NoisyClassifier(Block):
    """p(y | x_t, t) = softmax(f(x_t, t)): any network with apply(params, x, t) -> logits (n, K).

    ``log_prob(params, x, t, y) -> (n,)`` and ``guidance_fn(params)`` (the callable classifier_guidance wants).
    """

    def __init__(self, network):
        self.network = network

    def init(self, rng, dtype="float32"):
        return self.network.init(rng, dtype)

    def log_prob(self, params, x, t, y):
        xp = namespace(x, params)
        logp = log_softmax(self.network.apply(params, x, t), axis=-1)
        return xp.take_along_axis(logp, xp.reshape(y, (-1, 1)), axis=-1)[:, 0]

    def guidance_fn(self, params):
        return lambda x, t, y: self.log_prob(params, x, t, y)


