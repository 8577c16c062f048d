"""ms per discriminator and generator step of a conv GAN: the fused xp.conv2d against im2col + dense.

``ConvDiscriminator`` and ``ConvGenerator`` convolve with ``xp.conv2d`` (one primitive with its own VJP on numpy,
``genblocks/backends/fused.py``); before, they called ``xp.im2col`` then ``xp.dense``. This script times one
update of each player (``bench_gan.step_ms``: value_and_grad of the player's loss, then Adam) both ways in the
same process: "composed" swaps the numpy namespace's ``conv2d`` for that im2col + dense formula, which is
what the blocks ran before. The two alternate, round after round, so both see the same machine load; each
figure is the median over rounds of each round's median step. Losses: non-saturating (first order) and
WGAN-GP, whose penalty differentiates dD/dx again: that second-order pass goes through the composed
primitives on both sides, so only the rest of its step can differ.

    python benchmarks/bench_gan_conv.py --quick     # tiny sizes: checks the script runs (seconds)
    python benchmarks/bench_gan_conv.py             # 8x8x1 images, batch 128, 5 rounds
    python benchmarks/bench_gan_conv.py --image-size 16 --batch-size 64
"""

import argparse
import os
import pathlib
import platform
import statistics
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench_flows import set_blas_threads  # noqa: E402 (benchmarks/bench_flows.py, beside this script)
from bench_gan import step_ms  # noqa: E402
from profile_parts import cpu_model  # noqa: E402

from genblocks.backends import Rng, namespace_of  # noqa: E402
from genblocks.backends.fused import make_conv2d  # noqa: E402
from genblocks.blocks.discriminators import ConvDiscriminator, ConvGenerator  # noqa: E402
from genblocks.models.gan import GAN  # noqa: E402

LOSSES = {"non_saturating": dict(loss="non_saturating"), "wgan_gp": dict(loss="wasserstein", penalty="gp")}


def timed(gan, params, state, batch, repeats, conv):
    """{"disc": ms, "gen": ms} with the numpy namespace's conv2d set to ``conv`` for the duration."""
    xp = namespace_of("numpy")
    fused = xp.conv2d
    xp.conv2d = conv if conv is not None else fused
    try:
        return step_ms(gan, params, state, batch, repeats=repeats)
    finally:
        xp.conv2d = fused


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs")
    p.add_argument("--image-size", type=int, default=8, help="H = W of the 1-channel images (a multiple of 4)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="alternations of the two versions")
    p.add_argument("--repeats", type=int, default=10, help="timed steps per version and round")
    p.add_argument("--losses", nargs="*", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.rounds, args.repeats = 8, 2, 2
    threads = set_blas_threads(args.threads)
    s = args.image_size
    shape = (s, s, 1)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cpus, {platform.python_version()}, BLAS threads "
          f"{threads}, load average {os.getloadavg()[0]:.1f}; ConvGenerator(16, {shape}, (64, 64, 32)), "
          f"ConvDiscriminator({shape}, (32, 64), spectral_norm=True), float32, batch {args.batch_size}, "
          f"median over {args.rounds} alternating rounds of the median of {args.repeats} steps")
    print("| loss | conv | ms/D step | ms/G step |\n|---|---|---|---|")
    xp = namespace_of("numpy")
    # conv2d's plain (non-fused) form: dense(im2col(x), reshape(W, (kh kw c_in, c_out)), b), the blocks before
    versions = {"xp.conv2d": None, "im2col + dense": make_conv2d(xp, fused=False)}
    for loss in args.losses:
        gan = GAN(ConvGenerator(16, shape, (64, 64, 32)), ConvDiscriminator(shape, (32, 64), spectral_norm=True),
                  **LOSSES[loss])
        params = gan.init(Rng(1))
        state = gan.init_state(params)
        batch = Rng(2).uniform((args.batch_size,) + shape, dtype="float32")
        found = {name: {"disc": [], "gen": []} for name in versions}
        for r in range(args.rounds):
            order = list(versions) if r % 2 == 0 else list(versions)[::-1]
            for name in order:
                ms = timed(gan, params, state, batch, args.repeats, versions[name])
                for k in ms:
                    found[name][k].append(ms[k])
        for name in versions:
            d, g = statistics.median(found[name]["disc"]), statistics.median(found[name]["gen"])
            print(f"| {loss} | {name} | {d:.2f} | {g:.2f} |", flush=True)


if __name__ == "__main__":
    main()
