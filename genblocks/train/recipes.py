"""Recipes that join a model to data, metrics and the training loop (model files import blocks only).

- ``dequantized_loss(flow, num_bins=K)``: a ``fit`` loss for integer data, -mean log p((x + u) / K) with fresh
  u ~ U[0, 1)^D every call; ``dequantized_nll``: the discrete NLL bound in nats and bits per dimension.
- ``train_noisy_classifier``: fit a ``NoisyClassifier`` for classifier guidance on noised data.
"""

from genblocks.backends import namespace, to_numpy
from genblocks.blocks.base import check_array
from genblocks.blocks.validate import check_positive_int
from genblocks.data import dequantization_log_det, uniform_dequantize
from genblocks.metrics import nats_to_bits_per_dim

from .loop import fit
from .optim import adam

__all__ = ["dequantized_loss", "dequantized_nll", "train_noisy_classifier"]


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
