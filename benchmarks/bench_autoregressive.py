"""Autoregressive benchmark: MADE and gated PixelCNN on the 17-level 8x8 digits, exact test NLL in nats.

Trains a categorical MADE (64 variables, 17 levels each; by default 8 masks, each with its own random order,
probabilities averaged at evaluation) and a gated PixelCNN (8 x 8 x 1, 17 levels) on the 1000 training
digits of ``genblocks.data.load_digits`` (the fixed 1000/350/447 split), keeps the checkpoint with the best
valid NLL (``--ema``: the parameter average competes too) and reports the test NLL in nats per image (the
independent-pixel floor is 106.4; with ``--binarized`` the pixels are x >= 8, MADE has Bernoulli outputs and
PixelCNN 2 levels, floor 24.9; PixelCNN trains with AdamW, weight decay 1.0). Then: training ms/step (loss,
gradient, Adam) at the same batch size, and, when torch is importable, the same network (same masks, same
widths, float32) in PyTorch with the ratio genblocks / torch, both the median of single steps timed in
alternating blocks; then sampling images/s for PixelCNN's naive loop (the whole network per sub-pixel) and
its cached loop (one vertical row per image row, one horizontal column per step), which give the same
images, at 8x8 and in a table by image size (``--sampling-sizes``). ``--train-twin`` also trains PixelCNN's
PyTorch twin with the same recipe and initial weights and prints its training time and test NLL.

    python benchmarks/bench_autoregressive.py            # the full run (minutes on 2 cores)
    python benchmarks/bench_autoregressive.py --quick    # a smoke run (seconds, numbers meaningless)
    python benchmarks/bench_autoregressive.py --threads 1   # single-threaded BLAS and torch (like for like)
    python benchmarks/bench_autoregressive.py --binarized   # binary digits (pixel >= 8)
    python benchmarks/bench_autoregressive.py --threads 1 --models pixelcnn --train-twin   # PixelCNN beside its twin

Figures are indicative: they move with the machine's load and the BLAS build.
"""

import argparse
import math
import os
import pathlib
import platform
import sys
import time

if "--threads" in sys.argv[:-1]:  # BLAS reads these when numpy is first imported
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_train_step import _interleaved_medians  # noqa: E402 (benchmarks/, next to this script)

from genblocks.backends import Rng, to_numpy, value_and_grad  # noqa: E402
from genblocks.data import load_digits  # noqa: E402
from genblocks.models.autoregressive import MADEModel, PixelCNN  # noqa: E402
from genblocks.train.loop import fit  # noqa: E402
from genblocks.train.optim import adam, adamw, cosine_decay  # noqa: E402

LEVELS = 17
FLOOR = {17: 106.4, 2: 24.9}  # test nats of independent pixels, 17-level and binarized digits


def digits(binarized=False):
    """The three splits as (n, 64) float32 levels 0..16, or 0/1 (pixel >= 8) when ``binarized``."""
    parts = load_digits(backend="numpy", dtype="float32")
    data = {name: to_numpy(parts[name][0]) for name in ("train", "valid", "test")}
    return {k: (v >= 8.0).astype(np.float32) for k, v in data.items()} if binarized else data


def nll(model, params, x, batch=500):
    """Mean exact NLL in nats per image over x."""
    total = sum(float(np.sum(-to_numpy(model.log_prob(params, x[i:i + batch])))) for i in range(0, len(x), batch))
    return total / len(x)


