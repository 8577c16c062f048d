"""A VAE on the 8x8 digits: bounds, reconstructions, samples and a latent traversal, saved as one PNG.

    python examples/vae_digits.py            # a couple of minutes on a laptop core
    python examples/vae_digits.py --quick    # seconds (tiny sizes, for the tests)

The encoder maps a digit (64 grey levels in 0..16) to q(z | x) = N(mu(x), diag sigma(x)^2); the decoder maps
z to 64 categorical distributions over the 17 levels. Training maximises the ELBO. We print the test
-ELBO, its split into reconstruction and KL, which latent dimensions the model uses (their KL per dimension:
"active units"), the IWAE bound and the importance-sampled NLL, then draw: test digits over their
reconstructions, samples from the prior, and a traversal of the two most used latent dimensions.
"""

import argparse
import os
import time

import numpy as np

from genblocks.backends import Rng, to_numpy
from genblocks.blocks.nn import MLP
from genblocks.data import load_digits
from genblocks.models.vae import VAE
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
    parser.add_argument("--out", default="examples-out/vae_digits.png")
    args = parser.parse_args()
    steps, hidden, is_k, n_test = args.steps, args.hidden, 1000, 447
    if args.quick:
        steps, hidden, is_k, n_test = 30, 16, 20, 40

    digits = load_digits(backend="numpy")
    train, test = to_numpy(digits["train"][0]), to_numpy(digits["test"][0])[:n_test]
    L = args.latent
    vae = VAE(MLP((64, hidden, hidden, 2 * L)), MLP((L, hidden, hidden, 64 * LEVELS)), likelihood="categorical",
              num_levels=LEVELS)
    r_init, r_fit, r_eval, r_is, r_sample = Rng(args.seed).split(5)
    start = time.perf_counter()
    result = fit(vae.loss, vae.init(r_init), train, r_fit, adam(cosine_decay(1e-3, steps, 1e-4)), steps,
                 batch_size=100, progress=not args.quick)
    params = result.params
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")

    terms = vae.loss_terms(params, test, r_eval, num_samples=10)
    iwae = vae.loss_terms(params, test, r_eval, objective="iwae", num_samples=50)["iwae"]
    nll = -to_numpy(vae.log_prob_estimate(params, test, r_is, is_k)).mean()
    print(f"test -ELBO {-float(terms['elbo']):.2f} nats = reconstruction {float(terms['reconstruction']):.2f} "
          f"+ KL {float(terms['kl']):.2f}")
    kl_dims = to_numpy(terms["kl_per_dim"])
    print("KL per latent dimension (nats): " + " ".join(f"{v:.2f}" for v in kl_dims)
          + f"; active units {int(to_numpy(terms['active_units']))} of {L}")
    print(f"test -IWAE (K=50) {-float(iwae):.2f} nats, importance-sampled NLL (K={is_k}) {nll:.2f} nats")

    recon = to_numpy(vae.decode(params, vae.encode(params, test[:10])))
    samples = to_numpy(vae.sample(params, r_sample, 20, mean=True))
    top = np.argsort(-kl_dims)[:2]
    values = np.linspace(-2.5, 2.5, 10)
    traversal = [to_numpy(vae.traverse(params, test[0], int(d), values)) for d in top]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'genblocks[plot]')")
        return

    def row(images):
        return np.concatenate([np.asarray(im).reshape(8, 8) for im in images], axis=1)

    panels = [("test digits (top) and their reconstructions", np.concatenate([row(test[:10]), row(recon)])),
              ("samples (decoder means)", np.concatenate([row(samples[:10]), row(samples[10:])])),
              (f"traversal of latent dimensions {top[0]} and {top[1]}, z_d from -2.5 to 2.5",
               np.concatenate([row(t) for t in traversal]))]
    fig, axes = plt.subplots(3, 1, figsize=(6, 5))
    for ax, (title, image) in zip(axes, panels):
        ax.imshow(image, cmap="gray_r", vmin=0, vmax=LEVELS - 1)
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # never into the repository root
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
