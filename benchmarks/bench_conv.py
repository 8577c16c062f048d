"""Milliseconds per training step (forward + backward + Adam) of a small conv net, genblocks vs PyTorch CPU.

The net, on NHWC images (genblocks) and the same weights on NCHW images (PyTorch): conv 3x3 (c -> 16, relu),
conv 3x3 stride 2 (16 -> 32, relu), conv 3x3 (32 -> 32, relu), the mean over the image, dense 32 -> 10;
loss = mean squared error to a random target; Adam. padding "same" as genblocks defines it (TensorFlow's: at
stride 2 on an even size the one extra row and column of zeros go at the bottom and right), which the twin
reproduces with an explicit pad, so both sides compute the same function: the script checks that the
first losses agree before timing. Batches: 64 images of 8x8x1 and 64 of 28x28x1, float32. Each figure is
the median of steps timed in alternating blocks (genblocks, torch, genblocks, ...) in this process.

    python benchmarks/bench_conv.py --threads 1              # single-threaded BLAS and torch
    python benchmarks/bench_conv.py --threads 1 --profile    # and where genblocks' step time goes
    python benchmarks/bench_conv.py --quick                  # a smoke run (few steps, numbers meaningless)

Figures are indicative: they move with the machine's load and the BLAS build.
"""

import argparse
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_train_step import _interleaved_medians, blas_arch, threads_and_torch  # noqa: E402
from profile_parts import HEADER, cpu_model, format_parts, profile_parts  # noqa: E402

from genblocks.backends import Rng, namespace, value_and_grad  # noqa: E402
from genblocks.blocks.nn import Conv2d, Dense  # noqa: E402
from genblocks.train.optim import adam  # noqa: E402

SIZES = (8, 28)
BATCH = 64


def genblocks_net(channels=1):
    convs = [Conv2d(channels, 16, 3, activation="relu", init="he"),
             Conv2d(16, 32, 3, stride=2, activation="relu", init="he"),
             Conv2d(32, 32, 3, activation="relu", init="he")]
    head = Dense(32, 10)

    def apply(params, x):
        h = x
        for conv, p in zip(convs, params[:3]):
            h = conv.apply(p, h)
        return head.apply(params[3], namespace(h).mean(h, axis=(1, 2)))

    def init(rng, dtype="float32"):
        rs = rng.split(4)
        return [layer.init(r, dtype) for layer, r in zip(convs + [head], rs)]

    return init, apply


def genblocks_step(size, batch, seed=0):
    """(step, loss value at the initial params, params, x, y) for one configuration."""
    init, apply = genblocks_net()
    params = init(Rng(seed))
    r = np.random.default_rng(seed + 1)
    x = r.normal(size=(batch, size, size, 1)).astype("float32")
    y = r.normal(size=(batch, 10)).astype("float32")
    xp = namespace(x)

    def loss(params):
        d = apply(params, x) - y
        return xp.mean(d * d)

    loss_and_grad = value_and_grad(loss)
    opt_init, opt_update = adam(1e-3)
    state = {"params": params, "opt": opt_init(params)}

    def step():
        _, grads = loss_and_grad(state["params"])
        state["params"], state["opt"] = opt_update(grads, state["opt"], state["params"])

    return step, float(loss(params)), params, x, y


def torch_step(params, x, y):
    """The same net, weights and data in torch (NCHW); returns (step, first loss)."""
    import torch

    T = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    convs = []
    for p in params[:3]:
        kh, kw, c_in, c_out = p["W"].shape
        conv = torch.nn.Conv2d(c_in, c_out, (kh, kw), bias=True)
        with torch.no_grad():
            conv.weight.copy_(T(p["W"].transpose(3, 2, 0, 1)))
            conv.bias.copy_(T(p["b"]))
        convs.append(conv)
    head = torch.nn.Linear(32, 10)
    with torch.no_grad():
        head.weight.copy_(T(params[3]["W"].T))
        head.bias.copy_(T(params[3]["b"]))
    pads = [(1, 1, 1, 1), _same_pads_stride2(x.shape[1]), (1, 1, 1, 1)]
    strides = [1, 2, 1]
    model = torch.nn.ModuleList(convs + [head])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tx, ty = T(x.transpose(0, 3, 1, 2)), T(y)

    def loss_fn():
        h = tx
        for conv, pad, s in zip(convs, pads, strides):
            h = torch.relu(torch.nn.functional.conv2d(torch.nn.functional.pad(h, pad), conv.weight, conv.bias,
                                                      stride=s))
        return torch.mean((head(h.mean(dim=(2, 3))) - ty) ** 2)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    with torch.no_grad():
        first = float(loss_fn())
    return step, first


def _same_pads_stride2(size):
    """torch.nn.functional.pad's (left, right, top, bottom) for genblocks' "same" 3x3 conv at stride 2."""
    out = -(-size // 2)
    total = max((out - 1) * 2 + 3 - size, 0)
    return (total // 2, total - total // 2, total // 2, total - total // 2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run, noisy figures)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: numpy's)")
    parser.add_argument("--profile", action="store_true", help="print where genblocks' step time goes first")
    args = parser.parse_args(argv)
    n_warmup, n_steps = (2, 6) if args.quick else (5, 60)
    threads, torch = threads_and_torch(args.threads, args.no_torch)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); numpy {np.__version__} ({blas_arch()}), "
          f"BLAS threads {threads}" + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
                                       if torch else ", torch not installed"))
    if args.profile:
        print("\nprofile (ms per step; fixed = the same step at batch 1; elem+mem = total - BLAS - fixed)")
        print(HEADER)
        print("-" * len(HEADER))
        for size in SIZES:
            step, *_ = genblocks_step(size, BATCH)
            small, *_ = genblocks_step(size, 1)
            print(format_parts(f"{size}x{size} b{BATCH} f32", profile_parts(step, small, 5 if args.quick else 30)),
                  flush=True)
    header = f"\n{'images':<10} {'batch':>5} {'genblocks':>10}" + (f" {'torch':>8} {'ratio':>6}" if torch else "")
    print(header + f"   (median ms per step over {n_steps} steps, alternating)")
    for size in SIZES:
        step, first, params, x, y = genblocks_step(size, BATCH)
        line = f"{f'{size}x{size}x1':<10} {BATCH:>5}"
        if torch:
            t_step, t_first = torch_step(params, x, y)
            if not np.isclose(first, t_first, rtol=1e-4):
                raise AssertionError(f"the twins differ: first loss {first} (genblocks) vs {t_first} (torch)")
            ms, t_ms = _interleaved_medians([step, t_step], n_warmup, n_steps, block=5)
            line += f" {ms:>10.3f} {t_ms:>8.3f} {ms / t_ms:>6.2f}"
        else:
            ms = _interleaved_medians([step], n_warmup, n_steps, block=5)[0]
            line += f" {ms:>10.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
