"""GANs on the 8-Gaussian ring and the 5x5 grid (std 0.05): modes, high-quality rate, MMD, ms per D and G step.

Each run trains a 3x128 MLP generator and discriminator (latent dimension 2, Adam b1 = 0.5, lr 2e-3
cosine-decayed to 5%, generator EMA 0.99; by default the discriminator has the minibatch-std feature and
its first-layer kinks start inside [-4, 4]^2, ``MLPDiscriminator(input_range=4)``: the recipe that took the
grid from 1 to 11 of 25 modes, docs/gan.md) for a wall-clock budget (``--seconds``, default 120, the
figure the issue quotes for PyTorch) or a step count, then scores 2500 samples of the EMA generator: modes
covered (a mode counts with at least 20 samples within 3 std of its centre, PacGAN's rule), the
high-quality rate (the fraction of samples within 3 std of some centre) and the MMD^2 to 2000 held-out
points. Losses: non-saturating, and WGAN-GP (n_critic 5; ``--wgan-betas 0 0.9 --d-lr-scale 4`` is the
setting that works). Prints ms per discriminator step and per generator step (forward, backward, Adam)
and, when torch is importable, the same figures for a PyTorch twin of the non-saturating run (same D start
and learning rates, no minibatch std) trained for the same time or steps. Then an MLP GAN on the 8x8
digits, scored by the Frechet distance on ``genblocks.metrics.DigitsFeatures`` (``--digits-steps 0``
skips it).

    python benchmarks/bench_gan.py                   # both targets, both losses, 120 s each, digits (15 minutes)
    python benchmarks/bench_gan.py --quick           # tiny sizes: checks the script runs (seconds)
    python benchmarks/bench_gan.py --targets grid_gaussians --losses non_saturating --steps 1500 --seconds 100000

Measured figures, with the commands and the machine's load, are in docs/gan.md ("Measured"): at 1500
steps 8/8 at 97.8% on eight Gaussians and 11/25 at 51.8% on the grid; the default (120 s or 4000 steps) at
load about 10 gave 20/25 at 74.0% on the grid in 4000 steps (122 s; PyTorch twin 13/25 in 81 s).
Figures move with the machine's load and the BLAS build.
"""

import argparse
import math
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_flows import set_blas_threads  # noqa: E402 (benchmarks/bench_flows.py, beside this script)

from genblocks.backends import Rng, to_numpy, value_and_grad  # noqa: E402
from genblocks.blocks.discriminators import MLPDiscriminator, MLPGenerator  # noqa: E402
from genblocks.data import toy  # noqa: E402
from genblocks.metrics import mixture_modes, mmd  # noqa: E402
from genblocks.models.gan import GAN  # noqa: E402
from genblocks.train.loop import fit  # noqa: E402
from genblocks.train.optim import adam, cosine_decay  # noqa: E402

LOSSES = {"non_saturating": dict(loss="non_saturating"),
          "wgan_gp": dict(loss="wasserstein", penalty="gp", n_critic=5)}
N_EVAL, MIN_COUNT = 2500, 20



def score(samples, target, test):
    modes = mixture_modes(samples, target, min_count=MIN_COUNT)
    return {"modes": f"{modes['n_modes_covered']}/{modes['n_modes']}", "hq": modes["high_quality"],
            "mmd": float(to_numpy(mmd(samples, test)))}


def step_ms(gan, params, state, batch, repeats=20):
    """Median ms of one D update and one G update (value_and_grad + Adam)."""
    out = {}
    for name, loss in (("disc", gan.loss_d_and_state), ("gen", gan.loss_g_and_state)):
        init, update = adam(1e-4)
        opt = init(params[name])
        vg = value_and_grad(lambda own, p=params, loss=loss, name=name: loss({**p, name: own}, state, batch,
                                                                            Rng(0))[0])
        times = []
        for i in range(repeats + 2):
            start = time.perf_counter()
            _, g = vg(params[name])
            update(g, opt, params[name])
            if i >= 2:
                times.append(1000 * (time.perf_counter() - start))
        out[name] = statistics.median(times)
    return out


