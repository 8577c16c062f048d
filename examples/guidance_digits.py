"""Class-conditional digits with both kinds of guidance: classifier-free and classifier guidance.

    python examples/guidance_digits.py            # a few minutes on a laptop core
    python examples/guidance_digits.py --quick    # seconds (tiny sizes, for the tests)

One small U-Net learns eps(x_t, t, y) on scikit-learn's 8x8 digits, with labels replaced by a null token
10% of the time, so the same network is also unconditional. Classifier-free guidance mixes the two,
eps_u + (1 + w)(eps_c - eps_u). Classifier guidance instead pushes the unconditional model along the
gradient of a noise-aware classifier's log p(y | x_t). We report how often a classifier recognises the
intended digit in each set of samples (an independent logistic regression judges), and save both grids.
"""

import argparse
import os
import time

import numpy as np

from genblocks.backends import Rng, namespace, to_numpy
from genblocks.blocks import samplers
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet, UNet
from genblocks.data import load_digits
from genblocks.models.diffusion import Diffusion, NoisyClassifier
from genblocks.train.loop import fit
from genblocks.train.optim import adam
from genblocks.train.recipes import train_noisy_classifier


class FlatImages:
    """An MLP network seen as an image network: (n, 8, 8, 1) in and out."""

    def __init__(self, mlp):
        self.mlp, self.num_classes = mlp, mlp.num_classes

    def init(self, rng, dtype="float32"):
        return self.mlp.init(rng, dtype)

    def apply(self, params, x, t, y=None):
        xp = namespace(x)
        return xp.reshape(self.mlp.apply(params, xp.reshape(x, (x.shape[0], 64)), t, y), x.shape)


def flat_classifier(clf, params):
    """log p(y | x_t, t) for images (n, 8, 8, 1) from a classifier on flat vectors (n, 64)."""
    def log_prob(x, t, y):
        xp = namespace(x)
        return clf.log_prob(params, xp.reshape(x, (x.shape[0], 64)), t, y)

    return log_prob


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--steps", type=int, default=2000, help="diffusion training steps")
    parser.add_argument("--net", choices=("unet", "mlp"), default="unet", help="U-Net on 8x8, or MLP on 64-vectors")
    parser.add_argument("--cfg-weight", type=float, default=2.0, help="classifier-free guidance weight w")
    parser.add_argument("--classifier-scale", type=float, default=4.0, help="classifier guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples-out/guidance_digits.png")
    args = parser.parse_args()
    steps, clf_steps, base, T, per_class = args.steps, 2000, 16, 500, 10
    if args.quick:
        steps, clf_steps, base, T, per_class = 5, 20, 4, 20, 2

    x, y = load_digits(split="train", backend="numpy")
    x = to_numpy(x) / 8.0 - 1.0  # grey levels 0..16 -> [-1, 1]
    y = to_numpy(y)
    images = x.reshape(-1, 8, 8, 1).astype(np.float32)
    r_init, r_fit, r_clf, r_sample = Rng(args.seed).split(4)

    schedule = DiscreteSchedule("squaredcos_cap_v2", T)
    if args.net == "unet":
        net = UNet(1, base_channels=base, channel_mults=(1, 2), num_classes=10, time_embed_dim=4 * base)
    else:
        net = FlatImages(MLPScoreNet(64, (16 * base,) * 3, num_classes=10, time_embed_dim=4 * base))
    model = Diffusion(net, schedule, cond_drop_prob=0.1, data_shape=(8, 8, 1))
    start = time.perf_counter()
    result = fit(model.loss, model.init(r_init), (images, y), r_fit, adam(1e-3), steps, batch_size=64,
                 progress=not args.quick, ema_decay=0.999 if not args.quick else None)
    params = result.ema_params if result.ema_params is not None else result.params
    print(f"diffusion: {steps} steps in {time.perf_counter() - start:.1f} s")

    clf = NoisyClassifier(MLPScoreNet(64, (128, 128), time_embed_dim=32, out_dim=10))
    clf_params = train_noisy_classifier(clf, schedule, x.astype(np.float32), y, r_clf, steps=clf_steps, lr=2e-3)
    log_p_y = flat_classifier(clf, clf_params)

    labels = np.repeat(np.arange(10), per_class)
    n = labels.shape[0]
    r_cfg, r_cls, r_plain = r_sample.split(3)
    kw = dict(num_inference_steps=min(50, T))
    cfg = model.sample(params, r_cfg, n, sampler="ddim", y=labels, guidance_weight=args.cfg_weight, **kw)
    guided_fn = samplers.classifier_guidance(model.model_fn(params), log_p_y, schedule, args.classifier_scale)
    cls = samplers.ddim_sample(guided_fn, schedule, r_cls, (n, 8, 8, 1), cond={"y": labels}, **kw)
    plain = model.sample(params, r_plain, n, sampler="ddim", y=labels, **kw)

    # judge with an independent classifier (the guiding one would be fooled by its own adversarial pushes)
    from sklearn.linear_model import LogisticRegression

    judge = LogisticRegression(max_iter=2000).fit(x, y)
    for name, s in (("conditional (w=0)", plain), (f"classifier-free w={args.cfg_weight}", cfg),
                    (f"classifier guidance s={args.classifier_scale}", cls)):
        pred = judge.predict(np.clip(to_numpy(s).reshape(n, 64), -1, 1))
        print(f"{name:34s} samples a logistic regression reads as their label: {(pred == labels).mean():.0%}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install 'genblocks[plot]')")
        return

    def grid(s):
        s = np.clip(to_numpy(s).reshape(10, per_class, 8, 8), -1, 1)
        return s.transpose(1, 2, 0, 3).reshape(per_class * 8, 10 * 8)

    fig, axes = plt.subplots(1, 2, figsize=(10, 1 + per_class / 2))
    for ax, (title, s) in zip(axes, ((f"classifier-free, w={args.cfg_weight}", cfg),
                                     (f"classifier guidance, s={args.classifier_scale}", cls))):
        ax.imshow(grid(s), cmap="gray_r")
        ax.set(title=title, xticks=[], yticks=[])
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)  # never into the repository root
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
