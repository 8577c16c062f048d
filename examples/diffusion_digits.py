"""Diffusion trained for likelihood on 17-level 8x8 digits: the full bound, where its bits go, and samples.

    python examples/diffusion_digits.py            # tens of minutes on a laptop core
    python examples/diffusion_digits.py --quick    # seconds (tiny sizes, for the tests)

The recipe is Improved DDPM's (``genblocks.train.recipes.digits_diffusion``): an MLP noise predictor with
learned variances trained on L_simple + 0.01 T L_vlb (L_vlb training the mean as well as the variances),
timesteps drawn by importance sampling, the cosine schedule truncated at sigma 0.1 and an EMA of the
weights. The grey levels 0..16 become the grid {-1, -7/8, ..., 1}, and the decoder p(x_0 | x_1) is a
categorical over those 17 levels (the exact Gaussian posterior of each level plus logits that a small conv
net reads off the whole of x_1), so the bound -log p(x) <= L_T + sum_t L_t is in nats of the discrete
images. We evaluate every one of the T terms on the test images, plot L_t against t (where the bits go) and
save a grid of DDPM samples.
"""

import argparse
import os
import time

import numpy as np

from genblocks.backends import Rng, to_numpy
from genblocks.data import load_digits
from genblocks.train.recipes import diffusion_bound, digits_diffusion, fit_diffusion, levels_to_unit


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--steps", type=int, default=6000, help="training steps")
    parser.add_argument("--test-points", type=int, default=447, help="test images in the bound (447: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples-out/diffusion_digits.png",
                        help="the sample grid; the L_t plot goes beside it as *_lt.png")
    args = parser.parse_args()
    steps, hidden, T, points, n_samples = args.steps, (512, 512, 512), 1000, args.test_points, 64
    if args.quick:
        steps, hidden, T, points, n_samples = 5, (16,), 20, 16, 16

    digits = load_digits(backend="numpy")
    train = levels_to_unit(to_numpy(digits["train"][0])).astype(np.float32)
    test = levels_to_unit(to_numpy(digits["test"][0][:points])).astype(np.float32)
    model = digits_diffusion(hidden=hidden, num_timesteps=T)
    T = model.schedule.num_train_timesteps  # the cosine steps above sigma_min
    r_fit, r_bound, r_sample = Rng(args.seed).split(3)

    start = time.perf_counter()
    result = fit_diffusion(model, train, r_fit, steps)
    params = result.ema_params
    print(f"trained {steps} steps in {time.perf_counter() - start:.0f} s")

    start = time.perf_counter()
    bound = diffusion_bound(model, params, test, r_bound)
    L_t = np.asarray(bound["L_t"])
    print(f"test bound over {len(test)} images, all {T} terms: {bound['nats']:.2f} nats per image "
          f"(+- {bound['se_mc']:.2f} from the noise draws, +- {bound['se_images']:.2f} over images) = "
          f"{bound['bits_per_dim']:.3f} bits/dim  [{time.perf_counter() - start:.0f} s]")
    print(f"  L_0 (decoder) {L_t[0]:.2f}, sum of L_1..L_{T - 1} {L_t[1:].sum():.2f}, L_T (prior) {bound['L_T']:.4f}")
    tenth = max(T // 10, 1)
    shares = [L_t[i:i + tenth].sum() for i in range(0, T, tenth)]
    print("  by tenths of t: " + " ".join(f"{s:.1f}" for s in shares))

    samples = to_numpy(model.sample(params, r_sample, n_samples, sampler="ddpm"))
    levels = np.clip(np.round((samples + 1.0) * 8.0), 0, 16)  # back to the 17 grey levels

    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    side = int(np.sqrt(n_samples))
    grid = levels[: side * side].reshape(side, side, 8, 8).transpose(0, 2, 1, 3).reshape(side * 8, side * 8)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=16)
    ax.set_title(f"DDPM samples ({T} steps, learned variances)", fontsize=9)
    ax.axis("off")
    fig.savefig(args.out, dpi=120, bbox_inches="tight")
    plt.close(fig)

    lt_out = os.path.splitext(args.out)[0] + "_lt.png"
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.loglog(np.arange(1, T), np.maximum(L_t[1:], 1e-6), lw=1, label="L_t = KL(q(x_{t-1}|x_t,x_0) || p)")
    ax.set_xlabel(f"t (log scale; L_0, the decoder, is {L_t[0]:.2f})")
    ax.set_ylabel("nats per image")
    ax.set_title(f"where the bits go: {bound['nats']:.1f} nats per test digit in all", fontsize=9)
    ax.legend(fontsize=8)
    fig.savefig(lt_out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {args.out} and {lt_out}")


if __name__ == "__main__":
    main()
