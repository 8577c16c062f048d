"""GAN parts: D(x) in R (logits) from MLP, conv and projection discriminators; G(z) generators; losses and penalties.

A discriminator maps a batch x (n, ...) to one real score per row, ``D(x)`` (n,): a logit for the
minimax, non-saturating and least-squares losses, a critic value for the Wasserstein and hinge losses.
Every discriminator here has the same call::

    logits, new_state = disc.apply(params, state, x, y=None)       # y: class labels (projection only)

where ``state = disc.init_state(params)`` holds the non-trained power-iteration vectors of spectral
normalisation (``{}`` without it). A generator maps latent codes to samples, ``generator.apply(params, z,
y=None) -> x``. The losses are functions of the discriminator's outputs only (``d_loss``, ``g_loss``);
the penalties (``gradient_penalty``, ``r1_penalty``) differentiate the critic w.r.t. its *input* with
autograd, and the training loss differentiates that again (second order), so they run on numpy.

Spectral normalisation (Miyato et al. 2018): a weight W (d_in, d_out) is used as W / sigma(W), with the
largest singular value sigma estimated by power iteration from a vector u carried between calls::

    v = W u / ||W u||,   u' = W^T v / ||W^T v||,   sigma = v^T W u'      (u, v held fixed under the gradient)

Minibatch standard deviation (Karras et al. 2018): the mean over features of the per-feature standard
deviation across the batch, appended as one more feature before the last layer, lets D see the batch's
diversity (a collapsed generator gives 0).
"""

import math

from genblocks.backends import Rng, grad, namespace, stop_gradient
from genblocks.blocks import ops
from genblocks.blocks.base import Block, check_array, check_dtype
from genblocks.blocks.nn import Dense, _check_activation_arg, conv_pads, get_init, upsample_nearest, zeros
from genblocks.blocks.validate import check_choice, check_nonnegative_int, check_positive_int, check_real

__all__ = [
    "LOSSES", "PENALTIES", "spectral_normalize", "minibatch_std", "MLPDiscriminator", "ConvDiscriminator",
    "ProjectionDiscriminator", "MLPGenerator", "ConvGenerator", "d_loss", "g_loss", "gradient_penalty",
    "r1_penalty", "clip_weights",
]

LOSSES = ("minimax", "non_saturating", "wasserstein", "hinge", "least_squares")
PENALTIES = (None, "gp", "r1", "clip")
_EPS = 1e-12


# ---------------------------------------------------------------------------------------------------
# Spectral normalisation and the minibatch-std feature


def spectral_normalize(W, u, n_power_iterations=1):
    """(W / sigma, u', sigma): sigma = v^T W u' estimates W's largest singular value by power iteration.

    W (d_in, d_out), u (d_out,) the vector from the last call (state, never trained). The iteration runs
    on a detached W, so the gradient of W / sigma flows through sigma's explicit W only (as in Miyato et
    al.); u' (detached) is the next call's u.
    """
    xp = namespace(W, u)
    Wd = stop_gradient(W)
    v = None
    for _ in range(max(int(n_power_iterations), 1)):
        v = xp.matmul(Wd, u)
        v = v / (xp.sqrt(xp.sum(v * v)) + _EPS)
        u = xp.matmul(v, Wd)
        u = u / (xp.sqrt(xp.sum(u * u)) + _EPS)
    u = stop_gradient(u)
    sigma = xp.sum(v * xp.matmul(W, u))
    return W / sigma, u, sigma


def minibatch_std(h):
    """s = mean_j sqrt(Var_i h[i, j] + 1e-8), appended as a column: h (n, d) -> (n, d + 1)."""
    xp = namespace(h)
    mu = xp.mean(h, axis=0, keepdims=True)
    var = xp.mean((h - mu) * (h - mu), axis=0)
    s = xp.mean(xp.sqrt(var + 1e-8))
    col = xp.zeros((h.shape[0], 1), dtype=h.dtype) + s
    return xp.concat([h, col], axis=-1)


