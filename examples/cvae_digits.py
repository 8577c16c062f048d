"""A conditional VAE on the 8x8 digits: p(x | y) = ∫ p(x | z, y) p(z | y) dz, samples drawn per class.

    python examples/cvae_digits.py            # a couple of minutes on a laptop core
    python examples/cvae_digits.py --quick    # seconds (tiny sizes, for the tests)

The label y (one-hot, the VAE's ``context``) reaches the encoder q(z | x, y), the decoder p(x | z, y) and a
learned conditional prior p(z | y). Given y the latent needs to carry only the style of the digit, so asking
for a class gives that class: an independent logistic regression trained on the real digits judges how often
the samples read as the label they were drawn for, and the importance-sampled log p(x | y) with the right
label is compared with the one under a wrong label. The grid of samples (one column per class) goes to a PNG.
"""

import argparse
import os
import time

import numpy as np

from genblocks.backends import Rng, to_numpy
from genblocks.blocks.nn import MLP
from genblocks.data import load_digits
from genblocks.models.vae import VAE, ConditionalGaussianPrior
from genblocks.train.loop import fit
from genblocks.train.optim import adam, cosine_decay

LEVELS = 17


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--latent", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples-out/cvae_digits.png")
    args = parser.parse_args()
    steps, hidden, per_class, is_k, n_test = args.steps, args.hidden, 10, 500, 447
    if args.quick:
        steps, hidden, per_class, is_k, n_test = 30, 16, 2, 10, 40

    digits = load_digits(backend="numpy")
    x, y = (to_numpy(a) for a in digits["train"])
    xt, yt = (to_numpy(a)[:n_test] for a in digits["test"])
    onehot = np.eye(10, dtype=np.float32)
    L = args.latent
    vae = VAE(MLP((64 + 10, hidden, hidden, 2 * L)), MLP((L + 10, hidden, hidden, 64 * LEVELS)),
              likelihood="categorical", num_levels=LEVELS, context_dim=10,
              prior=ConditionalGaussianPrior(L, 10, (32,)))
    r_init, r_fit, r_is, r_sample = Rng(args.seed).split(4)
    start = time.perf_counter()
    result = fit(vae.loss, vae.init(r_init), (x, onehot[y]), r_fit, adam(cosine_decay(1e-3, steps, 1e-4)), steps,
                 batch_size=100, progress=not args.quick)
    params = result.params
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")

    right = to_numpy(vae.log_prob_estimate(params, xt, r_is, is_k, context=onehot[yt])).mean()
    wrong = to_numpy(vae.log_prob_estimate(params, xt, r_is, is_k, context=onehot[(yt + 1) % 10])).mean()
    print(f"test NLL given the right label {-right:.2f} nats, given the next label {-wrong:.2f} nats "
          f"(importance-sampled, K={is_k})")

    labels = np.repeat(np.arange(10), per_class)
    samples = to_numpy(vae.sample(params, r_sample, labels.shape[0], onehot[labels], mean=True))
    from sklearn.linear_model import LogisticRegression

    judge = LogisticRegression(max_iter=2000).fit(x / 16.0, y)
    read = (judge.predict(samples / 16.0) == labels).mean()
    print(f"samples a logistic regression reads as the label they were drawn for: {read:.0%}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'genblocks[plot]')")
        return
    grid = samples.reshape(10, per_class, 8, 8).transpose(1, 2, 0, 3).reshape(per_class * 8, 10 * 8)
    fig, ax = plt.subplots(figsize=(6, 1 + per_class * 0.6))
    ax.imshow(grid, cmap="gray_r", vmin=0, vmax=LEVELS - 1)
    ax.set(title="conditional VAE samples (decoder means), one column per class 0..9", xticks=[], yticks=[])
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # never into the repository root
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
