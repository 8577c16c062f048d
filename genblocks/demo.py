"""The rows of ``genblocks demo``: one small model per family, trained with train/, scored on held-out data.

Each row is ``row(rng, *, smoke=False) -> dict`` with keys family, model, data, metric, value (the test NLL
in nats where the family has a likelihood, with how it is computed in ``metric``), seconds (training and
scoring), samples (1000 draws), sample_ms (milliseconds per 1000 samples), test (the held-out points:
``test_points(smoke)`` of them for every row) and params (how many numbers were trained). The CLI adds the
MMD^2 of samples against test for every row. ``FAMILIES`` is the table the CLI runs. The model files hold
only the lecture; training, data and metrics come together here.
"""

import math
import time

from genblocks.backends import to_numpy
from genblocks.blocks.discriminators import MLPDiscriminator, MLPGenerator
from genblocks.blocks.nn import MLP
from genblocks.blocks.samplers import clip_sample
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet
from genblocks.data import checkerboard, eight_gaussians, moons
from genblocks.metrics import mixture_modes
from genblocks.models.autoregressive import MADEModel
from genblocks.models.diffusion import Diffusion
from genblocks.models.flow import neural_spline_flow
from genblocks.models.gan import GAN
from genblocks.models.mixture import GaussianMixture
from genblocks.models.vae import VAE
from genblocks.train.loop import fit
from genblocks.train.optim import adam, cosine_decay
from genblocks.train.tree import tree_leaves

TEST_POINTS = 2000  # held-out points per row, the same for every family (256 with smoke=True)


def test_points(smoke):
    """How many held-out points each row scores: the same number for every family."""
    return 256 if smoke else TEST_POINTS


def count_params(params):
    """The number of trained numbers in a parameter tree."""
    return int(sum(math.prod(tuple(leaf.shape)) for leaf in tree_leaves(params)))


def finish_row(start, draw, test, params, *, n=1000, **fields):
    """A row's dict: ``fields`` plus seconds since ``start`` (training and scoring), n samples ``draw(n)`` and
    their milliseconds per 1000, the held-out ``test`` points and the number of trained ``params``."""
    seconds = time.perf_counter() - start
    begin = time.perf_counter()
    samples = to_numpy(draw(n))
    sample_ms = (time.perf_counter() - begin) * 1000.0 * 1000.0 / n
    return {**fields, "seconds": seconds, "samples": samples, "sample_ms": sample_ms, "test": to_numpy(test),
            "params": count_params(params)}


def mixture_row(rng, *, smoke=False):
    """Fit an 8-component mixture to two moons; report held-out NLL in nats (the demo's baseline row)."""
    start = time.perf_counter()
    data_rng, init_rng, fit_rng, test_rng, sample_rng = rng.split(5)
    train = moons(data_rng, 512 if smoke else 4096)
    test = moons(test_rng, test_points(smoke))
    model = GaussianMixture(2, 8)
    params = model.init(init_rng)
    result = fit(model.loss, params, train, fit_rng, adam(0.05), 60 if smoke else 600, batch_size=256,
                 progress=False)
    nll = float(to_numpy(model.loss(result.params, test)))
    return finish_row(start, lambda n: model.sample(result.params, sample_rng, n), test, result.params,
                      family="baseline", model="Gaussian mixture (K=8)", data="two moons",
                      metric="test NLL (nats, exact)", value=nll)


def flow_row(rng, *, smoke=False):
    """Train a small neural spline flow on the checkerboard; report held-out NLL (true entropy log 32)."""
    start = time.perf_counter()
    data_rng, test_rng, init_rng, fit_rng, sample_rng = rng.split(5)
    train = checkerboard(data_rng, 512 if smoke else 20000)
    test = checkerboard(test_rng, test_points(smoke))
    flow = neural_spline_flow(2, layers=2 if smoke else 4, bins=8, bound=3.0,
                              hidden=(16,) if smoke else (32, 32))
    params = flow.init_from_data(flow.init(init_rng), train)
    steps = 30 if smoke else 1000
    result = fit(flow.loss, params, train, fit_rng, adam(cosine_decay(3e-3, steps)), steps, batch_size=256,
                 progress=False)
    nll = float(to_numpy(flow.loss(result.params, test)))
    return finish_row(start, lambda n: flow.sample(result.params, sample_rng, n), test, result.params,
                      family="flow", model="neural spline flow (coupling)", data="checkerboard",
                      metric=f"test NLL (nats, exact; optimum {math.log(32.0):.3f})", value=nll)


def diffusion_row(rng, *, smoke=False):
    """Train a small DDPM on the checkerboard; report the PF-ODE test NLL (nats) and DPM-Solver++ samples.

    ``rng``: a numpy-backend Rng (training uses autograd).
    """
    start = time.perf_counter()
    r_data, r_test, r_init, r_fit, r_sample = rng.split(5)
    n_train, steps, width = (256, 30, 16) if smoke else (20000, 3000, 64)
    n_test = test_points(smoke)
    data = to_numpy(checkerboard(r_data, n_train)) / 2.0
    test = to_numpy(checkerboard(r_test, n_test)) / 2.0
    net = MLPScoreNet(2, (width, width, width), time_embed_dim=32)
    model = Diffusion(net, DiscreteSchedule("squaredcos_cap_v2", 200))
    params = model.init(r_init)
    params = fit(model.loss, params, data, r_fit, adam(cosine_decay(3e-3, steps, 1e-4)), steps, batch_size=256,
                 progress=False).params
    tol = 1e-2 if smoke else 1e-3
    # the data were scaled by 1/2: log p_x(x) = log p_z(x / 2) - 2 log 2
    nll = -to_numpy(model.log_prob(params, test, rtol=tol, atol=tol)) + 2.0 * math.log(2.0)
    # DPM-Solver++(2M), 20 steps, predictions of x_0 clipped to the data range [-2, 2]: unclipped, the
    # first steps (SNR near 0 on the cosine schedule) amplify the eps error into streaks
    def draw(n):
        return 2.0 * model.sample(params, r_sample, n, sampler="dpm_solver_pp",
                                  num_inference_steps=20 if not smoke else 5, x0_transform=clip_sample(2.0))

    return finish_row(start, draw, 2.0 * test, params, n=1000 if not smoke else 64, family="diffusion",
                      model="DDPM (MLP + FiLM, cosine T=200), DPM-Solver++ 20", data="checkerboard",
                      metric="test NLL (nats, PF-ODE)", value=float(nll.mean()))


