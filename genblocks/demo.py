"""The rows of ``genblocks demo``: one small model per family, trained with train/, scored on held-out data.

Each row is ``row(rng, *, smoke=False, progress=False) -> dict`` with keys family, model, data, metric, value
(the test NLL in nats where the family has a likelihood, with how it is computed in ``metric``), seconds (training and
scoring), samples (1000 draws), sample_ms (milliseconds per 1000 samples), test (the held-out points:
``test_points(smoke)`` of them for every row) and params (how many numbers were trained); the flow and
diffusion rows add path, a list of (PATH_POINTS, 2) arrays from noise to data (the flow after each layer,
the sampler after each step). Rows take ``progress=`` for ``fit``'s bar (False, or a label). The CLI adds the
MMD^2 of samples against test for every row. ``FAMILIES`` is the table the CLI runs on 2-D data,
``DIGIT_FAMILIES`` the one for ``--data digits`` (8x8 digits at 17 levels). The model files hold
only the lecture; training, data and metrics come together here.
"""

import functools
import math
import time

from genblocks.backends import Rng, namespace, to_numpy
from genblocks.blocks import bijectors as bj
from genblocks.blocks.discriminators import MLPDiscriminator, MLPGenerator
from genblocks.blocks.nn import MLP
from genblocks.blocks.samplers import clip_sample
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet
from genblocks.data import checkerboard, eight_gaussians, load_digits, moons, quantize, uniform_dequantize
from genblocks.metrics import mixture_modes
from genblocks.models.autoregressive import MADEModel
from genblocks.models.diffusion import Diffusion
from genblocks.models.flow import Flow, neural_spline_flow
from genblocks.models.gan import GAN
from genblocks.models.mixture import GaussianMixture
from genblocks.models.vae import VAE
from genblocks.train.loop import fit
from genblocks.train.optim import adam, cosine_decay
from genblocks.train.recipes import dequantized_loss, dequantized_nll
from genblocks.train.tree import tree_leaves

TEST_POINTS = 2000  # held-out points per row, the same for every family (256 with smoke=True)
PATH_POINTS = 300  # points whose way from noise to data the flow and diffusion rows trace for the picture


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


def mixture_row(rng, *, smoke=False, progress=False):
    """Fit an 8-component mixture to two moons; report held-out NLL in nats (the demo's baseline row)."""
    start = time.perf_counter()
    data_rng, init_rng, fit_rng, test_rng, sample_rng = rng.split(5)
    train = moons(data_rng, 512 if smoke else 4096)
    test = moons(test_rng, test_points(smoke))
    model = GaussianMixture(2, 8)
    params = model.init(init_rng)
    result = fit(model.loss, params, train, fit_rng, adam(0.05), 60 if smoke else 600, batch_size=256,
                 progress=progress)
    nll = float(to_numpy(model.loss(result.params, test)))
    return finish_row(start, lambda n: model.sample(result.params, sample_rng, n), test, result.params,
                      family="baseline", model="Gaussian mixture (K=8)", data="two moons",
                      metric="test NLL (nats, exact)", value=nll)


def flow_row(rng, *, smoke=False, progress=False):
    """Train a small neural spline flow on the checkerboard; report held-out NLL (true entropy log 32)."""
    start = time.perf_counter()
    data_rng, test_rng, init_rng, fit_rng, sample_rng, path_rng = rng.split(6)
    train = checkerboard(data_rng, 512 if smoke else 20000)
    test = checkerboard(test_rng, test_points(smoke))
    flow = neural_spline_flow(2, layers=2 if smoke else 4, bins=8, bound=3.0,
                              hidden=(16,) if smoke else (32, 32))
    params = flow.init_from_data(flow.init(init_rng), train)
    steps = 30 if smoke else 1000
    result = fit(flow.loss, params, train, fit_rng, adam(cosine_decay(3e-3, steps)), steps, batch_size=256,
                 progress=progress)
    nll = float(to_numpy(flow.loss(result.params, test)))
    row = finish_row(start, lambda n: flow.sample(result.params, sample_rng, n), test, result.params,
                     family="flow", model="neural spline flow (coupling)", data="checkerboard",
                     metric=f"test NLL (nats, exact; optimum {math.log(32.0):.3f})", value=nll)
    # noise -> data, one layer at a time (not timed)
    return {**row, "path": [to_numpy(x) for x in flow.sample_path(result.params, path_rng, PATH_POINTS)]}


