"""Page faults and time of the diffusion samplers' loop in a fresh process, with and without buffer reuse.

A sampling loop frees every large array of its network at the end of each step. glibc can then give the top
of its heap back to the system, and the next step faults the same memory in again, 4 kB at a time. The
samplers' default loop (``fast=True``) runs the network inside ``genblocks.backends.reuse_buffers()``, which
hands ``dense``'s outputs out again once nothing references them; ``fast=False`` is the plain loop, fresh
arrays at every step. The two give the same bits (``tests/test_samplers.py``).

Whether the faults happen depends on what the process allocated before: after a training run, or after
``import torch``, they may not show at all. So this script samples first thing in its own process, as
``genblocks sample`` does, from networks with freshly initialised weights (the work does not depend on
their values), and imports nothing else. Rows alternate fast=True and fast=False; each figure is a median.

    python benchmarks/bench_sampling_memory.py --threads 1
    python benchmarks/bench_sampling_memory.py --quick      # a smoke run (seconds, numbers meaningless)
"""

import argparse
import os
import pathlib
import resource
import statistics
import sys
import time

if "--threads" in sys.argv[:-1]:  # BLAS reads these when numpy is first imported
    _threads = sys.argv[sys.argv.index("--threads") + 1]
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_var] = _threads

import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from profile_parts import cpu_model  # noqa: E402 (benchmarks/profile_parts.py, next to this script)

from genblocks.backends import Rng  # noqa: E402
from genblocks.blocks.samplers import clip_sample  # noqa: E402
from genblocks.blocks.schedules import DiscreteSchedule  # noqa: E402
from genblocks.blocks.score_nets import MLPScoreNet, UNet  # noqa: E402
from genblocks.models.diffusion import Diffusion  # noqa: E402


def minor_faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(run, repeat):
    """{fast: (median ms, median minor page faults)} over ``repeat`` alternating calls of run(fast)."""
    times, faults = {True: [], False: []}, {True: [], False: []}
    for _ in range(repeat):
        for fast in (True, False):
            before, t0 = minor_faults(), time.perf_counter()
            run(fast)
            times[fast].append(time.perf_counter() - t0)
            faults[fast].append(minor_faults() - before)
    return {f: (1e3 * statistics.median(times[f]), statistics.median(faults[f])) for f in (True, False)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads (default: theirs)")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical cores); numpy {np.__version__}, BLAS threads "
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')}")
    n, repeat, T = (100, 1, 100) if args.quick else (1000, 5, 1000)
    sched = DiscreteSchedule("squaredcos_cap_v2", T)
    board = Diffusion(MLPScoreNet(2, (128, 128, 128)), sched)
    digits = Diffusion(MLPScoreNet(64, (256, 256, 256)), sched)
    unet = Diffusion(UNet(1, base_channels=32, channel_mults=(1, 2)), sched)
    rows = [
        ("checkerboard MLP, DDIM-50", board, n, {"sampler": "ddim", "num_inference_steps": 50}),
        ("checkerboard MLP, DPM-Solver++-20", board, n,
         {"sampler": "dpm_solver_pp", "num_inference_steps": 20, "x0_transform": clip_sample(2.0)}),
        (f"checkerboard MLP, DDPM-{T}", board, n, {"sampler": "ddpm", "num_inference_steps": None}),
        ("8x8 digits MLP, DDIM-50", digits, n, {"sampler": "ddim", "num_inference_steps": 50}),
        ("8x8 U-Net, DDIM-10", unet, n // 4,
         {"sampler": "ddim", "num_inference_steps": 10, "data_shape": (8, 8, 1)}),
    ]
    print(f"\n{'sampling (batch)':<40} {'fast=True':>20} {'fast=False':>20} {'ratio':>6}")
    for name, model, batch, kw in rows:
        params = model.init(Rng(0))
        res = measure(lambda fast: model.sample(params, Rng(1), batch, fast=fast, **kw), repeat)
        (ms_on, f_on), (ms_off, f_off) = res[True], res[False]
        print(f"{name + f' ({batch})':<40} {ms_on:9.1f} ms {f_on:6.0f} pf {ms_off:9.1f} ms {f_off:6.0f} pf "
              f"{ms_on / ms_off:5.2f}x", flush=True)
    print("(ms: median wall time of one sample() call; pf: minor page faults during it)")


if __name__ == "__main__":
    main()
