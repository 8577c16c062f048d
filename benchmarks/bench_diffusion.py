"""Diffusion benchmark: train on the checkerboard and on 8x8 digits, then time the samplers.

Reports, per dataset: training ms/step, MMD^2 between 1000 DDIM-50 samples and held-out data, the
variational bound in bits/dim (the full L_0..L_T sum) and the PF-ODE NLL; then the wall time to draw 1000
checkerboard samples with DDPM-1000, DDIM-50 and DPM-Solver++-20. When torch is importable, the same
network (same weights, float32, inference mode, the same thread count with --threads) and the same DDPM,
DDIM and DPM-Solver++ loops run in PyTorch CPU and the table shows the ratio genblocks / torch (target
<= 1.0), then the network forward alone (each loop is one forward per step plus a few vector updates).

What each side computes: a sampler passes one time for the whole batch, and both sides embed it once
(genblocks: ``Diffusion.sample`` hands the network t[:1]; the twin slices t[:1] too), so neither pays
for n identical time embeddings. genblocks then folds that shared FiLM (h gamma + beta) into the next
layer's weights; the twin applies FiLM as written, the way a PyTorch user writes the network. The sampling
table is printed with glibc's default allocator and again after ``keep_freed_memory()`` (process-wide, so
torch runs under it too); see ``benchmarks/allocator.py``.

    python benchmarks/bench_diffusion.py            # about two minutes on 2 quiet cores
    python benchmarks/bench_diffusion.py --quick    # a smoke run (seconds, numbers meaningless)
    python benchmarks/bench_diffusion.py --threads 1   # single-threaded BLAS and torch (a like-for-like loop)
    python benchmarks/bench_diffusion.py --sampling-only --threads 1 --profile   # where sampling time goes

Figures are indicative: they move with the machine's load and the BLAS build.
"""

import argparse
import math
import os
import pathlib
import sys
import time

if "--threads" in sys.argv[:-1]:  # BLAS reads these when numpy is first imported
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from allocator import keep_freed_memory  # noqa: E402 (benchmarks/allocator.py, next to this script)
from profile_parts import HEADER, cpu_model, format_parts, profile_parts  # noqa: E402

from genblocks.backends import Rng, to_numpy, value_and_grad  # noqa: E402
from genblocks.blocks.samplers import clip_sample  # noqa: E402
from genblocks.blocks.schedules import DiscreteSchedule  # noqa: E402
from genblocks.blocks.score_nets import MLPScoreNet  # noqa: E402
from genblocks.data import checkerboard, load_digits  # noqa: E402
from genblocks.metrics import mmd  # noqa: E402
from genblocks.models.diffusion import Diffusion  # noqa: E402
from genblocks.train.loop import fit  # noqa: E402
from genblocks.train.optim import adam  # noqa: E402

CLIP_RANGE = 2.0  # DPM-Solver++'s x_0 clipping, the same on both sides of the comparison


def train(model, data, steps, seed=0):
    r_init, r_fit = Rng(seed).split(2)
    params = model.init(r_init)
    step = value_and_grad(model.loss)
    t0 = time.perf_counter()
    for i in range(5):  # ms/step of the bare loss + gradient, after a warm-up
        step(params, data[:256], Rng(i))
    t0 = time.perf_counter()
    for i in range(20):
        step(params, data[:256], Rng(i))
    ms = (time.perf_counter() - t0) / 20 * 1000
    res = fit(model.loss, params, data, r_fit, adam(2e-3), steps, batch_size=256, progress=False, ema_decay=0.995)
    return res.ema_params, ms


