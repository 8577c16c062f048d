"""DDPM vs DDIM on a known truth: trajectories and sample quality against the number of steps.

    python examples/ddim_vs_ddpm.py            # a few seconds
    python examples/ddim_vs_ddpm.py --quick    # tiny sizes, for the tests

The data are eight Gaussians on a circle, whose exact denoiser at every noise level is known in closed form
(``genblocks.checks.analytic_gaussian_mixture_model``), so any difference between the samplers comes from
the samplers alone, not from a network. DDPM (ancestral, stochastic) needs many steps; DDIM (eta = 0, the
deterministic probability-flow discretisation) stays accurate with few. The picture shows particle
trajectories x_t from the same starting noise.
"""

import argparse
import math
import os

import numpy as np

from genblocks.backends import Rng, to_numpy
from genblocks.blocks import samplers
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.checks import analytic_gaussian_mixture_model
from genblocks.metrics import mmd


def eight_gaussians_oracle(schedule, radius=2.0, std=0.15):
    angles = np.arange(8) * 2 * math.pi / 8
    means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    covs = np.tile(np.eye(2) * std ** 2, (8, 1, 1))
    return analytic_gaussian_mixture_model(np.full(8, 1 / 8), means, covs, schedule)


def trajectory(sampler, oracle, schedule, x_T, **kw):
    """The sampler's path: a list of (t, x) with x a host (n, 2) array."""
    path = [(schedule.num_train_timesteps, x_T)]
    sampler(oracle, schedule, Rng(1), None, x_T=x_T, dtype="float64",
            callback=lambda step, t, x: path.append((t, to_numpy(x))), **kw)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--out", default="examples-out/ddim_vs_ddpm.png", help="PNG file for the trajectories")
    args = parser.parse_args()
    n, steps_list = (200, (5, 20)) if args.quick else (2000, (5, 10, 20, 50, 100, 1000))

    schedule = DiscreteSchedule("linear", 1000)
    oracle = eight_gaussians_oracle(schedule)
    data = to_numpy(oracle.sample(Rng(0), n))
    print(f"{'steps':>6s} {'DDPM MMD^2':>12s} {'DDIM MMD^2':>12s}")
    for steps in steps_list:
        kw = dict(num_inference_steps=steps, dtype="float64")
        ddpm = to_numpy(samplers.ddpm_sample(oracle, schedule, Rng(2), (n, 2), **kw))
        ddim = to_numpy(samplers.ddim_sample(oracle, schedule, Rng(2), (n, 2), **kw))
        print(f"{steps:6d} {float(mmd(ddpm, data)):12.5f} {float(mmd(ddim, data)):12.5f}")

    x_T = to_numpy(Rng(3).normal((12 if args.quick else 40, 2), dtype="float64"))
    steps = 20 if args.quick else 100
    paths = {
        f"DDPM, {steps} steps": trajectory(samplers.ddpm_sample, oracle, schedule, x_T, num_inference_steps=steps),
        f"DDIM (eta=0), {steps} steps": trajectory(samplers.ddim_sample, oracle, schedule, x_T,
                                                   num_inference_steps=steps),
    }
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'genblocks[plot]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 5))
    for ax, (name, path) in zip(axes, paths.items()):
        xs = np.stack([x for _, x in path])  # (steps + 1, particles, 2)
        ax.scatter(data[:, 0], data[:, 1], s=1, c="lightgrey")
        for i in range(xs.shape[1]):
            ax.plot(xs[:, i, 0], xs[:, i, 1], lw=0.7)
        ax.scatter(xs[-1, :, 0], xs[-1, :, 1], s=8, c="k", zorder=3)
        ax.set(title=name, xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal")
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # never into the repository root
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
