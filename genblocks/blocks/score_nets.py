"""Noise / score networks: f(x_t, t, y) -> prediction with the shape of x_t (or twice its channels).

- ``TimeEmbedding``: e(t) = W_2 silu(W_1 sin_cos(time_scale t) + b_1) + b_2.
- ``ClassEmbedding``: a (num_classes + 1, dim) table; row ``num_classes`` is the null token used for
  classifier-free guidance (and for y=None).
- ``MLPScoreNet``: an MLP on flat data whose hidden layers are modulated by FiLM,
  h <- h gamma(e) + beta(e) (gamma starts at 1, beta at 0), with e = silu(e_time(t) + e_class(y)).
- ``UNet``: a small U-Net on NHWC images (conv residual blocks with FiLM, stride-2 down-sampling,
  nearest up-sampling, skip connections) for 8x8 and 28x28 inputs.
- ``LevelDecoder``: g(x_1) (n, ..., K), logits over K levels per dimension for a categorical decoder
  p(x_0 | x_1) (``Diffusion(decoder="categorical")``): same-padded convs plus a per-dimension bias.

Every network has ``apply(params, x, t, y=None)``; ``out_channels = 2 * channels`` gives the extra
outputs a ``variance_type="learned_range"`` model needs.
"""

from genblocks.backends import namespace
from genblocks.blocks.base import Block, check_array, check_dtype
from genblocks.blocks.nn import (
    Conv2d,
    Dense,
    FiLM,
    LayerNorm,
    ResBlock,
    SinusoidalEmbedding,
    film_modulate,
    upsample_nearest,
    zeros,
)
from genblocks.blocks.ops import get_activation, silu
from genblocks.blocks.validate import check_positive_int

# FiLM, ResBlock and upsample_nearest live with the other layers in nn.py; re-exported here for old imports
__all__ = ["TimeEmbedding", "ClassEmbedding", "FiLM", "MLPScoreNet", "UNet", "LevelDecoder", "ResBlock",
           "upsample_nearest"]


def _check_times(t, n):
    """t (n,): one time per example, or (1,): one time shared by the whole batch (computed once)."""
    check_array(t, "t", ndim=1)
    if t.shape[0] not in (n, 1):
        raise ValueError(f"t: expected one time per example ({n},) or one shared time (1,), got shape "
                         f"{tuple(t.shape)}")
    return t


class TimeEmbedding(Block):
    """e(t) = W_2 silu(W_1 [cos(s t w), sin(s t w)] + b_1) + b_2, s = ``time_scale``.

    t (n,) -> (n, dim). Use time_scale=1000 for continuous times in [0, 1].
    """

    def __init__(self, dim, *, time_scale=1.0, frequency_dim=None):
        self.dim = check_positive_int(dim, "dim")
        self.time_scale = float(time_scale)
        self.frequency_dim = check_positive_int(frequency_dim or dim, "frequency_dim")
        self.sinusoid = SinusoidalEmbedding(self.frequency_dim)
        self.fc1 = Dense(self.frequency_dim, dim, activation="silu")
        self.fc2 = Dense(dim, dim)
        self._fc2_silu = Dense(dim, dim, activation="silu")  # fc2's params with silu fused in

    def init(self, rng, dtype="float32"):
        r1, r2 = rng.split(2)
        return {"fc1": self.fc1.init(r1, dtype), "fc2": self.fc2.init(r2, dtype)}

    def apply(self, params, t, activation=None):
        """e(t) (n, dim); ``activation="silu"`` returns silu(e(t)) from the same fused call."""
        e = self.sinusoid.apply({}, t * self.time_scale if self.time_scale != 1.0 else t)
        if activation not in (None, "silu"):
            raise ValueError(f"activation: expected None or 'silu', got {activation!r}")
        fc2 = self.fc2 if activation is None else self._fc2_silu
        return fc2.apply(params["fc2"], self.fc1.apply(params["fc1"], e))