def quality(name, model, params, test_x, nll_points, vlb_offset, nll_offset):
    """Print sample MMD, the VLB (bits/dim, + vlb_offset nats) and the PF-ODE NLL (+ nll_offset nats)."""
    samples = to_numpy(model.sample(params, Rng(1), 1000, sampler="ddim", num_inference_steps=50))
    m = float(mmd(samples, test_x[:1000]))
    t0 = time.perf_counter()
    terms = model.loss_terms(params, test_x[:200], Rng(2))
    D = test_x.shape[1]
    vlb_bpd = (float(terms["vlb"]) + vlb_offset) / (D * math.log(2))
    t_vlb = time.perf_counter() - t0
    t0 = time.perf_counter()
    nll = -to_numpy(model.log_prob(params, test_x[:nll_points], trace="exact" if D <= 4 else "hutchinson",
                                   rng=Rng(3), rtol=1e-4, atol=1e-4)).mean() + nll_offset
    t_nll = time.perf_counter() - t0
    print(f"{name:12s} MMD^2 {m:8.5f}   VLB {vlb_bpd:6.3f} bits/dim ({t_vlb:4.1f} s)   "
          f"PF-ODE NLL {nll:8.3f} nats = {nll / (D * math.log(2)):6.3f} bits/dim ({t_nll:4.1f} s)")


# ---------------------------------------------------------------------------------------------------
# the PyTorch twin of MLPScoreNet (same weights) and its sampling loops


def torch_twin(params, net, device="cpu"):
    import torch

    params = to_numpy(params)
    T = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
    half = net.time_embedding.frequency_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=device) * (-math.log(10000.0) / half))
    P = {"fc1": params["cond"]["time"]["fc1"], "fc2": params["cond"]["time"]["fc2"]}
    silu = torch.nn.functional.silu

    def lin(x, p):
        return torch.addmm(T(p["b"]), x, T(p["W"]))

    @torch.inference_mode()  # the fastest no-autograd mode: a fair twin of an untraced numpy forward
    def model(x, t):
        args = t[:1, None] * freqs  # one shared time per call, embedded once (as Diffusion.sample does)
        e = lin(silu(lin(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), P["fc1"])), P["fc2"])
        e = silu(e)
        h = x
        for p, f in zip(params["layers"], params["films"]):
            gamma, beta = lin(e, f).chunk(2, dim=-1)  # FiLM: one matmul for both halves, as in MLPScoreNet
            h = silu(lin(h, p)) * gamma + beta
        return lin(h, params["out"])

    return model


def torch_ddim(model, sched, x, steps, eta=0.0):
    """DDIM in torch, out of place; eta = 1 on all T steps is DDPM's ancestral sampler (fixed_small)."""
    import torch

    grid = sched.timesteps(steps)
    with torch.inference_mode():
        for k, t in enumerate(grid):
            a, s = sched.marginal_host(t)
            a_prev, s_prev = sched.marginal_host(grid[k + 1]) if k + 1 < len(grid) else (1.0, 0.0)
            eps = model(x, torch.full((x.shape[0],), float(t), device=x.device))
            x0 = (x - s * eps) / a
            c = 0.0
            if eta > 0 and s_prev > 0:
                c = eta * s_prev / s * math.sqrt(max(s * s - (a * s_prev / a_prev) ** 2, 0.0))
            x = a_prev * x0 + math.sqrt(max(s_prev ** 2 - c * c, 0.0)) * eps
            if c > 0:
                x = x + c * torch.randn_like(x)
    return x


def torch_dpm_solver_pp(model, sched, x, grid, clip):
    """DPM-Solver++(2M) in torch on the time grid genblocks visits, x0_hat clipped to [-clip, clip]."""
    import torch

    x0_prev = h_prev = None
    with torch.inference_mode():
        for k, t in enumerate(grid):
            a, s = sched.marginal_host(t)
            x0 = ((x - s * model(x, torch.full((x.shape[0],), float(t), device=x.device))) / a).clamp(-clip, clip)
            if k + 1 == len(grid):
                return x0
            a_next, s_next = sched.marginal_host(grid[k + 1])
            h = math.log(a_next / s_next) - math.log(a / s)
            D = x0 if x0_prev is None else (1.0 + 0.5 * h / h_prev) * x0 - (0.5 * h / h_prev) * x0_prev
            x = (s_next / s) * x - a_next * math.expm1(-h) * D
            x0_prev, h_prev = x0, h
    return x


def time_it(fn, repeat=3):
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_pair(fn_a, fn_b, repeat=3):
    """Best-of-repeat times of two functions run alternately, so a load change on a shared machine hits both."""
    a = b = math.inf
    for _ in range(repeat):
        a = min(a, time_it(fn_a, 1))
        if fn_b is not None:
            b = min(b, time_it(fn_b, 1))
    return a, b


