"""Milliseconds per training step (forward + backward + Adam update) of an MLP, genblocks vs PyTorch CPU.

Models: 64-512-512-64 (relu) at batch 256 and 64-128-128-64 at batch 64, float32 and float64, loss = mean
squared error to a random target. Each figure is the median over timed steps after a warm-up. When torch
is importable the same model (nn.Sequential of Linear/ReLU, torch.optim.Adam, same initial weights) runs in
this process with the same number of BLAS threads, and the table shows genblocks / torch.

    python benchmarks/bench_train_step.py                  # under a minute on 2 quiet cores
    python benchmarks/bench_train_step.py --quick          # fewer steps, a smoke run
    python benchmarks/bench_train_step.py --threads 1      # single-threaded BLAS and torch
    python benchmarks/bench_train_step.py --threads 1 --profile   # where genblocks' time goes, then the table

The table is printed twice: with the default allocator, then after
``keep_freed_memory()`` of ``benchmarks/allocator.py`` (opt-in, process-wide: freed blocks are reused
instead of being mapped and faulted in again every step; torch runs under the same setting).

Figures are indicative: they move with the machine's load, the BLAS build and OPENBLAS_CORETYPE.
"""

import argparse
import os
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from allocator import keep_freed_memory  # noqa: E402 (benchmarks/allocator.py, next to this script)
from profile_parts import HEADER, cpu_model, format_parts, profile_parts  # noqa: E402

from genblocks.backends import Rng, namespace, value_and_grad  # noqa: E402
from genblocks.blocks.nn import MLP  # noqa: E402

CONFIGS = [((64, 512, 512, 64), 256), ((64, 128, 128, 64), 64)]


def blas_threads():
    """The number of threads numpy's BLAS uses (threadpoolctl when installed, else the environment)."""
    try:
        from threadpoolctl import threadpool_info

        counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
        if counts:
            return max(counts)
    except ImportError:
        pass
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return os.cpu_count() or 1


def threads_and_torch(threads=None, no_torch=False):
    """(BLAS threads, the torch module or None): numpy's BLAS limited to ``threads`` when given, and torch (when
    importable and not ``no_torch``) set to the same number, so both sides of a comparison run alike."""
    if threads:
        set_blas_threads(threads)
    threads = blas_threads()
    if no_torch:
        return threads, None
    try:
        import torch
    except ImportError:
        return threads, None
    torch.set_num_threads(threads)
    return threads, torch


