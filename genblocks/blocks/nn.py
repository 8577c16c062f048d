"""Neural-network layers: Dense, MLP, MaskedDense, MADE, Conv2d, MaskedConv2d, LayerNorm, embeddings, FiLM, ResBlock.

Every layer is a :class:`~genblocks.blocks.base.Block`: ``__init__`` stores hyperparameters (and constant
masks), ``init(rng, dtype="float32")`` returns a plain dict/list of arrays, ``apply(params, ...)`` is pure.
Activations are given by name (see ``ACTIVATIONS``) or as a callable; named ones go through the fused
``xp.dense`` primitive on the numpy backend (one autograd node per layer with a hand-written VJP).

Initialisers are functions ``(rng, shape, dtype) -> array``: ``glorot``, ``he`` and ``zeros``.
"""

import math

from genblocks.backends import namespace, namespace_of, resolve_dtype, to_numpy
from genblocks.backends.activations import ACTIVATIONS, check_activation
from genblocks.blocks.base import Block, check_array, check_dtype
from genblocks.blocks.ops import get_activation
from genblocks.blocks.validate import check_positive_int

__all__ = [
    "ACTIVATIONS", "INITS", "glorot", "he", "zeros", "get_init", "Dense", "MLP", "MaskedDense",
    "made_degrees", "made_masks", "MADE", "conv_pads", "im2col", "Conv2d", "pixelcnn_mask", "MaskedConv2d", "LayerNorm",
    "SinusoidalEmbedding", "ResidualMLPBlock", "upsample_nearest", "FiLM", "film_modulate", "ResBlock",
]


# ---------------------------------------------------------------------------------------------------
# Initialisers


def _fans(shape):
    """(fan_in, fan_out) of a dense (d_in, d_out) or conv (kh, kw, c_in, c_out) weight shape."""
    if len(shape) < 2:
        return shape[0] if shape else 1, shape[0] if shape else 1
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1]


def glorot(rng, shape, dtype="float32"):
    """W ~ U(-a, a) with a = sqrt(6 / (fan_in + fan_out)) (Glorot & Bengio 2010); array of ``shape``."""
    fan_in, fan_out = _fans(tuple(shape))
    limit = math.sqrt(6.0 / max(fan_in + fan_out, 1))
    return rng.uniform(shape, dtype=check_dtype(dtype), low=-limit, high=limit)


def he(rng, shape, dtype="float32"):
    """W ~ N(0, 2 / fan_in) (He et al. 2015, for ReLU-like activations); array of ``shape``."""
    fan_in, _ = _fans(tuple(shape))
    return rng.normal(shape, dtype=check_dtype(dtype), scale=math.sqrt(2.0 / max(fan_in, 1)))


def zeros(rng, shape, dtype="float32"):
    """W = 0 on ``rng``'s backend; array of ``shape`` (``rng`` only picks the backend)."""
    xp = namespace_of(rng.backend)
    dtype = check_dtype(dtype)
    return xp.zeros(tuple(shape), dtype=getattr(xp, dtype))


INITS = {"glorot": glorot, "he": he, "zeros": zeros}


def get_init(init):
    """An initialiser by name (one of ``INITS``) or a callable ``(rng, shape, dtype)``; ValueError otherwise."""
    if callable(init):
        return init
    if init not in INITS:
        raise ValueError(f"init: expected one of {tuple(INITS)} or a callable (rng, shape, dtype), got {init!r}")
    return INITS[init]


def _host_xp():
    """The numpy-backend namespace, used to build host constants (masks, degrees)."""
    return namespace_of("numpy")


def _check_activation_arg(activation, name="activation"):
    """None, an activation name, or a callable; ValueError listing the names otherwise."""
    if activation is None or callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: expected one of {ACTIVATIONS}, None or a callable, got {activation!r}")
    return check_activation(activation)


def _dense(xp, x, W, b, activation):
    """activation(x @ W + b): fused for named activations, composed for callables."""
    if callable(activation):
        return activation(xp.dense(x, W, b, None))
    return xp.dense(x, W, b, activation)


class _ConstantCache:
    """A host constant (mask) converted once per (backend, dtype, device) it is used on."""

    def __init__(self, host):
        self.host = host
        self._converted = {}

    def on(self, xp, ref):
        key = (xp.backend_name, str(ref.dtype), str(xp.device_of(ref)))
        out = self._converted.get(key)
        if out is None:
            out = self._converted[key] = xp.asarray(self.host, dtype=ref.dtype, device=xp.device_of(ref))
        return out