def _u0(xp, k, like):
    """The power iteration's deterministic start, 1 / sqrt(k) in every coordinate (no rng needed)."""
    return xp.full((k,), 1.0 / math.sqrt(k), dtype=like.dtype, device=xp.device_of(like))


class _SNLayers(Block):
    """Shared by the discriminators: a list of weight matrices, optionally spectrally normalised."""

    def _sn_init_state(self, params, dtype):
        if not self.spectral_norm:
            return {}
        if params is None:
            params = self.init(Rng(0, backend="numpy"), dtype)
        xp = namespace(params)
        return {"u": [_u0(xp, p["W"].shape[-1], p["W"]) for p in self._sn_weights(params)]}

    def init_state(self, params=None, dtype="float32"):
        """``{"u": [u per normalised weight (d_out,)]}`` with spectral_norm, else ``{}``.

        ``params`` (optional) picks the backend and dtype; u starts at 1 / sqrt(d_out) everywhere.
        """
        check_dtype(dtype)
        return self._sn_init_state(params, dtype)

    def _weights(self, layers, state):
        """Each layer's weight (normalised with spectral_norm) of the list of dicts ``layers``; the new state."""
        mats = []
        new_u = []
        for i, p in enumerate(layers):
            W = p["W"]
            shape = W.shape
            if self.spectral_norm:
                xp = namespace(W)
                W2, u, _ = spectral_normalize(xp.reshape(W, (-1, shape[-1])), state["u"][i], self.n_power_iterations)
                W = xp.reshape(W2, shape)
                new_u.append(u)
            mats.append(W)
        return mats, ({"u": new_u} if self.spectral_norm else {})

    def _check_state(self, state):
        if self.spectral_norm:
            if not isinstance(state, dict) or "u" not in state or len(state["u"]) != len(self._sn_weights_count()):
                raise ValueError(f"state: {type(self).__name__} with spectral_norm carries its power-iteration "
                                 f"vectors in a state; expected disc.init_state(params), got {state!r:.80}")


# ---------------------------------------------------------------------------------------------------
# Discriminators


class MLPDiscriminator(_SNLayers):
    """D(x) = w_L^T h_{L-1} + b_L, h_k = act(W_k h_{k-1} + b_k), h_0 = x: x (n, d_in) -> logits (n,).

    ``hidden``: widths of the hidden layers; ``spectral_norm``: every W_k used as W_k / sigma(W_k);
    ``minibatch_std``: the batch-std feature appended before the last layer. Params: list of Dense dicts.
    ``input_range`` s (optional): the first layer's biases start at b_j = -w_j . c_j with c_j ~ U(-s, s)^d_in,
    so its units' kinks (hyperplanes w_j . x + b_j = 0) cut the box [-s, s]^d_in where the data lie, instead
    of all passing through the origin (zero biases): D can then resolve modes far from the origin from the
    first step (data on the 5x5 grid reach |x| = 4; zero biases must first travel that far).
    """

    def __init__(self, d_in, hidden=(128, 128, 128), *, activation="leaky_relu", spectral_norm=False,
                 minibatch_std=False, n_power_iterations=1, input_range=None):
        self.d_in = check_positive_int(d_in, "d_in")
        self.hidden = tuple(check_positive_int(h, "hidden") for h in hidden)
        self.activation = _check_activation_arg(activation)
        self.spectral_norm = bool(spectral_norm)
        self.minibatch_std = bool(minibatch_std)
        self.n_power_iterations = check_positive_int(n_power_iterations, "n_power_iterations")
        self.input_range = None if input_range is None else check_real(input_range, "input_range", low=0.0,
                                                                         low_open=True)
        widths = (self.d_in,) + self.hidden
        self.layers = [Dense(widths[i], widths[i + 1], init="he") for i in range(len(self.hidden))]
        self.layers.append(Dense(widths[-1] + int(self.minibatch_std), 1, init="glorot"))

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        if self.input_range is not None:
            rng, r_centres = rng.split(2)
        params = [layer.init(r, dtype) for layer, r in zip(self.layers, rng.split(len(self.layers)))]
        if self.input_range is not None and self.hidden:
            first = params[0]
            xp = namespace(first["W"])
            s = self.input_range
            c = r_centres.uniform((self.hidden[0], self.d_in), low=-s, high=s, dtype=dtype)  # one point per unit
            first["b"] = -xp.sum(xp.matrix_transpose(first["W"]) * c, axis=-1)
        return params

    def _sn_weights(self, params):
        return params

    def _sn_weights_count(self):
        return self.layers

    def _mlp(self, mlp_params, state, x):
        """(h_{L-1} (n, hidden[-1] (+1 with minibatch_std)), the last layer's score (n,), new state)."""
        check_array(x, "x", ndim=2, last_dim=self.d_in)
        self._check_state(state)
        xp = namespace(x, mlp_params)
        mats, new_state = self._weights(mlp_params, state)
        h = x
        for W, p in zip(mats[:-1], mlp_params[:-1]):
            h = xp.dense(h, W, p["b"], self.activation)
        if self.minibatch_std:
            h = minibatch_std(h)
        out = xp.reshape(xp.dense(h, mats[-1], mlp_params[-1]["b"], None), (x.shape[0],))
        return h, out, new_state

    def apply(self, params, state, x, y=None):
        """(D(x) (n,), new_state)."""
        self.check_params(params)
        _, out, new_state = self._mlp(params, state, x)
        return out, new_state