def made_row(rng, *, smoke=False):
    """Fit a MADE with Gaussian-mixture conditionals, p(x) = p(x_1) p(x_2 | x_1), to two moons; test NLL (nats).

    The same data and metric as the baseline row, so the two numbers compare directly.
    """
    start = time.perf_counter()
    data_rng, init_rng, fit_rng, test_rng, sample_rng = rng.split(5)
    train = moons(data_rng, 512 if smoke else 4096)
    test = moons(test_rng, test_points(smoke))
    model = MADEModel(2, (16,) if smoke else (64, 64), output="mixture_gaussian", num_components=8)
    params = model.init(init_rng)
    steps = 60 if smoke else 1500
    lr = cosine_decay(1e-2 if smoke else 3e-3, steps)
    result = fit(model.loss, params, train, fit_rng, adam(lr), steps, batch_size=256, progress=False)
    nll = float(to_numpy(model.loss(result.params, test)))
    return finish_row(start, lambda n: model.sample(result.params, sample_rng, n), test, result.params,
                      family="autoregressive", model="MADE (mixture of 8 Gaussians per conditional)",
                      data="two moons", metric="test NLL (nats, exact)", value=nll)


def vae_row(rng, *, smoke=False):
    """Train a VAE (2-D latent, Gaussian decoder with its own scale) on two moons with the IWAE bound (K = 4);
    report the importance-sampled test NLL (nats; K = 1000 draws from the encoder per point).

    The same data and metric as the baseline and MADE rows. Measured with Rng(0): 2.86 nats (50 s on a loaded
    2-core machine); an ELBO-trained VAE of the same size scored about 0.2 nats worse in a comparison run.
    """
    start = time.perf_counter()
    data_rng, init_rng, fit_rng, test_rng, sample_rng, is_rng = rng.split(6)
    train = moons(data_rng, 512 if smoke else 4096)
    test = moons(test_rng, test_points(smoke))
    h = 16 if smoke else 32
    model = VAE(MLP((2, h, h, 4)), MLP((2, h, h, 4)), likelihood="gaussian", scale="decoder", objective="iwae",
                num_samples=2 if smoke else 4)
    params = model.init(init_rng)
    steps = 60 if smoke else 1000
    result = fit(model.loss, params, train, fit_rng, adam(cosine_decay(3e-3, steps)), steps, batch_size=256,
                 progress=False)
    k = 50 if smoke else 1000
    nll = -float(to_numpy(model.log_prob_estimate(result.params, test, is_rng, k)).mean())
    return finish_row(start, lambda n: model.sample(result.params, sample_rng, n), test, result.params,
                      family="vae", model=f"VAE (2-D latent, IWAE K={model.num_samples})", data="two moons",
                      metric=f"test NLL (nats, importance-sampled K={k})", value=nll)


def gan_row(rng, *, smoke=False):
    """A non-saturating GAN (3-layer MLPs) on 8 Gaussians; no likelihood, so the value is the MMD^2 to test data.

    Samples come from the generator's parameter EMA; the row also reports the modes covered and the
    high-quality rate (samples within 3 std of a centre).
    """
    start = time.perf_counter()
    data_rng, test_rng, init_rng, fit_rng, sample_rng = rng.split(5)
    train = eight_gaussians(data_rng, 512 if smoke else 20000)
    test = eight_gaussians(test_rng, test_points(smoke))
    width, steps = (16, 30) if smoke else (128, 2000)
    gan = GAN(MLPGenerator(2, 2, (width,) * 3), MLPDiscriminator(2, (width,) * 3), loss="non_saturating")
    params = gan.init(init_rng)
    lr = cosine_decay(1e-3, steps, 5e-5)
    result = fit(None, params, train, fit_rng, None, steps, groups=gan.players(adam(lr, b1=0.5), adam(lr, b1=0.5)),
                 state=gan.init_state(params), batch_size=256, ema_decay=0.99, progress=False)
    row = finish_row(start, lambda n: gan.sample(result.ema_params, sample_rng, n), test, result.params["gen"],
                     family="gan", model=f"GAN (non-saturating, MLP 3x{width}, EMA)", data="8 Gaussians",
                     metric="none (a GAN has no likelihood)", value=None)
    modes = mixture_modes(row["samples"], "eight_gaussians")
    return {**row, "modes_covered": modes["n_modes_covered"], "high_quality": modes["high_quality"]}


# (family, row): the order ``genblocks demo`` runs and prints them in
FAMILIES = (
    ("baseline", mixture_row),
    ("flow", flow_row),
    ("diffusion", diffusion_row),
    ("autoregressive", made_row),
    ("vae", vae_row),
    ("gan", gan_row),
)
