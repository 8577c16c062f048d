"""Gaussian mixture model fit by gradient descent: the flow-free baseline of `genblocks demo` (row in demo.py).

    log p(x) = logsumexp_k [ log pi_k + sum_d log N(x_d; mu_kd, sigma_kd) ],   pi = softmax(logits)

Read top to bottom: parameters, the per-component log-densities, the mixture log-density, the loss
(mean negative log-likelihood), the decomposition a teacher shows, and sampling.
"""

import math

from genblocks.backends import namespace
from genblocks.blocks import ops
from genblocks.blocks.base import Block, check_array, check_dtype, resolve_dtype
from genblocks.blocks.validate import check_positive_int

LOG_2PI = math.log(2.0 * math.pi)


class GaussianMixture(Block):
    """K diagonal Gaussians in D dimensions: params {"logits": (K,), "loc": (K, D), "log_scale": (K, D)}.

    ``log_prob(params, x)``: x (..., D) -> (...,). ``sample(params, rng, n)`` -> (n, D).
    """

    def __init__(self, dim, num_components=8, *, init_scale=1.0):
        self.dim = check_positive_int(dim, "dim")
        self.num_components = check_positive_int(num_components, "num_components")
        if not init_scale > 0:
            raise ValueError(f"init_scale: expected a positive float, got {init_scale!r}")
        self.init_scale = float(init_scale)

    def init(self, rng, dtype="float32"):
        check_dtype(dtype)
        k, d = self.num_components, self.dim
        xp = rng.xp
        dt = resolve_dtype(xp, dtype)
        return {
            "logits": xp.zeros((k,), dtype=dt),
            "loc": rng.normal((k, d), dtype=dtype, scale=self.init_scale),
            "log_scale": xp.zeros((k, d), dtype=dt),
        }

    def component_log_prob(self, params, x):
        """log N(x; mu_k, diag sigma_k^2) for every k: x (..., D) -> (..., K)."""
        self.check_params(params)
        check_array(x, "x", min_ndim=1, last_dim=self.dim)
        xp = namespace(params, x)
        x = xp.expand_dims(x, axis=-2)  # (..., 1, D)
        z = (x - params["loc"]) * xp.exp(-params["log_scale"])
        return xp.sum(-0.5 * z * z - params["log_scale"] - 0.5 * LOG_2PI, axis=-1)

    def log_prob(self, params, x):
        """log p(x) = logsumexp_k (log pi_k + log N(x; mu_k, sigma_k)): x (..., D) -> (...,)."""
        self.check_params(params)
        log_weights = ops.log_softmax(params["logits"])
        return ops.logsumexp(log_weights + self.component_log_prob(params, x), axis=-1)

    def loss(self, params, batch, rng=None):
        """Mean negative log-likelihood in nats per example."""
        xp = namespace(params, batch)
        return -xp.mean(self.log_prob(params, batch))

    def loss_terms(self, params, batch, rng=None):
        """The per-component responsibilities and the mixture weights behind the NLL."""
        self.check_params(params)
        xp = namespace(params, batch)
        joint = ops.log_softmax(params["logits"]) + self.component_log_prob(params, batch)
        log_px = ops.logsumexp(joint, axis=-1)
        return {
            "nll": -xp.mean(log_px),
            "weights": ops.softmax(params["logits"]),
            "responsibilities": xp.mean(xp.exp(joint - xp.expand_dims(log_px, axis=-1)), axis=0),
        }

    def sample(self, params, rng, n):
        """Ancestral sampling: k ~ Categorical(pi), then x = mu_k + sigma_k * eps. Returns (n, D)."""
        self.check_params(params)
        check_positive_int(n, "n")
        xp = namespace(params)
        k = rng.categorical(params["logits"], (n,))
        loc = xp.take(params["loc"], k, axis=0)
        scale = xp.exp(xp.take(params["log_scale"], k, axis=0))
        return loc + scale * rng.normal((n, self.dim), dtype=params["loc"].dtype)