class ProjectionDiscriminator(MLPDiscriminator):
    """D(x, y) = w^T phi(x) + b + e_y^T phi(x) (Miyato & Koyama 2018): phi the MLP's last hidden layer.

    x (n, d_in), y (n,) integer labels in [0, num_classes) -> (n,). Params: the MLP's list plus a final
    dict {"embed": (num_classes, width)} (the class embeddings e_y).
    """

    def __init__(self, d_in, num_classes, hidden=(128, 128), *, activation="leaky_relu", spectral_norm=False,
                 minibatch_std=False, n_power_iterations=1):
        super().__init__(d_in, hidden, activation=activation, spectral_norm=spectral_norm,
                         minibatch_std=minibatch_std, n_power_iterations=n_power_iterations)
        self.num_classes = check_positive_int(num_classes, "num_classes")

    def init(self, rng, dtype="float32"):
        r_mlp, r_embed = rng.split(2)
        width = self.hidden[-1] + int(self.minibatch_std)
        embed = get_init("glorot")(r_embed, (self.num_classes, width), check_dtype(dtype))
        return super().init(r_mlp, dtype) + [{"embed": embed}]

    def _sn_weights(self, params):
        return params[:-1]

    def apply(self, params, state, x, y=None):
        """(D(x, y) (n,), new_state); y (n,) integer labels."""
        if y is None:
            raise ValueError(f"y: ProjectionDiscriminator needs class labels (n,) in [0, {self.num_classes}), got None")
        self.check_params(params)
        h, out, new_state = self._mlp(params[:-1], state, x)
        xp = namespace(x, params)
        e = xp.take(params[-1]["embed"], xp.astype(y, xp.int64), axis=0)
        return out + xp.sum(e * h, axis=-1), new_state


