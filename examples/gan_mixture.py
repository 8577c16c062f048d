"""Train a GAN on the 8-Gaussian ring: samples over the target density as training goes, saved as PNG frames.

    python examples/gan_mixture.py                      # a few minutes on a laptop core
    python examples/gan_mixture.py --loss wgan_gp       # WGAN-GP, 5 critic steps per generator step
    python examples/gan_mixture.py --quick --out DIR    # seconds (tiny sizes, for the tests)

The generator and the discriminator train in turns through ``fit(..., groups=gan.players(opt_d, opt_g))``:
each step makes ``n_critic`` discriminator updates and one generator update, each player with its own
Adam. Every ``--frame-every`` steps the generator's EMA draws samples, which are scored (modes covered, the
fraction within 3 std of a centre, MMD^2 to held-out points) and drawn over the target's density.
"""

import argparse
import math
import os

from genblocks.backends import Rng, to_numpy
from genblocks.blocks.discriminators import MLPDiscriminator, MLPGenerator
from genblocks.data import eight_gaussians, eight_gaussians_log_prob
from genblocks.metrics import mixture_modes, mmd
from genblocks.models.gan import GAN
from genblocks.train.loop import fit
from genblocks.train.optim import adam, cosine_decay

LOSSES = {"non_saturating": dict(loss="non_saturating"),
          "wgan_gp": dict(loss="wasserstein", penalty="gp", n_critic=5)}


def density_grid(lim, n=200):
    """log p of the target on an n x n grid over [-lim, lim]^2, as an image (rows = y)."""
    xs = [-lim + 2 * lim * i / (n - 1) for i in range(n)]
    pts = Rng(0).xp.asarray([[x, y] for y in xs for x in xs])
    return to_numpy(eight_gaussians_log_prob(pts)).reshape(n, n)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--loss", default="non_saturating", choices=list(LOSSES))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--frame-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples-out/gan_frames", help="folder for the PNG frames")
    args = parser.parse_args()
    steps, every, width, n_train = args.steps, args.frame_every, 128, 20000
    if args.quick:
        steps, every, width, n_train = 20, 10, 16, 1024

    r_data, r_test, r_init, r_fit, r_sample = Rng(args.seed).split(5)
    train = to_numpy(eight_gaussians(r_data, n_train))
    test = to_numpy(eight_gaussians(r_test, 1000))
    gan = GAN(MLPGenerator(2, 2, (width,) * 3), MLPDiscriminator(2, (width,) * 3), **LOSSES[args.loss])
    params = gan.init(r_init)
    lr = cosine_decay(5e-4, steps, 2.5e-5)
    frames = []

    def snapshot(p):
        # eval_fn sees the raw params; the EMA is not passed to it, so frames show the raw generator
        samples = to_numpy(gan.sample(p, r_sample, 1000))
        modes = mixture_modes(samples, "eight_gaussians", min_count=10)
        frames.append(samples)
        return {"modes": modes["n_modes_covered"], "high_quality": modes["high_quality"],
                "mmd": float(to_numpy(mmd(samples, test)))}

    result = fit(None, params, train, r_fit, None, steps, groups=gan.players(adam(lr, b1=0.5), adam(lr, b1=0.5)),
                 state=gan.init_state(params), batch_size=256, ema_decay=0.99, eval_fn=snapshot, eval_every=every,
                 progress=not args.quick)
    print(f"{gan.loss} GAN, n_critic={gan.n_critic}, {steps} steps")
    for step, s in result.history["eval"]:
        print(f"  step {step:5d}: {s['modes']}/8 modes, {100 * s['high_quality']:.1f}% within 3 std, "
              f"MMD^2 {s['mmd']:.5f}")
    final = snapshot(result.ema_params)
    print(f"  generator EMA: {final['modes']}/8 modes, {100 * final['high_quality']:.1f}% within 3 std, "
          f"MMD^2 {final['mmd']:.5f}")
    d_losses = result.history["loss"]["disc"]
    print(f"  discriminator loss: first {d_losses[0]:.3f}, last {d_losses[-1]:.3f} "
          f"(2 log 2 = {2 * math.log(2):.3f} when D cannot tell)")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: pip install "genblocks[plot]" for the frames')
        return
    os.makedirs(args.out, exist_ok=True)
    lim = 4.0
    logp = density_grid(lim, 60 if args.quick else 200)
    labels = [f"step {s}" for s, _ in result.history["eval"]] + ["EMA"]
    for i, (pts, label) in enumerate(zip(frames, labels)):
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(logp, extent=(-lim, lim, -lim, lim), origin="lower", cmap="Greys", vmin=-12)
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color="tab:red")
        ax.set_title(f"{gan.loss}: {label}")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, f"frame_{i:03d}.png"), dpi=80)
        plt.close(fig)
    print(f"wrote {len(frames)} frames to {args.out}")


if __name__ == "__main__":
    main()
