"""Recipes that join a model to data, metrics and the training loop (model files import blocks only).

- ``dequantized_loss(flow, num_bins=K)``: a ``fit`` loss for integer data, -mean log p((x + u) / K) with fresh
  u ~ U[0, 1)^D every call; ``dequantized_nll``: the discrete NLL bound in nats and bits per dimension.
- ``train_noisy_classifier``: fit a ``NoisyClassifier`` for classifier guidance on noised data.
- ``digits_diffusion`` / ``fit_diffusion`` / ``diffusion_bound``: a diffusion model of 17-level digits trained for
  likelihood (learned variances, hybrid loss, importance-sampled t, cosine schedule, EMA) and its full
  variational bound in nats per image with standard errors; ``ode_discrete_nll``: the PF-ODE density put on
  the same discrete scale by uniform dequantization.
"""

import math

from genblocks.backends import namespace, to_numpy
from genblocks.blocks.base import check_array
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import LevelDecoder, MLPScoreNet, UNet
from genblocks.blocks.validate import check_positive_int
from genblocks.data import dequantization_log_det, uniform_dequantize
from genblocks.metrics import nats_to_bits_per_dim
from genblocks.models.diffusion import Diffusion

from .loop import fit
from .optim import adam, adamw, cosine_decay

__all__ = ["dequantized_loss", "dequantized_nll", "train_noisy_classifier", "levels_to_unit", "digits_diffusion",
           "digits_images", "fit_diffusion", "diffusion_bound", "ode_discrete_nll", "truncated_cosine_betas"]


def dequantized_loss(flow, *, num_bins):
    """A ``fit`` loss for integer data: loss(params, x, rng) = -mean log p((x + u) / K), u ~ U[0, 1)^D.

    The noise u is drawn afresh from ``rng`` at every call (a single fixed draw lets a flow memorise it, and
    held-out likelihoods collapse). x: (n, D) integer levels in [0, K) as floats, K = ``num_bins``.
    """
    def loss(params, x, rng):
        return flow.loss(params, uniform_dequantize(x, rng, num_bins=num_bins))

    return loss


def dequantized_nll(flow, params, x, rng, *, num_bins, samples=1, context=None):
    """Discrete NLL bound -log P(x) <= -E_u[log p((x + u) / K)] + D log K, averaged over examples.

    x: (n, D) integer levels in [0, K) as floats, on ``rng``'s backend; ``flow`` models data in [0, 1)^D.
    Returns {"nats": nats per example, "bits_per_dim": bits per dimension} (Python floats).
    """
    check_array(x, "x", ndim=2)
    samples = check_positive_int(samples, "samples")
    xp = namespace(x)
    total = 0.0
    for r in rng.split(samples):
        y = uniform_dequantize(x, r, num_bins=num_bins)
        total += float(to_numpy(xp.mean(flow.log_prob(params, y, context))))
    dim = x.shape[-1]
    nats = -(total / samples + dequantization_log_det(num_bins, dim))
    return {"nats": nats, "bits_per_dim": float(nats_to_bits_per_dim(nats, dim))}


def train_noisy_classifier(classifier, schedule, x, y, rng, *, steps=500, batch_size=128, lr=1e-3, params=None,
                           progress=False):
    """Fit ``NoisyClassifier`` params by minimising -log p(y | alpha_t x + sigma_t eps, t) over random t and eps.

    x (n, ...) host data, y (n,) int labels. Returns the trained params (numpy backend).
    """
    r_init, r_fit = rng.split(2)
    if params is None:
        params = classifier.init(r_init, "float64" if "64" in str(x.dtype) else "float32")

    def loss(p, batch, r):
        xb, yb = batch
        xp = namespace(xb, p)
        dtype = "float64" if "64" in str(xb.dtype) else "float32"
        r_t, r_eps = r.split(2)
        t = schedule.sample_t(r_t, xb.shape[0], dtype)
        a, s = schedule.marginal(t)
        shape = (xb.shape[0],) + (1,) * (xb.ndim - 1)
        x_t = xp.reshape(a, shape) * xb + xp.reshape(s, shape) * r_eps.normal(tuple(xb.shape), dtype=dtype)
        return -xp.mean(classifier.log_prob(p, x_t, t, yb))

    return fit(loss, params, (x, y), r_fit, adam(lr), steps, batch_size=batch_size, progress=progress).params


