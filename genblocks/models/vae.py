"""Variational autoencoders: log p(x) >= E_q(z|x)[log p(x|z) + log p(z) - log q(z|x)] (the ELBO), and IWAE.

A latent-variable model p(x) = integral p(x | z) p(z) dz has no tractable density: the integral over z is the
obstacle. Variational inference brings in an encoder q(z | x) and Jensen's inequality:

    log p(x) = log E_q[p(x, z) / q(z | x)] >= E_q[log p(x | z)] - KL(q(z | x) || p(z))      (the ELBO)

The gap is KL(q(z | x) || p(z | x)): the ELBO equals log p(x) when q is the exact posterior. Read top to
bottom:

1. **Likelihoods** p(x | z): the decoder's outputs become a distribution over x (``LIKELIHOODS``).
2. **Priors** p(z): ``StandardNormalPrior``, ``MixturePrior`` (a learned Gaussian mixture), ``VampPrior``
   (the mixture of the encoder's posteriors at K learned pseudo-inputs, Tomczak & Welling 2018),
   ``ConditionalGaussianPrior`` p(z | c), or any block with ``init``, ``log_prob(params, z, context)`` and
   ``sample(params, rng, n, context, dtype=...)``: a ``genblocks.models.flow.Flow`` over the latents is one.
3. **Posteriors** q(z | x): a diagonal Gaussian N(mu(x), diag sigma(x)^2) from the encoder, optionally pushed
   through a bijector (IAF or planar steps, Kingma et al. 2016; Rezende & Mohamed 2015):
   z_K = f(z_0; h(x)), log q(z_K | x) = log q_0(z_0 | x) - log|det df/dz_0|.
4. **Objectives**: z = mu + sigma * eps (the reparameterisation trick) makes the ELBO differentiable in the
   encoder. The KL term is analytic where ``genblocks.blocks.distributions.kl`` has a closed form (a
   Gaussian posterior against a Gaussian prior) and the Monte Carlo estimate log q(z|x) - log p(z) otherwise,
   chosen automatically. Options: beta (a number or a schedule of the step, for KL warm-up), free bits
   (Kingma et al. 2016: each latent dimension's KL counts at least ``free_bits`` nats), and the IWAE bound
   (Burda et al. 2016) with K samples, log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)], which rises
   with K towards log p(x).
5. **Evaluation**: ``log_prob_estimate`` is the importance-sampled log p(x) with K samples from q (the
   IWAE estimate with large K), accumulated by logsumexp in chunks so K = 5000 fits in memory.

A conditional VAE (``context_dim`` > 0) feeds the context c to the encoder q(z | x, c), the decoder
p(x | z, c) and the prior p(z | c) (when the prior takes one).
"""

import math

from genblocks.backends import is_traced, namespace, to_numpy
from genblocks.blocks import ops
from genblocks.blocks.base import Block, check_array, check_dtype, dtype_name, params_dtype, unpack_batch
from genblocks.blocks.distributions import (
    Bernoulli,
    Categorical,
    DiscretizedLogisticMixture,
    Independent,
    MixtureSameFamily,
    Normal,
    kl,
)
from genblocks.blocks.nn import MLP
from genblocks.blocks.validate import check_choice, check_int, check_nonnegative_int, check_positive_int, check_real

__all__ = [
    "LIKELIHOODS", "VAE", "StandardNormalPrior", "MixturePrior", "VampPrior", "ConditionalGaussianPrior",
    "kl_warmup",
]


def _widths(block):
    """(input width, output width) of an MLP / Dense-like block, (None, None) when it does not say."""
    widths = getattr(block, "widths", None)
    if widths is not None:
        return widths[0], widths[-1]
    return getattr(block, "d_in", None), getattr(block, "d_out", None)




def _with_context(xp, h, context):
    """concat([h, context broadcast to h's batch shape]) along the last axis (h when context is None)."""
    if context is None:
        return h
    c = xp.broadcast_to(context, tuple(h.shape[:-1]) + (context.shape[-1],))
    return xp.concat([h, c], axis=-1)


# ---------------------------------------------------------------------------------------------------
# 1. Likelihoods p(x | z): decoder outputs (..., D * P) -> a distribution over x (..., D)

LIKELIHOODS = {
    "bernoulli": "x in {0, 1}^D: P = 1 logit per dimension",
    "gaussian": "x real: N(x; mu, sigma^2) with sigma fixed (scale=float), learned per dimension "
                "(scale='learned') or from the decoder (scale='decoder', P = 2)",
    "categorical": "x in {0, ..., K-1}^D (num_levels = K): P = K logits per dimension",
    "logistic_mixture": "x in {0, ..., K-1}^D: a discretized logistic mixture (num_components = C), P = 3C",
}


# ---------------------------------------------------------------------------------------------------
# 2. Priors p(z) (or p(z | c))