def set_blas_threads(n):
    """Limit numpy's BLAS to ``n`` threads (needs threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(n, user_api="blas")


def get_adam(lr):
    """``genblocks.train.optim.adam`` when it exists, else a small local Adam with the same interface."""
    try:
        from genblocks.train.optim import adam

        return adam(lr), "genblocks.train.optim.adam"
    except ImportError:
        return _local_adam(lr), "local adam (genblocks.train.optim not found)"


def _local_adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    def tree_map(fn, *trees):
        first = trees[0]
        if isinstance(first, dict):
            return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
        if isinstance(first, list):
            return [tree_map(fn, *(t[i] for t in trees)) for i in range(len(first))]
        return fn(*trees)

    def init(params):
        return {"t": 0, "m": tree_map(np.zeros_like, params), "v": tree_map(np.zeros_like, params)}

    def update(grads, state, params):
        t = state["t"] + 1
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        m = tree_map(lambda m, g: b1 * m + (1.0 - b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: b2 * v + (1.0 - b2) * (g * g), state["v"], grads)
        new = tree_map(lambda p, m, v: p - lr * (m / c1) / (np.sqrt(v / c2) + eps), params, m, v)
        return new, {"t": t, "m": m, "v": v}

    return init, update


def _median_ms(step, n_warmup, n_steps):
    return _interleaved_medians([step], n_warmup, n_steps)[0]


def _interleaved_medians(steps, n_warmup, n_steps, block=10):
    """Median ms per call of each function, timed in alternating blocks so load changes hit all alike."""
    for step in steps:
        for _ in range(n_warmup):
            step()
    times = [[] for _ in steps]
    while len(times[0]) < n_steps:
        for step, out in zip(steps, times):
            for _ in range(min(block, n_steps - len(out))):
                t0 = time.perf_counter()
                step()
                out.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(t) for t in times]


def genblocks_step(widths, batch, dtype, seed=0):
    """(step, pieces, params): a closure doing one training step, and closures timing its two halves."""
    mlp = MLP(widths, activation="relu", init="he")
    params = mlp.init(Rng(seed, backend="numpy"), dtype)
    r = np.random.default_rng(seed + 1)
    x = r.normal(size=(batch, widths[0])).astype(dtype)
    y = r.normal(size=(batch, widths[-1])).astype(dtype)
    xp = namespace(x)

    def loss(params):
        d = mlp.apply(params, x) - y
        return xp.mean(d * d)

    loss_and_grad = value_and_grad(loss)
    (opt_init, opt_update), _ = get_adam(1e-3)
    state = {"params": params, "opt": opt_init(params)}
    initial = params

    def step():
        _, grads = loss_and_grad(state["params"])
        state["params"], state["opt"] = opt_update(grads, state["opt"], state["params"])

    grads0 = loss_and_grad(params)[1]

    def fwd_bwd():
        loss_and_grad(state["params"])

    def adam_only():
        opt_update(grads0, state["opt"], state["params"])

    return step, {"fwd+bwd": fwd_bwd, "adam": adam_only}, initial, x, y


def torch_step(widths, params, x, y, dtype):
    import torch

    tdtype = getattr(torch, dtype)
    layers = []
    for i, p in enumerate(params):
        lin = torch.nn.Linear(widths[i], widths[i + 1], dtype=tdtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["W"].T)))
            lin.bias.copy_(torch.from_numpy(p["b"]))
        layers.append(lin)
        if i < len(params) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.mean((model(tx) - ty) ** 2)
        loss.backward()
        opt.step()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a smoke run, noisy figures)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS and torch threads (default: what numpy's BLAS uses now)")
    parser.add_argument("--allocator", choices=["default", "keep", "both"], default="both",
                        help="run with the default allocator, after keep_freed_memory(), or both (default)")
    parser.add_argument("--profile", action="store_true",
                        help="first print where genblocks' step time goes (benchmarks/profile_parts.py)")
    args = parser.parse_args(argv)
    n_warmup, n_large, n_small = (3, 10, 30) if args.quick else (10, 100, 400)

    threads, torch = threads_and_torch(args.threads, args.no_torch)
    _, adam_name = get_adam(1e-3)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); python {sys.version.split()[0]}")
    print(f"numpy {np.__version__} ({blas_arch()}), BLAS threads {threads}, "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE')!r}"
          + (f", torch {torch.__version__} ({torch.get_num_threads()} threads)" if torch else ", torch not installed"))
    print(f"optimizer: {adam_name}; median ms per step over {n_large} (batch 256) / {n_small} (batch 64) steps; "
          "fwd+bwd and adam are genblocks' two halves")
    if args.profile:
        profile_table(n_small if not args.quick else 10)
    modes = ["default", "keep"] if args.allocator == "both" else [args.allocator]
    for mode in modes:
        if mode == "keep":
            applied = keep_freed_memory()
            print(f"\nallocator: keep_freed_memory() {'applied' if applied else 'unavailable (not glibc)'}")
        else:
            print("\nallocator: default")
        run_table(torch, n_warmup, n_large, n_small)


def profile_table(n):
    """Per model and dtype: the whole step, fwd+bwd and the optimizer, split by profile_parts."""
    print("\nprofile (ms per step; fixed = the same step on 1-wide arrays; elem+mem = total - BLAS - fixed; "
          "faults = minor page faults per step)")
    print(HEADER)
    print("-" * len(HEADER))
    for widths, batch in CONFIGS:
        for dtype in ("float32", "float64"):
            step, pieces, *_ = genblocks_step(widths, batch, dtype)
            small_step, small_pieces, *_ = genblocks_step((1,) * len(widths), 1, dtype)
            tag = f"{widths[1]}w b{batch} {dtype[5:]}"
            print(format_parts(f"{tag} step", profile_parts(step, small_step, n)))
            for key in ("fwd+bwd", "adam"):
                print(format_parts(f"{tag} {key}", profile_parts(pieces[key], small_pieces[key], n)), flush=True)


def blas_arch():
    try:
        from threadpoolctl import threadpool_info

        archs = {p.get("architecture") for p in threadpool_info() if p.get("user_api") == "blas"}
        return f"{'/'.join(sorted(a for a in archs if a))} kernels"
    except ImportError:
        return "BLAS kernels unknown"


def run_table(torch, n_warmup, n_large, n_small):
    header = f"{'model':<18} {'batch':>5} {'dtype':<8} {'fwd+bwd':>8} {'adam':>7} {'step':>8}"
    if torch:
        header += f" {'torch':>8} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for widths, batch in CONFIGS:
        n_steps = n_large if batch >= 256 else n_small
        for dtype in ("float32", "float64"):
            step, pieces, params, x, y = genblocks_step(widths, batch, dtype)
            part = {k: _median_ms(f, n_warmup, n_steps // 2) for k, f in pieces.items()}
            if torch:
                ms, t_ms = _interleaved_medians([step, torch_step(widths, params, x, y, dtype)], n_warmup, n_steps)
            else:
                ms = _median_ms(step, n_warmup, n_steps)
            line = (f"{'-'.join(map(str, widths)):<18} {batch:>5} {dtype:<8} {part['fwd+bwd']:>8.3f} "
                    f"{part['adam']:>7.3f} {ms:>8.3f}")
            if torch:
                line += f" {t_ms:>8.3f} {ms / t_ms:>6.2f}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