def train(model, data, shape, args, steps, lr, seed=0, weight_decay=0.0):
    """fit with Adam (AdamW when ``weight_decay`` > 0) + cosine decay; the valid split picks the best of
    ``eval_points`` checkpoints."""
    r_init, r_fit = Rng(seed).split(2)
    params = model.init(r_init)
    x = {k: v.reshape((-1,) + shape) for k, v in data.items()}
    best = {"nats": math.inf, "params": params}

    def keep_best(p):
        nats = nll(model, p, x["valid"])
        if nats < best["nats"]:
            best.update(nats=nats, params=p)
        return nats

    t0 = time.perf_counter()
    schedule = cosine_decay(lr, steps)
    optimizer = adamw(schedule, weight_decay=weight_decay) if weight_decay else adam(schedule)
    result = fit(model.loss, params, x["train"], r_fit, optimizer, steps,
                 batch_size=args.batch_size, progress=args.progress, eval_fn=keep_best,
                 eval_every=max(steps // args.eval_points, 1), ema_decay=args.ema or None)
    if result.ema_params is not None:  # the parameter average competes with the checkpoints, on valid
        keep_best(result.ema_params)
    seconds = time.perf_counter() - t0
    return best["params"], seconds, best["nats"], nll(model, best["params"], x["test"])


def genblocks_step(model, params, batch):
    """One training step as a closure: loss + gradient + Adam update (what the torch twins do too)."""
    grad_fn = value_and_grad(model.loss)
    init, update = adam(1e-3)
    state = {"params": params, "opt": init(params)}

    def step():
        _, grads = grad_fn(state["params"], batch, Rng(0))  # with an rng: one mask per step, as in training
        state["params"], state["opt"] = update(grads, state["opt"], state["params"])

    return step


def step_ms(step, twin, repeats):
    """(genblocks ms, torch ms or None): medians of single steps timed in alternating blocks of 5, so that a
    change in the machine's load hits both alike."""
    if twin is None:
        return _interleaved_medians([step], 2, repeats, block=5)[0], None
    return tuple(_interleaved_medians([step, twin], 2, repeats, block=5))


# ---------------------------------------------------------------------------------------------------
# PyTorch twins: the same masks, widths and activations; ms per loss + backward + Adam step


def torch_made_step(model, batch):
    import torch

    masks = [torch.tensor(layer.mask, dtype=torch.float32) for layer in model.nets[0]]
    Ws = [torch.nn.Parameter(0.1 * torch.randn(m.shape)) for m in masks]
    bs = [torch.nn.Parameter(torch.zeros(m.shape[1])) for m in masks]
    opt = torch.optim.Adam(Ws + bs, lr=1e-3)
    x = torch.tensor(batch)

    def step():
        h = x
        for i, (W, b, m) in enumerate(zip(Ws, bs, masks)):
            h = h @ (W * m) + b
            h = torch.relu(h) if i < len(masks) - 1 else h
        if model.output == "bernoulli":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(h, x, reduction="sum") / x.shape[0]
        else:
            K = model.num_classes
            loss = torch.nn.functional.cross_entropy(h.reshape(-1, K), x.reshape(-1).long(),
                                                     reduction="sum") / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def torch_pixelcnn_step(model, batch):
    """One training step (loss, backward, Adam) of ``PixelCNN._forward`` in torch: ``torch_pixelcnn_net``
    with the model's initial weights, masks applied in every pass as genblocks applies them."""
    import torch
    import torch.nn.functional as tf

    from genblocks.backends import Rng

    logits, leaves = torch_pixelcnn_net(model, model.init(Rng(0)), "cpu", trainable=True)
    opt = torch.optim.Adam(leaves, lr=1e-3)
    x = torch.tensor(batch).reshape(-1, 1, model.height, model.width)
    target = x.long().reshape(-1, model.height, model.width)

    def step():
        loss = tf.cross_entropy(logits(x), target, reduction="sum") / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def torch_pixelcnn_net(model, params, device, trainable=False):
    """``PixelCNN._forward`` in torch from genblocks weights (one channel, categorical output, no classes):
    (logits(x), leaves) with x (n, 1, H, W) levels -> logits (n, L, H, W). The masks are applied in every
    pass, so training keeps them; ``trainable`` makes the weights leaf tensors that need gradients."""
    import torch
    import torch.nn.functional as tf

    from genblocks.models.autoregressive import channel_groups, horizontal_mask

    if model.channels != 1 or model.output != "categorical" or model.context_classes:
        raise ValueError(f"model: the torch twin covers one channel, categorical, no classes; got {model!r}")
    F, r, L = model.features, model.radius, model.levels
    g_feat = channel_groups(F, 1)
    leaves = []

    def layer(p, mask=None, dense=False):  # genblocks (kh, kw, in, out) or (in, out) -> torch (out, in, kh, kw)
        W = np.asarray(to_numpy(p["W"]), np.float32)
        W = W[None, None] if dense else W
        t = lambda a: torch.tensor(np.ascontiguousarray(a.transpose(3, 2, 0, 1)), device=device)  # noqa: E731
        Wt, bt = t(W), torch.tensor(np.asarray(to_numpy(p["b"]), np.float32), device=device)
        if trainable:
            leaves.extend([Wt.requires_grad_(), bt.requires_grad_()])
        m = None if mask is None else t(np.broadcast_to(np.asarray(mask, np.float32).reshape(
            (1, 1) + np.shape(mask) if dense else np.shape(mask)), W.shape))
        return Wt, bt, m

    def apply(wbm, x):
        W, b, m = wbm
        return tf.conv2d(x, W if m is None else W * m, b)

    pin = params["input"]
    in_v, in_h = layer(pin["v"]), layer(pin["h"], horizontal_mask(r, (0,), g_feat, "A"))
    in_link = layer(pin["link"], dense=True)
    blocks = [(layer(p["v"]), layer(p["h"], horizontal_mask(r, g_feat, g_feat + g_feat, "B")),
               layer(p["link"], dense=True), layer(p["res"], model.residuals[i].mask, dense=True))
              for i, p in enumerate(params["blocks"])]
    head = [layer(p, lay.mask, dense=True) for p, lay in zip(params["head"], model.head)]

    def down(a):
        return tf.pad(a, (0, 0, 1, 0))[:, :, :-1, :]

    def gate(a):
        return torch.tanh(a[:, :F]) * torch.sigmoid(a[:, F:])

    def logits(x):
        u = x * (2.0 / (L - 1)) - 1.0
        v = apply(in_v, tf.pad(u, (r, r, r, 0)))
        h = apply(in_h, tf.pad(u, (r, 0, 0, 0))) + apply(in_link, down(v))
        for cv, ch, link, res in blocks:
            a_v = apply(cv, tf.pad(v, (r, r, r, 0)))
            a_h = apply(ch, tf.pad(h, (r, 0, 0, 0))) + apply(link, down(a_v))
            v = gate(a_v)
            h = h + apply(res, gate(a_h))
        return apply(head[1], torch.relu(apply(head[0], torch.relu(h))))

    return logits, leaves


def torch_pixelcnn_twin(model, params, device):
    """The twin's forward with the given genblocks weights, x (n, 1, H, W) levels -> logits (n, L, H, W): for
    sampling speed (bench_gpu.py) and checks."""
    return torch_pixelcnn_net(model, params, device)[0]


def torch_pixelcnn_fit(model, params, data, args, steps, lr, weight_decay, seed=0):
    """Train the PyTorch twin with genblocks' recipe: the same network and initial weights (masks applied in
    every forward pass), AdamW (``weight_decay`` scaled by the scheduled lr, as genblocks' adamw does) with
    the same cosine decay, batches of ``args.batch_size`` drawn at random, the valid split picking the best
    of ``args.eval_points`` checkpoints. Returns (seconds, valid nats, test nats)."""
    import torch
    import torch.nn.functional as tf

    logits, leaves = torch_pixelcnn_net(model, params, "cpu", trainable=True)
    split = {k: torch.tensor(v).reshape(-1, 1, model.height, model.width) for k, v in data.items()}

    def nats(x):
        with torch.no_grad():
            return float(tf.cross_entropy(logits(x), x[:, 0].long(), reduction="sum")) / x.shape[0]

    opt = torch.optim.AdamW(leaves, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    every, n_train = max(steps // args.eval_points, 1), split["train"].shape[0]
    best = (math.inf, None)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x = split["train"][torch.randint(n_train, (args.batch_size,), generator=gen)]
        loss = tf.cross_entropy(logits(x), x[:, 0].long(), reduction="sum") / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 or step == steps:
            valid = nats(split["valid"])
            if valid < best[0]:
                best = (valid, [t.detach().clone() for t in leaves])
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for t, kept in zip(leaves, best[1]):
            t.copy_(kept)
    return seconds, best[0], nats(split["test"])


def torch_pixelcnn_sample(forward, model, n, device, seed=0):
    """The naive loop in torch: the whole network per pixel, Gumbel-max draws; (n, 1, H, W) levels."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.zeros(n, 1, model.height, model.width, device=device)
    with torch.no_grad():
        for i in range(model.height):
            for j in range(model.width):
                logits = forward(x)[:, :, i, j]
                u = torch.rand(logits.shape, generator=gen, device=device).clamp_(1e-30, 1.0 - 1e-7)
                x[:, 0, i, j] = torch.argmax(logits - torch.log(-torch.log(u)), dim=1).to(x.dtype)
    return x


def with_torch(fn, *args):
    try:
        import torch
    except ImportError:
        return None
    torch.manual_seed(0)
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return fn(*args)


def sampling_rate(model, params, n, cached):
    t0 = time.perf_counter()
    model.sample(params, Rng(1), n, cached=cached)
    return n / (time.perf_counter() - t0)


def sampling_by_size(args):
    """Naive against cached PixelCNN sampling at each size in ``--sampling-sizes`` (an untrained net: the
    cost does not depend on the weights); the cached loop's gain should grow with the image, since the naive
    loop runs the whole H x W network for each of the H W C steps and the cached one a column per step."""
    print(f"\nPixelCNN sampling by image size (F={args.features}, {args.blocks} blocks, untrained, "
          f"{args.n_size_sample} images):")
    print(f"{'size':>7} {'naive img/s':>11} {'cached img/s':>12} {'speed-up':>8}", flush=True)
    for size in args.sampling_sizes:
        model = PixelCNN(size, size, 1, LEVELS, features=args.features, num_blocks=args.blocks)
        params = model.init(Rng(3))
        naive = sampling_rate(model, params, args.n_size_sample, cached=False)
        cached = sampling_rate(model, params, args.n_size_sample, cached=True)
        print(f"{size:>3}x{size:<3} {naive:11.2f} {cached:12.2f} {cached / naive:7.1f}x", flush=True)


def row(name, steps, seconds, valid, test, ms, tms, naive, cached):
    torch_part = f"{tms:8.1f} {ms / tms:6.2f}" if tms else f"{'-':>8} {'-':>6}"
    sample_part = f"{naive:11.1f} {cached:12.1f} {cached / naive:7.1f}x" if naive else f"{'-':>11} {'-':>12} {'-':>8}"
    print(f"{name:<26} {steps:6d} {seconds:8.1f} {valid:7.2f} {test:9.2f} {ms:8.1f} {torch_part} {sample_part}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few steps, tiny nets")
    parser.add_argument("--made-steps", type=int, default=3000)
    parser.add_argument("--pixelcnn-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--made-hidden", type=int, nargs="+", default=[512, 512])
    parser.add_argument("--made-masks", type=int, default=8, help="MADE masks (probabilities averaged)")
    parser.add_argument("--made-order", choices=["natural", "random"], default="random",
                        help="random: each MADE mask its own variable order (order-agnostic training)")
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--pixelcnn-weight-decay", type=float, default=1.0,
                        help="AdamW's decoupled weight decay for PixelCNN (0: Adam); without it the net overfits the "
                             "1000 training digits (train NLL ~31 nats against ~82 on test)")
    parser.add_argument("--eval-points", type=int, default=10)
    parser.add_argument("--ema", type=float, default=0.0,
                        help="also keep a parameter EMA with this decay (0 = none); it competes on valid")
    parser.add_argument("--repeats", type=int, default=40, help="timed training steps per side (median)")
    parser.add_argument("--n-sample", type=int, default=100)
    parser.add_argument("--sampling-sizes", type=int, nargs="*", default=[8, 16, 28],
                        help="image sizes for the naive-vs-cached sampling table (none: skip it)")
    parser.add_argument("--n-size-sample", type=int, default=20, help="images per size in that table")
    parser.add_argument("--models", nargs="+", default=["made", "pixelcnn"], choices=["made", "pixelcnn"])
    parser.add_argument("--binarized", action="store_true", help="binary digits (pixel >= 8), floor 24.9 nats")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--train-twin", action="store_true",
                        help="also train PixelCNN's PyTorch twin with the same recipe (steps, batch, AdamW, cosine, "
                             "initial weights, best-of-valid) and print its train seconds and test NLL")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: theirs)")
    args = parser.parse_args()
    if args.quick:
        args.made_steps = args.pixelcnn_steps = 20
        args.made_hidden, args.features, args.blocks, args.repeats, args.n_sample = [64], 8, 1, 2, 10
        args.eval_points = 2
        args.sampling_sizes, args.n_size_sample = [4, 6], 2
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, numpy {np.__version__}")
    data = digits(args.binarized)
    levels = 2 if args.binarized else LEVELS
    print(f"digits: {len(data['train'])}/{len(data['valid'])}/{len(data['test'])} images, {levels} levels; "
          f"independent-pixel floor {FLOOR[levels]} test nats")
    batch = data["train"][:args.batch_size]
    print(f"\n{'model':<26} {'steps':>6} {'train s':>8} {'valid':>7} {'test nats':>9} {'ms/step':>8} "
          f"{'torch ms':>8} {'ratio':>6} {'naive img/s':>11} {'cached img/s':>12} {'speed-up':>8}", flush=True)
    if "made" in args.models:
        made = MADEModel(64, tuple(args.made_hidden), **({"output": "bernoulli"} if args.binarized else
                                                           {"output": "categorical", "num_classes": LEVELS}),
                         num_masks=args.made_masks, order=args.made_order, order_seed=0)
        params, seconds, valid, test = train(made, data, (64,), args, args.made_steps, args.lr)
        ms, tms = step_ms(genblocks_step(made, params, batch), with_torch(torch_made_step, made, batch), args.repeats)
        name = "MADE " + "x".join(map(str, args.made_hidden)) + f" masks={args.made_masks}" + (
            " own orders" if args.made_order == "random" else "")
        row(name, args.made_steps, seconds, valid, test, ms, tms, None, None)
    if "pixelcnn" in args.models:
        pcnn = PixelCNN(8, 8, 1, levels, features=args.features, num_blocks=args.blocks)
        params, seconds, valid, test = train(pcnn, data, (8, 8, 1), args, args.pixelcnn_steps, args.lr,
                                             weight_decay=args.pixelcnn_weight_decay)
        ms, tms = step_ms(genblocks_step(pcnn, params, batch.reshape(-1, 8, 8, 1)),
                          with_torch(torch_pixelcnn_step, pcnn, batch), args.repeats)
        naive = sampling_rate(pcnn, params, args.n_sample, cached=False)
        cached = sampling_rate(pcnn, params, args.n_sample, cached=True)
        row(f"PixelCNN F={args.features} blocks={args.blocks}", args.pixelcnn_steps, seconds, valid, test, ms, tms,
            naive, cached)
        if args.train_twin:
            twin = with_torch(torch_pixelcnn_fit, pcnn, pcnn.init(Rng(0).split(2)[0]), data, args, args.pixelcnn_steps,
                              args.lr, args.pixelcnn_weight_decay)
            if twin is not None:
                t_seconds, t_valid, t_test = twin
                print(f"{'  PyTorch twin, same recipe':<26} {args.pixelcnn_steps:6d} {t_seconds:8.1f} {t_valid:7.2f} "
                      f"{t_test:9.2f}", flush=True)
    if "pixelcnn" in args.models and args.sampling_sizes:
        sampling_by_size(args)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("  [torch not importable: no PyTorch twin]")
    print(f"(batch {args.batch_size}; ms/step = loss + gradient + Adam on both sides, float32; "
          f"sampling {args.n_sample} images)")


if __name__ == "__main__":
    main()
