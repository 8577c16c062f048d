"""Generative adversarial networks: min_G max_D V(D, G), a generator and a discriminator trained in turns.

A generator G maps noise z ~ N(0, I) to samples; a discriminator D scores samples, D(x) in R. For the
original value function (Goodfellow et al. 2014), with s the logistic sigmoid,

    V(D, G) = E_{x ~ p} log s(D(x)) + E_z log(1 - s(D(G(z)))),

the best discriminator for a fixed G with sample density q is s(D*(x)) = p(x) / (p(x) + q(x)), and
then V = 2 JS(p || q) - log 4: the generator minimises a Jensen-Shannon divergence. In practice G
maximises log s(D(G(z))) instead ("non-saturating": the same fixed point, strong gradients when D
wins). The Wasserstein GAN (Arjovsky et al. 2017) replaces the logit by a critic constrained to be
1-Lipschitz, which makes E D(x) - E D(G(z)) approach the Wasserstein-1 distance; the constraint comes
from weight clipping, the gradient penalty (WGAN-GP, Gulrajani et al. 2017) or spectral normalisation.
Hinge and least-squares losses change the discriminator's target; R1 (Mescheder et al. 2018) penalises
the critic's gradient at the data. The losses and penalties are in ``genblocks.blocks.discriminators``.

There is no likelihood: a GAN is scored by its samples (MMD, mode coverage, high-quality rate).

Training alternates ``n_critic`` discriminator updates with one generator update; ``players`` gives
both, for ``genblocks.train.fit(None, params, data, rng, None, steps, groups=gan.players(opt_d, opt_g),
state=gan.init_state(params))``. Params are ``{"gen": ..., "disc": ...}``; the state holds the
discriminator's spectral-normalisation vectors (``{"disc": {}}`` without them).
"""

from genblocks.backends import float_dtype_name, namespace
from genblocks.blocks.base import Block, check_array, check_dtype
from genblocks.blocks.discriminators import LOSSES, clip_weights, d_loss, g_loss, gradient_penalty, r1_penalty
from genblocks.blocks.validate import check_int, check_positive_int, check_real

__all__ = ["GAN", "LOSSES", "PENALTIES", "PENALTY_FITS"]

# the penalties and the losses each one belongs to
PENALTY_FITS = {
    None: LOSSES,
    "gp": ("wasserstein", "hinge"),
    "clip": ("wasserstein",),
    "r1": ("minimax", "non_saturating", "hinge", "least_squares"),
}
PENALTIES = tuple(PENALTY_FITS)
_DEFAULT_WEIGHT = {"gp": 10.0, "r1": 10.0, "clip": 0.01}


