"""One unit for every family's likelihood on 17-level digits: nats per image, and bits per dimension as
nats / (64 log 2) of the discrete images. A model that is uniform over the 17 levels of each of the 64
pixels has -log P(x) = 64 log 17 nats = log2(17) bits/dim exactly, whichever family it is written in and
whichever route (exact discrete likelihood, importance-sampled bound, dequantized density) reports it."""

import math

import numpy as np
import pytest

from genblocks.backends import Rng, to_numpy
from genblocks.blocks.nn import MLP
from genblocks.data import load_digits
from genblocks.metrics import bits_per_dim_to_nats, nats_to_bits_per_dim
from genblocks.models.autoregressive import MADEModel
from genblocks.models.vae import VAE
from genblocks.train.recipes import (
    dequantized_nll,
    diffusion_bound,
    digits_diffusion,
    levels_to_unit,
    ode_discrete_nll,
)

K, D = 17, 64
UNIFORM_NATS = D * math.log(K)


@pytest.fixture(scope="module")
def levels():
    return to_numpy(load_digits(split="test", backend="numpy", dtype="float64")[0][:12])


def zeros_like_tree(tree):
    if isinstance(tree, dict):
        return {k: zeros_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(zeros_like_tree(v) for v in tree)
    return np.zeros_like(tree)


def test_the_conversion_itself():
    assert nats_to_bits_per_dim(UNIFORM_NATS, D) == pytest.approx(math.log2(K), rel=1e-12)
    # a density on [0, 1)^D (levels divided by K) is D log K nats short of the discrete NLL
    assert nats_to_bits_per_dim(0.0, D, num_bins=K) == pytest.approx(math.log2(K), rel=1e-12)
    assert bits_per_dim_to_nats(math.log2(K), D) == pytest.approx(UNIFORM_NATS, rel=1e-12)


def test_autoregressive_exact_likelihood(levels):
    made = MADEModel(D, (32,), output="categorical", num_classes=K)
    params = zeros_like_tree(made.init(Rng(0), "float64"))  # every logit 0: uniform conditionals
    nats = -float(np.mean(to_numpy(made.log_prob(params, levels))))
    assert nats == pytest.approx(UNIFORM_NATS, rel=1e-12)
    assert nats_to_bits_per_dim(nats, D) == pytest.approx(math.log2(K), rel=1e-12)


def test_vae_importance_sampled_likelihood(levels):
    vae = VAE(MLP((D, 16, 4)), MLP((2, 16, D * K)), likelihood="categorical", num_levels=K)
    params = zeros_like_tree(vae.init(Rng(0), "float64"))  # q(z | x) = p(z), p(x | z) uniform
    nats = -float(np.mean(to_numpy(vae.log_prob_estimate(params, levels, Rng(1), k=8))))
    assert nats == pytest.approx(UNIFORM_NATS, rel=1e-12)


class UniformDensity:
    """log p = -D log(width) on a box of side ``width``: a stand-in for a flow or a PF-ODE density."""

    def __init__(self, width):
        self.width = width

    def log_prob(self, params, x, context=None, **kw):
        return np.full(x.shape[0], -D * math.log(self.width))


def test_flow_dequantized_bound(levels):
    # a density uniform on [0, 1)^D, the unit cube that dequantized levels (x + u) / K fill
    out = dequantized_nll(UniformDensity(1.0), {}, levels, Rng(0), num_bins=K)
    assert out["nats"] == pytest.approx(UNIFORM_NATS, rel=1e-12)
    assert out["bits_per_dim"] == pytest.approx(math.log2(K), rel=1e-12)


def test_diffusion_pf_ode_dequantized_bound(levels):
    # on the grid {-1, ..., 1} the 17 bins of width 2/16 fill [-17/16, 17/16]: a uniform density there
    out = ode_discrete_nll(UniformDensity(2.0 * K / (K - 1)), {}, levels_to_unit(levels), Rng(0), num_bins=K)
    assert out["nats"] == pytest.approx(UNIFORM_NATS, rel=1e-12)


def test_diffusion_variational_bound_reports_the_same_units(levels):
    model = digits_diffusion(hidden=(8,), time_embed_dim=8, num_timesteps=10)
    params = model.init(Rng(0), "float64")
    x = levels_to_unit(levels)
    terms = model.loss_terms(params, x, Rng(1))
    assert float(terms["bits_per_dim"]) == pytest.approx(nats_to_bits_per_dim(float(terms["vlb"]), D), rel=1e-12)
    b = diffusion_bound(model, params, x, Rng(1), passes=1)
    assert b["bits_per_dim"] == pytest.approx(nats_to_bits_per_dim(b["nats"], D), rel=1e-12)
    # the decoder's probabilities are over the same 17 bins: they sum to 1 at every pixel
    from genblocks.models.diffusion import discretized_gaussian_log_likelihood

    grid = levels_to_unit(np.arange(K, dtype=float))
    assert np.exp(discretized_gaussian_log_likelihood(grid, np.zeros(K), np.full(K, -1.0), K)).sum() == \
        pytest.approx(1.0, abs=1e-12)