class StandardNormalPrior(Block):
    """p(z) = N(z; 0, I_dim): log p = -|z|^2 / 2 - dim log(2 pi) / 2; z (..., dim) -> (...,). No params."""

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def distribution(self, params, context=None, like=None):
        """N(0, I) as an Independent(Normal) on ``like``'s backend and dtype (for the analytic KL)."""
        xp = namespace(like)
        zero = xp.zeros((self.dim,), dtype=like.dtype, device=xp.device_of(like))
        return Independent(Normal(zero, zero + 1.0, validate=False), 1, validate=False)

    def log_prob(self, params, z, context=None):
        check_array(z, "z", min_ndim=1, last_dim=self.dim)
        return self.distribution(params, like=z).log_prob(z)

    def sample(self, params, rng, n, context=None, dtype="float32"):
        """n draws (n, dim) on ``rng``'s backend."""
        return rng.normal((check_positive_int(n, "n"), self.dim), dtype=check_dtype(dtype))


class MixturePrior(Block):
    """p(z) = sum_k pi_k N(z; mu_k, diag sigma_k^2), pi = softmax(logits), all learned; z (..., dim) -> (...,).

    params {"logits": (K,), "loc": (K, dim), "log_scale": (K, dim)}; the means start spread as N(0, I).
    """

    def __init__(self, dim, num_components=10):
        self.dim = check_positive_int(dim, "dim")
        self.num_components = check_positive_int(num_components, "num_components")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        xp = rng.xp
        k = self.num_components
        return {"logits": xp.zeros((k,), dtype=getattr(xp, dtype)), "loc": rng.normal((k, self.dim), dtype),
                "log_scale": xp.zeros((k, self.dim), dtype=getattr(xp, dtype))}

    def _dist(self, params):
        comp = Independent(Normal(params["loc"], namespace(params["loc"]).exp(params["log_scale"]),
                                  validate=False), 1, validate=False)
        return MixtureSameFamily(params["logits"], comp, validate=False)

    def log_prob(self, params, z, context=None):
        check_array(z, "z", min_ndim=1, last_dim=self.dim)
        return self._dist(params).log_prob(z)

    def sample(self, params, rng, n, context=None, dtype=None):
        return self._dist(params).sample(rng, (check_positive_int(n, "n"),))


class VampPrior(Block):
    """p(z) = (1/K) sum_k q(z | u_k): the encoder's posteriors at K learned pseudo-inputs u_k (data_dim,).

    params {"pseudo_inputs": (K, data_dim)}, started at N(0, 0.1^2) around ``init_center`` (a number, e.g.
    the data's mean level). ``log_prob`` and ``sample`` need ``posterior``: a function u -> q(z | u) (the
    VAE passes its encoder's Gaussian). Unconditional only.
    """

    needs_posterior = True

    def __init__(self, dim, data_dim, num_pseudo=50, *, init_center=0.0):
        self.dim = check_positive_int(dim, "dim")
        self.data_dim = check_positive_int(data_dim, "data_dim")
        self.num_pseudo = check_positive_int(num_pseudo, "num_pseudo")
        self.init_center = check_real(init_center, "init_center")

    def init(self, rng, dtype="float32"):
        u = rng.normal((self.num_pseudo, self.data_dim), check_dtype(dtype), scale=0.1)
        return {"pseudo_inputs": u + self.init_center}

    def _mixture(self, params, posterior):
        if posterior is None:
            raise ValueError("posterior: the VampPrior needs the encoder's q(z | u); use it inside a VAE")
        q = posterior(params["pseudo_inputs"])  # batch (K,), event (dim,)
        xp = namespace(params["pseudo_inputs"])
        logits = xp.zeros((self.num_pseudo,), dtype=params["pseudo_inputs"].dtype,
                          device=xp.device_of(params["pseudo_inputs"]))
        return MixtureSameFamily(logits, q, validate=False)

    def log_prob(self, params, z, context=None, *, posterior=None):
        check_array(z, "z", min_ndim=1, last_dim=self.dim)
        return self._mixture(params, posterior).log_prob(z)

    def sample(self, params, rng, n, context=None, dtype=None, *, posterior=None):
        return self._mixture(params, posterior).sample(rng, (check_positive_int(n, "n"),))


class ConditionalGaussianPrior(Block):
    """p(z | c) = N(z; mu(c), diag sigma(c)^2), (mu, log sigma) = MLP(c): c (..., context_dim) -> z (..., dim).

    params: the MLP's (its last layer starts at zero, so the prior starts as N(0, I)).
    """

    def __init__(self, dim, context_dim, hidden=(32,), *, activation="relu"):
        self.dim = check_positive_int(dim, "dim")
        self.context_dim = check_positive_int(context_dim, "context_dim")
        self.hidden = tuple(hidden)
        self.net = MLP((self.context_dim,) + self.hidden + (2 * self.dim,), activation=activation)

    def init(self, rng, dtype="float32"):
        params = self.net.init(rng, check_dtype(dtype))
        xp = namespace(params)
        params[-1] = {k: xp.zeros_like(v) for k, v in params[-1].items()}
        return params

    def distribution(self, params, context=None, like=None):
        if context is None:
            raise ValueError("context: the ConditionalGaussianPrior p(z | c) needs a context, got None")
        check_array(context, "context", min_ndim=1, last_dim=self.context_dim)
        out = self.net.apply(params, context)
        xp = namespace(out)
        return Independent(Normal(out[..., :self.dim], xp.exp(out[..., self.dim:]), validate=False), 1,
                           validate=False)

    def log_prob(self, params, z, context=None):
        check_array(z, "z", min_ndim=1, last_dim=self.dim)
        return self.distribution(params, context).log_prob(z)

    def sample(self, params, rng, n, context=None, dtype=None):
        """n draws (n, dim); context (context_dim,) or (n, context_dim)."""
        n = check_positive_int(n, "n")
        if context is not None:
            check_array(context, "context", min_ndim=1, last_dim=self.context_dim)
            context = namespace(context).broadcast_to(context, (n, self.context_dim))
        dist = self.distribution(params, context)
        return dist.sample(rng) if dist.batch_shape == (n,) else dist.sample(rng, (n,))