class GAN(Block):
    """x = G(z), z ~ N(0, I_latent); D trained on ``loss`` (+ ``penalty``), ``n_critic`` D steps per G step.

    - ``generator``: ``apply(params, z, y=None) -> x`` with ``latent_dim`` (``MLPGenerator``, ``ConvGenerator``);
      ``discriminator``: ``apply(params, state, x, y=None) -> (D(x) (n,), state)``.
    - ``loss``: one of ``LOSSES``; ``penalty``: None, "gp" (lambda E (||grad D(x_hat)|| - 1)^2, Wasserstein
      or hinge), "r1" (gamma / 2 E ||grad D(x)||^2 at the data) or "clip" (weights clipped to
      [-c, c] after each critic update, Wasserstein only); ``penalty_weight``: lambda, gamma or c
      (defaults 10, 10, 0.01). A Wasserstein critic needs one of gp, clip or a spectral-normalised
      discriminator.
    - ``n_critic``: discriminator updates per generator update (int >= 1).
    - ``pack``: PacGAN packing (Lin et al. 2018): D sees ``pack`` samples at once, rows (n, d) concatenated
      into (n / pack, pack * d) (so the discriminator takes ``d_in = pack * d``); a packed batch of fakes
      from a collapsed generator looks unlike a packed batch of data, which penalises mode collapse. The
      batch size must be a multiple of ``pack``; unconditional flat data only.
    - Class-conditional when the discriminator has ``num_classes`` (projection): the batches are
      ``(x, y)`` and the generator must take the same labels.
    """

    def __init__(self, generator, discriminator, *, loss="non_saturating", penalty=None, penalty_weight=None,
                 n_critic=1, latent_dim=None, pack=1):
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        if penalty not in PENALTY_FITS:
            raise ValueError(f"penalty: expected one of {PENALTIES}, got {penalty!r}")
        if loss not in PENALTY_FITS[penalty]:
            fits = [p for p, losses in PENALTY_FITS.items() if p is not None and loss in losses]
            raise ValueError(f"penalty: {penalty!r} does not fit loss={loss!r} (it goes with "
                             f"{PENALTY_FITS[penalty]}); for {loss!r} choose one of {[None] + fits}")
        sn = bool(getattr(discriminator, "spectral_norm", False))
        if loss == "wasserstein" and penalty is None and not sn:
            raise ValueError("penalty: loss='wasserstein' needs a Lipschitz critic: penalty='gp' or 'clip', or a "
                             "discriminator with spectral_norm=True; got penalty=None")
        self.n_critic = check_int(n_critic, "n_critic", low=1)
        for name, part, method in (("generator", generator, "apply"), ("discriminator", discriminator, "apply")):
            if not callable(getattr(part, method, None)) or not callable(getattr(part, "init", None)):
                raise TypeError(f"{name}: expected a block with init and {method}, got {part!r}")
        g_latent = getattr(generator, "latent_dim", None)
        if latent_dim is None:
            if g_latent is None:
                raise ValueError("latent_dim: the generator has no latent_dim attribute; pass latent_dim=")
            latent_dim = g_latent
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        if g_latent is not None and g_latent != self.latent_dim:
            raise ValueError(f"latent_dim: {self.latent_dim} given, the generator takes {g_latent}")
        self.num_classes = int(getattr(discriminator, "num_classes", 0) or 0)
        if self.num_classes != int(getattr(generator, "num_classes", 0) or 0):
            raise ValueError(f"generator: the discriminator is conditioned on {self.num_classes} classes, the "
                             f"generator on {getattr(generator, 'num_classes', 0)}; they must agree")
        self.pack = check_int(pack, "pack", low=1)
        if self.pack > 1 and self.num_classes:
            raise ValueError(f"pack: packing is for unconditional GANs; this one is conditioned on {self.num_classes} "
                             f"classes, got pack={self.pack}")
        self.generator, self.discriminator = generator, discriminator
        self.loss, self.penalty = loss, penalty
        weight = _DEFAULT_WEIGHT.get(penalty, 0.0) if penalty_weight is None else penalty_weight
        self.penalty_weight = check_real(weight, "penalty_weight", low=0.0)

    def __repr__(self):
        return (f"GAN({self.generator!r}, {self.discriminator!r}, loss={self.loss!r}, penalty={self.penalty!r}, "
                f"penalty_weight={self.penalty_weight}, n_critic={self.n_critic}"
                + (f", pack={self.pack})" if self.pack > 1 else ")"))

    # ------------------------------------------------------------------------------------------------
    # params and state

    def init(self, rng, dtype="float32"):
        """``{"gen": generator params, "disc": discriminator params}``."""
        dtype = check_dtype(dtype)
        r_gen, r_disc = rng.split(2)
        return {"gen": self.generator.init(r_gen, dtype), "disc": self.discriminator.init(r_disc, dtype)}

    def init_state(self, params=None, dtype="float32"):
        """``{"disc": the discriminator's state}`` (spectral-norm vectors u; ``{}`` without them)."""
        check_dtype(dtype)
        if params is not None:
            self.check_params(params)
        disc = None if params is None else params["disc"]
        return {"disc": self.discriminator.init_state(disc, dtype)}

    def _split(self, batch):
        if self.num_classes:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError(f"batch: this GAN is class-conditional ({self.num_classes} classes): expected "
                                 f"(x, y), got {type(batch).__name__}")
            return batch[0], batch[1]
        if isinstance(batch, (tuple, list)):
            raise ValueError("batch: this GAN is unconditional: expected an array x (n, ...), got a tuple")
        return batch, None

    def _packed(self, x):
        """x (n, ...) -> (n / pack, pack * prod(...)): ``pack`` consecutive rows side by side (x itself for pack=1)."""
        if self.pack == 1:
            return x
        n = x.shape[0]
        if n % self.pack:
            raise ValueError(f"batch: pack={self.pack} needs a batch size divisible by {self.pack}, got {n} rows")
        width = 1
        for s in x.shape[1:]:
            width *= s
        return namespace(x).reshape(x, (n // self.pack, self.pack * width))

    # ------------------------------------------------------------------------------------------------
    # sampling

    def _fake(self, params, rng, n, y, like):
        dtype = float_dtype_name(like.dtype)
        z = rng.normal((n, self.latent_dim), dtype=dtype)
        return self.generator.apply(params["gen"], z, y)

    def sample(self, params, rng, n, y=None):
        """x = G(z), z ~ N(0, I): n samples on ``rng``'s backend in the params' dtype (``y``: labels, conditional)."""
        n = check_positive_int(n, "n")
        self.check_params(params)
        if self.num_classes and y is None:
            raise ValueError(f"y: this GAN is class-conditional ({self.num_classes} classes): pass labels (n,)")
        return self._fake(params, rng, n, y, _first_leaf(params["gen"]))

    # ------------------------------------------------------------------------------------------------
    # the two losses

    def loss_terms(self, params, batch, rng, state=None):
        """{"d_real": D(x) (n / pack,), "d_fake": D(G(z)) (n / pack,), "penalty": scalar (0 without one)}.

        ``state``: the model state (``init_state``); None is allowed for a discriminator without
        spectral norm. Training uses ``loss_d_and_state``, which also returns the advanced state.
        """
        if state is None:
            state = self._default_state(params, "loss_terms")
        return self._terms(params, state, batch, rng)[0]

    def _terms(self, params, state, batch, rng):
        """(terms, new state): the real batch's forward advances the power iteration (with spectral norm),
        the fake and penalty passes use the advanced state; "gp" draws one eps ~ U(0, 1) per row."""
        self.check_params(params)
        x, y = self._split(batch)
        check_array(x, "x", min_ndim=2)
        r_z, r_eps = rng.split(2)
        n = x.shape[0]
        fake = self._fake(params, r_z, n, y, x)
        if fake.shape != x.shape:
            fake = namespace(fake).reshape(fake, x.shape)
        D = self.discriminator
        d_state = state["disc"]
        x, fake = self._packed(x), self._packed(fake)
        n = x.shape[0]
        d_real, d_state = D.apply(params["disc"], d_state, x, y)
        d_fake, d_state = D.apply(params["disc"], d_state, fake, y)
        xp = namespace(x, params)
        penalty = xp.zeros((), dtype=d_real.dtype)
        if self.penalty in ("gp", "r1"):
            fixed = d_state

            def critic(v):
                return D.apply(params["disc"], fixed, v, y)[0]

            if self.penalty == "gp":
                eps = r_eps.uniform((n,), dtype=float_dtype_name(x.dtype))
                penalty = gradient_penalty(critic, x, fake, eps)
            else:
                penalty = r1_penalty(critic, x)
        return {"d_real": d_real, "d_fake": d_fake, "penalty": penalty}, {"disc": d_state}

    def loss_d_and_state(self, params, state, batch, rng):
        """(L_D = d_loss(D(x), D(G(z))) + weight * penalty, new state): the discriminator's objective."""
        terms, new_state = self._terms(params, state, batch, rng)
        value = d_loss(self.loss, terms["d_real"], terms["d_fake"])
        if self.penalty in ("gp", "r1"):
            scale = self.penalty_weight if self.penalty == "gp" else 0.5 * self.penalty_weight
            value = value + scale * terms["penalty"]
        return value, new_state

    def loss_g_and_state(self, params, state, batch, rng):
        """(L_G = g_loss(D(G(z))), new state) for a batch of z as large as the real batch (its labels reused)."""
        self.check_params(params)
        x, y = self._split(batch)
        check_array(x, "x", min_ndim=2)
        fake = self._fake(params, rng, x.shape[0], y, x)
        d_fake, d_state = self.discriminator.apply(params["disc"], state["disc"], self._packed(fake), y)
        return g_loss(self.loss, d_fake), {"disc": d_state}

    def _default_state(self, params, method):
        if getattr(self.discriminator, "spectral_norm", False):
            hint = ("pass state=model.init_state(params)" if method == "loss_terms" else
                    f"use {method}_and_state(params, state, batch, rng) with state=model.init_state(params)")
            raise ValueError("state: the spectral-normalised discriminator carries its power-iteration vectors in a "
                             f"state; {hint}")
        return self.init_state(params)

    def _stateless(self, method, params, batch, rng):
        return getattr(self, f"{method}_and_state")(params, self._default_state(params, method), batch, rng)[0]

    def loss_d(self, params, batch, rng):
        """L_D (scalar) for a discriminator without state (see ``loss_d_and_state``)."""
        return self._stateless("loss_d", params, batch, rng)

    def loss_g(self, params, batch, rng):
        """L_G (scalar) for a discriminator without state (see ``loss_g_and_state``)."""
        return self._stateless("loss_g", params, batch, rng)

    def project_disc(self, disc_params):
        """The critic's params after an update: clipped to [-c, c] with penalty="clip", unchanged otherwise."""
        if self.penalty != "clip":
            return disc_params
        return clip_weights(disc_params, self.penalty_weight)

    def players(self, disc_optimizer, gen_optimizer):
        """``{"disc": (loss_d_and_state, optimizer, n_critic), "gen": (loss_g_and_state, optimizer, 1)}``.

        The groups for ``genblocks.train.fit(..., groups=..., state=model.init_state(params))``; with
        penalty="clip" the discriminator's optimizer clips the weights after each of its updates. Each
        optimizer is an ``(init, update)`` pair (``genblocks.train.optim``).
        """
        init, update = disc_optimizer
        if self.penalty == "clip":
            inner = update

            def update(grads, opt_state, params):
                new, opt_state = inner(grads, opt_state, params)
                return self.project_disc(new), opt_state

        return {"disc": (self.loss_d_and_state, (init, update), self.n_critic),
                "gen": (self.loss_g_and_state, gen_optimizer, 1)}


def _first_leaf(tree):
    while isinstance(tree, (dict, list, tuple)):
        tree = next(iter(tree.values())) if isinstance(tree, dict) else tree[0]
    return tree