def train(target, loss_name, args):
    data = to_numpy(toy(target, Rng(0), args.n_train))
    test = to_numpy(toy(target, Rng(9), 2000))
    w = args.width
    gan = GAN(MLPGenerator(args.latent, 2, (w,) * 3),
              MLPDiscriminator(2 * args.pack, (w,) * 3, minibatch_std=args.minibatch_std,
                               spectral_norm=args.spectral_norm, input_range=args.input_range or None),
              pack=args.pack, **LOSSES[loss_name])
    params = gan.init(Rng(1))
    total = args.steps
    lr = cosine_decay(args.lr, total, args.lr * 0.05)
    lr_d = cosine_decay(args.lr * args.d_lr_scale, total, args.lr * args.d_lr_scale * 0.05)
    b1, b2 = args.wgan_betas if loss_name == "wgan_gp" else (0.5, 0.999)
    groups = gan.players(adam(lr_d, b1=b1, b2=b2), adam(lr, b1=b1, b2=b2))
    ms = step_ms(gan, params, gan.init_state(params), data[:args.batch_size], repeats=3 if args.quick else 20)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.npz")
        done = 0
        while done < total:  # chunks resumed bit-exactly from a checkpoint, until the time budget is spent
            done = min(done + args.chunk, total)
            result = fit(None, params, data, Rng(2), None, done, groups=groups, state=gan.init_state(params),
                         batch_size=args.batch_size, ema_decay=args.ema, progress=False, checkpoint_path=path,
                         resume=True)
            if time.perf_counter() - start > args.seconds:
                break
    seconds = time.perf_counter() - start
    samples = to_numpy(gan.sample(result.ema_params, Rng(3), N_EVAL))
    return {"steps": done, "seconds": seconds, "ms_d": ms["disc"], "ms_g": ms["gen"], **score(samples, target, test)}