def diffusion_row(rng, *, smoke=False, progress=False):
    """Train a small DDPM on the checkerboard; report the PF-ODE test NLL (nats) and DPM-Solver++ samples.

    ``rng``: a numpy-backend Rng (training uses autograd).
    """
    start = time.perf_counter()
    r_data, r_test, r_init, r_fit, r_sample, r_path = rng.split(6)
    n_train, steps, width = (256, 30, 16) if smoke else (20000, 3000, 64)
    n_test = test_points(smoke)
    data = to_numpy(checkerboard(r_data, n_train)) / 2.0
    test = to_numpy(checkerboard(r_test, n_test)) / 2.0
    net = MLPScoreNet(2, (width, width, width), time_embed_dim=32)
    model = Diffusion(net, DiscreteSchedule("squaredcos_cap_v2", 200))
    params = model.init(r_init)
    params = fit(model.loss, params, data, r_fit, adam(cosine_decay(3e-3, steps, 1e-4)), steps, batch_size=256,
                 progress=progress).params
    tol = 1e-2 if smoke else 1e-3
    # the data were scaled by 1/2: log p_x(x) = log p_z(x / 2) - 2 log 2
    nll = -to_numpy(model.log_prob(params, test, rtol=tol, atol=tol)) + 2.0 * math.log(2.0)
    # DPM-Solver++(2M), 20 steps, predictions of x_0 clipped to the data range [-2, 2]: unclipped, the
    # first steps (SNR near 0 on the cosine schedule) amplify the eps error into streaks
    sampler = {"sampler": "dpm_solver_pp", "num_inference_steps": 20 if not smoke else 5,
               "x0_transform": clip_sample(2.0)}

    def draw(n):
        return 2.0 * model.sample(params, r_sample, n, **sampler)

    row = finish_row(start, draw, 2.0 * test, params, n=1000 if not smoke else 64, family="diffusion",
                     model="DDPM (MLP + FiLM, cosine T=200), DPM-Solver++ 20", data="checkerboard",
                     metric="test NLL (nats, PF-ODE)", value=float(nll.mean()))
    return {**row, "path": [2.0 * x for x in sampler_path(model, params, r_path, PATH_POINTS, 2, **sampler)]}


def sampler_path(model, params, rng, n, dim, **sampler):
    """[x_T, x after step 1, ..., x_0]: n of a diffusion sampler's own draws (n, dim) after each of its steps,
    as host arrays: the way from noise to data (not timed). x_T and then the sampler's noise come from rng."""
    x_T = rng.normal((n, dim))
    path = [to_numpy(x_T)]
    model.sample(params, rng, n, x_T=x_T, callback=lambda k, t, x: path.append(to_numpy(x)), **sampler)
    return path


def made_row(rng, *, smoke=False, progress=False):
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
    result = fit(model.loss, params, train, fit_rng, adam(lr), steps, batch_size=256, progress=progress)
    nll = float(to_numpy(model.loss(result.params, test)))
    return finish_row(start, lambda n: model.sample(result.params, sample_rng, n), test, result.params,
                      family="autoregressive", model="MADE (mixture of 8 Gaussians per conditional)",
                      data="two moons", metric="test NLL (nats, exact)", value=nll)


def vae_row(rng, *, smoke=False, progress=False):
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
                 progress=progress)
    k = 50 if smoke else 1000
    nll = -float(to_numpy(model.log_prob_estimate(result.params, test, is_rng, k)).mean())
    return finish_row(start, lambda n: model.sample(result.params, sample_rng, n), test, result.params,
                      family="vae", model=f"VAE (2-D latent, IWAE K={model.num_samples})", data="two moons",
                      metric=f"test NLL (nats, importance-sampled K={k})", value=nll)