# ---------------------------------------------------------------------------------------------------
# diffusion trained for likelihood on 17-level digits


def levels_to_unit(x, num_bins=17):
    """Integer levels {0, ..., K-1} -> the grid {-1, -1 + 2/(K-1), ..., 1} the discretized decoder expects."""
    return x * (2.0 / (num_bins - 1)) - 1.0


def truncated_cosine_betas(num_timesteps, sigma_min):
    """The cosine schedule's betas from its first step with sigma_t >= ``sigma_min``, that many steps merged into one.

    beta'_0 = 1 - alpha_bar_k for the first such k, then beta_{k+1}, ..., beta_{T-1}: the same chain above
    step k (the same alpha_bar_t), with the steps below it dropped. Returns a list of T - k floats.
    """
    full = DiscreteSchedule("squaredcos_cap_v2", num_timesteps)
    abar = full.alphas_cumprod
    k = next(i for i, a in enumerate(abar) if math.sqrt(1.0 - a) >= sigma_min)
    return [1.0 - abar[k]] + list(full.betas[k + 1:])


def digits_diffusion(*, hidden=(512, 512, 512), time_embed_dim=128, num_timesteps=1000, num_bins=17,
                     sigma_min=0.1, timestep_sampling="importance", vlb_weight=0.01, network="mlp",
                     base_channels=64, channel_mults=(1, 2), num_res_blocks=2, vlb_trains_mean=True,
                     decoder_variance="beta", decoder="categorical", decoder_channels=16):
    """Improved DDPM for 8x8 images on ``num_bins`` levels in [-1, 1]: an eps-predictor with learned variances
    (``learned_range``, twice the outputs), the hybrid loss L_simple + ``vlb_weight`` T L_vlb, importance-sampled
    t, the cosine schedule of ``num_timesteps`` steps (its steps below ``sigma_min`` merged into the first,
    ``truncated_cosine_betas``; None keeps them all) and a decoder p(x_0 | x_1) over the levels.

    ``decoder="categorical"`` (default): softmax_k(-(x_1 - a_0 v_k)^2 / (2 s_0^2) + g_k(x_1)) per pixel, g a
    ``LevelDecoder`` of ``decoder_channels`` (0: none, the uniform-prior posterior) reading the whole of x_1;
    "discretized": a Gaussian N(x0_hat, sigma^2) discretized over the bins, its variance learned in
    [sigma~^2_1, beta_0] (``decoder_variance="beta"``; "posterior" fixes it at sigma~^2_1, DDPM's table).
    ``vlb_trains_mean=True``: L_vlb's gradient also trains the mean prediction (``Diffusion``), not only the
    variances. ``network="mlp"``: an MLP with FiLM time conditioning (``hidden`` widths) on flat data x (n, 64).
    ``network="unet"``: the ``UNet`` (``base_channels``, ``channel_mults``, ``num_res_blocks``, 2 output
    channels) on images x (n, 8, 8, 1) (``digits_images``). The default sigma_min = 0.1 merges the 56 steps
    below it into the first. Test bounds of the MLP (docs/diffusion.md): the first recipe (sigma_min 0.025,
    "posterior" discretized decoder, vlb_trains_mean False, vlb_weight 0.001) 128.1 nats after 6000 steps;
    sigma_min 0.05 with the "beta" discretized decoder and vlb_trains_mean 103.3; these defaults 97.7 after
    3000 and 90.1 after 6000 steps (``fit_diffusion``'s default AdamW decay 0.1; the PyTorch twin 90.0).
    """
    if sigma_min is None:
        schedule = DiscreteSchedule("squaredcos_cap_v2", num_timesteps)
    else:
        betas = truncated_cosine_betas(num_timesteps, sigma_min)
        schedule = DiscreteSchedule("squaredcos_cap_v2", len(betas), trained_betas=betas)
    if network == "mlp":
        net = MLPScoreNet(64, tuple(hidden), time_embed_dim=time_embed_dim, out_dim=128)
    elif network == "unet":
        net = UNet(1, base_channels=base_channels, channel_mults=tuple(channel_mults), num_res_blocks=num_res_blocks,
                   time_embed_dim=time_embed_dim, out_channels=2)
    else:
        raise ValueError(f"network: expected 'mlp' or 'unet', got {network!r}")
    if decoder not in ("discretized", "categorical"):
        raise ValueError(f"decoder: expected 'discretized' or 'categorical', got {decoder!r}")
    decoder_net = None
    if decoder == "categorical" and decoder_channels:
        decoder_net = LevelDecoder((8, 8, 1), num_bins, channels=decoder_channels)
    return Diffusion(net, schedule, variance_type="learned_range", timestep_sampling=timestep_sampling,
                     vlb_weight=vlb_weight, decoder=decoder, num_bins=num_bins,
                     vlb_trains_mean=vlb_trains_mean, decoder_variance=decoder_variance, decoder_network=decoder_net)