class ConvDiscriminator(_SNLayers):
    """D(x) = w^T flatten(h_K) + b, h_k = act(conv_{3x3, stride 2}(h_{k-1})): images (n, H, W, C) -> (n,).

    ``image_shape`` (H, W, C); flat inputs (n, H*W*C) are reshaped. ``channels``: one stride-2 conv per
    entry. Params: list of {"W": (3, 3, c_in, c_out), "b"} and a last Dense dict.
    """

    def __init__(self, image_shape, channels=(16, 32), *, activation="leaky_relu", spectral_norm=False,
                 minibatch_std=False, n_power_iterations=1):
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape: expected (H, W, C), got {image_shape!r}")
        self.image_shape = tuple(check_positive_int(s, "image_shape") for s in image_shape)
        self.channels = tuple(check_positive_int(c, "channels") for c in channels)
        self.activation = _check_activation_arg(activation)
        self.spectral_norm = bool(spectral_norm)
        self.minibatch_std = bool(minibatch_std)
        self.n_power_iterations = check_positive_int(n_power_iterations, "n_power_iterations")
        H, W, _ = self.image_shape
        for _ in self.channels:
            H, W = -(-H // 2), -(-W // 2)
        self.flat = H * W * self.channels[-1]

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        rngs = rng.split(len(self.channels) + 1)
        c_in = self.image_shape[2]
        params = []
        for c, r in zip(self.channels, rngs):
            params.append({"W": get_init("he")(r, (3, 3, c_in, c), dtype), "b": zeros(r, (c,), dtype)})
            c_in = c
        params.append(Dense(self.flat + int(self.minibatch_std), 1).init(rngs[-1], dtype))
        return params

    def _sn_weights(self, params):
        return params

    def _sn_weights_count(self):
        return self.channels + (None,)

    def apply(self, params, state, x, y=None):
        """(D(x) (n,), new_state)."""
        xp = namespace(x, params)
        if x.ndim == 2:
            check_array(x, "x", ndim=2, last_dim=math.prod(self.image_shape))
            x = xp.reshape(x, (x.shape[0],) + self.image_shape)
        check_array(x, "x", ndim=4, last_dim=self.image_shape[2])
        self.check_params(params)
        self._check_state(state)
        mats, new_state = self._weights(params, state)
        h = x
        for W, p in zip(mats[:-1], params[:-1]):  # W (3, 3, c_in, c_out), already normalised with spectral_norm
            pads = conv_pads(h.shape, (3, 3), (2, 2), "same")
            h = xp.conv2d(h, W, p["b"], (2, 2), pads, self.activation)  # act(im2col(h) @ reshape(W) + b)
        h = xp.reshape(h, (h.shape[0], self.flat))
        if self.minibatch_std:
            h = minibatch_std(h)
        return xp.reshape(xp.dense(h, mats[-1], params[-1]["b"], None), (x.shape[0],)), new_state


# ---------------------------------------------------------------------------------------------------
# Generators


class MLPGenerator(Block):
    """G(z) = final_act(MLP([z, onehot(y)])): z (n, latent_dim) -> x (n, d_out).

    ``num_classes`` > 0 makes it class-conditional (one-hot labels concatenated to z).
    """

    def __init__(self, latent_dim, d_out, hidden=(128, 128, 128), *, activation="relu", final_activation=None,
                 num_classes=0):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        self.d_out = check_positive_int(d_out, "d_out")
        self.hidden = tuple(check_positive_int(h, "hidden") for h in hidden)
        self.activation = _check_activation_arg(activation)
        self.final_activation = _check_activation_arg(final_activation, "final_activation")
        self.num_classes = check_nonnegative_int(num_classes, "num_classes")
        widths = (self.latent_dim + self.num_classes,) + self.hidden + (self.d_out,)
        self.layers = [Dense(widths[i], widths[i + 1], init="he" if i < len(self.hidden) else "glorot")
                       for i in range(len(widths) - 1)]

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        return [layer.init(r, dtype) for layer, r in zip(self.layers, rng.split(len(self.layers)))]

    def apply(self, params, z, y=None):
        """x = G(z[, y]) (n, d_out)."""
        check_array(z, "z", ndim=2, last_dim=self.latent_dim)
        self.check_params(params)
        xp = namespace(z, params)
        h = _with_labels(xp, z, y, self.num_classes)
        last = len(params) - 1
        for i, p in enumerate(params):
            h = xp.dense(h, p["W"], p["b"], self.activation if i < last else self.final_activation)
        return h


def _with_labels(xp, z, y, num_classes):
    if num_classes == 0:
        if y is not None:
            raise ValueError("y: this generator is unconditional (num_classes=0), got labels")
        return z
    if y is None:
        raise ValueError(f"y: this generator is class-conditional (num_classes={num_classes}), got y=None")
    onehot = xp.astype(xp.equal(xp.reshape(xp.astype(y, xp.int64), (-1, 1)),
                                xp.reshape(xp.arange(num_classes, dtype=xp.int64, device=xp.device_of(z)),
                                           (1, -1))), z.dtype)
    return xp.concat([z, onehot], axis=-1)


class ConvGenerator(Block):
    """G(z): Dense -> (s, s, c_0), then [upsample x2, conv 3x3 c_{i-1} -> c_i, act] per channel step, conv -> C.

    ``image_shape`` (H, W, C) with H, W divisible by 2^(len(channels) - 1); s = H / 2^(len(channels) - 1).
    z (n, latent_dim) -> images (n, H, W, C) in final_activation's range (sigmoid: (0, 1)).
    """

    def __init__(self, latent_dim, image_shape=(8, 8, 1), channels=(32, 32, 16), *, activation="relu",
                 final_activation="sigmoid", num_classes=0):
        self.latent_dim = check_positive_int(latent_dim, "latent_dim")
        if len(tuple(image_shape)) != 3:
            raise ValueError(f"image_shape: expected (H, W, C), got {image_shape!r}")
        self.image_shape = tuple(check_positive_int(s, "image_shape") for s in image_shape)
        self.channels = tuple(check_positive_int(c, "channels") for c in channels)
        scale = 2 ** (len(self.channels) - 1)
        H, W, _ = self.image_shape
        if H % scale or W % scale:
            raise ValueError(f"image_shape: H and W must be divisible by 2^(len(channels) - 1) = {scale}, "
                             f"got {self.image_shape}")
        self.start = (H // scale, W // scale)
        self.activation = _check_activation_arg(activation)
        self.final_activation = _check_activation_arg(final_activation, "final_activation")
        self.num_classes = check_nonnegative_int(num_classes, "num_classes")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        rngs = rng.split(len(self.channels) + 1)
        d0 = self.start[0] * self.start[1] * self.channels[0]
        params = [Dense(self.latent_dim + self.num_classes, d0, init="he").init(rngs[0], dtype)]
        c_in = self.channels[0]
        for c, r in zip(self.channels[1:] + (self.image_shape[2],), rngs[1:]):
            params.append({"W": get_init("he")(r, (3, 3, c_in, c), dtype), "b": zeros(r, (c,), dtype)})
            c_in = c
        return params

    def apply(self, params, z, y=None):
        """Images G(z[, y]) (n, H, W, C)."""
        check_array(z, "z", ndim=2, last_dim=self.latent_dim)
        self.check_params(params)
        xp = namespace(z, params)
        h = _with_labels(xp, z, y, self.num_classes)
        h = xp.dense(h, params[0]["W"], params[0]["b"], self.activation)
        h = xp.reshape(h, (z.shape[0],) + self.start + (self.channels[0],))
        last = len(params) - 1
        for i, p in enumerate(params[1:], start=1):
            if i < last:
                h = upsample_nearest(h)
            pads = conv_pads(h.shape, (3, 3), (1, 1), "same")
            h = xp.conv2d(h, p["W"], p["b"], (1, 1), pads, self.activation if i < last else self.final_activation)
        return h


# ---------------------------------------------------------------------------------------------------
# Losses: functions of the discriminator's outputs (means over the batch)


def d_loss(kind, d_real, d_fake):
    """The discriminator's loss from D(x_real) (n,) and D(G(z)) (m,); a scalar.

    minimax / non_saturating: -E log sigmoid(D(x)) - E log(1 - sigmoid(D(G(z))))   (softplus form);
    wasserstein: E D(G(z)) - E D(x);   hinge: E relu(1 - D(x)) + E relu(1 + D(G(z)));
    least_squares: E (D(x) - 1)^2 / 2 + E D(G(z))^2 / 2.
    """
    kind = check_choice(kind, "loss", LOSSES)
    xp = namespace(d_real, d_fake)
    if kind in ("minimax", "non_saturating"):
        return xp.mean(ops.softplus(-d_real)) + xp.mean(ops.softplus(d_fake))
    if kind == "wasserstein":
        return xp.mean(d_fake) - xp.mean(d_real)
    if kind == "hinge":
        return xp.mean(xp.maximum(1.0 - d_real, 0.0)) + xp.mean(xp.maximum(1.0 + d_fake, 0.0))
    return 0.5 * xp.mean((d_real - 1.0) * (d_real - 1.0)) + 0.5 * xp.mean(d_fake * d_fake)


def g_loss(kind, d_fake):
    """The generator's loss from D(G(z)) (m,); a scalar.

    minimax: E log(1 - sigmoid(D(G(z)))) = -E softplus(D(G(z)))  (saturates when D wins);
    non_saturating: -E log sigmoid(D(G(z))) = E softplus(-D(G(z)));
    wasserstein and hinge: -E D(G(z));   least_squares: E (D(G(z)) - 1)^2 / 2.
    """
    kind = check_choice(kind, "loss", LOSSES)
    xp = namespace(d_fake)
    if kind == "minimax":
        return -xp.mean(ops.softplus(d_fake))
    if kind == "non_saturating":
        return xp.mean(ops.softplus(-d_fake))
    if kind in ("wasserstein", "hinge"):
        return -xp.mean(d_fake)
    return 0.5 * xp.mean((d_fake - 1.0) * (d_fake - 1.0))


# ---------------------------------------------------------------------------------------------------
# Penalties (autograd w.r.t. the critic's input; numpy backend)


def _input_grad(critic, x):
    """d/dx sum_i critic(x)_i: row i's gradient of its own score (rows independent without minibatch_std)."""
    xp = namespace(x)
    return grad(lambda v: xp.sum(critic(v)))(x)


def _row_sq_norms(xp, g):
    g2 = xp.reshape(g * g, (g.shape[0], -1))
    return xp.sum(g2, axis=-1)


def gradient_penalty(critic, x_real, x_fake, eps, target=1.0):
    """E_i (||grad_x D(x_hat_i)|| - target)^2 at x_hat = eps x_real + (1 - eps) x_fake (Gulrajani et al. 2017).

    ``critic(x) -> (n,)``; x_real, x_fake (n, ...); eps (n,) uniform on [0, 1], one per row. The norm is
    sqrt(||g||^2 + 1e-12) so that its own gradient (training differentiates this again) stays finite.
    """
    xp = namespace(x_real, x_fake)
    shape = (x_real.shape[0],) + (1,) * (x_real.ndim - 1)
    e = xp.reshape(eps, shape)
    x_hat = e * x_real + (1.0 - e) * x_fake
    norms = xp.sqrt(_row_sq_norms(xp, _input_grad(critic, x_hat)) + _EPS)
    return xp.mean((norms - target) * (norms - target))


def r1_penalty(critic, x_real):
    """E_i ||grad_x D(x_i)||^2 at the real data (Mescheder et al. 2018); the model weighs it by gamma / 2."""
    xp = namespace(x_real)
    return xp.mean(_row_sq_norms(xp, _input_grad(critic, x_real)))


def clip_weights(params, c):
    """Every leaf clipped to [-c, c]: the WGAN critic's Lipschitz constraint (Arjovsky et al. 2017)."""
    if isinstance(params, dict):
        return {k: clip_weights(v, c) for k, v in params.items()}
    if isinstance(params, (list, tuple)):
        return type(params)(clip_weights(v, c) for v in params)
    xp = namespace(params)
    return xp.clip(params, -c, c)