def gan_row(rng, *, smoke=False, progress=False):
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
                 state=gan.init_state(params), batch_size=256, ema_decay=0.99, progress=progress)
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


# ---------------------------------------------------------------------------------------------------
# --data digits: the same families on scikit-learn's 8x8 digits at 17 grey levels (64 dimensions)
#
# Every row trains on the fixed split's 1000 training images and is scored on its 447 test images, in nats
# per image of the discrete 17-level data (the independent-pixel baseline is the floor to beat). Samples and
# held-out points are level images (n, 64) with values 0..16, so MMD^2 compares like with like.

LEVELS = 17


def _n(smoke):
    """Samples each digits row draws and times: 1000 (256 with smoke=True; MADE needs 64 passes per batch)."""
    return 256 if smoke else 1000


@functools.lru_cache(maxsize=None)
def _digits(split=("train", "test")):
    """The 17-level digits of the fixed 1000/350/447 split, host float32 arrays (n, 64): one per name in split.

    Read once per process (every digits row asks); the rows only read the arrays."""
    parts = load_digits(backend="numpy")
    return tuple(to_numpy(parts[name][0]) for name in split)


def _best_on_valid(nll_fn, params):
    """(eval_fn, best): an ``eval_fn`` for ``fit`` that keeps in best["params"] the params of lowest
    ``nll_fn(params)`` on the valid split seen so far (early stopping: 1000 training digits overfit)."""
    best = {"nll": math.inf, "params": params}

    def eval_fn(p):
        nll = float(to_numpy(nll_fn(p)))
        if nll < best["nll"]:
            best.update(nll=nll, params=p)
        return nll

    return eval_fn, best


def _to_unit(x):
    """Levels 0..16 -> [-1, 1]: x / 8 - 1 (the scale the diffusion model and the GAN work in)."""
    return x / 8.0 - 1.0


def _to_levels(y):
    """[-1, 1] -> the nearest of the 17 levels, clipped to 0..16."""
    xp = namespace(y)
    return xp.clip(xp.round((y + 1.0) * 8.0), 0.0, 16.0)


def pixels_digits_row(rng, *, smoke=False, progress=False):
    """Independent pixels: p(x) = prod_i Cat(x_i; pi_i), pi_i the training counts of pixel i plus 1/2 each.

    The floor every other model must beat: it knows each pixel's grey-level histogram and nothing else.
    """
    start = time.perf_counter()
    train, test = _digits()
    xp = namespace(train)
    levels = xp.arange(LEVELS, dtype=xp.float32)
    counts = xp.sum(xp.astype(train[:, :, None] == levels, xp.float64), axis=0) + 0.5  # (64, 17)
    log_pi = xp.log(counts) - xp.log(xp.sum(counts, axis=-1, keepdims=True))
    onehot = xp.astype(test[:, :, None] == levels, xp.float64)
    nll = -float(xp.mean(xp.sum(onehot * log_pi, axis=(1, 2))))
    params = {"log_pi": log_pi}

    def draw(n):
        return xp.astype(rng.categorical(log_pi, shape=(n, 64)), xp.float32)

    return finish_row(start, draw, test, params, n=_n(smoke), family="baseline",
                      model="independent pixels (17 levels each)", data="digits 8x8",
                      metric="test NLL (nats, exact)", value=nll)