# ---------------------------------------------------------------------------------------------------
# Dense layers


class Dense(Block):
    """y = activation(x @ W + b).

    x (..., d_in) -> y (..., d_out); params {"W": (d_in, d_out), "b": (d_out,)} ("b" absent if bias=False).
    """

    def __init__(self, d_in, d_out, *, activation=None, init="glorot", bias=True):
        self.d_in = check_positive_int(d_in, "d_in")
        self.d_out = check_positive_int(d_out, "d_out")
        self.activation = _check_activation_arg(activation)
        get_init(init)
        self.init_scheme = init
        self.bias = bool(bias)

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        init = getattr(self.init_scheme, "__name__", self.init_scheme)
        return (f"Dense(d_in={self.d_in}, d_out={self.d_out}, activation={act!r}, init={init!r}, "
                f"bias={self.bias})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        params = {"W": get_init(self.init_scheme)(rng, (self.d_in, self.d_out), dtype)}
        if self.bias:
            params["b"] = zeros(rng, (self.d_out,), dtype)
        return params

    def apply(self, params, x):
        check_array(x, "x", min_ndim=1, last_dim=self.d_in)
        xp = namespace(x, params)
        return _dense(xp, x, params["W"], params.get("b"), self.activation)


class MLP(Block):
    """h_0 = x, h_k = act(h_{k-1} @ W_k + b_k), output final_activation(h_{L-1} @ W_L + b_L).

    widths = (d_in, h_1, ..., d_out): x (..., d_in) -> (..., d_out); params = list of Dense params.
    """

    def __init__(self, widths, *, activation="relu", final_activation=None, init="he"):
        widths = tuple(widths)
        if len(widths) < 2:
            raise ValueError(f"widths: expected (d_in, ..., d_out) with at least 2 entries, got {widths!r}")
        for i, w in enumerate(widths):
            check_positive_int(w, f"widths[{i}]")
        self.widths = widths
        self.activation = _check_activation_arg(activation)
        self.final_activation = _check_activation_arg(final_activation, "final_activation")
        get_init(init)
        self.init_scheme = init
        n = len(widths) - 1
        self.layers = [
            Dense(widths[i], widths[i + 1], activation=self.activation if i < n - 1 else self.final_activation,
                  init=init)
            for i in range(n)
        ]

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        final = getattr(self.final_activation, "__name__", self.final_activation)
        init = getattr(self.init_scheme, "__name__", self.init_scheme)
        return f"MLP(widths={self.widths}, activation={act!r}, final_activation={final!r}, init={init!r})"

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        return [layer.init(r, dtype) for layer, r in zip(self.layers, rng.split(len(self.layers)))]

    def apply(self, params, x):
        check_array(x, "x", min_ndim=1, last_dim=self.widths[0])
        if len(params) != len(self.layers):
            raise ValueError(f"params: expected a list of {len(self.layers)} layer dicts, got {len(params)}")
        xp = namespace(x, params)
        h = x
        for layer, p in zip(self.layers, params):
            h = _dense(xp, h, p["W"], p.get("b"), layer.activation)
        return h


def _host_mask(mask, name="mask"):
    xp = _host_xp()
    m = xp.asarray(to_numpy(mask))
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d (d_in, d_out) 0/1 array, got shape {tuple(m.shape)}")
    if not bool(xp.all(xp.logical_or(m == 0, m == 1))):
        raise ValueError(f"{name}: expected only 0/1 entries")
    return xp.astype(m, xp.float64)


class MaskedDense(Block):
    """y = activation(x @ (W * M) + b) with a constant 0/1 mask M (d_in, d_out).

    x (..., d_in) -> (..., d_out); params {"W": (d_in, d_out), "b": (d_out,)}; the mask is not a parameter.
    """

    def __init__(self, mask, *, activation=None, init="glorot"):
        self._mask = _ConstantCache(_host_mask(mask))
        self.d_in, self.d_out = (int(s) for s in self._mask.host.shape)
        self.activation = _check_activation_arg(activation)
        get_init(init)
        self.init_scheme = init

    @property
    def mask(self):
        """The host 0/1 mask (d_in, d_out), float64."""
        return self._mask.host

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        return f"MaskedDense(d_in={self.d_in}, d_out={self.d_out}, activation={act!r})"

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        W = get_init(self.init_scheme)(rng, (self.d_in, self.d_out), dtype)
        return {"W": W, "b": zeros(rng, (self.d_out,), dtype)}

    def apply(self, params, x):
        check_array(x, "x", min_ndim=1, last_dim=self.d_in)
        xp = namespace(x, params)
        W = params["W"]
        return _dense(xp, x, W * self._mask.on(xp, W), params.get("b"), self.activation)


# ---------------------------------------------------------------------------------------------------
# MADE (Germain et al. 2015)


def _check_order(dim, order):
    if order is None:
        return list(range(dim))
    host = to_numpy(order)
    try:
        order = [int(o) for o in host]
    except TypeError:
        raise ValueError(f"order: expected a permutation of range({dim}), got {order!r}") from None
    if sorted(order) != list(range(dim)):
        raise ValueError(f"order: expected a permutation of range({dim}), got {order!r}")
    return order


def made_degrees(dim, hidden_widths, *, order=None):
    """MADE degrees: input j gets order(j) + 1; hidden unit k of each layer gets (k mod (dim - 1)) + 1.

    Returns a list of tuples of ints: [input degrees (dim,), hidden layer 1 degrees, ...]. A unit of degree
    d may see inputs of degree <= d, so an output of degree d sees only inputs of degree < d.
    """
    check_positive_int(dim, "dim")
    hidden_widths = tuple(hidden_widths)
    for i, w in enumerate(hidden_widths):
        check_positive_int(w, f"hidden_widths[{i}]")
    order = _check_order(dim, order)
    degrees = [tuple(o + 1 for o in order)]
    span = max(dim - 1, 1)
    for width in hidden_widths:
        degrees.append(tuple(k % span + 1 for k in range(width)))
    return degrees


def made_masks(dim, hidden_widths, *, order=None, out_multiplier=1):
    """MADE masks M_l[j, k] = [deg_l(k) >= deg_{l-1}(j)] (hidden), M_out[j, i] = [deg_out(i) > deg_L(j)].

    Returns host float arrays [(dim, h_1), (h_1, h_2), ..., (h_L, dim * out_multiplier)]; output unit
    i * out_multiplier + m belongs to variable i (degree order(i) + 1).
    """
    check_positive_int(out_multiplier, "out_multiplier")
    xp = _host_xp()
    degrees = made_degrees(dim, hidden_widths, order=order)
    masks = []
    for prev, cur in zip(degrees[:-1], degrees[1:]):
        d_prev = xp.asarray(prev)[:, None]
        d_cur = xp.asarray(cur)[None, :]
        masks.append(xp.astype(d_cur >= d_prev, xp.float64))
    out_degrees = xp.repeat(xp.asarray(degrees[0]), out_multiplier)
    masks.append(xp.astype(out_degrees[None, :] > xp.asarray(degrees[-1])[:, None], xp.float64))
    return masks


class MADE(Block):
    """Masked autoencoder: out[..., i, :] = f_i(x[..., j] for order(j) < order(i), context).

    x (..., dim), context (..., context_dim) or None -> (..., dim, out_multiplier).
    params {"layers": [{"W", "b"}, ...]}: MaskedDense params, input layer first. The context enters as extra
    input columns of the first hidden layer and of the output layer with all-ones mask rows, so every
    hidden unit and every output (even the first variable's) depends on it.
    """

    def __init__(self, dim, hidden_widths, *, out_multiplier=1, context_dim=0, activation="relu", order=None):
        self.dim = check_positive_int(dim, "dim")
        self.hidden_widths = tuple(hidden_widths)
        self.out_multiplier = check_positive_int(out_multiplier, "out_multiplier")
        if isinstance(context_dim, bool) or not isinstance(context_dim, int) or context_dim < 0:
            raise ValueError(f"context_dim: expected a non-negative int, got {context_dim!r}")
        self.context_dim = context_dim
        self.activation = _check_activation_arg(activation)
        self.order = tuple(_check_order(dim, order))
        masks = made_masks(dim, self.hidden_widths, order=self.order, out_multiplier=out_multiplier)
        n = len(masks)
        if context_dim:
            xp = _host_xp()
            ones = lambda m: xp.ones((context_dim, m.shape[1]), dtype=xp.float64)
            masks[0] = xp.concat([masks[0], ones(masks[0])], axis=0)
            if n > 1:
                masks[-1] = xp.concat([masks[-1], ones(masks[-1])], axis=0)
        self.layers = [
            MaskedDense(m, activation=self.activation if i < n - 1 else None) for i, m in enumerate(masks)
        ]

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        order = "" if self.order == tuple(range(self.dim)) else f", order={self.order}"
        return (f"MADE(dim={self.dim}, hidden_widths={self.hidden_widths}, out_multiplier={self.out_multiplier}, "
                f"context_dim={self.context_dim}, activation={act!r}{order})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        rngs = rng.split(len(self.layers))
        return {"layers": [layer.init(r, dtype) for layer, r in zip(self.layers, rngs)]}

    def apply(self, params, x, context=None):
        check_array(x, "x", min_ndim=1, last_dim=self.dim)
        if self.context_dim and context is None:
            raise ValueError(f"context: this MADE expects a context of size {self.context_dim}, got None")
        if not self.context_dim and context is not None:
            raise ValueError("context: this MADE was built with context_dim=0, but a context was given")
        xp = namespace(x, params, context)
        if context is not None:
            check_array(context, "context", min_ndim=1, last_dim=self.context_dim)
            batch = _broadcast_batch(x.shape[:-1], context.shape[:-1])
            x = xp.broadcast_to(x, batch + (self.dim,))
            context = xp.broadcast_to(context, batch + (self.context_dim,))
        h = x
        last = len(self.layers) - 1
        for i, (layer, p) in enumerate(zip(self.layers, params["layers"])):
            if context is not None and (i == 0 or i == last):
                h = xp.concat([h, context], axis=-1)
            W = p["W"] * layer._mask.on(xp, p["W"])
            h = _dense(xp, h, W, p["b"], layer.activation)
        return xp.reshape(h, tuple(h.shape[:-1]) + (self.dim, self.out_multiplier))


def _broadcast_batch(a, b):
    """The broadcast of two batch shapes; ValueError naming x and context when they do not broadcast."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + a, (1,) * (n - len(b)) + b
    out = []
    for i, j in zip(a, b):
        if i != j and 1 not in (i, j):
            raise ValueError(f"context: batch shape {b} does not broadcast with x's batch shape {a}")
        out.append(max(i, j))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Convolutions (NHWC: im2col + one matmul, one primitive with its own VJP on numpy)


def _pair(value, name):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(value)
    if len(value) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    for v in value:
        check_positive_int(v, name)
    return value


def _same_pads(size, k, s):
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def conv_pads(x_shape, kernel_size, stride, padding):
    """((top, bottom), (left, right)) zeros for "same" (H_out = ceil(H / s)), "valid", (ph, pw) padding, or
    explicit ((top, bottom), (left, right)) (e.g. a causal conv's rows above only)."""
    if padding == "same":
        return _same_pads(x_shape[1], kernel_size[0], stride[0]), _same_pads(x_shape[2], kernel_size[1], stride[1])
    if padding == "valid":
        return (0, 0), (0, 0)
    if _is_explicit_pads(padding):
        return tuple(tuple(p) for p in padding)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    return (ph, ph), (pw, pw)


def _is_explicit_pads(padding):
    return (isinstance(padding, (tuple, list)) and len(padding) == 2
            and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding))


def _check_padding(padding):
    """"same", "valid", (ph, pw) from an int or a pair, or ((top, bottom), (left, right)); ValueError otherwise."""
    if padding in ("same", "valid"):
        return padding
    if _is_explicit_pads(padding):
        flat = [p for pair in padding for p in pair]
        if all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in flat):
            return tuple(tuple(pair) for pair in padding)
    else:
        if isinstance(padding, int) and not isinstance(padding, bool):
            padding = (padding, padding)
        if (isinstance(padding, tuple) and len(padding) == 2
                and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding)):
            return padding
    raise ValueError(f"padding: expected 'same', 'valid', non-negative int(s) or ((top, bottom), (left, right)), "
                     f"got {padding!r}")


