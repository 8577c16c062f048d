"""Diffusion likelihood on 17-level digits: the Improved DDPM recipe against its PyTorch twin in one run.

Both sides train ``genblocks.train.recipes.digits_diffusion`` (an MLP eps-predictor with FiLM time
conditioning and learned variances; loss L_simple + 0.01 T L_vlb with L_vlb training the mean as well;
importance-sampled t; cosine schedule truncated at sigma 0.1; a categorical decoder p(x_0 | x_1) over the 17
levels whose LevelDecoder conv net trains on its own term; AdamW with decay 0.1, gradient clipping at 1,
EMA 0.999; batch 128 on the 1000 training digits; flags restore the former recipes) from the same initial
weights for ``--steps`` and then 2 x ``--steps`` steps. The twin is the same network, decoder, loss, sampler
of t, optimizer and EMA written in PyTorch. Both EMA weights are scored by the same code
(``recipes.diffusion_bound``: all T terms of the bound, two noise draws per term and image) on all 447 test
digits (and the 350 valid ones with ``--valid``), in nats per image (independent-pixel floor 106.4). Then
the PF-ODE NLL of the genblocks model on the same discrete scale (uniform dequantization: -log P(x) <=
E_u[-log p(x + u)] - D log(2/16)), the Frechet distance on DigitsFeatures of each model's DDPM samples
(``--fd-samples``), ms/step of both training loops (alternating, best of 3), and the picture of L_t
against t (``--plot``).

    python benchmarks/bench_diffusion_likelihood.py --threads 1                # tens of minutes, 1 core
    python benchmarks/bench_diffusion_likelihood.py --steps 1500 --threads 1   # both sides at fewer steps
    python benchmarks/bench_diffusion_likelihood.py --quick                    # seconds, numbers meaningless
    # the first recipe:
    python benchmarks/bench_diffusion_likelihood.py --sigma-min 0.025 --decoder discretized \
        --decoder-variance posterior --no-vlb-trains-mean --vlb-weight 0.001 --weight-decay 0 --threads 1

Figures are indicative: they move with the machine's load and the BLAS build.
"""

import argparse
import math
import os
import pathlib
import platform
import sys
import tempfile
import time

if "--threads" in sys.argv[:-1]:  # BLAS reads these when numpy is first imported
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_flows import set_blas_threads  # noqa: E402 (benchmarks/bench_flows.py, beside this script)

from genblocks.backends import Rng, to_numpy  # noqa: E402
from genblocks.data import load_digits  # noqa: E402
from genblocks.train.recipes import (  # noqa: E402
    diffusion_bound,
    digits_diffusion,
    fit_diffusion,
    levels_to_unit,
    ode_discrete_nll,
)
from genblocks.train.tree import tree_leaves  # noqa: E402

BATCH, LR, EMA, CLIP = 128, 1e-3, 0.999, 1.0


# ---------------------------------------------------------------------------------------------------
# the PyTorch twin: MLPScoreNet, Improved DDPM's hybrid loss with importance-sampled t, Adam + clip + EMA