def digits_images(x):
    """Flat digits x (n, 64) -> NHWC images (n, 8, 8, 1), row-major, the data a ``network="unet"`` model takes."""
    check_array(x, "x", ndim=2)
    if x.shape[1] != 64:
        raise ValueError(f"x: expected 64 pixels per digit, got shape {tuple(x.shape)}")
    return namespace(x).reshape(x, (x.shape[0], 8, 8, 1))


def fit_diffusion(model, x, rng, steps, *, batch_size=128, lr=1e-3, ema_decay=0.999, clip_norm=1.0,
                  weight_decay=0.1, lr_decay_steps=None, final_lr=0.0, checkpoint_path=None, resume=False,
                  progress=False):
    """Train ``model`` on x (n, ...) with Adam, gradient clipping and an EMA; returns ``fit``'s result.

    ``weight_decay`` > 0 uses AdamW (decoupled decay: p <- p - lr_t (m_hat / (sqrt(v_hat) + eps) + wd p)); 0 is
    Adam. The default 0.1 was picked on the valid bound of ``digits_diffusion`` after 6000 steps (88.8 nats,
    90.6 with 0.5; with the former discretized decoder 99.3 against 100.2, docs/diffusion.md).
    ``lr_decay_steps``: the learning rate follows a cosine from ``lr`` down to ``final_lr`` over that many steps,
    lr_t = final_lr + (lr - final_lr)(1 + cos(pi min(t, S) / S)) / 2; None keeps it constant.
    Uses ``loss_and_state`` (the importance sampler's history travels as state). With ``checkpoint_path``
    and ``resume=True`` a run continues from the checkpoint, so ``steps`` then 2 x ``steps`` is one run.
    """
    r_init, r_fit = rng.split(2)
    params = model.init(r_init, "float64" if "64" in str(x.dtype) else "float32")
    schedule = lr if lr_decay_steps is None else cosine_decay(lr, lr_decay_steps, final_lr)
    optimizer = adamw(schedule, weight_decay=weight_decay) if weight_decay else adam(schedule)
    return fit(model.loss_and_state, params, x, r_fit, optimizer, steps, state=model.init_state(params),
               batch_size=batch_size, progress=progress, ema_decay=ema_decay, clip_norm=clip_norm,
               checkpoint_path=checkpoint_path, checkpoint_every=None if checkpoint_path is None else steps,
               resume=resume)