def made_digits_row(rng, *, smoke=False, progress=False):
    """A categorical MADE over the 64 pixels (17 levels each): exact test NLL in nats per image."""
    start = time.perf_counter()
    init_rng, fit_rng, sample_rng = rng.split(3)
    train, valid, test = _digits(("train", "valid", "test"))
    # order- and connectivity-agnostic: 8 masks, each with its own random order, probabilities averaged
    model = MADEModel(64, (32,) if smoke else (512, 512), output="categorical", num_classes=LEVELS,
                      order="random", order_seed=0, num_masks=2 if smoke else 8)
    params = model.init(init_rng)
    steps = 20 if smoke else 3000
    eval_fn, best = _best_on_valid(lambda p: model.loss(p, valid), params)
    fit(model.loss, params, train, fit_rng, adam(cosine_decay(1e-3, steps)), steps, batch_size=100,
        eval_fn=eval_fn, eval_every=max(steps // 10, 1), progress=progress)
    params = best["params"]
    nll = float(to_numpy(model.loss(params, test)))
    return finish_row(start, lambda n: model.sample(params, sample_rng, n), test, params, n=_n(smoke),
                      family="autoregressive", model=f"MADE (categorical, {model.num_masks} orders)",
                      data="digits 8x8",
                      metric="test NLL (nats, exact)", value=nll)


def vae_digits_row(rng, *, smoke=False, progress=False):
    """A VAE, 16-D latent, whose decoder is a mixture of 3 discretized logistics over the 17 levels per pixel
    (neighbouring levels share mass: 17 free logits per pixel overfit 1000 digits); importance-sampled NLL."""
    start = time.perf_counter()
    init_rng, fit_rng, valid_rng, is_rng, sample_rng = rng.split(5)
    train, valid, test = _digits(("train", "valid", "test"))
    h, latent = (32, 4) if smoke else (256, 16)
    model = VAE(MLP((64, h, h, 2 * latent)), MLP((latent, h, h, 64 * 3 * 3)), likelihood="logistic_mixture",
                num_levels=LEVELS, num_components=3)
    params = model.init(init_rng)
    steps = 20 if smoke else 1500
    # early stopping on the valid split's ELBO (the same draws each time, so checks compare)
    draws = valid_rng.state()
    eval_fn, best = _best_on_valid(lambda p: model.loss(p, valid, Rng.from_state(draws)), params)
    fit(model.loss, params, train, fit_rng, adam(cosine_decay(1e-3, steps)), steps, batch_size=100,
        eval_fn=eval_fn, eval_every=max(steps // 10, 1), progress=progress)
    params = best["params"]
    k = 20 if smoke else 500
    nll = -float(to_numpy(model.log_prob_estimate(params, test, is_rng, k)).mean())
    return finish_row(start, lambda n: model.sample(params, sample_rng, n), test, params, n=_n(smoke),
                      family="vae", model=f"VAE ({latent}-D latent, logistic-mixture decoder)", data="digits 8x8",
                      metric=f"test NLL (nats, importance-sampled K={k})", value=nll)


def flow_digits_row(rng, *, smoke=False, progress=False):
    """A neural spline flow on dequantized digits y = (x + u) / 17 (a sigmoid last): a bound on the discrete NLL.

    -log P(x) <= E_u[-log p((x + u) / 17)] + 64 log 17 (``recipes.dequantized_nll``), one draw of u per image.
    """
    start = time.perf_counter()
    init_rng, fit_rng, eval_rng, sample_rng, path_rng = rng.split(5)
    train, test = _digits()
    base = neural_spline_flow(64, layers=2 if smoke else 4, bins=8, bound=3.0, hidden=(32,) if smoke else (256, 256))
    flow = Flow(64, bj.Chain([*base.bijector.bijectors, bj.Sigmoid()]))
    params = flow.init_from_data(flow.init(init_rng), uniform_dequantize(train, init_rng, num_bins=LEVELS))
    steps = 20 if smoke else 2000
    result = fit(dequantized_loss(flow, num_bins=LEVELS), params, train, fit_rng, adam(cosine_decay(1e-3, steps)),
                 steps, batch_size=100, clip_norm=100.0, progress=progress)
    nll = dequantized_nll(flow, result.params, test, eval_rng, num_bins=LEVELS)["nats"]
    row = finish_row(start, lambda n: quantize(flow.sample(result.params, sample_rng, n), num_bins=LEVELS), test,
                     result.params, n=_n(smoke), family="flow", model="neural spline flow (coupling), dequantized",
                     data="digits 8x8", metric="test NLL (nats, bound by uniform dequantization)", value=nll)
    path = flow.sample_path(result.params, path_rng, 4)
    return {**row, "path": [to_numpy(x) for x in path[:-1]] + [to_numpy(quantize(path[-1], num_bins=LEVELS))]}


def diffusion_digits_row(rng, *, smoke=False, progress=False):
    """DDPM on digits scaled to [-1, 1] with the discretized decoder over 17 bins: the full variational bound.

    -log P(x) <= L_T + sum_t L_t with L_0 the discretized Gaussian over the 17 bins (``Diffusion.loss_terms``,
    T network passes over the test set); samples by DPM-Solver++ 20, rounded to the nearest level.
    """
    start = time.perf_counter()
    init_rng, fit_rng, vlb_rng, sample_rng, path_rng = rng.split(5)
    train, test = _digits()
    width, T, steps = (32, 20, 20) if smoke else (256, 200, 3000)
    model = Diffusion(MLPScoreNet(64, (width,) * 3), DiscreteSchedule("squaredcos_cap_v2", T), decoder="discretized",
                      num_bins=LEVELS)
    params = model.init(init_rng)
    params = fit(model.loss, params, _to_unit(train), fit_rng, adam(cosine_decay(1e-3, steps, 1e-5)), steps,
                 batch_size=128, progress=progress).params
    vlb = float(to_numpy(model.loss_terms(params, _to_unit(test), vlb_rng)["vlb"]))
    n_steps = 5 if smoke else 20
    sampler = {"sampler": "dpm_solver_pp", "num_inference_steps": n_steps, "x0_transform": clip_sample(1.0)}

    def draw(n):
        return _to_levels(model.sample(params, sample_rng, n, **sampler))

    row = finish_row(start, draw, test, params, n=_n(smoke), family="diffusion",
                     model=f"DDPM (MLP + FiLM, cosine T={T}), DPM-Solver++ {n_steps}", data="digits 8x8",
                     metric=f"test NLL (nats, variational bound, all {T} terms)", value=vlb)
    path = sampler_path(model, params, path_rng, 4, 64, **sampler)
    return {**row, "path": path[:-1] + [_to_levels(path[-1])]}


def gan_digits_row(rng, *, smoke=False, progress=False):
    """A non-saturating GAN (MLPs, tanh output) on digits scaled to [-1, 1]; no likelihood, MMD^2 only."""
    start = time.perf_counter()
    init_rng, fit_rng, sample_rng = rng.split(3)
    train, test = _digits()
    width, steps = (32, 20) if smoke else (256, 3000)
    gan = GAN(MLPGenerator(16, 64, (width, width), final_activation="tanh"), MLPDiscriminator(64, (width, width)),
              loss="non_saturating")
    params = gan.init(init_rng)
    lr = cosine_decay(2e-4, steps, 1e-5)
    result = fit(None, params, _to_unit(train), fit_rng, None, steps,
                 groups=gan.players(adam(lr, b1=0.5), adam(lr, b1=0.5)), state=gan.init_state(params),
                 batch_size=100, ema_decay=0.999, progress=progress)
    return finish_row(start, lambda n: _to_levels(gan.sample(result.ema_params, sample_rng, n)), test,
                      result.params["gen"], n=_n(smoke), family="gan",
                      model=f"GAN (non-saturating, MLP 2x{width}, EMA)", data="digits 8x8",
                      metric="none (a GAN has no likelihood)", value=None)


# (family, row) on the digits: ``genblocks demo --data digits``
DIGIT_FAMILIES = (
    ("baseline", pixels_digits_row),
    ("flow", flow_digits_row),
    ("diffusion", diffusion_digits_row),
    ("autoregressive", made_digits_row),
    ("vae", vae_digits_row),
    ("gan", gan_digits_row),
)