def torch_categorical_decoder(model, decoder_params):
    """The twin of ``Diffusion(decoder="categorical", decoder_network=LevelDecoder(...))``'s decoder from
    genblocks' decoder params: (leaves, nll(x0, x1) -> -log p(x_0 | x_1) (n, D), tree(value_of) -> genblocks
    params of the decoder with each leaf's value ``value_of(leaf)``)."""
    import torch

    dec, p0 = model.decoder_network, to_numpy(decoder_params)
    H, W, C = dec.image_shape
    a0, s0 = model.schedule.marginal_host(0)
    levels = torch.linspace(-1.0, 1.0, model.num_bins)
    f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))
    conv0 = lambda p: {"W": torch.nn.Parameter(f32(p["W"]).permute(3, 2, 0, 1).contiguous()),  # (c_out, c_in, kh, kw)
                       "b": torch.nn.Parameter(f32(p["b"]))}
    P = {"convs": [conv0(p) for p in p0["convs"]], "out": conv0(p0["out"]), "bias": torch.nn.Parameter(f32(p0["bias"]))}
    leaves = [p[j] for p in P["convs"] + [P["out"]] for j in ("W", "b")] + [P["bias"]]

    def nll(x0, x1):
        n, D = x1.shape
        logits = -0.5 / s0 ** 2 * (x1[..., None] - a0 * levels) ** 2
        h = x1.reshape(n, H, W, C).permute(0, 3, 1, 2)
        for p in P["convs"]:
            h = torch.nn.functional.silu(torch.nn.functional.conv2d(h, p["W"], p["b"], padding=dec.kernel_size // 2))
        g = torch.nn.functional.conv2d(h, P["out"]["W"], P["out"]["b"]).permute(0, 2, 3, 1)  # NHWC, C K last
        logits = logits + g.reshape(n, D, -1) + P["bias"]
        index = torch.round((x0 + 1.0) * (0.5 * (model.num_bins - 1))).long()
        return -torch.log_softmax(logits, -1).gather(-1, index[..., None])[..., 0]

    def tree(value_of):
        conv = lambda p: {"W": np.ascontiguousarray(np.asarray(value_of(p["W"])).transpose(2, 3, 1, 0)),
                          "b": np.asarray(value_of(p["b"]))}
        return {"convs": [conv(p) for p in P["convs"]], "out": conv(P["out"]), "bias": np.asarray(value_of(P["bias"]))}

    return leaves, nll, tree


def torch_twin_train(model, params0, x, steps, seed=0, snapshots=(), weight_decay=0.0):
    """Train the twin from genblocks' initial params0 for ``steps``; returns ({step: EMA params as a genblocks
    tree} for each step in ``snapshots`` and the last, training seconds)."""
    import torch

    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    sched, net = model.schedule, model.network
    T, D = sched.num_train_timesteps, x.shape[1]
    f32 = lambda a: torch.tensor(np.asarray(a, dtype=np.float32))
    abar = f32(sched.alphas_cumprod)
    c1, c2 = f32(sched.posterior_mean_coef1), f32(sched.posterior_mean_coef2)
    small = f32(sched.posterior_log_variance_clipped)
    first = sched.posterior_variance[1] if model.decoder_variance == "posterior" else sched.betas[0]
    big = torch.log(f32((first,) + tuple(sched.betas[1:])))
    half = net.time_embedding.frequency_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * (-math.log(10000.0) / half))
    categorical, dec_net = model.decoder == "categorical", model.decoder_network
    p0 = to_numpy(params0)
    pd0 = p0["decoder"] if dec_net is not None else None
    p0 = p0["network"] if dec_net is not None else p0
    lin0 = lambda p: {"W": torch.nn.Parameter(f32(p["W"])), "b": torch.nn.Parameter(f32(p["b"]))}
    P = {"fc1": lin0(p0["cond"]["time"]["fc1"]), "fc2": lin0(p0["cond"]["time"]["fc2"]),
         "layers": [lin0(p) for p in p0["layers"]], "films": [lin0(p) for p in p0["films"]], "out": lin0(p0["out"])}
    leaves = [P[k][j] for k in ("fc1", "fc2", "out") for j in ("W", "b")]
    leaves += [p[j] for k in ("layers", "films") for p in P[k] for j in ("W", "b")]
    if dec_net is not None:
        dec_leaves, decoder_nll, decoder_tree = torch_categorical_decoder(model, pd0)
        leaves += dec_leaves
        a0, s0 = sched.marginal_host(0)  # x_1 = a0 x_0 + s0 eps, the decoder's input
    silu = torch.nn.functional.silu
    lin = lambda h, p: torch.addmm(p["b"], h, p["W"])

    def forward(xt, t):
        args = t[:, None] * freqs
        e = silu(lin(silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), P["fc1"])), P["fc2"]))
        h = xt
        for p, f in zip(P["layers"], P["films"]):
            gamma, beta = lin(e, f).chunk(2, dim=-1)
            h = silu(lin(h, p)) * gamma + beta
        return lin(h, P["out"])

    def log_cdf_logit(z):  # the same tanh approximation of Phi as genblocks' decoder, in log space
        return 2.0 * math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)

    def vb_terms(pred, v, x0, xt, ti):
        a, s = abar[ti].sqrt()[:, None], (1.0 - abar[ti]).sqrt()[:, None]
        x0_hat = (xt - s * pred) / a
        mean = c1[ti][:, None] * x0_hat + c2[ti][:, None] * xt
        frac = 0.5 * (v + 1.0)
        logvar = frac * big[ti][:, None] + (1.0 - frac) * small[ti][:, None]
        true_mean = c1[ti][:, None] * x0 + c2[ti][:, None] * xt
        true_logvar = small[ti][:, None].expand_as(x0)
        kl = 0.5 * (logvar - true_logvar + torch.exp(true_logvar - logvar) + (true_mean - mean) ** 2
                    * torch.exp(-logvar) - 1.0)
        inv = torch.exp(-0.5 * logvar)
        u, w = log_cdf_logit(inv * (x0 - mean + 1.0 / 16)), log_cdf_logit(inv * (x0 - mean - 1.0 / 16))
        ls = torch.nn.functional.logsigmoid
        d = u - w
        log1m = torch.where(d < math.log(2.0), torch.log(-torch.expm1(-d.clamp(min=1e-30))),
                            torch.log1p(-torch.exp(-d.clamp(min=math.log(2.0)))))
        logp = torch.where(x0 < -1 + 1.0 / 16, ls(u), torch.where(x0 > 1 - 1.0 / 16, ls(-w), ls(u) + ls(-w) + log1m))
        if categorical:  # L_0 is the decoder's alone
            return torch.where((ti == 0)[:, None], torch.zeros_like(kl), kl)
        return torch.where((ti == 0)[:, None], -logp, kl)

    history, counts = np.zeros((T, 10)), np.zeros(T, dtype=np.int64)  # LossSecondMomentSampler's state

    def draw_t(n):
        if (counts >= 10).all():
            root = np.sqrt((history ** 2).mean(axis=1))
            p = 0.999 * root / root.sum() + 0.001 / T
        else:
            p = np.full(T, 1.0 / T)
        ti = gen.choice(T, size=n, p=p)
        return torch.from_numpy(ti), torch.from_numpy((1.0 / (T * p[ti])).astype(np.float32))

    def as_tree(values):
        back = dict(zip([id(p) for p in leaves], [v.numpy().copy() for v in values]))
        g = lambda p: {"W": back[id(p["W"])], "b": back[id(p["b"])]}
        tree = {"cond": {"time": {"fc1": g(P["fc1"]), "fc2": g(P["fc2"])}}, "layers": [g(p) for p in P["layers"]],
                "films": [g(p) for p in P["films"]], "out": g(P["out"])}
        if dec_net is None:
            return tree
        return {"network": tree, "decoder": decoder_tree(lambda p: back[id(p)])}

    kept = {}
    opt = (torch.optim.AdamW(leaves, lr=LR, weight_decay=weight_decay) if weight_decay
           else torch.optim.Adam(leaves, lr=LR))
    ema = [p.detach().clone() for p in leaves]
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n, per_epoch, order, k = data.shape[0], data.shape[0] // BATCH, None, 0
    t0 = time.perf_counter()
    for step in range(steps):
        if order is None or k == per_epoch:
            order, k = torch.from_numpy(gen.permutation(n)), 0
        x0 = data[order[k * BATCH:(k + 1) * BATCH]]
        k += 1
        ti, weights = draw_t(BATCH)
        eps = torch.randn_like(x0)
        a, s = abar[ti].sqrt()[:, None], (1.0 - abar[ti]).sqrt()[:, None]
        xt = a * x0 + s * eps
        out = forward(xt, ti.float())
        pred, v = out[:, :D], out[:, D:]
        vb = vb_terms(pred if model.vlb_trains_mean else pred.detach(), v, x0, xt, ti).mean(dim=1)
        per = ((pred - eps) ** 2).mean(dim=1) + (model.vlb_weight * T) * vb
        for tt, val in zip(ti.tolist(), vb.detach().tolist()):  # the shift register, in batch order
            history[tt, :-1] = history[tt, 1:]
            history[tt, -1] = val
            counts[tt] += 1
        loss = (per * weights).mean()
        if dec_net is not None:  # the decoder's own term on a fresh x_1 of every example
            loss = loss + decoder_nll(x0, a0 * x0 + s0 * torch.randn_like(x0)).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(leaves, CLIP)
        opt.step()
        with torch.no_grad():
            for e_, p in zip(ema, leaves):
                e_.mul_(EMA).add_(p, alpha=1.0 - EMA)
        if step + 1 in snapshots or step + 1 == steps:
            kept[step + 1] = as_tree(ema)
    return kept, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------


