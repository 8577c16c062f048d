"""Sampling on Dask: samples/s against the number of worker processes, and the Dask path's overhead.

Draws ``--n`` samples of a neural spline flow (2-D, 4 coupling layers, 64x64 MLPs, float32; freshly
initialised: throughput does not depend on training) with ``genblocks.distributed.sample`` in chunks of
``--chunk`` on a ``LocalCluster`` of 1 and 2 worker processes (one thread, one BLAS thread each), gathered
to this process, and the same chunks from the same streams in a plain in-process loop
(``distributed.sample_local``, BLAS threads ``--threads``). The plain loop and the 1-worker Dask run are
timed alternately, best of ``--repeat``, so a change in the machine's load hits both. Then the pieces a
cluster's throughput is made of: the parameter broadcast (``client.scatter(..., broadcast=True)``), the
fixed cost per task (chunks of one sample), and how fast results come back to the client.

    python benchmarks/bench_distributed.py              # 400,000 samples in chunks of 20,000
    python benchmarks/bench_distributed.py --quick      # small sizes: checks the script runs
    python benchmarks/bench_distributed.py --workers 1 2 4 --n 1000000 --chunk 50000
    python benchmarks/bench_distributed.py --backend cupy --cuda   # one worker per GPU (dask-cuda)

Measured here (2 cores shared with five other sessions, load average 15 to 22; ``python
benchmarks/bench_distributed.py``, three runs in turn): the plain loop drew 41,457 / (not kept) / 38,885
samples/s, the 1-worker Dask path 44,287 / 34,801 / 38,282, an overhead of -6.4% / +2.6% / +1.6% (target
<= 5%; the same samples bit for bit every time); 2 workers gave 0.82x / 0.86x / 1.22x the 1-worker rate:
with about twenty runnable processes on two cores, a second worker process gains little or nothing.
Parameter broadcast 14 to 58 ms (93 kB), fixed cost 53 to 111 ms of a worker per task, gathering 24 to 152
MB/s over loopback. At 100,000 samples (``--n 100000 --workers 1 --repeat 2``) the Dask path cost +9.6% over
the loop (2.96 s against 2.70 s: the per-call broadcast, the one-sample probe and the round trips, about
0.25 s at that load), and with the ``MALLOC_TRIM_THRESHOLD_`` Dask's nanny sets (``--dask-malloc-trim``)
+93.7%: each large temporary page-faults afresh once glibc's adaptive mmap threshold is off, which is why
``distributed.local_cluster`` unsets it. The cupy / ``--cuda`` path was not run (no GPU in that session).

How throughput grows on N GPUs, from these pieces. Each chunk costs one worker t_task (the fixed cost per
task: 50 to 110 ms measured here under that load, where every round trip waits for a time slice; far less on
an idle machine) plus chunk / r_gpu (one GPU's samples/s, ``benchmarks/bench_gpu.py``). The parameters go to
each worker once (scatter, then ``to_device`` once per worker): a start-up of about params_bytes / bandwidth
per worker (14 to 58 ms for 93 kB here, all latency), nothing per chunk. Every sample comes back to the
client through its link at b bytes/s (24 to 152 MB/s on this loaded loopback; a data-centre link gives 1 to
10 GB/s). N GPUs therefore give about

    min(N * r_gpu * chunk / (chunk + t_task * r_gpu), b / sample_bytes) samples/s:

linear in N while chunk >> t_task * r_gpu (at r_gpu = 1e7 samples/s and t_task = 10 ms, chunks of 1e6
samples or more), until the client's link is full (2-D float32 samples are 8 bytes: 1 GB/s carries 1.25e8
samples/s, about a dozen such GPUs). Beyond that, keep the samples where they are drawn (reduce them on the
workers with ``log_prob`` or statistics of the Dask array, or write ``.zarr`` from the workers to shared
storage).

Figures are indicative: they move with the machine's load and the BLAS build.
"""

import argparse
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_flows import set_blas_threads  # noqa: E402 (benchmarks/bench_flows.py, beside this script)

from genblocks import distributed as gd  # noqa: E402
from genblocks.backends import Rng  # noqa: E402
from genblocks.models.flow import neural_spline_flow  # noqa: E402


def best(fn, repeat):
    """The least wall-clock seconds of ``repeat`` calls of ``fn`` (its last result too)."""
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def cluster(workers, cuda, plain_nanny=False):
    """A local cluster of ``workers`` processes (one thread each), or one worker per GPU with ``cuda``."""
    from distributed import Client, LocalCluster

    if cuda:
        from dask_cuda import LocalCUDACluster

        c = LocalCUDACluster()
    else:
        c = gd.local_cluster(workers) if not plain_nanny else LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return c, Client(c, set_as_default=False)