def torch_twin(target, args):
    """The non-saturating run in PyTorch (same widths, init of D's first layer, Adam and its two learning rates,
    cosine decay, EMA, batch), same time budget (it does not pack)."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)

    def mlp(d_in, d_out, act):
        w, layers = args.width, []
        for a, b in [(d_in, w), (w, w), (w, w)]:
            layers += [torch.nn.Linear(a, b), act()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(w, d_out))

    G, D = mlp(2, 2, torch.nn.ReLU), mlp(2, 1, lambda: torch.nn.LeakyReLU(0.01))
    if args.input_range:  # the same start as MLPDiscriminator(input_range=s): kinks through points of the box
        with torch.no_grad():
            first = D[0]
            c = (torch.rand(first.weight.shape) * 2.0 - 1.0) * args.input_range
            first.bias.copy_(-(first.weight * c).sum(1))
    ema = [p.detach().clone() for p in G.parameters()]
    opt_g = torch.optim.Adam(G.parameters(), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=args.lr * args.d_lr_scale, betas=(0.5, 0.999))
    sched = [torch.optim.lr_scheduler.CosineAnnealingLR(o, args.steps, eta_min=o.param_groups[0]["lr"] * 0.05)
             for o in (opt_g, opt_d)]
    data = torch.tensor(to_numpy(toy(target, Rng(0), args.n_train)))
    test = to_numpy(toy(target, Rng(9), 2000))
    sp = torch.nn.functional.softplus
    t_d, t_g = [], []
    start, step = time.perf_counter(), 0
    while step < args.steps and time.perf_counter() - start <= args.seconds:
        x = data[torch.randint(0, data.shape[0], (args.batch_size,))]
        t0 = time.perf_counter()
        fake = G(torch.randn(args.batch_size, 2)).detach()
        loss_d = sp(-D(x)).mean() + sp(D(fake)).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        t1 = time.perf_counter()
        loss_g = sp(-D(G(torch.randn(args.batch_size, 2)))).mean()
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        t_d.append(1000 * (t1 - t0))
        t_g.append(1000 * (time.perf_counter() - t1))
        for s in sched:
            s.step()
        with torch.no_grad():
            for e, p in zip(ema, G.parameters()):
                e.mul_(args.ema).add_(p, alpha=1 - args.ema)
        step += 1
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for e, p in zip(ema, G.parameters()):
            p.copy_(e)
        samples = G(torch.randn(N_EVAL, 2)).numpy().astype("float32")
    return {"steps": step, "seconds": seconds, "ms_d": statistics.median(t_d), "ms_g": statistics.median(t_g),
            **score(samples, target, test)}


def digits_run(args):
    """An MLP GAN on the 1000 training digits (pixels / 16 in [0, 1], sigmoid generator) for ``--digits-seconds``;
    the Frechet distance on DigitsFeatures of its samples and, for scale, of the valid split and of noise,
    each against the 447 test digits."""
    from genblocks.data import load_digits
    from genblocks.metrics import DigitsFeatures

    start = time.perf_counter()
    feats = DigitsFeatures.train(Rng(0), steps=60 if args.quick else 400)
    train_s = time.perf_counter() - start
    x = load_digits(split="train", backend="numpy")[0] / 16.0
    test = load_digits(split="test", backend="numpy")[0]
    valid = load_digits(split="valid", backend="numpy")[0]
    w = args.width
    gan = GAN(MLPGenerator(args.digits_latent, 64, (w, w), final_activation="sigmoid"),
              MLPDiscriminator(64, (w, w)), loss="non_saturating")
    params = gan.init(Rng(1))
    steps = 20 if args.quick else args.digits_steps
    lr = args.digits_lr
    schedule = cosine_decay(lr, steps, lr * 0.05)
    groups = gan.players(adam(schedule, b1=0.5), adam(schedule, b1=0.5))
    start = time.perf_counter()
    result = fit(None, params, x, Rng(2), None, steps, groups=groups, state=gan.init_state(params),
                 batch_size=min(args.batch_size, 128), ema_decay=args.ema, progress=False)
    seconds = time.perf_counter() - start
    samples = 16.0 * to_numpy(gan.sample(result.ema_params, Rng(3), test.shape[0]))
    noise = 16.0 * to_numpy(Rng(4).uniform(test.shape))
    print(f"digits (8x8, 1000 training images): classifier {feats.mlp.widths} trained in {train_s:.1f} s, valid "
          f"accuracy {100 * feats.accuracy:.1f}%; Frechet distance on its {feats.mlp.widths[-2]} penultimate "
          f"features, against the {test.shape[0]} test digits:")
    print("| images | FD |\n|---|---|")
    print(f"| valid split (real digits) | {feats.frechet_distance(valid, test):.2f} |")
    print(f"| MLP GAN {w}x2, latent {args.digits_latent}, {steps} steps ({seconds:.0f} s), EMA generator | "
          f"{feats.frechet_distance(samples, test):.2f} |")
    print(f"| uniform noise | {feats.frechet_distance(noise, test):.2f} |", flush=True)


def row(name, r):
    return (f"| {name} | {r['steps']} | {r['seconds']:.0f} | {r['modes']} | {100 * r['hq']:.1f}% | {r['mmd']:.5f} "
            f"| {r['ms_d']:.2f} | {r['ms_g']:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--seconds", type=float, default=120.0, help="wall-clock budget per run")
    p.add_argument("--steps", type=int, default=4000, help="steps (the cosine schedule's length; the cap)")
    p.add_argument("--chunk", type=int, default=250, help="steps between time checks")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.99)
    p.add_argument("--n-train", type=int, default=20000)
    p.add_argument("--targets", nargs="*", default=["eight_gaussians", "grid_gaussians"])
    p.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--latent", type=int, default=2)
    p.add_argument("--minibatch-std", action=argparse.BooleanOptionalAction, default=True,
                   help="the batch-std feature in the discriminator (default on)")
    p.add_argument("--spectral-norm", action="store_true", help="a spectral-normalised discriminator")
    p.add_argument("--input-range", type=float, default=4.0,
                   help="the discriminator's first-layer kinks start inside [-s, s]^2 (0: zero biases)")
    p.add_argument("--d-lr-scale", type=float, default=1.0, help="the discriminator's lr is this times --lr")
    p.add_argument("--pack", type=int, default=1, help="PacGAN: samples the discriminator sees at once")
    p.add_argument("--wgan-betas", type=float, nargs=2, default=(0.5, 0.999), help="Adam's b1, b2 for WGAN-GP")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin")
    p.add_argument("--digits-steps", type=int, default=1500, help="steps of the digits GAN (0: skip it)")
    p.add_argument("--digits-latent", type=int, default=16)
    p.add_argument("--digits-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.steps, args.chunk, args.width, args.n_train, args.batch_size = 5.0, 20, 10, 16, 2000, 64
    threads = set_blas_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, {platform.python_version()}, BLAS threads "
          f"{threads}; budget {args.seconds:.0f} s or {args.steps} steps per run, {args.width}-wide 3-layer MLPs, "
          f"latent {args.latent}, lr {args.lr}, minibatch_std {args.minibatch_std}, "
          f"spectral_norm {args.spectral_norm}, D lr x{args.d_lr_scale}, input_range {args.input_range}, "
          f"pack {args.pack}, EMA {args.ema}")
    print("| run | steps | s | modes (>= 20 of 2500 within 3 std) | high quality | MMD^2 | ms/D step | ms/G step |")
    print("|---|---|---|---|---|---|---|---|")
    for target in args.targets:
        for loss_name in args.losses:
            print(row(f"genblocks {loss_name}, {target}", train(target, loss_name, args)), flush=True)
        if args.no_torch:
            continue
        theirs = torch_twin(target, args)
        if theirs is None:
            print(f"| PyTorch non_saturating, {target} | [torch not importable] | | | | | | |")
        else:
            print(row(f"PyTorch non_saturating, {target}", theirs), flush=True)
    if args.digits_steps > 0:
        digits_run(args)
    print(f"targets: 8/8 modes at >= 97% high quality on eight_gaussians, >= 20/25 on the grid; sqrt(2)/4 and "
          f"0.05 are the stds, {math.sqrt(2) / 4 * 3:.3f} and 0.15 the 3-std radii")


if __name__ == "__main__":
    main()