def _as_prior(prior, latent_dim):
    if isinstance(prior, str):
        check_choice(prior, "prior", ("normal",))
        return StandardNormalPrior(latent_dim)
    if not all(hasattr(prior, name) for name in ("init", "log_prob", "sample")):
        raise TypeError(f"prior: expected 'normal' or a prior block with init, log_prob and sample (e.g. "
                        f"MixturePrior, VampPrior or a Flow over the latents), got {type(prior).__name__}")
    dim = getattr(prior, "dim", None)
    if dim is not None and dim != latent_dim:
        raise ValueError(f"prior: expected a prior over {latent_dim} latent dimensions (the VAE's latent_dim), "
                         f"got {type(prior).__name__} with dim={dim}")
    return prior


def kl_warmup(steps, start=0.0):
    """KL warm-up: the schedule beta(step) = min(1, start + (1 - start) step / steps), for ``VAE(beta=...)``."""
    steps = check_positive_int(steps, "steps")
    start = check_real(start, "start", low=0.0, high=1.0)

    def beta(step):
        return min(1.0, start + (1.0 - start) * float(step) / steps)

    return beta


# ---------------------------------------------------------------------------------------------------
# 3-5. The model


class VAE(Block):
    """log p(x | c) >= E_q[log p(x | z, c)] - KL(q(z | x, c) || p(z | c)); x (..., D), z (..., L).

    encoder: a block (e.g. ``nn.MLP``) with ``apply(params, h)``, h = [x', c] (..., D + context_dim) ->
    (..., 2L + H): the Gaussian's mean and log standard deviation, then H features for a conditional
    posterior flow. x' = x for binary and real data, x / (K - 1) for K-level data.
    decoder: a block with ``apply(params, [z, c])`` (..., L + context_dim) -> (..., D P), P numbers per
    data dimension for the likelihood (``LIKELIHOODS``).
    prior: "normal" or a prior block (``MixturePrior``, ``VampPrior``, ``ConditionalGaussianPrior``, a Flow
    over L dimensions, ...). posterior: None (the diagonal Gaussian) or a bijector z_0 -> z (its context is
    the H encoder features when ``posterior_context_dim`` = H > 0).
    likelihood: one of ``LIKELIHOODS``; ``scale`` (gaussian: a positive float, "learned" or "decoder"),
    ``num_levels`` (categorical, logistic_mixture), ``num_components`` (logistic_mixture).
    Training defaults (each overridable per ``loss`` call): ``objective`` "elbo" or "iwae", ``num_samples``
    (z draws per x; the K of IWAE), ``beta`` (a number or a schedule ``beta(step)``, see ``kl_warmup``),
    ``free_bits`` (nats per latent dimension), ``kl`` "auto", "analytic" or "mc".
    latent_dim and data_dim are read from the decoder's and encoder's widths when not given.
    params {"encoder", "decoder", "prior", "posterior", "likelihood"}.
    """

    def __init__(self, encoder, decoder, *, latent_dim=None, data_dim=None, prior="normal", posterior=None,
                 posterior_context_dim=0, likelihood="gaussian", scale=1.0, num_levels=None, num_components=5,
                 context_dim=0, objective="elbo", num_samples=1, beta=1.0, free_bits=0.0, kl="auto",
                 min_log_scale=-7.0, validate_data=True):
        for name, block in (("encoder", encoder), ("decoder", decoder)):
            if not (hasattr(block, "init") and hasattr(block, "apply")):
                raise TypeError(f"{name}: expected a block with init and apply (e.g. genblocks.blocks.nn.MLP), "
                                f"got {type(block).__name__}")
        self.encoder, self.decoder = encoder, decoder
        self.context_dim = check_nonnegative_int(context_dim, "context_dim")
        self.posterior_context_dim = check_nonnegative_int(posterior_context_dim, "posterior_context_dim")
        self.likelihood = check_choice(likelihood, "likelihood", tuple(LIKELIHOODS))
        self.num_levels = self.num_components = None
        if likelihood in ("categorical", "logistic_mixture"):
            if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 2:
                raise ValueError(f"num_levels: expected an int >= 2 (the K levels of the data) with likelihood="
                                 f"{likelihood!r}, got {num_levels!r}")
            self.num_levels = num_levels
        if likelihood == "logistic_mixture":
            self.num_components = check_positive_int(num_components, "num_components")
        self.scale = scale
        if likelihood == "gaussian" and scale not in ("learned", "decoder"):
            self.scale = check_real(scale, "scale", low=0.0, low_open=True)
        self.params_per_dim = {"bernoulli": 1, "categorical": self.num_levels,
                               "gaussian": 2 if scale == "decoder" else 1,
                               "logistic_mixture": 3 * (self.num_components or 1)}[likelihood]
        self.min_log_scale = check_real(min_log_scale, "min_log_scale")
        # sizes: from the arguments, else from the blocks' widths; then every width must agree
        enc_in, enc_out = _widths(encoder)
        dec_in, dec_out = _widths(decoder)
        if latent_dim is None:
            if dec_in is None:
                raise ValueError("latent_dim: the decoder does not say its input width; give latent_dim")
            latent_dim = dec_in - self.context_dim
        if data_dim is None:
            if enc_in is None:
                raise ValueError("data_dim: the encoder does not say its input width; give data_dim")
            data_dim = enc_in - self.context_dim
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.data_dim = check_positive_int(data_dim, "data_dim")
        L, D, C, H = self.latent_dim, self.data_dim, self.context_dim, self.posterior_context_dim
        checks = (("encoder", "input", enc_in, D + C, f"data_dim {D} + context_dim {C}"),
                  ("encoder", "output", enc_out, 2 * L + H,
                   f"2 x latent_dim {L} (mean and log-scale) + posterior_context_dim {H}"),
                  ("decoder", "input", dec_in, L + C, f"latent_dim {L} + context_dim {C}"),
                  ("decoder", "output", dec_out, D * self.params_per_dim,
                   f"data_dim {D} x {self.params_per_dim} parameters per dimension for likelihood={likelihood!r}"))
        for name, side, have, want, why in checks:
            if have is not None and have != want:
                raise ValueError(f"{name}: expected an {side} width of {want} ({why}), got {have}")
        self.prior = _as_prior(prior, self.latent_dim)
        if getattr(self.prior, "needs_posterior", False) and self.context_dim:
            raise ValueError("prior: a VampPrior is unconditional; use ConditionalGaussianPrior or a conditional "
                             "Flow with context_dim > 0")
        if posterior is not None and not hasattr(posterior, "forward"):
            raise TypeError(f"posterior: expected None or a bijector (IAF / planar steps), got "
                            f"{type(posterior).__name__}")
        if posterior is not None and getattr(posterior, "dim", L) != L:
            raise ValueError(f"posterior: expected a bijector over latent_dim={L}, got dim={posterior.dim}")
        if posterior is None and H:
            raise ValueError(f"posterior_context_dim: {H} encoder features are only used by a posterior flow")
        self.posterior = posterior
        self.objective = check_choice(objective, "objective", ("elbo", "iwae"))
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.beta = self._check_beta(beta)
        self.free_bits = check_real(free_bits, "free_bits", low=0.0)
        self.kl = check_choice(kl, "kl", ("auto", "analytic", "mc"))
        if kl == "analytic" and (posterior is not None or not hasattr(self.prior, "distribution")):
            raise ValueError("kl: 'analytic' needs a Gaussian posterior (no posterior flow) and a prior with a "
                             "distribution (StandardNormalPrior, ConditionalGaussianPrior); use 'auto' or 'mc'")
        self.validate_data = bool(validate_data)

    @staticmethod
    def _check_beta(beta):
        if callable(beta):
            return beta
        return check_real(beta, "beta", low=0.0)

    def __repr__(self):
        return (f"VAE(encoder={self.encoder!r}, decoder={self.decoder!r}, prior={self.prior!r}, "
                f"posterior={self.posterior!r}, likelihood={self.likelihood!r}, latent_dim={self.latent_dim}, "
                f"data_dim={self.data_dim}, context_dim={self.context_dim})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        r = rng.split(4)
        params = {"encoder": self.encoder.init(r[0], dtype), "decoder": self.decoder.init(r[1], dtype),
                  "prior": self.prior.init(r[2], dtype),
                  "posterior": self.posterior.init(r[3], dtype) if self.posterior is not None else {},
                  "likelihood": {}}
        params["encoder"] = self._unit_start(params["encoder"])
        if self.likelihood == "gaussian" and self.scale == "learned":
            xp = rng.xp
            params["likelihood"] = {"log_scale": xp.zeros((self.data_dim,), dtype=getattr(xp, dtype))}
        return params

    def _unit_start(self, enc):
        """Zero the log-scale outputs of an MLP-like encoder's last layer, so q starts as N(mu(x), I).

        An encoder whose log sigma starts at a few units gives sigma ~ e^5 and latents the decoder cannot
        use; starting at sigma = 1 (the prior's scale) trains smoothly. Other encoder layouts are left alone.
        """
        last = enc[-1] if isinstance(enc, list) and enc else None
        if not (isinstance(last, dict) and "W" in last and last["W"].shape[-1] == 2 * self.latent_dim
                + self.posterior_context_dim):
            return enc
        xp = namespace(last["W"])
        L = self.latent_dim
        cols = xp.arange(last["W"].shape[-1], device=xp.device_of(last["W"]))
        keep = xp.astype(xp.logical_or(cols < L, cols >= 2 * L), last["W"].dtype)
        new = {k: v * keep for k, v in last.items()}
        return enc[:-1] + [new]

    # -- inputs ---------------------------------------------------------------------------------------
    def _check_inputs(self, x, context):
        check_array(x, "x", min_ndim=1, last_dim=self.data_dim)
        if self.context_dim:
            if context is None:
                raise ValueError(f"context: this VAE is conditional (context_dim={self.context_dim}), got None")
            check_array(context, "context", min_ndim=1, last_dim=self.context_dim)
        elif context is not None:
            raise ValueError("context: this VAE is unconditional (context_dim=0), got a context")
        if self.validate_data and not is_traced(x):
            self._check_support(x)

    def _check_support(self, x):
        """Raise when x lies outside the likelihood's support (one host read of a boolean)."""
        xp = namespace(x)
        if self.likelihood == "bernoulli":
            ok, want = xp.logical_or(x == 0.0, x == 1.0), "binary data in {0, 1} (binarize grey levels first, or " \
                "use likelihood='gaussian' / 'categorical')"
        elif self.likelihood == "gaussian":
            ok, want = xp.isfinite(x), "finite real data"
        else:
            k = self.num_levels
            ok = xp.logical_and(xp.logical_and(x >= 0.0, x <= k - 1.0), xp.floor(x) == x)
            want = f"integer levels in {{0, ..., {k - 1}}} (num_levels={k})"
        if not bool(to_numpy(xp.all(ok))):
            bad = to_numpy(x)[~to_numpy(ok)]
            raise ValueError(f"x: likelihood={self.likelihood!r} expects {want}, got {bad.size} value(s) outside "
                             f"it, e.g. {[float(v) for v in bad[:3]]}")

    def _encoder_input(self, x):
        if self.num_levels is not None:
            return x * (1.0 / (self.num_levels - 1))
        return x

    # -- q(z | x): the encoder -----------------------------------------------------------------------
    def posterior_base(self, params, x, context=None):
        """(q_0(z | x, c) = Independent(Normal(mu, sigma)), h): the encoder's Gaussian and its H features."""
        xp = namespace(x, params)
        out = self.encoder.apply(params["encoder"], _with_context(xp, self._encoder_input(x), context))
        L = self.latent_dim
        q0 = Independent(Normal(out[..., :L], xp.exp(out[..., L:2 * L]), validate=False), 1, validate=False)
        return q0, (out[..., 2 * L:] if self.posterior_context_dim else None)

    def _flow(self, params, z0, h):
        """z = f(z_0; h) and log|det dz/dz_0| (zero without a posterior flow)."""
        if self.posterior is None:
            return z0, None
        if h is not None:
            xp = namespace(z0, h)
            h = xp.broadcast_to(h, tuple(z0.shape[:-1]) + (h.shape[-1],))
            return self.posterior.forward(params["posterior"], z0, h)
        return self.posterior.forward(params["posterior"], z0)

    def _draw(self, params, x, context, rng, n):
        """n reparameterised draws z (n, ..., L), a function giving log q(z | x) (n, ...), and q_0."""
        q0, h = self.posterior_base(params, x, context)
        z0 = q0.rsample(rng, (n,))
        z, log_det = self._flow(params, z0, h)
        return z, lambda: q0.log_prob(z0) if log_det is None else q0.log_prob(z0) - log_det, q0

    def _posterior_sample(self, params, x, context, rng, n):
        """n reparameterised draws z (n, ..., L), log q(z | x) (n, ...), and q_0."""
        z, log_q, q0 = self._draw(params, x, context, rng, n)
        return z, log_q(), q0

    # -- p(z): the prior -----------------------------------------------------------------------------
    def _q_of(self, params):
        return lambda u: self.posterior_base(params, u)[0]

    def prior_log_prob(self, params, z, context=None):
        """log p(z | c): z (..., L) -> (...,)."""
        if getattr(self.prior, "needs_posterior", False):
            return self.prior.log_prob(params["prior"], z, posterior=self._q_of(params))
        if context is not None:
            xp = namespace(z, context)
            context = xp.broadcast_to(context, tuple(z.shape[:-1]) + (context.shape[-1],))
        return self.prior.log_prob(params["prior"], z, context)

    # -- p(x | z): the decoder -----------------------------------------------------------------------
    def decoder_distribution(self, params, z, context=None):
        """p(x | z, c) as a distribution with event shape (D,): z (..., L) -> batch (...)."""
        xp = namespace(z, params)
        out = self.decoder.apply(params["decoder"], _with_context(xp, z, context))
        D, P = self.data_dim, self.params_per_dim
        out = xp.reshape(out, tuple(out.shape[:-1]) + (D, P))
        if self.likelihood == "bernoulli":
            base = Bernoulli(out[..., 0], validate=False)
        elif self.likelihood == "categorical":
            base = Categorical(out, validate=False)
        elif self.likelihood == "logistic_mixture":
            c = self.num_components
            log_scale = self.min_log_scale + ops.softplus(out[..., 2 * c:] - self.min_log_scale)
            base = DiscretizedLogisticMixture(out[..., :c], out[..., c:2 * c], log_scale, self.num_levels,
                                              validate=False)
        else:
            if self.scale == "decoder":
                log_scale = self.min_log_scale + ops.softplus(out[..., 1] - self.min_log_scale)
                scale = xp.exp(log_scale)
            elif self.scale == "learned":
                scale = xp.exp(params["likelihood"]["log_scale"]) + 0.0 * out[..., 0]
            else:
                scale = 0.0 * out[..., 0] + self.scale
            base = Normal(out[..., 0], scale, validate=False)
        return Independent(base, 1, validate=False)

    # The categorical log p(x | z) through xp.log_softmax_take and the KL to N(0, I) as one formula (False:
    # the plain Categorical and kl(Normal, Normal) paths; tests/test_vae.py pins the two together). The ELBO
    # with the Gaussian posterior and N(0, I) prior also takes its draws and that KL from one
    # xp.normal_rsample_kl (``_fused_gaussian_elbo``; the same bits as the formula's graph, pinned by a test).
    fast_paths = True

    def decoder_log_prob(self, params, z, x, context=None):
        """log p(x | z, c): z (..., L), x broadcastable to (..., D) -> (...,).

        The categorical likelihood on validated data (``validate_data``) takes the fused path,
        sum_d xp.log_softmax_take(logits_d, x_d): the same value and gradient as
        ``decoder_distribution(...).log_prob(x)`` (``tests/test_vae.py`` pins them), in one pass.
        """
        if self.likelihood == "categorical" and self.fast_paths and self.validate_data and not is_traced(x):
            xp = namespace(z, params)
            out = self.decoder.apply(params["decoder"], _with_context(xp, z, context))
            logits = xp.reshape(out, tuple(out.shape[:-1]) + (self.data_dim, self.num_levels))
            index = xp.broadcast_to(xp.astype(x, xp.int64), tuple(logits.shape[:-1]))
            return xp.sum(xp.log_softmax_take(logits, index), axis=-1)
        return self.decoder_distribution(params, z, context).log_prob(x)

    # -- the bounds ----------------------------------------------------------------------------------
    def _log_weights(self, params, x, context, rng, n):
        """log p(x | z) (n, ...), log p(z) (n, ...), log q(z | x) (n, ...), z and q_0 for n draws z ~ q."""
        z, log_q, q0 = self._posterior_sample(params, x, context, rng, n)
        log_px = self.decoder_log_prob(params, z, x, context)
        return log_px, self.prior_log_prob(params, z, context), log_q, z, q0

    def _analytic_kl(self, params, q0, context):
        """KL(q_0 || p) per latent dimension (..., L), or None when there is no closed form."""
        if self.posterior is not None or not hasattr(self.prior, "distribution") or self.kl == "mc":
            return None
        if self.fast_paths and type(self.prior) is StandardNormalPrior:  # (sigma^2 + mu^2 - 1) / 2 - log sigma
            xp = namespace(q0.base_dist.loc)
            mu, sigma = q0.base_dist.loc, q0.base_dist.scale
            return 0.5 * (sigma * sigma + mu * mu - 1.0) - xp.log(sigma)
        p = self.prior.distribution(params["prior"], context, like=q0.base_dist.loc)
        try:
            return kl(q0.base_dist, p.base_dist if isinstance(p, Independent) else p)
        except NotImplementedError:
            if self.kl == "analytic":
                raise
            return None

    def _fused_gaussian_elbo(self):
        """True when the ELBO's draws and KL can come from ``xp.normal_rsample_kl`` (one node on numpy, the
        same values and gradients as ``_draw`` and ``_analytic_kl``'s formula): the diagonal Gaussian posterior
        against the N(0, I) prior, with ``fast_paths``."""
        return (self.fast_paths and self.posterior is None and self.posterior_context_dim == 0
                and type(self.prior) is StandardNormalPrior and self.kl != "mc")

    def _fused_elbo_loss(self):
        """True when the analytic-KL ELBO's loss comes from ``xp.elbo_loss`` (one node on numpy, the same bits as
        the means and sums of ``_terms``): with ``fast_paths``."""
        return self.fast_paths

    def _draw_with_kl(self, params, x, context, rng, n):
        """n reparameterised draws z (n, ..., L) and KL(q(z | x) || N(0, I)) per dimension (..., L), from the
        encoder's (mu, log sigma) in one ``xp.normal_rsample_kl``; eps is drawn as ``Normal.rsample`` draws it."""
        xp = namespace(x, params)
        h = self.encoder.apply(params["encoder"], _with_context(xp, self._encoder_input(x), context))
        if rng.backend != xp.backend_name:
            raise ValueError(f"rng: expected a genblocks Rng on the parameters' backend {xp.backend_name!r}, got "
                             f"{rng!r}; use Rng(seed, backend={xp.backend_name!r})")
        eps = rng.normal((n,) + tuple(h.shape[:-1]) + (self.latent_dim,), dtype=dtype_name(h.dtype))
        return xp.normal_rsample_kl(h, eps)

    def _beta(self, beta, step):
        beta = self.beta if beta is None else self._check_beta(beta)
        if callable(beta):
            if step is None:
                raise ValueError("step: beta is a schedule beta(step) (KL warm-up); pass step= to loss")
            beta = check_real(beta(step), "beta(step)", low=0.0)
        return beta

    def loss_terms(self, params, batch, rng, *, objective=None, num_samples=None, beta=None, free_bits=None,
                   step=None):
        """The decomposition a teacher shows, all batch means in nats:

        {"loss": what is minimised, "elbo": E_q[log p(x|z)] - KL, "reconstruction": -E_q[log p(x|z)],
        "kl": KL(q || p) (analytic or Monte Carlo), "kl_per_dim": (L,) per latent dimension (present with the
        analytic KL only), "active_units": the number of latent dimensions whose posterior mean varies over
        the batch (Cov_x E_q[z_d] > 0.01, Burda et al. 2016), "iwae": the K-sample bound (objective "iwae"),
        "beta": the beta used}, every value an array in the params' dtype. batch = x (n, D) or (x, context).
        With objective "iwae" the weights are log w = log p(x|z) + beta (log p(z) - log q(z|x)) (beta = 1: the
        IWAE bound); free bits are refused.
        """
        return self._terms(params, batch, rng, objective, num_samples, beta, free_bits, step, True)

    def _terms(self, params, batch, rng, objective, num_samples, beta, free_bits, step, full):
        """loss_terms (full=True), or just what loss needs (full=False: no ELBO or beta report, no per-dimension
        KL without free bits, no active-unit count; only {"loss"} for the analytic-KL ELBO without free bits)."""
        x, context = unpack_batch(batch)
        self.check_params(params)
        self._check_inputs(x, context)
        xp = namespace(x, params)
        objective = self.objective if objective is None else check_choice(objective, "objective", ("elbo", "iwae"))
        k = self.num_samples if num_samples is None else check_positive_int(num_samples, "num_samples")
        beta = self._beta(beta, step)
        free_bits = self.free_bits if free_bits is None else check_real(free_bits, "free_bits", low=0.0)
        if not full and objective == "elbo" and self._fused_gaussian_elbo():
            z, kl_dims = self._draw_with_kl(params, x, context, rng, k)
            lazy_log_q = q0 = None
        else:
            z, lazy_log_q, q0 = self._draw(params, x, context, rng, k)
            kl_dims = self._analytic_kl(params, q0, context)
        log_px = self.decoder_log_prob(params, z, x, context)
        if not full and objective == "elbo" and not free_bits and kl_dims is not None and self._fused_elbo_loss():
            return {"loss": xp.elbo_loss(log_px, kl_dims, beta)}  # one node: the same bits as the lines below
        rec = xp.mean(log_px, axis=0)  # (...,): E_q log p(x|z) by k draws
        if kl_dims is None or objective == "iwae":  # the weights' other terms (the analytic ELBO needs neither)
            log_q, log_pz = lazy_log_q(), self.prior_log_prob(params, z, context)
        if kl_dims is not None:
            kl_x = xp.sum(kl_dims, axis=-1)
            kl_per_dim = xp.mean(xp.reshape(kl_dims, (-1, self.latent_dim)), axis=0) if full or free_bits else None
        else:
            kl_x = xp.mean(log_q - log_pz, axis=0)
            kl_per_dim = None
        kl_mean = xp.mean(kl_x)
        terms = {"reconstruction": -xp.mean(rec), "kl": kl_mean}
        if full:  # (loss() skips what only the report needs)
            terms.update(elbo=xp.mean(rec - kl_x), beta=xp.asarray(beta, dtype=x.dtype, device=xp.device_of(x)))
        if kl_per_dim is not None:
            terms["kl_per_dim"] = kl_per_dim
        if full:
            locs = ops.stop_gradient(xp.reshape(q0.base_dist.loc, (-1, self.latent_dim)))
            active = xp.var(locs, axis=0) > 0.01 if locs.shape[0] > 1 else xp.zeros_like(locs[0]) > 1.0
            terms["active_units"] = xp.sum(xp.astype(active, locs.dtype))  # a count, in the params' dtype
        if objective == "iwae":
            if free_bits:
                raise ValueError("free_bits: applies to the ELBO's KL term; the IWAE bound has none (use 0)")
            log_w = log_px + beta * (log_pz - log_q)
            bound = ops.logsumexp(log_w, axis=0) - math.log(k)
            terms["iwae"] = xp.mean(bound)
            terms["loss"] = -terms["iwae"]
            return terms
        if free_bits:
            if kl_per_dim is not None:  # each dimension's batch-mean KL counts at least free_bits
                kl_term = xp.sum(xp.maximum(kl_per_dim, free_bits))
            else:  # no per-dimension KL: the floor applies to the total
                kl_term = xp.maximum(kl_mean, free_bits * self.latent_dim)
        else:
            kl_term = kl_mean
        terms["loss"] = terms["reconstruction"] + beta * kl_term
        return terms

    def loss(self, params, batch, rng, **options):
        """The training objective (negative ELBO or IWAE bound, with beta and free bits), a scalar.

        batch = x (n, D) or (x, context); options as ``loss_terms`` (objective, num_samples, beta, free_bits,
        step). For KL warm-up with ``fit``, wrap it: ``lambda p, b, r: vae.loss(p, b, r, beta=w(step))``.
        """
        unknown = set(options) - {"objective", "num_samples", "beta", "free_bits", "step"}
        if unknown:
            raise TypeError(f"loss: unexpected option(s) {sorted(unknown)}; it takes objective, num_samples, beta, "
                            "free_bits and step")
        get = options.get
        return self._terms(params, batch, rng, get("objective"), get("num_samples"), get("beta"), get("free_bits"),
                           get("step"), False)["loss"]

    # -- evaluation ----------------------------------------------------------------------------------
    def log_prob_estimate(self, params, x, rng, k=5000, *, context=None, chunk_size=None):
        """log p(x | c) ~= logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K, z_k ~ q(z | x).

        x (n, D) -> (n,). Importance sampling with the encoder as proposal: a lower bound in expectation
        (the IWAE bound) that converges to log p(x) as K grows. The K draws go in chunks of ``chunk_size``
        (default: about 2^22 decoder outputs per chunk), summed by a running logsumexp, so memory does not
        grow with K. Works on every backend (no gradients needed).
        """
        self.check_params(params)
        check_array(x, "x", ndim=2, last_dim=self.data_dim)
        self._check_inputs(x, context)
        k = check_positive_int(k, "k")
        if chunk_size is None:
            per_draw = max(1, x.shape[0] * self.data_dim * self.params_per_dim)
            chunk_size = max(1, min(k, (1 << 22) // per_draw))
        chunk_size = check_positive_int(chunk_size, "chunk_size")
        xp = namespace(x, params)
        total = None
        rngs = rng.split((k + chunk_size - 1) // chunk_size)
        done = 0
        for r in rngs:
            m = min(chunk_size, k - done)
            done += m
            log_px, log_pz, log_q, _, _ = self._log_weights(params, x, context, r, m)
            part = ops.logsumexp(log_px + log_pz - log_q, axis=0)
            total = part if total is None else xp.logaddexp(total, part)
        return total - math.log(k)

    def encode(self, params, x, context=None, rng=None):
        """The posterior mean mu(x) (..., L) of q_0, or, given ``rng``, one draw z ~ q(z | x) (through the flow)."""
        self.check_params(params)
        self._check_inputs(x, context)
        if rng is None:
            return self.posterior_base(params, x, context)[0].base_dist.loc
        return self._posterior_sample(params, x, context, rng, 1)[0][0]

    def decode(self, params, z, context=None):
        """The mean of p(x | z, c): z (..., L) -> (..., D) (probabilities for Bernoulli, mean level for levels)."""
        self.check_params(params)
        check_array(z, "z", min_ndim=1, last_dim=self.latent_dim)
        return self.decoder_distribution(params, z, context).base_dist.mean

    def sample(self, params, rng, n, context=None, *, mean=False, dtype=None):
        """x ~ p(x | z, c), z ~ p(z | c): n samples (n, D) on ``rng``'s backend (``mean=True``: E[x | z]).

        context: (context_dim,) (one condition for all n) or (n, context_dim).
        """
        self.check_params(params)
        n = check_positive_int(n, "n")
        dtype = params_dtype(params) if dtype is None else check_dtype(dtype)
        r1, r2 = rng.split(2)
        if self.context_dim:
            if context is None:
                raise ValueError(f"context: this VAE is conditional (context_dim={self.context_dim}), got None")
            check_array(context, "context", min_ndim=1, last_dim=self.context_dim)
            context = namespace(context).broadcast_to(context, (n, self.context_dim))
        if getattr(self.prior, "needs_posterior", False):
            z = self.prior.sample(params["prior"], r1, n, posterior=self._q_of(params))
        else:
            z = self.prior.sample(params["prior"], r1, n, context, dtype=dtype)
        z = ops.stop_gradient(z)
        dist = self.decoder_distribution(params, z, context)
        if mean:
            return dist.base_dist.mean
        x = dist.sample(r2)
        xp = namespace(x)
        return x if xp.isdtype(x.dtype, "real floating") else xp.astype(x, getattr(xp, dtype))

    def interpolate(self, params, x0, x1, steps=8, context=None):
        """Decoded means along the straight line between the posterior means of x0 and x1 (D,): (steps, D)."""
        steps = check_int(steps, "steps", low=2)
        xp = namespace(x0, params)
        z = self.encode(params, xp.stack([x0, x1]), None if context is None else xp.stack([context, context]))
        t = xp.reshape(xp.linspace(0.0, 1.0, steps, dtype=z.dtype, device=xp.device_of(z)), (steps, 1))
        zs = (1.0 - t) * z[0] + t * z[1]
        c = None if context is None else xp.broadcast_to(context, (steps, context.shape[-1]))
        return self.decode(params, zs, c)

    def traverse(self, params, x, dim, values, context=None):
        """Decoded means with latent coordinate ``dim`` of x's posterior mean set to each of ``values``: (V, D)."""
        dim = check_nonnegative_int(dim, "dim")
        if dim >= self.latent_dim:
            raise ValueError(f"dim: expected a latent coordinate in [0, {self.latent_dim - 1}], got {dim}")
        xp = namespace(x, params)
        z = self.encode(params, xp.reshape(x, (1, self.data_dim)),
                        None if context is None else xp.reshape(context, (1, self.context_dim)))
        v = xp.reshape(xp.asarray([float(a) for a in values], dtype=z.dtype, device=xp.device_of(z)), (-1, 1))
        onehot = xp.reshape(xp.astype(xp.arange(self.latent_dim, device=xp.device_of(z)) == dim, z.dtype),
                            (1, self.latent_dim))
        zs = z * (1.0 - onehot) + v * onehot
        c = None if context is None else xp.broadcast_to(context, (v.shape[0], self.context_dim))
        return self.decode(params, zs, c)
