"""Normalizing flows: held-out NLL against the true entropy, training ms/step, sampling samples/s.

Trains ``neural_spline_flow`` (spline couplings) and ``real_nvp`` on the 2-D checkerboard (true entropy
log 32 = 3.4657 nats) and eight Gaussians (2.8316 nats), target: test NLL within 0.05 nats of the entropy;
then both on the 8x8 digits (17 grey levels, uniformly dequantized afresh every step, a sigmoid on the data
side, the best of 10 checkpoints on the valid split), reporting the test NLL in nats per image and bits per
dimension. Prints training ms/step (forward + backward + Adam), sampling samples/s, and, when torch is
importable, the ms/step of the same RealNVP step in PyTorch (CPU), timed back to back with ours.

Measured here (2 cores, two benchmark processes at once, one BLAS thread each; see the session notes):
NSF (6 layers, 5000 steps) left +0.032 on the checkerboard and +0.012 on eight Gaussians, and 2.11 bits/dim
on digits. RealNVP (32 couplings, 24000 steps, lr 1e-3) left +0.014 on eight Gaussians, but on the
checkerboard this seed ended at +0.328, while another seed (16000 steps) reached +0.055. An affine coupling
only shifts and scales each conditional density, and the checkerboard's conditionals are two separate
uniform bands, so RealNVP needs depth and many steps there, and deep stacks train unevenly at lr 1e-3. Its
digits run at 32 couplings and lr 1e-3 ended at 7.3 bits/dim, against 2.34 with 24 couplings. Earlier
settings: 12 couplings, 3000 steps left +0.207 (eight Gaussians) and +0.161 (checkerboard); 24 couplings,
3000 steps left +0.085 and +0.126. At lr 5e-4 (now RealNVP's default, REALNVP_LR), 32 couplings and 24000
steps left +0.045 and +0.049 on the checkerboard (two seeds), +0.015 on eight Gaussians, and 2.91 bits/dim
on digits. The RealNVP training step is 1.1x to 1.4x PyTorch's in 2-D and 1.4x to 1.6x on digits.

    python benchmarks/bench_flows.py                    # the full benchmark (about 75 minutes on one core)
    python benchmarks/bench_flows.py --quick            # reduced sizes, a couple of minutes
    python benchmarks/bench_flows.py --steps 2000 --datasets checkerboard --models nsf
    python benchmarks/bench_flows.py --threads 2         # BLAS threads (default 1)

Figures are indicative: they move with the machine's load and the BLAS build.
"""

import argparse
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from genblocks.backends import Rng, to_numpy, value_and_grad  # noqa: E402
from genblocks.blocks import bijectors as bj  # noqa: E402
from genblocks.data import TRUE_ENTROPY, checkerboard, eight_gaussians, load_digits  # noqa: E402
from genblocks.models.flow import Flow, neural_spline_flow, real_nvp  # noqa: E402
from genblocks.train.loop import fit  # noqa: E402
from genblocks.train.optim import adam, cosine_decay  # noqa: E402
from genblocks.train.recipes import dequantized_loss, dequantized_nll  # noqa: E402

TOY = {"checkerboard": checkerboard, "eight_gaussians": eight_gaussians}
DIGIT_LEVELS = 17
# An affine coupling only shifts and scales each conditional, so RealNVP needs depth and steps where a spline
# has bins: its own coupling count and 2-D step count (see the module docstring for what each setting left).
REALNVP_COUPLINGS = 32
REALNVP_STEPS = 24000
REALNVP_LR = 5e-4  # at 1e-3 the 32-coupling stack trained unevenly (see the module docstring)


