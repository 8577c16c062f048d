"""The model families by name, each rebuilt from a JSON config: what ``genblocks train / sample / eval`` use.

A checkpoint written by ``genblocks train`` carries ``{"family", "model": {...}, "scaling": ...}`` as its
config, so ``sample`` and ``eval`` rebuild the model from the file alone, with no code. Each entry is a
``Family``: ``build(config) -> model`` for a config holding ``dim`` and the family's options (its
``defaults`` fill the rest), ``prepare(model, params, x)`` for any data-dependent initialisation (a flow's
ActNorm), ``log_prob(model, params, x)`` with how it is computed (``likelihood``), and the keyword options
its ``sample`` accepts. A family trained by several players (the GAN) gives ``players(model, lr, config) -> groups``
for ``fit(..., groups=...)`` instead of one loss, ``log_prob=None`` (no likelihood) and an ``ema_decay``:
its checkpoint keeps a parameter average, which ``sample`` and ``eval`` use. New families join ``FAMILIES``.
"""

from typing import Callable, NamedTuple

from genblocks.backends import Rng
from genblocks.blocks.discriminators import MLPDiscriminator, MLPGenerator
from genblocks.blocks.nn import MLP
from genblocks.blocks.schedules import DiscreteSchedule
from genblocks.blocks.score_nets import MLPScoreNet
from genblocks.blocks.validate import check_choice, check_positive_int
from genblocks.models.autoregressive import MADEModel
from genblocks.models.diffusion import Diffusion
from genblocks.models.flow import neural_spline_flow
from genblocks.models.gan import GAN
from genblocks.models.mixture import GaussianMixture
from genblocks.models.vae import VAE

__all__ = ["Family", "FAMILIES", "build_model", "model_config"]


class Family(NamedTuple):
    """How the CLI builds, initialises, scores and samples one family."""
    build: Callable  # config -> model
    defaults: dict  # the model options' defaults, plus "lr", the Adam learning rate
    likelihood: str  # how log_prob is computed, for tables
    prepare: Callable = lambda model, params, x: params  # data-dependent initialisation
    sample_options: tuple = ()  # keyword options of model.sample the CLI may pass
    log_prob: Callable = lambda model, params, x: model.log_prob(params, x)  # (n,) nats; None: no likelihood
    players: Callable = None  # (model, lr, config) -> fit's groups, for a family trained by several players
    ema_decay: float = None  # keep a parameter EMA while training; sample and eval use it


def _gan_players(model, lr, d_lr_scale, b1=0.5):
    """The GAN's two players with Adam (b1 = 0.5): the discriminator's learning rate is ``d_lr_scale * lr``."""
    from genblocks.train.optim import adam

    return model.players(adam(lr * d_lr_scale, b1=b1), adam(lr, b1=b1))


def _gan(c):
    hidden = tuple(c["hidden"])
    return GAN(MLPGenerator(c["latent_dim"], c["dim"], hidden),
               MLPDiscriminator(c["dim"] * c["pack"], hidden, minibatch_std=c["minibatch_std"],
                                input_range=c["input_range"]),
               loss=c["loss"], penalty=c["penalty"], n_critic=c["n_critic"], pack=c["pack"])


FAMILIES = {
    "mixture": Family(
        build=lambda c: GaussianMixture(c["dim"], c["num_components"]),
        defaults={"num_components": 8, "lr": 0.05}, likelihood="exact"),
    "flow": Family(
        build=lambda c: neural_spline_flow(c["dim"], layers=c["layers"], hidden=tuple(c["hidden"]),
                                           kind="coupling" if c["dim"] > 1 else "autoregressive"),
        defaults={"layers": 4, "hidden": [64, 64], "lr": 1e-3}, likelihood="exact",
        prepare=lambda model, params, x: model.init_from_data(params, x[:2048])),
    "made": Family(
        build=lambda c: MADEModel(c["dim"], tuple(c["hidden"]), output="mixture_gaussian",
                                  num_components=c["num_components"]),
        defaults={"hidden": [128, 128], "num_components": 5, "lr": 1e-3}, likelihood="exact"),
    "diffusion": Family(
        build=lambda c: Diffusion(MLPScoreNet(c["dim"], tuple(c["hidden"])),
                                  DiscreteSchedule(c["beta_schedule"], c["num_train_timesteps"])),
        defaults={"hidden": [128, 128], "beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000,
                  "lr": 2e-3},
        likelihood="PF-ODE", sample_options=("sampler", "num_inference_steps")),
    "vae": Family(
        build=lambda c: VAE(MLP((c["dim"], *c["hidden"], 2 * c["latent_dim"])),
                            MLP((c["latent_dim"], *c["hidden"], 2 * c["dim"])), likelihood="gaussian",
                            scale="decoder", objective="iwae", num_samples=c["num_samples"]),
        defaults={"hidden": [64, 64], "latent_dim": 2, "num_samples": 4, "lr": 3e-3},
        likelihood="importance-sampled, K=1000",
        log_prob=lambda model, params, x: model.log_prob_estimate(params, x, Rng(0, "numpy"), 1000)),
    "gan": Family(
        build=_gan,
        defaults={"hidden": [128, 128, 128], "latent_dim": 2, "loss": "non_saturating", "penalty": None,
                  "n_critic": 1, "pack": 1, "minibatch_std": False, "input_range": 2.0, "d_lr_scale": 1.0,
                  "lr": 5e-4},
        likelihood="none: a GAN has no likelihood", log_prob=None, ema_decay=0.999,
        players=lambda model, lr, c: _gan_players(model, lr, c["d_lr_scale"])),
}


def model_config(family, dim, **options):
    """The full JSON config of ``family`` over ``dim`` features: its defaults overridden by ``options``."""
    entry = FAMILIES[check_choice(family, "family", tuple(FAMILIES))]
    unknown = sorted(set(options) - set(entry.defaults) - {"lr"})
    if unknown:
        raise ValueError(f"--option: the {family} family takes {sorted(set(entry.defaults) - {'lr'})}, got "
                         f"{unknown}")
    return {"dim": check_positive_int(dim, "dim"), **entry.defaults, **options}


def build_model(family, config):
    """The model of ``family`` described by ``config`` (from ``model_config`` or a checkpoint)."""
    entry = FAMILIES[check_choice(family, "family", tuple(FAMILIES))]
    return entry.build({**entry.defaults, **config})