def sampling_table(model, params, quick, threads=None):
    n = 200 if quick else 1000
    runs = [("DDPM", "ddpm", {"num_inference_steps": None}), ("DDIM", "ddim", {"num_inference_steps": 50}),
            ("DPM-Solver++", "dpm_solver_pp", {"num_inference_steps": 20, "x0_transform": clip_sample(2.0)})]
    try:
        import torch

        if threads:
            torch.set_num_threads(threads)
        twin = torch_twin(params, model.network)
    except ImportError:
        torch = twin = None
    repeat = 1 if quick else 3
    blas = os.environ.get("OPENBLAS_NUM_THREADS", "default")
    print(f"\nsampling {n} checkerboard samples (best of {repeat}, alternating; BLAS threads {blas}, torch threads "
          f"{torch.get_num_threads() if torch else '-'}){'' if torch else '  [torch not importable]'}")
    for name, sampler, kw in runs:
        grid = []
        model.sample(params, Rng(0), 4, sampler=sampler, callback=lambda step, t, x: grid.append(t), **kw)
        twin_loop = None
        if torch is not None:
            x = torch.randn(n, 2)
            if sampler == "dpm_solver_pp":
                twin_loop = lambda: torch_dpm_solver_pp(twin, model.schedule, x, grid, CLIP_RANGE)
            else:
                eta = 1.0 if sampler == "ddpm" else 0.0
                steps = kw.get("num_inference_steps", model.schedule.num_train_timesteps)
                twin_loop = lambda: torch_ddim(twin, model.schedule, x, steps, eta)
        g, tt = time_pair(lambda: model.sample(params, Rng(0), n, sampler=sampler, **kw), twin_loop, repeat)
        line = f"  {name + '-' + str(len(grid)):16s} genblocks {g:7.3f} s"
        if torch is not None:
            line += f"   torch {tt:7.3f} s   ratio {g / tt:5.2f}x"
        print(line)
    # the network alone: each loop above is one forward per step plus a few vector updates
    fn = model.model_fn(params, shared_time=True)
    x_np = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    t_np = np.full((n,), 500.0, dtype=np.float32)
    twin_fwd = None
    if torch is not None:
        x_t, t_t = torch.from_numpy(x_np), torch.from_numpy(t_np)
        twin_fwd = lambda: [twin(x_t, t_t) for _ in range(50)]
    fwd, fwd_t = time_pair(lambda: [fn(x_np, t_np) for _ in range(50)], twin_fwd, repeat)
    line = f"  {'forward alone':16s} genblocks {fwd / 50 * 1e3:7.3f} ms"
    if torch is not None:
        line += f"  torch {fwd_t / 50 * 1e3:7.3f} ms  ratio {fwd / fwd_t:5.2f}x"
    print(line)
    try:
        import diffusers  # noqa: F401
        print("  diffusers importable: its scheduler comparison is not wired in this script yet")
    except ImportError:
        print("  [diffusers not importable: no scheduler comparison]")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: theirs)")
    parser.add_argument("--sampling-only", action="store_true", help="skip the quality figures")
    parser.add_argument("--allocator", choices=["default", "keep", "both"], default="both",
                        help="time sampling with the default allocator, after keep_freed_memory(), or both")
    parser.add_argument("--profile", action="store_true",
                        help="print where genblocks' sampling time goes (benchmarks/profile_parts.py) first")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); numpy {np.__version__}, BLAS {blas_info()}")
    steps_cb, steps_dg, T = (50, 30, 100) if args.quick else (2000, 1500, 1000)

    board = to_numpy(checkerboard(Rng(10), 20000)) / 2.0
    held = to_numpy(checkerboard(Rng(11), 2000)) / 2.0
    model = Diffusion(MLPScoreNet(2, (128, 128, 128)), DiscreteSchedule("squaredcos_cap_v2", T))
    t0 = time.perf_counter()
    steps_cb = min(steps_cb, 1000) if args.sampling_only else steps_cb
    params, ms = train(model, board, steps_cb)
    print(f"checkerboard: {steps_cb} steps in {time.perf_counter() - t0:.1f} s ({ms:.1f} ms/step at batch 256)")
    if args.sampling_only:
        return sampling_tables(model, params, args)
    # the network sees the board divided by 2: densities of the original data lose 2 log 2 nats
    quality("checkerboard", model, params, held, 50 if args.quick else 200, 2 * math.log(2.0), 2 * math.log(2.0))

    digits = load_digits(backend="numpy")
    scale = lambda x: (to_numpy(x) / 8.0 - 1.0).astype(np.float32)  # 17 grey levels -> [-1, 1]
    dx, tx = scale(digits["train"][0]), scale(digits["test"][0])
    dmodel = Diffusion(MLPScoreNet(64, (256, 256, 256)), DiscreteSchedule("squaredcos_cap_v2", T),
                       decoder="discretized", num_bins=17)
    t0 = time.perf_counter()
    dparams, dms = train(dmodel, dx, steps_dg)
    print(f"digits:       {steps_dg} steps in {time.perf_counter() - t0:.1f} s ({dms:.1f} ms/step at batch 256)")
    # the bound is over the 17-level data already; the ODE density is over [-1, 1]^64, so bin it with
    # width 2/16 (density x bin volume, a rough conversion, not a bound: bench_diffusion_likelihood.py
    # puts the ODE density on the discrete scale by uniform dequantization, and trains for likelihood)
    quality("digits", dmodel, dparams, tx, 20 if args.quick else 100, 0.0, 64 * math.log(2.0 / 16.0))

    sampling_tables(model, params, args)


