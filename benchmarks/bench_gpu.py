"""GPU benchmark: genblocks on the cupy backend, against the same loops in PyTorch CUDA.

Prints, for the diffusion samplers (the MLP+FiLM score network of ``bench_diffusion.py``, cosine schedule,
T = 1000): samples per second for DDPM-1000, DDIM-50 and DPM-Solver++-20 at 1,000 and 100,000 samples,
cupy against a PyTorch CUDA twin with the same weights (ratio genblocks / torch, lower is better); then a
U-Net DDIM-50 run on 28x28 images; then flow sampling and log-density throughput (RealNVP, neural spline
flow) on cupy against numpy on this machine's CPU; then GAN sampling and discriminator forward passes (3x128 MLPs
with spectral normalisation; the 8x8 conv generator and discriminator) on cupy against numpy; then a digits-size
VAE's sampling, decoding and importance-sampled log p(x) with K = 5000 in chunks (cupy against numpy). Peak
memory is cupy's memory-pool size after each run (the pool keeps what it allocated, so it is the high-water mark).
Last, gated PixelCNN sampling (17 levels): images/s for the naive loop (the whole network per pixel) and the
cached loop, against the naive loop of a PyTorch CUDA twin with the same weights, and log_prob images/s.

Weights are random (a perturbed initialisation): speed does not depend on training.

    python benchmarks/bench_gpu.py            # needs cupy and an NVIDIA GPU; about a minute
    python benchmarks/bench_gpu.py --quick    # a smoke run
"""

import argparse
import math
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_autoregressive import torch_pixelcnn_sample, torch_pixelcnn_twin  # noqa: E402
from bench_diffusion import CLIP_RANGE, torch_ddim, torch_dpm_solver_pp, torch_twin  # noqa: E402

from genblocks.backends import Rng, to_device, to_numpy  # noqa: E402
from genblocks.blocks.discriminators import (  # noqa: E402
    ConvDiscriminator,
    ConvGenerator,
    MLPDiscriminator,
    MLPGenerator,
)
from genblocks.blocks.nn import MLP  # noqa: E402
from genblocks.blocks.samplers import clip_sample  # noqa: E402
from genblocks.blocks.schedules import DiscreteSchedule  # noqa: E402
from genblocks.blocks.score_nets import MLPScoreNet, UNet  # noqa: E402
from genblocks.data import load_digits  # noqa: E402
from genblocks.models.autoregressive import PixelCNN  # noqa: E402
from genblocks.models.diffusion import Diffusion  # noqa: E402
from genblocks.models.flow import neural_spline_flow, real_nvp  # noqa: E402
from genblocks.models.gan import GAN  # noqa: E402
from genblocks.models.vae import VAE  # noqa: E402


def perturbed(params, seed=0, scale=0.05):
    """Host params plus small noise on every leaf (no layer starts at an exact identity or zero)."""
    gen = np.random.default_rng(seed)
    if isinstance(params, dict):
        return {k: perturbed(v, seed + i + 1, scale) for i, (k, v) in enumerate(params.items())}
    if isinstance(params, (list, tuple)):
        return type(params)(perturbed(v, seed + i + 1, scale) for i, v in enumerate(params))
    a = np.asarray(params)
    if a.dtype.kind != "f":
        return params
    return (a + scale * gen.standard_normal(a.shape)).astype(a.dtype)