def im2col(x, kernel_size, *, stride=(1, 1), padding="same"):
    """Patches P[n, i, j, (a, b, c)] = x_pad[n, i*s_h + a, j*s_w + b, c].

    x (N, H, W, C) -> (N, H_out, W_out, kh * kw * C), ordered (kh, kw, C) to match a (kh, kw, C, C_out) kernel.
    One autograd primitive on numpy (``xp.im2col``), slices and a stack elsewhere.
    """
    xp = namespace(x)
    kernel_size, stride = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    return xp.im2col(x, kernel_size, stride, conv_pads(x.shape, kernel_size, stride, padding))


class Conv2d(Block):
    """y[n, i, j, :] = sum_{a, b, c} x_pad[n, i s + a, j s + b, c] W[a, b, c, :] + b (cross-correlation).

    x (N, H, W, c_in) -> (N, H_out, W_out, c_out); params {"W": (kh, kw, c_in, c_out), "b": (c_out,)}.
    padding: "same" (H_out = ceil(H / stride)), "valid", an int / (ph, pw) of zeros on each side, or explicit
    ((top, bottom), (left, right)) zeros (a causal conv pads above and not below).
    mask: an optional constant 0/1 array broadcasting to (kh, kw, c_in, c_out): the kernel used is W * mask
    (e.g. gated PixelCNN's channel masks); not a parameter.
    """

    def __init__(self, c_in, c_out, kernel_size, *, stride=1, padding="same", activation=None, init="glorot",
                 mask=None):
        self.c_in = check_positive_int(c_in, "c_in")
        self.c_out = check_positive_int(c_out, "c_out")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _check_padding(padding)
        self.activation = _check_activation_arg(activation)
        get_init(init)
        self.init_scheme = init
        self._kernel_mask = None if mask is None else _ConstantCache(_host_kernel_mask(mask, self))

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        return (f"{type(self).__name__}(c_in={self.c_in}, c_out={self.c_out}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding!r}, activation={act!r})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        kh, kw = self.kernel_size
        W = get_init(self.init_scheme)(rng, (kh, kw, self.c_in, self.c_out), dtype)
        return {"W": W, "b": zeros(rng, (self.c_out,), dtype)}

    def _kernel(self, xp, W):
        return W if self._kernel_mask is None else W * self._kernel_mask.on(xp, W)

    def apply(self, params, x, *, padding=None):
        """The conv of x (N, H, W, c_in); ``padding`` overrides the layer's own for this call (e.g. a
        sampler that feeds pre-padded windows uses "valid")."""
        check_array(x, "x", ndim=4, last_dim=self.c_in)
        xp = namespace(x, params)
        padding = self.padding if padding is None else _check_padding(padding)
        pads = conv_pads(x.shape, self.kernel_size, self.stride, padding)
        W, act = self._kernel(xp, params["W"]), self.activation
        if callable(act):
            return act(xp.conv2d(x, W, params["b"], self.stride, pads, None))
        return xp.conv2d(x, W, params["b"], self.stride, pads, act)


def _host_kernel_mask(mask, conv):
    """A 0/1 host mask broadcasting to the conv's (kh, kw, c_in, c_out) kernel; ValueError naming ``mask``."""
    xp = _host_xp()
    m = xp.asarray(to_numpy(mask) if hasattr(mask, "shape") else mask, dtype=xp.float64)
    full = tuple(conv.kernel_size) + (conv.c_in, conv.c_out)
    try:
        xp.broadcast_to(m, full)
    except ValueError:
        raise ValueError(f"mask: expected a 0/1 array broadcasting to the kernel shape {full}, got shape "
                         f"{tuple(m.shape)}") from None
    if m.ndim > 4 or not bool(xp.all(xp.logical_or(m == 0, m == 1))):
        raise ValueError(f"mask: expected only 0/1 entries broadcasting to {full}")
    return m


def pixelcnn_mask(kernel_size, mask_type):
    """M[a, b] = 1 for rows above the centre and, on the centre row, columns left of it (and the centre for B).

    Returns a host (kh, kw, 1, 1) float array that broadcasts over (c_in, c_out).
    """
    kh, kw = kernel_size
    xp = _host_xp()
    rows = xp.arange(kh)[:, None]
    cols = xp.arange(kw)[None, :]
    ci, cj = kh // 2, kw // 2
    above = rows < ci
    left = xp.logical_and(rows == ci, cols < cj if mask_type == "A" else cols <= cj)
    return xp.reshape(xp.astype(xp.logical_or(above, left), xp.float64), (kh, kw, 1, 1))


class MaskedConv2d(Conv2d):
    """PixelCNN convolution: Conv2d with W * M, M the causal mask (type "A" hides the centre, "B" keeps it).

    x (N, H, W, c_in) -> (N, H, W, c_out) ("same" padding, stride 1, odd kernel). Output pixel (i, j) sees
    input pixels strictly before it in raster order (A) or up to and including it (B). Channels are not
    split into colour groups: every input channel of a visible pixel is visible.
    """

    def __init__(self, c_in, c_out, kernel_size, *, mask_type="A", activation=None, init="glorot"):
        super().__init__(c_in, c_out, kernel_size, stride=1, padding="same", activation=activation, init=init)
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type: expected one of ('A', 'B'), got {mask_type!r}")
        if any(k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size: expected odd sizes for a centred causal mask, got {self.kernel_size}")
        self.mask_type = mask_type
        self._mask = _ConstantCache(pixelcnn_mask(self.kernel_size, mask_type))

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        return (f"MaskedConv2d(c_in={self.c_in}, c_out={self.c_out}, kernel_size={self.kernel_size}, "
                f"mask_type={self.mask_type!r}, activation={act!r})")

    def _kernel(self, xp, W):
        return W * self._mask.on(xp, W)


# ---------------------------------------------------------------------------------------------------
# Normalisation, embeddings, residual blocks


class LayerNorm(Block):
    """y = (x - mean(x)) / sqrt(var(x) + eps) * scale + shift over the last axis.

    x (..., dim) -> (..., dim); params {"scale": ones (dim,), "shift": zeros (dim,)}.
    """

    def __init__(self, dim, *, eps=1e-5):
        self.dim = check_positive_int(dim, "dim")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps: expected a positive float, got {eps!r}")
        self.eps = float(eps)

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        z = zeros(rng, (self.dim,), dtype)
        return {"scale": z + 1.0, "shift": z}

    def apply(self, params, x):
        check_array(x, "x", min_ndim=1, last_dim=self.dim)
        xp = namespace(x, params)
        centred = x - xp.mean(x, axis=-1, keepdims=True)
        var = xp.mean(centred * centred, axis=-1, keepdims=True)
        return centred / xp.sqrt(var + self.eps) * params["scale"] + params["shift"]


class SinusoidalEmbedding(Block):
    """e(t) = [cos(t w_0), ..., cos(t w_{h-1}), sin(t w_0), ..., sin(t w_{h-1})], w_k = max_period^(-k/h).

    t (...,) -> (..., dim) with h = dim // 2 (an odd dim gets a trailing zero). No params. Integer t gives
    float32; floating t keeps its dtype.
    """

    def __init__(self, dim, *, max_period=10000.0):
        self.dim = check_positive_int(dim, "dim")
        if not (isinstance(max_period, (int, float)) and max_period > 1):
            raise ValueError(f"max_period: expected a float > 1, got {max_period!r}")
        self.max_period = float(max_period)
        half = self.dim // 2
        self._freqs = _ConstantCache([math.exp(-math.log(self.max_period) * k / max(half, 1)) for k in range(half)])

    def init(self, rng, dtype="float32"):
        check_dtype(dtype)
        return {}

    def apply(self, params, t):
        if getattr(t, "shape", None) is None:
            raise TypeError(f"t: expected an array of times, got {type(t).__name__}")
        xp = namespace(t, params)
        if not xp.isdtype(t.dtype, "real floating"):
            t = xp.astype(t, xp.float32)
        freqs = self._freqs.on(xp, t)  # computed once on the host, converted once per backend and dtype
        args = xp.expand_dims(t, axis=-1) * freqs
        parts = [xp.cos(args), xp.sin(args)]
        if self.dim % 2:
            parts.append(xp.zeros(tuple(t.shape) + (1,), dtype=t.dtype, device=xp.device_of(t)))
        return xp.concat(parts, axis=-1)


class ResidualMLPBlock(Block):
    """y = x + W_2 act(LayerNorm(x) W_1 + b_1) + b_2.

    x (..., dim) -> (..., dim); params {"norm": LayerNorm params, "mlp": [Dense params, Dense params]}.
    """

    def __init__(self, dim, hidden, *, activation="silu"):
        self.dim = check_positive_int(dim, "dim")
        self.hidden = check_positive_int(hidden, "hidden")
        self.activation = _check_activation_arg(activation)
        self.norm = LayerNorm(dim)
        self.mlp = MLP((dim, hidden, dim), activation=self.activation)

    def __repr__(self):
        act = getattr(self.activation, "__name__", self.activation)
        return f"ResidualMLPBlock(dim={self.dim}, hidden={self.hidden}, activation={act!r})"

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        r1, r2 = rng.split(2)
        return {"norm": self.norm.init(r1, dtype), "mlp": self.mlp.init(r2, dtype)}

    def apply(self, params, x):
        check_array(x, "x", min_ndim=1, last_dim=self.dim)
        return x + self.mlp.apply(params["mlp"], self.norm.apply(params["norm"], x))


def upsample_nearest(x):
    """Nearest-neighbour x2 up-sampling of NHWC images: (n, H, W, c) -> (n, 2H, 2W, c)."""
    xp = namespace(x)
    n, H, W, c = x.shape
    y = xp.broadcast_to(xp.reshape(x, (n, H, 1, W, 1, c)), (n, H, 2, W, 2, c))
    return xp.reshape(y, (n, 2 * H, 2 * W, c))


# ---------------------------------------------------------------------------------------------------
# Conditioning layers (FiLM) and the residual conv block of the U-Net


class FiLM(Block):
    """h gamma + beta with (gamma, beta) = split(W e + b): one matmul gives both halves.

    W (embed_dim, 2 channels) starts at zero and b at (1, ..., 1, 0, ..., 0), so the modulation starts as
    the identity. e (n, embed_dim); ``apply(params, h, e)`` modulates h (n, ..., channels), same shape out.
    """

    def __init__(self, embed_dim, channels):
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.channels = check_positive_int(channels, "channels")
        self.proj = Dense(embed_dim, 2 * channels, init="zeros")

    def init(self, rng, dtype="float32"):
        p = self.proj.init(rng, dtype)
        xp, c = rng.xp, self.channels
        dt = resolve_dtype(xp, dtype)
        p["b"] = xp.concat([xp.ones((c,), dtype=dt), xp.zeros((c,), dtype=dt)])
        return p

    def modulation(self, params, e):
        """(gamma, beta), each (n, channels), or (1, channels) for a one-row e."""
        gb = self.proj.apply(params, e)
        c = self.channels
        return gb[:, :c], gb[:, c:]

    def apply(self, params, h, e):
        return film_modulate(h, *self.modulation(params, e))


def film_modulate(h, gamma, beta):
    """h gamma + beta with gamma, beta (n, c) or (1, c) broadcast over h (n, ..., c)'s other axes."""
    xp = namespace(h, gamma, beta)
    c = h.shape[-1]
    extra = h.ndim - 2
    if extra:
        shape = (gamma.shape[0],) + (1,) * extra + (c,)
        gamma, beta = xp.reshape(gamma, shape), xp.reshape(beta, shape)
    return h * gamma + beta


class ResBlock(Block):
    """y = skip(x) + conv_2(silu(norm_2(FiLM(conv_1(silu(norm_1(x))), e)))) on NHWC images.

    x (n, H, W, c_in), e (n, embed_dim) -> (n, H, W, c_out). Norms are over channels (per pixel).
    """

    def __init__(self, c_in, c_out, embed_dim):
        self.c_in = check_positive_int(c_in, "c_in")
        self.c_out = check_positive_int(c_out, "c_out")
        self.embed_dim = check_positive_int(embed_dim, "embed_dim")
        self.norm1, self.norm2 = LayerNorm(c_in), LayerNorm(c_out)
        self.conv1 = Conv2d(c_in, c_out, 3, init="he")
        self.conv2 = Conv2d(c_out, c_out, 3, init="zeros")
        self.film = FiLM(embed_dim, c_out)
        self.skip = None if c_in == c_out else Conv2d(c_in, c_out, 1)

    def init(self, rng, dtype="float32"):
        rs = rng.split(6)
        p = {"norm1": self.norm1.init(rs[0], dtype), "conv1": self.conv1.init(rs[1], dtype),
             "film": self.film.init(rs[2], dtype), "norm2": self.norm2.init(rs[3], dtype),
             "conv2": self.conv2.init(rs[4], dtype)}
        if self.skip is not None:
            p["skip"] = self.skip.init(rs[5], dtype)
        return p

    def apply(self, params, x, e):
        silu = get_activation("silu")
        h = self.conv1.apply(params["conv1"], silu(self.norm1.apply(params["norm1"], x)))
        h = self.film.apply(params["film"], h, e)
        h = self.conv2.apply(params["conv2"], silu(self.norm2.apply(params["norm2"], h)))
        skip = x if self.skip is None else self.skip.apply(params["skip"], x)
        return skip + h