class ClassEmbedding(Block):
    """e(y) = E[y], E a (num_classes + 1, dim) table whose last row is the null token (y = None or num_classes).

    y: int array (n,) -> (n, dim).
    """

    def __init__(self, num_classes, dim):
        self.num_classes = check_positive_int(num_classes, "num_classes")
        self.dim = check_positive_int(dim, "dim")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        return {"table": rng.normal((self.num_classes + 1, self.dim), dtype=dtype, scale=0.02)}

    def apply(self, params, y, n=None):
        xp = namespace(params)
        table = params["table"]
        if y is None:
            if n is None:
                raise ValueError("y: None (the null token) needs the batch size n")
            return xp.broadcast_to(table[self.num_classes:self.num_classes + 1, :], (n, self.dim))
        if getattr(y, "shape", None) is None or len(y.shape) != 1:
            raise ValueError(f"y: expected an int array of labels (n,), got {y!r}")
        if xp.isdtype(y.dtype, "real floating"):
            raise TypeError(f"y: expected integer labels, got dtype {y.dtype}")
        return xp.take(table, y, axis=0)


class _Conditioning(Block):
    """e = silu(time_embedding(t) + class_embedding(y)) shared by the networks below."""

    accepts_shared_time = True  # apply() takes t (1,) as one time for the whole batch

    def _setup_conditioning(self, embed_dim, num_classes, time_scale):
        self.embed_dim = check_positive_int(embed_dim, "time_embed_dim")
        self.num_classes = None if num_classes is None else check_positive_int(num_classes, "num_classes")
        self.time_scale = float(time_scale)
        self.time_embedding = TimeEmbedding(embed_dim, time_scale=time_scale)
        self.class_embedding = None if num_classes is None else ClassEmbedding(num_classes, embed_dim)

    def _init_conditioning(self, rng, dtype):
        r1, r2 = rng.split(2)
        p = {"time": self.time_embedding.init(r1, dtype)}
        if self.class_embedding is not None:
            p["class"] = self.class_embedding.init(r2, dtype)
        return p

    def _embed(self, params, t, y, n):
        """e (n, E), or (1, E) when t is one shared time (1,) and y is None: FiLM broadcasts it."""
        if y is None:
            n = t.shape[0]
        if self.class_embedding is None:
            if y is not None:
                raise ValueError("y: this network has no class embedding (num_classes=None), got labels")
            return self.time_embedding.apply(params["time"], t, activation="silu")
        e = self.time_embedding.apply(params["time"], t) + self.class_embedding.apply(params["class"], y, n)
        return silu(e)