def blas_info():
    """numpy's BLAS, its kernels and threads (threadpoolctl when installed)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"threads {os.environ.get('OPENBLAS_NUM_THREADS', 'default')} (threadpoolctl not installed)"
    infos = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} kernels, "
                     f"{p.get('num_threads')} threads" for p in infos) or "unknown"


def profile_sampling(model, params, quick):
    """Where the time of the network forward and of two sampling loops goes (profile_parts); the fixed
    cost is the same call at batch 2 (batch 1 would skip the FiLM folding, a different computation)."""
    n = 200 if quick else 1000
    fn = model.model_fn(params, shared_time=True)
    rng = np.random.default_rng(0)
    x, x2 = rng.normal(size=(n, 2)).astype(np.float32), rng.normal(size=(2, 2)).astype(np.float32)
    t, t2 = np.full((n,), 500.0, dtype=np.float32), np.full((2,), 500.0, dtype=np.float32)
    print(f"\nprofile ({n} samples; ms; fixed = the same call at batch 2; elem+mem = total - BLAS - fixed; "
          "faults = minor page faults per call)")
    print(HEADER)
    print("-" * len(HEADER))
    print(format_parts("forward", profile_parts(lambda: fn(x, t), lambda: fn(x2, t2), 10 if quick else 50)))
    runs = [("DDIM-50", "ddim", {"num_inference_steps": 50}),
            ("DPM-Solver++-20", "dpm_solver_pp", {"num_inference_steps": 20, "x0_transform": clip_sample(2.0)})]
    for name, sampler, kw in runs:
        parts = profile_parts(lambda: model.sample(params, Rng(0), n, sampler=sampler, **kw),
                              lambda: model.sample(params, Rng(0), 2, sampler=sampler, **kw), 3 if quick else 7)
        print(format_parts(name, parts), flush=True)


def sampling_tables(model, params, args):
    """The sampling table with glibc's default allocator and/or after keep_freed_memory() (process-wide:
    genblocks and torch run under the same setting; torch keeps its own CPU caching either way)."""
    if args.profile:
        profile_sampling(model, params, args.quick)
    if args.allocator in ("default", "both"):
        print("\nallocator: default")
        sampling_table(model, params, args.quick, args.threads)
    if args.allocator in ("keep", "both"):
        applied = keep_freed_memory()
        print(f"\nallocator: keep_freed_memory() {'applied' if applied else 'unavailable (not glibc)'}")
        sampling_table(model, params, args.quick, args.threads)


if __name__ == "__main__":
    main()