def best_time(fn, sync, repeat):
    """Best wall time of ``repeat`` synchronised runs after one warm-up run (compiles the kernels)."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    from genblocks.backends.cupy_backend import load_cupy

    cp = load_cupy()
    pool = cp.get_default_memory_pool()
    sync = cp.cuda.Device().synchronize
    try:
        import torch

        torch_ok = torch.cuda.is_available()
    except ImportError:
        torch, torch_ok = None, False
    tsync = torch.cuda.synchronize if torch_ok else (lambda: None)
    props = cp.cuda.runtime.getDeviceProperties(0)
    print(f"GPU: {props['name'].decode()}; cupy {cp.__version__}; "
          f"torch {torch.__version__ if torch else '-'} (CUDA {'yes' if torch_ok else 'no'})")
    repeat = 1 if args.quick else 3

    # -- diffusion sampling, MLP+FiLM ----------------------------------------------------------------
    T = 100 if args.quick else 1000
    model = Diffusion(MLPScoreNet(2, (128, 128, 128)), DiscreteSchedule("squaredcos_cap_v2", T))
    host = perturbed(model.init(Rng(0, "numpy")))
    dev = to_device(host, "cupy")
    twin = torch_twin(host, model.network, "cuda") if torch_ok else None
    runs = [("DDPM", "ddpm", {"num_inference_steps": None}), ("DDIM", "ddim", {"num_inference_steps": 50}),
            ("DPM-Solver++", "dpm_solver_pp", {"num_inference_steps": 20, "x0_transform": clip_sample(2.0)})]
    print(f"\ndiffusion sampling, MLP 2-128-128-128-2 with FiLM, float32 (best of {repeat}); samples/s and ratio "
          "of times genblocks-cupy / torch-cuda")
    for n in ((1000,) if args.quick else (1000, 100_000)):
        for name, sampler, kw in runs:
            grid = []
            model.sample(host, Rng(0, "numpy"), 4, sampler=sampler, callback=lambda s, t, x: grid.append(t), **kw)
            pool.free_all_blocks()
            g = best_time(lambda: model.sample(dev, Rng(0, "cupy"), n, sampler=sampler, **kw), sync, repeat)
            line = (f"  n={n:>7,d} {name + '-' + str(len(grid)):16s} cupy {g:7.3f} s ({n / g:>11,.0f} samples/s, "
                    f"pool {pool.total_bytes() / 2**20:7.1f} MiB)")
            if twin is not None:
                x = torch.randn(n, 2, device="cuda")
                if sampler == "dpm_solver_pp":
                    loop = lambda: torch_dpm_solver_pp(twin, model.schedule, x, grid, CLIP_RANGE)
                else:
                    loop = lambda: torch_ddim(twin, model.schedule, x, kw.get("num_inference_steps", T),
                                              1.0 if sampler == "ddpm" else 0.0)
                torch.cuda.reset_peak_memory_stats()
                tt = best_time(loop, tsync, repeat)
                line += (f"   torch {tt:7.3f} s (peak {torch.cuda.max_memory_allocated() / 2**20:7.1f} MiB)"
                         f"   ratio {g / tt:5.2f}x")
            print(line, flush=True)

    # -- diffusion sampling, U-Net on 28x28 --------------------------------------------------------------
    unet = Diffusion(UNet(1, base_channels=32, channel_mults=(1, 2)), DiscreteSchedule("squaredcos_cap_v2", T))
    uhost = perturbed(unet.init(Rng(1, "numpy")))
    udev = to_device(uhost, "cupy")
    nb = 8 if args.quick else 64
    steps = 5 if args.quick else 50
    pool.free_all_blocks()
    kw = {"num_inference_steps": steps, "data_shape": (28, 28, 1)}
    g = best_time(lambda: unet.sample(udev, Rng(0, "cupy"), nb, sampler="ddim", **kw), sync, 1)
    cpu_steps = 2 if args.quick else 5  # the CPU reference runs a few steps only, without a warm-up
    t0 = time.perf_counter()
    unet.sample(uhost, Rng(0, "numpy"), nb, sampler="ddim", num_inference_steps=cpu_steps, data_shape=(28, 28, 1))
    c = (time.perf_counter() - t0) / cpu_steps
    print(f"\nU-Net (32, 64 channels) DDIM-{steps}, {nb} images 28x28: cupy {g:6.2f} s ({g / steps * 1e3:6.1f} ms/step,"
          f" pool {pool.total_bytes() / 2**20:.0f} MiB)   numpy CPU {c * 1e3:7.1f} ms/step   speed-up "
          f"{c * steps / g:5.1f}x", flush=True)

    # -- flows -------------------------------------------------------------------------------------------
    n = 10_000 if args.quick else 1_000_000
    print(f"\nflows, 2-D, float32, {n:,} points (best of {repeat}): cupy against numpy on this machine's CPU")
    for label, flow in [("RealNVP, 24 couplings", real_nvp(2, layers=24, hidden=(64, 64))),
                        ("neural spline flow, 4 layers", neural_spline_flow(2, layers=4, hidden=(64, 64)))]:
        fh = perturbed(flow.init(Rng(2, "numpy")))
        fd = to_device(fh, "cupy")
        pool.free_all_blocks()
        gs = best_time(lambda: flow.sample(fd, Rng(0, "cupy"), n), sync, repeat)
        xs = flow.sample(fd, Rng(1, "cupy"), n)
        gl = best_time(lambda: flow.log_prob(fd, xs), sync, repeat)
        m = n // 10  # the CPU reference runs on a tenth of the points, once
        t0 = time.perf_counter()
        flow.sample(fh, Rng(0, "numpy"), m)
        hs = time.perf_counter() - t0
        xh = flow.sample(fh, Rng(1, "numpy"), m)
        t0 = time.perf_counter()
        flow.log_prob(fh, xh)
        hl = time.perf_counter() - t0
        print(f"  {label:30s} sample {n / gs:>12,.0f}/s (numpy {m / hs:>10,.0f}/s, {hs * n / m / gs:5.1f}x)   "
              f"log_prob {n / gl:>12,.0f}/s (numpy {m / hl:>10,.0f}/s, {hl * n / m / gl:5.1f}x)   "
              f"pool {pool.total_bytes() / 2**20:.0f} MiB", flush=True)

    # -- GANs --------------------------------------------------------------------------------------------
    print(f"\nGANs, float32 (best of {repeat}): sample and discriminator forward on cupy against numpy on this CPU")
    gans = [("MLP 3x128, 2-D, spectral norm", GAN(MLPGenerator(2, 2, (128,) * 3),
                                                  MLPDiscriminator(2, (128,) * 3, spectral_norm=True)),
             100_000 if args.quick else 1_000_000),
            ("conv 8x8 images", GAN(ConvGenerator(16, (8, 8, 1), (64, 64, 32)),
                                    ConvDiscriminator((8, 8, 1), (32, 64), spectral_norm=True)),
             2_000 if args.quick else 50_000)]
    for label, gan, n in gans:
        gh = perturbed(gan.init(Rng(3, "numpy")))
        gd = to_device(gh, "cupy")
        state_h = gan.init_state(gh)["disc"]
        state_d = to_device(state_h, "cupy")
        pool.free_all_blocks()
        gs = best_time(lambda: gan.sample(gd, Rng(0, "cupy"), n), sync, repeat)
        xs = gan.sample(gd, Rng(1, "cupy"), n)
        gf = best_time(lambda: gan.discriminator.apply(gd["disc"], state_d, xs), sync, repeat)
        m = max(n // 10, 2)
        t0 = time.perf_counter()
        xh = gan.sample(gh, Rng(1, "numpy"), m)
        hs = time.perf_counter() - t0
        t0 = time.perf_counter()
        gan.discriminator.apply(gh["disc"], state_h, xh)
        hf = time.perf_counter() - t0
        print(f"  {label:30s} sample {n / gs:>12,.0f}/s (numpy {m / hs:>10,.0f}/s, {hs * n / m / gs:5.1f}x)   "
              f"D forward {n / gf:>12,.0f}/s (numpy {m / hf:>10,.0f}/s, {hf * n / m / gf:5.1f}x)   "
              f"pool {pool.total_bytes() / 2**20:.0f} MiB", flush=True)

    # -- VAE ---------------------------------------------------------------------------------------------
    vae = VAE(MLP((64, 256, 256, 32)), MLP((16, 256, 256, 64 * 17)), likelihood="categorical", num_levels=17)
    vh = perturbed(vae.init(Rng(3, "numpy")))
    vd = to_device(vh, "cupy")
    test = load_digits(split="test", backend="numpy")[0]
    k = 500 if args.quick else 5000
    n = 10_000 if args.quick else 100_000
    pool.free_all_blocks()
    gs = best_time(lambda: vae.sample(vd, Rng(0, "cupy"), n), sync, repeat)
    zd = Rng(1, "cupy").normal((n, 16))
    gd = best_time(lambda: vae.decode(vd, zd), sync, repeat)
    td = to_device(test, "cupy")
    gl = best_time(lambda: vae.log_prob_estimate(vd, td, Rng(2, "cupy"), k), sync, 1)
    lp = float(to_numpy(vae.log_prob_estimate(vd, td, Rng(2, "cupy"), k)).mean())
    m = 20  # the CPU reference: 20 test digits, once
    t0 = time.perf_counter()
    lp_host = float(to_numpy(vae.log_prob_estimate(vh, test[:m], Rng(2, "numpy"), k)).mean())
    hl = (time.perf_counter() - t0) * test.shape[0] / m
    print(f"\nVAE (64-256-256-16, 17-level categorical decoder), float32: sample {n / gs:>10,.0f}/s, decode "
          f"{n / gd:>10,.0f}/s; IS log p(x) with K={k} on the {test.shape[0]} test digits: cupy {gl:6.2f} s "
          f"(numpy, extrapolated from {m} digits, {hl:7.1f} s; {hl / gl:5.1f}x), mean {lp:.2f} nats "
          f"(numpy on {m}: {lp_host:.2f}); pool {pool.total_bytes() / 2**20:.0f} MiB", flush=True)

    # -- PixelCNN sampling -------------------------------------------------------------------------------
    print(f"\nPixelCNN sampling, gated, F=32, 4 blocks, 17 levels, float32 (best of {repeat}): images/s of the naive "
          "loop and the cached one (the same images); torch-cuda runs the naive loop with the same weights")
    for size, n in ((8, 100),) if args.quick else ((8, 100), (8, 1000), (16, 100)):
        pcnn = PixelCNN(size, size, 1, 17, features=32, num_blocks=4)
        ph = perturbed(pcnn.init(Rng(4, "numpy")))
        pd = to_device(ph, "cupy")
        pool.free_all_blocks()
        gn = best_time(lambda: pcnn.sample(pd, Rng(0, "cupy"), n), sync, repeat)
        gc = best_time(lambda: pcnn.sample(pd, Rng(0, "cupy"), n, cached=True), sync, repeat)
        xs = pcnn.sample(pd, Rng(1, "cupy"), n, cached=True)
        gl = best_time(lambda: pcnn.log_prob(pd, xs), sync, repeat)
        line = (f"  {size}x{size} n={n:>5d}: naive {n / gn:9.1f}/s   cached {n / gc:9.1f}/s ({gn / gc:5.1f}x)   "
                f"log_prob {n / gl:>10,.0f}/s   pool {pool.total_bytes() / 2**20:.0f} MiB")
        if torch_ok:
            forward = torch_pixelcnn_twin(pcnn, ph, "cuda")
            with torch.no_grad():
                got = forward(torch.as_tensor(to_numpy(xs), device="cuda").permute(0, 3, 1, 2)).cpu().numpy()
            want = to_numpy(pcnn.network_outputs(pd, xs))[..., 0, :].transpose(0, 3, 1, 2)
            tn = best_time(lambda: torch_pixelcnn_sample(forward, pcnn, n, "cuda"), tsync, repeat)
            line += (f"   torch naive {n / tn:9.1f}/s (genblocks / torch time: naive {gn / tn:5.2f}x, cached "
                     f"{gc / tn:5.2f}x; max |logit difference| {np.max(np.abs(got - want)):.1e})")
        print(line, flush=True)


if __name__ == "__main__":
    main()