def nbytes(tree):
    if isinstance(tree, dict):
        return sum(nbytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(nbytes(v) for v in tree)
    return 0 if tree is None else int(tree.nbytes)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: checks the script runs")
    p.add_argument("--n", type=int, default=400_000, help="samples per timed run")
    p.add_argument("--chunk", type=int, default=20_000, help="samples per chunk (one Dask task each)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to time")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per setting (best of)")
    p.add_argument("--hidden", type=int, nargs="+", default=[64, 64])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    p.add_argument("--cuda", action="store_true", help="dask-cuda's LocalCUDACluster: one worker per GPU")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads of the plain loop (workers use 1)")
    p.add_argument("--dask-malloc-trim", action="store_true",
                   help="keep the MALLOC_TRIM_THRESHOLD_ Dask's nanny sets (distributed.local_cluster unsets it)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.chunk, args.repeat = 20_000, 2_000, 1
    threads = set_blas_threads(args.threads)
    import dask
    import numpy as np

    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cpus, python "
          f"{platform.python_version()}, numpy {np.__version__}, dask {dask.__version__}, BLAS threads {threads} "
          f"(workers 1), load average {os.getloadavg()[0]:.1f}")
    model = neural_spline_flow(2, layers=args.layers, hidden=tuple(args.hidden))
    params = model.init(Rng(0))
    kw = dict(chunk=args.chunk, backend=args.backend, seed=0)
    print(f"model: neural spline flow, 2-D, {args.layers} layers, hidden {args.hidden}, params "
          f"{nbytes(params) / 1e3:.0f} kB; {args.n:,} samples in chunks of {args.chunk:,}, best of {args.repeat}")
    print("| run | workers | seconds | samples/s | vs 1 worker |")
    print("|---|---|---|---|---|")
    plain_s = None
    base = None
    settings = [1] if args.cuda else args.workers
    for k, w in enumerate(settings):
        c, client = cluster(w, args.cuda, args.dask_malloc_trim)
        try:
            w = len(client.nthreads())
            run = lambda n, **k: client.compute(gd.sample(model, params, n, client=client, **k)).result()  # noqa: E731
            run(args.chunk, **kw)  # the workers import genblocks
            dask_run = lambda: run(args.n, **kw)  # noqa: E731
            if w == 1 and not args.cuda:  # alternate with the plain loop, so load changes hit both
                plain_t, dask_t = [], []
                for _ in range(args.repeat):
                    plain_t.append(best(lambda: gd.sample_local(model, params, args.n, **kw), 1)[0])
                    t, got = best(dask_run, 1)
                    dask_t.append(t)
                plain_s, seconds = min(plain_t), min(dask_t)
                same = np.array_equal(got, gd.sample_local(model, params, args.n, **kw))
                print(f"| plain in-process loop | - | {plain_s:.3f} | {args.n / plain_s:,.0f} | - |")
            else:
                seconds, got = best(dask_run, args.repeat)
                same = None
            base = base or seconds
            print(f"| Dask{' (cuda)' if args.cuda else ''} | {w} | {seconds:.3f} | {args.n / seconds:,.0f} "
                  f"| {base / seconds:.2f}x |", flush=True)
            if same is not None:
                print(f"|   (same samples as the plain loop: {same}; overhead "
                      f"{100 * (seconds / plain_s - 1):+.1f}%, target <= 5%) | | | | |")
            if k == len(settings) - 1:
                pieces(client, model, params, args, w)
        finally:
            client.close()
            c.close()


def pieces(client, model, params, args, workers):
    """The broadcast, the fixed cost per task and the gathering rate, for the N-GPU estimate."""
    import dask.array as da

    t_scatter, _ = best(lambda: client.scatter([(model, params)], broadcast=True, hash=False), args.repeat)
    tasks = 20 * workers
    run = lambda n: client.compute(gd.sample(model, params, n, client=client, chunk=1, seed=0)).result()  # noqa: E731
    t_tiny, _ = best(lambda: run(tasks), args.repeat)
    t_one, _ = best(lambda: run(1), args.repeat)
    per_task = (t_tiny - t_one) / (tasks - 1) * workers  # seconds of one worker per extra task
    held = client.persist(da.random.default_rng(0).random((args.n * 4, 2), chunks=(args.chunk * 4, 2)))
    t_gather, x = best(lambda: client.compute(held).result(), args.repeat)  # drawn on the workers, sent here
    print(f"pieces ({workers} workers): parameter broadcast {1e3 * t_scatter:.1f} ms; fixed cost per task "
          f"{1e3 * per_task:.1f} ms of a worker ({tasks} one-sample chunks {t_tiny:.2f} s, one {t_one:.2f} s); "
          f"gathering {x.nbytes / t_gather / 1e6:,.0f} MB/s ({x.nbytes / 1e6:.0f} MB to the client)")


if __name__ == "__main__":
    main()