def best_of(fns, repeat=3):
    """Best-of-repeat wall times of several functions run alternately (a load change hits all of them)."""
    best = [math.inf] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def plot_lt(path, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, bound in rows:
        L_t = np.asarray(bound["L_t"])
        ax.loglog(np.arange(1, len(L_t)), np.maximum(L_t[1:], 1e-6), lw=1,
                    label=f"{label}: {bound['nats']:.1f} nats (L_0 = {L_t[0]:.2f})")
    ax.set_xlabel("t (log scale)")
    ax.set_ylabel("L_t, nats per test digit")
    ax.set_title("where the bits go: L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) on 447 test digits",
                 fontsize=8)
    ax.legend(fontsize=7)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: theirs)")
    parser.add_argument("--steps", type=int, default=6000, help="training steps (the run goes on to 2x)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch twin")
    parser.add_argument("--timing-only", action="store_true", help="print ms/step of both loops and stop")
    parser.add_argument("--passes", type=int, default=2, help="noise draws per term and image in the bound")
    parser.add_argument("--valid", action="store_true", help="also score the valid digits (T more passes each)")
    parser.add_argument("--ode-points", type=int, default=447, help="test digits in the PF-ODE NLL (0: skip)")
    parser.add_argument("--sigma-min", type=float, default=0.1, help="digits_diffusion's truncation of the chain")
    parser.add_argument("--decoder-variance", default="beta", choices=("posterior", "beta"),
                        help="the top of the decoder's learned variance range (digits_diffusion)")
    parser.add_argument("--vlb-trains-mean", action=argparse.BooleanOptionalAction, default=True,
                        help="L_vlb's gradient also trains the mean")
    parser.add_argument("--decoder", default="categorical", choices=("discretized", "categorical"),
                        help="p(x_0 | x_1): a Gaussian discretized over the bins, or a categorical over the levels")
    parser.add_argument("--decoder-channels", type=int, default=16,
                        help="the categorical decoder's LevelDecoder width (0: no decoder network)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's decoupled decay (0: Adam)")
    parser.add_argument("--vlb-weight", type=float, default=0.01, help="lambda in L_simple + lambda T L_vlb")
    parser.add_argument("--plot", default="examples-out/diffusion_digits_lt.png", help="the L_t picture")
    parser.add_argument("--fd-samples", type=int, default=447,
                        help="DDPM samples per model for the Frechet distance on DigitsFeatures (0: skip)")
    args = parser.parse_args()
    threads = set_blas_threads(args.threads) if args.threads else "default"
    steps, hidden, T, ode_points = args.steps, (512, 512, 512), 1000, args.ode_points
    if args.quick:
        steps, hidden, T, ode_points = 10, (32,), 20, min(ode_points, 8)
    print(f"machine: {platform.machine()} {platform.processor() or ''} {platform.system()}, python "
          f"{platform.python_version()}, {os.cpu_count()} cpus, BLAS threads {threads}, load average "
          f"{' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    digits = load_digits(backend="numpy")
    x = {k: levels_to_unit(to_numpy(digits[k][0])).astype(np.float32) for k in ("train", "valid", "test")}
    model = digits_diffusion(hidden=hidden, num_timesteps=T, sigma_min=args.sigma_min,
                             decoder_variance=args.decoder_variance, vlb_trains_mean=args.vlb_trains_mean,
                             vlb_weight=args.vlb_weight, decoder=args.decoder,
                             decoder_channels=args.decoder_channels)
    nominal, T = T, model.schedule.num_train_timesteps  # the cosine chain's steps above sigma_min
    size = sum(v.size for v in tree_leaves(model.init(Rng(0))))
    print(f"model: {model.network!r}, T = {T} (of {nominal} cosine steps, sigma_min {args.sigma_min}), {size} params, "
          f"decoder_variance {model.decoder_variance!r}, vlb_trains_mean {model.vlb_trains_mean}, "
          f"vlb_weight {model.vlb_weight}, decoder {model.decoder!r} {model.decoder_network!r}; "
          f"batch {BATCH}, Adam {LR} (AdamW decay {args.weight_decay}), clip {CLIP}, EMA {EMA}; "
          f"independent-pixel floor 106.4 test nats")
    try:
        import torch
    except ImportError:
        torch = None
    twin = torch is not None and not args.no_torch
    if twin and args.threads:
        torch.set_num_threads(args.threads)

    # ms/step: both training loops alternately, short runs from the same start
    short = 5 if args.quick else 30
    params0 = model.init(Rng(0).split(2)[0])  # the initial params fit_diffusion(..., Rng(0), ...) draws
    wd = args.weight_decay
    fns = [lambda: fit_diffusion(model, x["train"], Rng(0), short, weight_decay=wd)]
    if twin:
        fns.append(lambda: torch_twin_train(model, params0, x["train"], short, weight_decay=wd))
    times = best_of(fns, 1 if args.quick else 3)
    line = (f"ms/step (loss, gradient, clip, Adam, EMA; best of 3 runs of {short}): "
            f"genblocks {times[0] / short * 1e3:.1f}")
    if twin:
        line += f"   torch {times[1] / short * 1e3:.1f}   ratio {times[0] / times[1]:.2f}x"
    print(line, flush=True)
    if args.timing_only:
        return

    print(f"\n{'run':<22}{'steps':>7}{'train s':>9}{'valid nats':>12}{'test nats':>11}{'+- mc':>7}{'+- images':>10}"
          f"{'bits/dim':>10}{'L_0':>7}")
    rows, finals = [], {}
    ck = pathlib.Path(tempfile.gettempdir()) / f"bench_diffusion_likelihood_{os.getpid()}.npz"
    spent = 0.0
    for mult in (1, 2):
        t0 = time.perf_counter()
        res = fit_diffusion(model, x["train"], Rng(0), mult * steps, weight_decay=wd, checkpoint_path=str(ck),
                            resume=True)
        spent += time.perf_counter() - t0
        rows.append(("genblocks", mult * steps, spent, res.ema_params))
    ck.unlink(missing_ok=True)
    if twin:
        kept, seconds = torch_twin_train(model, params0, x["train"], 2 * steps, snapshots=(steps,), weight_decay=wd)
        rows += [("torch twin", s, seconds * s / (2 * steps), kept[s]) for s in (steps, 2 * steps)]
    for name, s, seconds, params in rows:
        valid = math.nan
        if args.valid:
            valid = diffusion_bound(model, params, x["valid"], Rng(5), passes=args.passes)["nats"]
        test = diffusion_bound(model, params, x["test"], Rng(6), passes=args.passes)
        finals[(name, s)] = (params, test)
        print(f"{name:<22}{s:>7}{seconds:>9.0f}{valid:>12.2f}{test['nats']:>11.2f}{test['se_mc']:>7.2f}"
              f"{test['se_images']:>10.2f}{test['bits_per_dim']:>10.3f}{test['L_t'][0]:>7.2f}", flush=True)
    if twin:
        print("(torch train s: the twin's 2x-step run, pro rata at the first checkpoint)")

    params, test = finals[("genblocks", 2 * steps)]
    L_t = np.asarray(test["L_t"])
    cuts = [c for c in (1, 10, 30, 100, 300) if c < T] + [T]
    parts, lo = [], 0
    for c in cuts:
        parts.append(f"t in [{lo}, {c}): {L_t[lo:c].sum():.2f}")
        lo = c
    print(f"\nwhere the bits go (genblocks, {2 * steps} steps, test): " + ", ".join(parts) + f", L_T {test['L_T']:.4f}")
    if ode_points:
        t0 = time.perf_counter()
        ode = ode_discrete_nll(model, params, x["test"][:ode_points], Rng(7))
        print(f"PF-ODE NLL on {ode_points} test digits, uniformly dequantized onto the 17 bins (Hutchinson trace): "
              f"{ode['nats']:.2f} +- {ode['se']:.2f} nats = {ode['nats'] / (64 * math.log(2.0)):.3f} bits/dim "
              f"({time.perf_counter() - t0:.0f} s)")
    if args.fd_samples:
        frechet_table(model, finals, x, args.fd_samples, quick=args.quick)
    if args.plot:
        plot_lt(args.plot, [(f"{name}, {s} steps", finals[(name, s)][1]) for name, s in finals])
        print(f"wrote {args.plot}")


def frechet_table(model, finals, x, n, quick=False):
    """The Frechet distance on ``genblocks.metrics.DigitsFeatures`` (trained as bench_gan.py trains it: Rng(0),
    400 steps) of n DDPM samples of each model (every step of the chain, the decoder's draw at the end)
    against the test digits, and for scale the valid digits' and uniform noise's."""
    from genblocks.metrics import DigitsFeatures

    feats = DigitsFeatures.train(Rng(0), steps=60 if quick else 400)
    grey = lambda v: (np.asarray(v, dtype=np.float64) + 1.0) * 8.0  # [-1, 1] -> grey levels 0..16
    test = grey(x["test"])
    noise = np.random.default_rng(0).uniform(0.0, 16.0, size=(n, 64))
    print(f"\nFrechet distance on DigitsFeatures (valid accuracy {feats.accuracy:.3f}) against the {len(test)} test "
          f"digits: valid digits {feats.frechet_distance(grey(x['valid']), test):.2f}, uniform noise "
          f"{feats.frechet_distance(noise, test):.2f}")
    for (name, s), (params, _) in finals.items():
        t0 = time.perf_counter()
        samples = to_numpy(model.sample(params, Rng(8), n, sampler="ddpm", data_shape=(64,), num_inference_steps=None))
        print(f"  {name}, {s} steps: {feats.frechet_distance(grey(samples), test):.2f} "
              f"({n} DDPM samples, {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
