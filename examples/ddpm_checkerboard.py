"""Train a DDPM on the 2-D checkerboard and sample it three ways (DDPM-1000, DDIM-50, DPM-Solver++-20).

    python examples/ddpm_checkerboard.py            # about a minute on a laptop core
    python examples/ddpm_checkerboard.py --quick    # seconds (tiny sizes, for the tests)

The network is an MLP with a sinusoidal time embedding and FiLM (``MLPScoreNet``); the schedule is Improved
DDPM's cosine. We report the MMD between each sampler's output and held-out data, the PF-ODE test NLL and
the variational bound, and save a picture of the samples.
"""

import argparse
import math
import os
import time

import numpy as np

from genblocks.backends import Rng, to_numpy
from genblocks.blocks.samplers import clip_sample
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet
from genblocks.data import checkerboard
from genblocks.metrics import mmd
from genblocks.models.diffusion import Diffusion
from genblocks.train.loop import fit
from genblocks.train.optim import adam

SCALE = 2.0  # the board spans [-4, 4]^2; the network sees it divided by 2


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--steps", type=int, default=4000, help="training steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples-out/ddpm_checkerboard.png", help="PNG file for the samples")
    args = parser.parse_args()
    steps, n_train, n_eval, T, width = (args.steps, 20000, 1000, 1000, 128)
    if args.quick:
        steps, n_train, n_eval, T, width = 30, 512, 64, 50, 16

    r_data, r_test, r_init, r_fit, r_sample = Rng(args.seed).split(5)
    train = to_numpy(checkerboard(r_data, n_train)) / SCALE
    test = to_numpy(checkerboard(r_test, n_eval)) / SCALE

    model = Diffusion(MLPScoreNet(2, (width, width, width)), DiscreteSchedule("squaredcos_cap_v2", T))
    start = time.perf_counter()
    result = fit(model.loss, model.init(r_init), train, r_fit, adam(2e-3), steps, batch_size=256,
                 progress=not args.quick, ema_decay=0.995)
    params = result.ema_params
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s, final loss "
          f"{np.mean(result.history['loss'][-50:]):.4f}")

    runs = {
        f"DDPM-{T}": dict(sampler="ddpm", num_inference_steps=None),
        "DDIM-50": dict(sampler="ddim", num_inference_steps=min(50, T)),
        # the board lies in [-2, 2]^2 once scaled: clipping x0_hat there tames the near-zero-SNR first steps
        "DPM-Solver++-20": dict(sampler="dpm_solver_pp", num_inference_steps=20,
                                x0_transform=clip_sample(2.0)),
    }
    samples = {}
    for name, kw in runs.items():
        start = time.perf_counter()
        x = to_numpy(model.sample(params, r_sample, n_eval, **kw))
        samples[name] = x * SCALE
        print(f"{name:16s} {time.perf_counter() - start:6.2f} s   MMD^2 to test data "
              f"{float(mmd(x, test)):.5f}")

    nll = -to_numpy(model.log_prob(params, test[:100], rtol=1e-4, atol=1e-4)).mean() + 2 * math.log(SCALE)
    bound = float(model.loss_terms(params, test[:200], r_sample)["vlb"]) + 2 * math.log(SCALE)
    print(f"test NLL (PF-ODE) {nll:.3f} nats   variational bound {bound:.3f} nats   "
          f"(true entropy log 32 = {math.log(32):.3f})")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'genblocks[plot]')")
        return
    fig, axes = plt.subplots(1, 1 + len(samples), figsize=(4 * (1 + len(samples)), 4))
    for ax, (name, x) in zip(axes, [("test data", test * SCALE)] + list(samples.items())):
        ax.scatter(x[:, 0], x[:, 1], s=2)
        ax.set(title=name, xlim=(-4.5, 4.5), ylim=(-4.5, 4.5), aspect="equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # never into the repository root
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
