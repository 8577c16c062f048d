"""An order-agnostic MADE on the 8x8 digits: exact likelihood, samples, and completions of half-images.

    python examples/made_digits.py            # a few minutes on a laptop core
    python examples/made_digits.py --quick    # seconds (tiny sizes, for the tests)

The model is p(x) = (1/M) sum_k prod_i p_k(x_i | pixels before i in order k): M masks of one MLP, each
with its own order of the 64 pixels, each conditional a categorical over the 17 grey levels. Training
draws one mask per batch; the test NLL (nats per image) averages the masks' probabilities, so it is an
exact, normalised likelihood. Every order here visits the top half of the image first (a random order of
the top 32 pixels, then of the bottom 32), so completing the bottom half of a test digit given its top
half is an exact draw from p(bottom | top) under the mixture. The picture shows samples, completions and
the per-pixel share of the test NLL (``loss_terms``).
"""

import argparse
import os
import time

import numpy as np

from genblocks.backends import Rng, to_numpy
from genblocks.data import load_digits
from genblocks.models.autoregressive import MADEModel
from genblocks.train.loop import fit
from genblocks.train.optim import adam, cosine_decay

LEVELS = 17


def top_half_first_orders(num_masks, seed):
    """num_masks orders of the 64 pixels (ranks), each a random order of rows 0-3 then one of rows 4-7."""
    rng = np.random.default_rng(seed)
    orders = []
    for _ in range(num_masks):
        visit = np.concatenate([rng.permutation(32), 32 + rng.permutation(32)])
        rank = np.empty(64, dtype=int)
        rank[visit] = np.arange(64)
        orders.append(rank.tolist())
    return orders


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--steps", type=int, default=3000, help="training steps")
    parser.add_argument("--hidden", type=int, default=512, help="width of the two hidden layers")
    parser.add_argument("--masks", type=int, default=8, help="masks, each with its own order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples-out/made_digits.png")
    args = parser.parse_args()
    steps, hidden, masks, n_show = args.steps, args.hidden, args.masks, 10
    if args.quick:
        steps, hidden, masks, n_show = 5, 16, 2, 3

    parts = load_digits(backend="numpy")
    train, test = (to_numpy(parts[k][0]) for k in ("train", "test"))
    r_init, r_fit, r_sample, r_fill = Rng(args.seed).split(4)
    model = MADEModel(64, (hidden, hidden), output="categorical", num_classes=LEVELS, num_masks=masks,
                      order=top_half_first_orders(masks, args.seed))
    start = time.perf_counter()
    result = fit(model.loss, model.init(r_init), train, r_fit, adam(cosine_decay(2e-3, steps)), steps,
                 batch_size=64, progress=not args.quick)
    params = result.params
    print(f"trained {steps} steps in {time.perf_counter() - start:.1f} s")

    terms = model.loss_terms(params, test)
    per_pixel = to_numpy(terms["nll_per_dim"]).reshape(8, 8)
    print(f"test NLL {float(terms['nll']):.2f} nats per image (independent pixels: 106.4), of which "
          f"{float(terms['mask_kl']):.2f} is the masks' disagreement (KL of the mask posterior to uniform)")

    start = time.perf_counter()
    samples = to_numpy(model.sample(params, r_sample, n_show * n_show))
    print(f"{n_show * n_show} samples in {time.perf_counter() - start:.2f} s")

    given = np.zeros(64, dtype=bool)
    given[:32] = True  # the top half is given, the bottom half is sampled
    originals = test[:n_show]
    filled = [to_numpy(model.sample(params, r, n_show, x_init=originals, mask=given)) for r in r_fill.split(3)]

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'genblocks[plot]')")
        return

    def grid(images, rows):
        images = images.reshape(rows, -1, 8, 8)
        return images.transpose(0, 2, 1, 3).reshape(rows * 8, -1)

    halves = np.concatenate([originals * given + (~given) * (LEVELS - 1) * 0.25] + filled + [originals])
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    panels = ((grid(samples, n_show), "samples"),
              (grid(halves, 5), "given top half, three completions, original"),
              (per_pixel, "test NLL per pixel (nats)"))
    for ax, (image, title) in zip(axes, panels):
        shown = ax.imshow(image, cmap="gray_r" if title != panels[2][1] else "viridis")
        ax.set(title=title, xticks=[], yticks=[])
        if title == panels[2][1]:
            fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # never into the repository root
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