def diffusion_bound(model, params, x, rng, *, passes=2, batch_size=None):
    """The full variational bound (all T terms) of a ``decoder="discretized"`` model on x, in nats per example.

    Each pass draws one x_t per t and example (``Diffusion.loss_terms``), an unbiased estimate of every
    example's bound; the figure is the mean over ``passes`` passes. Returns host values:
    {"nats", "bits_per_dim", "se_mc": standard error of "nats" from the noise draws (from the spread between
    passes), "se_images": the standard error over examples (a test set's sampling error), "L_T",
    "L_t": (T,) list of mean L_t (L_0 the decoder at index 0), "per_example": (n,) list}.
    """
    passes = check_positive_int(passes, "passes")
    n = x.shape[0]
    batch_size = n if batch_size is None else batch_size
    runs, L_t, L_T = [], None, 0.0
    for r in rng.split(passes):
        per, lt, lT = [], 0.0, 0.0
        for i, rb in zip(range(0, n, batch_size), r.split((n + batch_size - 1) // batch_size)):
            terms = model.loss_terms(params, x[i:i + batch_size], rb)
            m = terms["vlb_per_example"].shape[0]
            per.append(to_numpy(terms["vlb_per_example"]))
            lt = lt + _concat_host([to_numpy(terms["L_t"])]) * (m / n)
            lT += float(terms["L_T"]) * (m / n)
        runs.append(_concat_host(per))  # float64 on the host
        L_t = lt / passes if L_t is None else L_t + lt / passes
        L_T += lT / passes
    xp = namespace(runs[0])
    stacked = xp.stack(runs)  # (passes, n)
    per_example = xp.mean(stacked, axis=0)
    nats = float(xp.mean(per_example))
    if passes > 1:
        # per-example noise variance from the spread across passes; the mean of passes x n draws
        noise_var = float(xp.mean(xp.var(stacked, axis=0, correction=1)))
        se_mc = math.sqrt(noise_var / (passes * n))
    else:
        se_mc = float("nan")
    se_images = float(xp.std(per_example, correction=1)) / math.sqrt(n)
    dim = math.prod(tuple(x.shape[1:]))
    return {"nats": nats, "bits_per_dim": float(nats_to_bits_per_dim(nats, dim)), "se_mc": se_mc,
            "se_images": se_images, "L_T": L_T, "L_t": [float(v) for v in L_t],
            "per_example": [float(v) for v in per_example]}


def _concat_host(parts):
    xp = namespace(parts[0])
    return xp.astype(xp.concat(parts, axis=0), xp.float64)


def ode_discrete_nll(model, params, x, rng, *, num_bins=17, samples=1, trace="hutchinson", rtol=1e-4, atol=1e-4):
    """-log P(x) <= E_u[-log p(x + u)] - D log(2 / (K - 1)): the PF-ODE density as a bound on the discrete data.

    x (n, D) on the grid of ``levels_to_unit``; u ~ U(-1/(K-1), 1/(K-1))^D fills each bin (width 2/(K-1) in
    these units), so P(x) = int_bin p >= exp(E_u log p(x + u)) (bin width)^D by Jensen. p is
    ``Diffusion.log_prob`` (an ODE solve, Hutchinson's trace by default: unbiased for the log-density's
    divergence integral). Returns {"nats": mean over examples and draws, "se": its standard error over examples}.
    """
    half = 1.0 / (num_bins - 1)
    dim = math.prod(tuple(x.shape[1:]))
    total = None
    for r in rng.split(samples):
        r_u, r_tr = r.split(2)
        u = r_u.uniform(tuple(x.shape), dtype="float64" if "64" in str(x.dtype) else "float32",
                        low=-half, high=half)
        lp = to_numpy(model.log_prob(params, x + u, trace=trace, rng=r_tr, rtol=rtol, atol=atol))
        total = lp if total is None else total + lp
    per = -(total / samples) - dim * math.log(2.0 * half)
    hx = namespace(per)
    return {"nats": float(hx.mean(per)), "se": float(hx.std(per, correction=1)) / math.sqrt(per.shape[0])}