class MLPScoreNet(_Conditioning):
    """eps_theta(x, t, y) = W_out h_L + b_out, h_k = FiLM_k(act(W_k h_{k-1} + b_k), e(t, y)), h_0 = x.

    x (n, dim), t (n,) or (1,) (one time for all), y int (n,) or None -> (n, out_dim) (default out_dim = dim).
    """

    def __init__(self, dim, hidden=(128, 128, 128), *, time_embed_dim=64, num_classes=None, out_dim=None,
                 activation="silu", time_scale=1.0):
        self.dim = check_positive_int(dim, "dim")
        self.hidden = tuple(check_positive_int(h, "hidden") for h in hidden)
        if not self.hidden:
            raise ValueError("hidden: expected at least one hidden width, got ()")
        self.out_dim = check_positive_int(out_dim or dim, "out_dim")
        self.activation = activation
        get_activation(activation)
        self._setup_conditioning(time_embed_dim, num_classes, time_scale)
        widths = (dim,) + self.hidden
        self.layers = [Dense(widths[i], widths[i + 1], activation=activation, init="he")
                       for i in range(len(self.hidden))]
        self.films = [FiLM(self.embed_dim, h) for h in self.hidden]
        self.out = Dense(self.hidden[-1], self.out_dim)

    def __repr__(self):
        return (f"MLPScoreNet(dim={self.dim}, hidden={self.hidden}, time_embed_dim={self.embed_dim}, "
                f"num_classes={self.num_classes}, out_dim={self.out_dim}, activation={self.activation!r}, "
                f"time_scale={self.time_scale})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        rs = rng.split(2 * len(self.layers) + 2)
        return {
            "cond": self._init_conditioning(rs[0], dtype),
            "layers": [layer.init(r, dtype) for layer, r in zip(self.layers, rs[1:])],
            "films": [f.init(r, dtype) for f, r in zip(self.films, rs[1 + len(self.layers):])],
            "out": self.out.init(rs[-1], dtype),
        }

    def apply(self, params, x, t, y=None):
        check_array(x, "x", ndim=2, last_dim=self.dim)
        n = x.shape[0]
        _check_times(t, n)
        e = self._embed(params["cond"], t, y, n)
        xp = namespace(x)
        h, pending = x, None
        for layer, film, p, pf in zip(self.layers, self.films, params["layers"], params["films"]):
            h = layer.apply(_fold_film(xp, p, pending), h)
            gamma, beta = film.modulation(pf, e)
            if gamma.shape[0] == 1 and n > 1:
                # one (gamma, beta) for the whole batch (a shared time, no labels): fold it into the next
                # layer, (h gamma + beta) W + b = h (gamma^T * W) + (beta W + b), instead of two passes over h
                pending = (gamma, beta)
            else:
                h, pending = film_modulate(h, gamma, beta), None
        return self.out.apply(_fold_film(xp, params["out"], pending), h)


def _fold_film(xp, p, pending):
    """Dense params {"W", "b"} with a pending FiLM (gamma, beta), each (1, d_in), folded in (or p as it is)."""
    if pending is None:
        return p
    gamma, beta = pending
    W = p["W"]
    b = xp.matmul(beta, W)[0, :]
    if p.get("b") is not None:
        b = b + p["b"]
    return {"W": xp.reshape(gamma, (-1, 1)) * W, "b": b}


class UNet(_Conditioning):
    """A small U-Net eps_theta(x, t, y) on NHWC images: levels of ResBlocks, stride-2 down, nearest up, skips.

    x (n, H, W, channels), t (n,) or (1,), y int (n,) or None -> (n, H, W, out_channels). H and W must be divisible
    by 2^(len(channel_mults) - 1) (8x8 with 2 or 3 levels, 28x28 with 2 or 3 levels).
    """

    def __init__(self, channels=1, *, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, time_embed_dim=64,
                 num_classes=None, out_channels=None, time_scale=1.0):
        self.channels = check_positive_int(channels, "channels")
        self.base_channels = check_positive_int(base_channels, "base_channels")
        self.channel_mults = tuple(check_positive_int(m, "channel_mults") for m in channel_mults)
        if not self.channel_mults:
            raise ValueError("channel_mults: expected at least one level, got ()")
        self.num_res_blocks = check_positive_int(num_res_blocks, "num_res_blocks")
        self.out_channels = check_positive_int(out_channels or channels, "out_channels")
        self._setup_conditioning(time_embed_dim, num_classes, time_scale)
        chans = [base_channels * m for m in self.channel_mults]
        E = self.embed_dim
        self.conv_in = Conv2d(channels, chans[0], 3)
        self.down, self.downsample, skips = [], [], []
        c = chans[0]
        for i, ch in enumerate(chans):
            blocks = []
            for _ in range(self.num_res_blocks):
                blocks.append(ResBlock(c, ch, E))
                c = ch
            self.down.append(blocks)
            skips.append(c)
            self.downsample.append(Conv2d(c, c, 3, stride=2) if i + 1 < len(chans) else None)
        self.mid = ResBlock(c, c, E)
        self.up, self.upsample = [], []
        for i in reversed(range(len(chans))):
            blocks = [ResBlock(c + skips[i], chans[i], E)]
            c = chans[i]
            for _ in range(self.num_res_blocks - 1):
                blocks.append(ResBlock(c, c, E))
            self.up.append(blocks)
            self.upsample.append(Conv2d(c, chans[i - 1], 3) if i > 0 else None)
            if i > 0:
                c = chans[i - 1]
        self.norm_out = LayerNorm(c)
        self.conv_out = Conv2d(c, self.out_channels, 3, init="zeros")

    def __repr__(self):
        return (f"UNet(channels={self.channels}, base_channels={self.base_channels}, "
                f"channel_mults={self.channel_mults}, num_res_blocks={self.num_res_blocks}, "
                f"time_embed_dim={self.embed_dim}, num_classes={self.num_classes}, "
                f"out_channels={self.out_channels}, time_scale={self.time_scale})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        count = 6 + 2 * len(self.down) + sum(len(b) for b in self.down) + sum(len(b) for b in self.up)
        r = iter(rng.split(count))

        def many(blocks):
            return [b.init(next(r), dtype) for b in blocks]

        return {
            "cond": self._init_conditioning(next(r), dtype),
            "conv_in": self.conv_in.init(next(r), dtype),
            "down": [many(blocks) for blocks in self.down],
            "downsample": [{} if d is None else d.init(next(r), dtype) for d in self.downsample],
            "mid": self.mid.init(next(r), dtype),
            "up": [many(blocks) for blocks in self.up],
            "upsample": [{} if u is None else u.init(next(r), dtype) for u in self.upsample],
            "norm_out": self.norm_out.init(next(r), dtype),
            "conv_out": self.conv_out.init(next(r), dtype),
        }

    def apply(self, params, x, t, y=None):
        check_array(x, "x", ndim=4, last_dim=self.channels)
        factor = 2 ** (len(self.channel_mults) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"x: expected H and W divisible by {factor} for {len(self.channel_mults)} levels, "
                             f"got shape {tuple(x.shape)}")
        n = x.shape[0]
        _check_times(t, n)
        xp = namespace(x, params)
        e = self._embed(params["cond"], t, y, n)
        h = self.conv_in.apply(params["conv_in"], x)
        skips = []
        for blocks, ps, down, pd in zip(self.down, params["down"], self.downsample, params["downsample"]):
            for block, p in zip(blocks, ps):
                h = block.apply(p, h, e)
            skips.append(h)
            if down is not None:
                h = down.apply(pd, h)
        h = self.mid.apply(params["mid"], h, e)
        for blocks, ps, up, pu in zip(self.up, params["up"], self.upsample, params["upsample"]):
            h = xp.concat([h, skips.pop()], axis=-1)
            for block, p in zip(blocks, ps):
                h = block.apply(p, h, e)
            if up is not None:
                h = up.apply(pu, upsample_nearest(h))
        silu = get_activation("silu")
        return self.conv_out.apply(params["conv_out"], silu(self.norm_out.apply(params["norm_out"], h)))


# ---------------------------------------------------------------------------------------------------
# the decoder network of a categorical decoder p(x_0 | x_1)


class LevelDecoder(Block):
    """g[n, d, k] = h_L(x_1)[n, d, k] + c[d, k]: logits over ``num_levels`` levels of every dimension d of x_0.

    h: ``depth`` same-padded ``kernel_size`` convs (``channels`` wide, silu) on x_1 seen as images of
    ``image_shape`` (H, W, C), then a 1x1 conv to C K; c (H W C, K) a learned bias per dimension and level
    (where a pixel's level tends to be). x_1 (n, H W C) flat or (n, H, W, C) -> g (n, H W C, K) or
    (n, H, W, C, K). The last conv and c start at zero, so a fresh decoder adds nothing: ``Diffusion``'s
    categorical decoder is then the exact posterior over the levels under a uniform prior.
    """

    def __init__(self, image_shape, num_levels, *, channels=32, depth=2, kernel_size=3):
        image_shape = tuple(image_shape)
        if len(image_shape) != 3:
            raise ValueError(f"image_shape: expected (H, W, C), got {image_shape!r}")
        self.image_shape = tuple(check_positive_int(v, "image_shape") for v in image_shape)
        self.num_levels = check_positive_int(num_levels, "num_levels")
        if self.num_levels < 2:
            raise ValueError(f"num_levels: expected at least 2 levels, got {num_levels!r}")
        self.channels = check_positive_int(channels, "channels")
        self.depth = check_positive_int(depth, "depth")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        c = self.image_shape[2]
        widths = (c,) + (self.channels,) * self.depth
        self.convs = [Conv2d(widths[i], widths[i + 1], self.kernel_size, activation="silu", init="he")
                      for i in range(self.depth)]
        self.out = Conv2d(self.channels, c * self.num_levels, 1, init="zeros")

    def __repr__(self):
        return (f"LevelDecoder(image_shape={self.image_shape}, num_levels={self.num_levels}, "
                f"channels={self.channels}, depth={self.depth}, kernel_size={self.kernel_size})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        rs = rng.split(self.depth + 1)
        H, W, C = self.image_shape
        return {"convs": [conv.init(r, dtype) for conv, r in zip(self.convs, rs)],
                "out": self.out.init(rs[-1], dtype),
                "bias": zeros(rs[-1], (H * W * C, self.num_levels), dtype)}

    def apply(self, params, x):
        H, W, C = self.image_shape
        D, K = H * W * C, self.num_levels
        flat = x.ndim == 2
        if flat:
            check_array(x, "x", ndim=2, last_dim=D)
        else:
            check_array(x, "x", ndim=4)
            if tuple(x.shape[1:]) != self.image_shape:
                raise ValueError(f"x: expected (n, {D}) or (n, {H}, {W}, {C}), got shape {tuple(x.shape)}")
        xp = namespace(x, params)
        n = x.shape[0]
        h = xp.reshape(x, (n, H, W, C))
        for conv, p in zip(self.convs, params["convs"]):
            h = conv.apply(p, h)
        g = xp.reshape(self.out.apply(params["out"], h), (n, D, K)) + params["bias"]
        return g if flat else xp.reshape(g, (n, H, W, C, K))