def set_blas_threads(n):
    """Limit numpy's (and torch's) BLAS to ``n`` threads; returns what was applied."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return "unchanged (pip install threadpoolctl to set it)"
    threadpool_limits(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass
    return n


def make_flow(model, dim, args, data_side=()):
    """The benchmark's flows; ``data_side`` bijectors are appended after the factory's chain."""
    if model == "nsf":
        flow = neural_spline_flow(dim, layers=args.layers, bins=args.bins, bound=args.bound, hidden=args.hidden)
    else:
        flow = real_nvp(dim, layers=args.realnvp_couplings, hidden=args.hidden)
    if data_side:
        flow = Flow(dim, bj.Chain([*flow.bijector.bijectors, *data_side]))
    return flow


def median_ms(step, repeats, warmup=2):
    """Median milliseconds of ``step(i)`` over ``repeats`` calls after ``warmup`` untimed ones (i counts every call)."""
    times = []
    for i in range(repeats + warmup):
        start = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def adam_step_ms(loss, params, args, repeats):
    """Median ms of value_and_grad(loss)(params, *args(i)) + an Adam update over ``repeats`` steps (after a warm-up)."""
    init, update = adam(1e-3)
    held = {"params": params, "state": init(params)}
    vg = value_and_grad(loss)

    def step(i):
        _, g = vg(held["params"], *args(i))
        held["params"], held["state"] = update(g, held["state"], held["params"])

    return median_ms(step, repeats)


def torch_step_ms(opt, loss_fn, repeats):
    """Median ms of a PyTorch step (zero_grad, loss_fn().backward(), opt.step()) over ``repeats`` (after a warm-up)."""
    def step(i):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()

    return median_ms(step, repeats)


def step_time_ms(flow, params, batch, repeats):
    """Median ms of value_and_grad(loss) + an Adam update over ``repeats`` steps (after a warm-up)."""
    return adam_step_ms(flow.loss, params, lambda i: (batch,), repeats)


def samples_per_second(flow, params, n):
    flow.sample(params, Rng(0), min(n, 256))  # warm-up
    start = time.perf_counter()
    flow.sample(params, Rng(1), n)
    return n / (time.perf_counter() - start)


def train(flow, train_x, args, rng, steps, lr):
    r_init, r_fit = rng.split(2)
    params = flow.init_from_data(flow.init(r_init), train_x[:4096])
    start = time.perf_counter()
    result = fit(flow.loss, params, train_x, r_fit, adam(cosine_decay(lr, steps)), steps,
                 batch_size=args.batch_size, progress=args.progress, clip_norm=args.clip_norm)
    return result.params, time.perf_counter() - start


def bench_toy(model, dataset, args, rng):
    r_train, r_test, r_fit = rng.split(3)
    train_x = to_numpy(TOY[dataset](r_train, args.n_train))  # float32
    test_x = to_numpy(TOY[dataset](r_test, args.n_test))
    flow = make_flow(model, 2, args)
    steps = args.realnvp_steps if model == "realnvp" else args.steps
    lr = args.realnvp_lr if model == "realnvp" else args.lr
    params, seconds = train(flow, train_x, args, r_fit, steps, lr)
    nll = float(flow.loss(params, test_x, training=False))
    return {
        "model": model, "data": dataset, "steps": steps, "test_nll": nll,
        "entropy": TRUE_ENTROPY[dataset], "gap": nll - TRUE_ENTROPY[dataset],
        "train_s": seconds, "ms_step": step_time_ms(flow, params, train_x[:args.batch_size], args.repeats),
        "samples_s": samples_per_second(flow, params, args.n_sample),
    }


def bench_digits(model, args, rng):
    """Digits: fresh dequantization noise every step (a fixed draw lets the flow memorise it and the test NLL
    explodes), the valid split picks the best of ``eval_points`` checkpoints, the test split is scored."""
    from genblocks.data import uniform_dequantize

    r_init, r_fit, r_valid, r_eval = rng.split(4)
    parts = load_digits(backend="numpy", dtype="float32")
    train_int, valid_int, test_int = parts["train"][0], parts["valid"][0], parts["test"][0]
    flow = make_flow(model, 64, args, data_side=(bj.Sigmoid(),))
    start = uniform_dequantize(train_int, r_init, num_bins=DIGIT_LEVELS)
    params = flow.init_from_data(flow.init(r_init), start)

    loss = dequantized_loss(flow, num_bins=DIGIT_LEVELS)
    best = {"nats": math.inf, "params": params, "step": 0}

    def keep_best(p):
        nats = dequantized_nll(flow, p, valid_int, r_valid, num_bins=DIGIT_LEVELS)["nats"]
        if nats < best["nats"]:
            best.update(nats=nats, params=p)
        return nats

    steps = args.digits_steps
    t0 = time.perf_counter()
    lr = args.realnvp_lr if model == "realnvp" else args.lr
    fit(loss, params, train_int, r_fit, adam(cosine_decay(lr, steps)), steps, batch_size=args.batch_size,
        progress=args.progress, clip_norm=args.clip_norm, eval_fn=keep_best,
        eval_every=max(steps // args.eval_points, 1))
    seconds = time.perf_counter() - t0
    params = best["params"]
    out = dequantized_nll(flow, params, test_int, r_eval, num_bins=DIGIT_LEVELS, samples=4)
    return {
        "model": model, "data": "digits", "steps": steps, "test_nll": out["nats"],
        "bits_per_dim": out["bits_per_dim"], "train_s": seconds,
        "ms_step": step_time_ms(flow, params, start[:args.batch_size], args.repeats),
        "samples_s": samples_per_second(flow, params, args.n_sample),
    }


# ---------------------------------------------------------------------------------------------------
# PyTorch reference: the same RealNVP training step


def torch_realnvp_ms(dim, args):
    """ms/step of a RealNVP with the same layers, widths and bounded log-scale in PyTorch; None without torch."""
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    layers = args.realnvp_couplings
    masks = [torch.tensor(bj.coupling_mask(dim, flip=i % 2 == 1), dtype=torch.bool) for i in range(layers)]

    def mlp(n_in, n_out):
        widths = (n_in, *args.hidden, n_out)
        mods = []
        for i in range(len(widths) - 1):
            mods.append(torch.nn.Linear(widths[i], widths[i + 1]))
            if i < len(widths) - 2:
                mods.append(torch.nn.ReLU())
        return torch.nn.Sequential(*mods)

    nets = torch.nn.ModuleList([mlp(int(m.sum()), 2 * int((~m).sum())) for m in masks])
    loc = torch.zeros(dim, requires_grad=True)
    log_scale = torch.zeros(dim, requires_grad=True)
    opt = torch.optim.Adam([*nets.parameters(), loc, log_scale], lr=1e-3)
    x = torch.randn(args.batch_size, dim)

    def loss_fn():
        z = (x - loc) * torch.exp(-log_scale)  # data-side ActNorm
        log_det = -log_scale.sum().expand(x.shape[0])
        for m, net in zip(reversed(masks), reversed(nets)):
            out = net(z[:, m])
            t, s = out.chunk(2, dim=-1)
            s = 3.0 * torch.tanh(s / 3.0)
            zb = (z[:, ~m] - t) * torch.exp(-s)
            z = z.clone()
            z[:, ~m] = zb
            log_det = log_det - s.sum(-1)
        base = -0.5 * (z * z).sum(-1) - 0.5 * dim * math.log(2 * math.pi)
        return -(base + log_det).mean()

    return torch_step_ms(opt, loss_fn, args.repeats)


# ---------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced sizes (a couple of minutes)")
    parser.add_argument("--models", nargs="+", default=["nsf", "realnvp"], choices=["nsf", "realnvp"])
    parser.add_argument("--datasets", nargs="+", default=["checkerboard", "eight_gaussians", "digits"],
                        choices=["checkerboard", "eight_gaussians", "digits"])
    parser.add_argument("--steps", type=int, default=5000, help="training steps on the 2-D data")
    parser.add_argument("--digits-steps", type=int, default=2000, help="training steps on digits")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 128])
    parser.add_argument("--layers", type=int, default=6,
                        help="spline layers of the neural spline flow")
    parser.add_argument("--realnvp-couplings", type=int, default=REALNVP_COUPLINGS, help="RealNVP's couplings")
    parser.add_argument("--realnvp-steps", type=int, default=REALNVP_STEPS, help="RealNVP's steps on the 2-D data")
    parser.add_argument("--bins", type=int, default=16)
    parser.add_argument("--bound", type=float, default=4.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--realnvp-lr", type=float, default=REALNVP_LR, help="RealNVP's learning rate")
    parser.add_argument("--eval-points", type=int, default=10, help="digits: valid-set checks for early stopping")
    parser.add_argument("--clip-norm", type=float, default=10.0)
    parser.add_argument("--n-train", type=int, default=100000)
    parser.add_argument("--n-test", type=int, default=50000)
    parser.add_argument("--n-sample", type=int, default=20000, help="samples timed for samples/s")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps for ms/step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show training progress bars")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads (default 1: these matrices are small, and extra threads only contend)")
    args = parser.parse_args()
    blas = set_blas_threads(args.threads)
    if args.quick:
        args.steps, args.digits_steps, args.hidden, args.layers = 600, 300, [64, 64], 4
        args.realnvp_couplings, args.realnvp_steps = 16, 600
        args.bins, args.batch_size, args.n_train, args.n_test, args.n_sample = 8, 256, 20000, 10000, 5000
        args.repeats = 10
    args.hidden = tuple(args.hidden)
    print(f"settings: steps={args.steps} digits_steps={args.digits_steps} batch={args.batch_size} "
          f"hidden={args.hidden} layers={args.layers} (RealNVP {args.realnvp_couplings} couplings, "
          f"{args.realnvp_steps} steps) bins={args.bins} "
          f"bound={args.bound} lr={args.lr} (RealNVP {args.realnvp_lr}) blas_threads={blas}")

    rows = []
    rngs = iter(Rng(args.seed).split(len(args.models) * len(args.datasets)))
    for dataset in args.datasets:
        for model in args.models:
            rng = next(rngs)
            row = bench_digits(model, args, rng) if dataset == "digits" else bench_toy(model, dataset, args, rng)
            rows.append(row)
            extra = (f"gap {row['gap']:+.4f} (entropy {row['entropy']:.4f}, target |gap| <= 0.05)"
                     if "gap" in row else f"{row['bits_per_dim']:.4f} bits/dim")
            print(f"{model:8s} {dataset:16s} test NLL {row['test_nll']:.4f} nats  {extra}  "
                  f"train {row['train_s']:.0f} s  {row['ms_step']:.1f} ms/step  {row['samples_s']:.0f} samples/s",
                  flush=True)

    print("\n| model | data | steps | test NLL (nats) | vs entropy / bits/dim | ms/step | samples/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ref = f"{r['gap']:+.4f}" if "gap" in r else f"{r['bits_per_dim']:.4f} bpd"
        print(f"| {r['model']} | {r['data']} | {r['steps']} | {r['test_nll']:.4f} | {ref} | {r['ms_step']:.1f} "
              f"| {r['samples_s']:.0f} |")

    print()
    for dim, data in ((2, "2-D"), (64, "digits")):
        theirs = torch_realnvp_ms(dim, args)
        if theirs is None:
            print("PyTorch comparison: torch is not importable here (pip install torch, CPU build)")
            break
        # timed back to back with torch (the machine's load moves between the runs above)
        flow = make_flow("realnvp", dim, args)
        batch = Rng(args.seed).normal((args.batch_size, dim))
        params = flow.init_from_data(flow.init(Rng(args.seed)), batch)
        ours = min(step_time_ms(flow, params, batch, args.repeats) for _ in range(2))
        theirs = min(theirs, torch_realnvp_ms(dim, args))  # each side: the better of two timed runs
        couplings = args.realnvp_couplings
        print(f"RealNVP ({couplings} couplings, hidden {args.hidden}, batch {args.batch_size}) {data} training "
              f"step: genblocks {ours:.1f} ms, PyTorch {theirs:.1f} ms, ratio {ours / theirs:.2f}x")

if __name__ == "__main__":
    main()
