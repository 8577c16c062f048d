"""Hot-path primitives, one call on every backend: ``dense``, ``conv2d``, ``im2col``, ``log_softmax_take``,
``gated_tanh``, ``normal_rsample_kl``, ``elbo_loss`` and ``adam_leaf``.

``dense(x, W, b, activation)``: y = activation(x @ W + b). On the numpy backend it is a single autograd
primitive with a hand-written VJP. The forward pass runs in plain numpy, in place where the buffers are
its own; the backward pass takes the activation's derivative from the forward output (relu,
leaky_relu, tanh, sigmoid, softplus) or from the pre-activation kept by the forward pass (silu, gelu),
so x @ W is never recomputed, and computes dW before dx (measured faster: dz is still in cache).
The VJP has two paths: plain numpy for plain arrays, and autograd.numpy when anything it touches is
traced (gradients of gradients: gradient penalties, sliced score matching), so higher-order
derivatives through ``dense`` are correct too. Untraced calls skip autograd altogether.

``im2col(x, kernel_size, stride, pads)``: the patches of a 2-D convolution (NHWC). On numpy a pair of
primitives, im2col (one strided copy) and its adjoint col2im (kh * kw strided adds), each the other's
VJP; measured 7x faster forward and a 4x faster conv gradient than slicing and stacking under autograd
(3x3 conv, 64x16x16x32 float32, one thread).

``conv2d(x, W, b, stride, pads, activation)``: y = activation(im2col(x) @ reshape(W, (kh kw c_in, c_out)) + b),
an NHWC convolution with explicit ((top, bottom), (left, right)) zero pads. On numpy one primitive that owns its
VJP: dW = cols^T dz and db = sum dz, and dx as a correlation of dz with the flipped kernel, per stride phase (one
at stride 1), in place of dz @ W^T and col2im (measured 2x faster, 64 x 14 x 14 x 32 -> 32, 3x3, float32, one
thread). The patches go through BLAS in blocks of images, in reused per-thread scratch buffers, and are built
again for dW rather than kept: no batch-sized patch matrix is allocated or held (a training step of
``benchmarks/bench_conv.py`` at 28x28, one thread: 74 ms with whole-batch patches kept for the VJP, about 3500
page faults per step on freshly allocated memory; 50 ms and no faults in blocks).
Gradients of gradients go through the composed im2col and dense primitives.

``log_softmax_take(logits, index)``: logits[..., index] - logsumexp(logits), the categorical
log-likelihood. On numpy one primitive whose forward keeps exp(logits - max) for the VJP,
g (onehot(index) - softmax(logits)), written into one buffer; composed under autograd it is a dozen nodes
with (..., K) intermediates and a onehot mask (measured, 100 x 64 x 17 float32, one thread: 0.85 ms
against 2.1 ms forward, 1.3 ms against 26 ms forward and backward).

``gated_tanh(a)``: tanh(a[..., :F]) * sigmoid(a[..., F:]), PixelCNN's gate. On numpy one primitive that
keeps both halves for its VJP; composed under autograd it is two slices, two activations and a product,
each a node with its own buffers.

``adam_leaf(p, g, m, v, ...)``: one leaf of ``genblocks.train.optim.adam``'s update, three fresh arrays. On
numpy ufuncs with ``out=`` and ``reciprocal`` on plain arrays: the same operations, so the same bits, as the
in-place operators of the generic form (measured 25% faster Adam update on the VAE benchmark's 440k float32
parameters, one thread).

``normal_rsample_kl(h, eps)``: a VAE's reparameterised draws mu + exp(log sigma) eps and KL(N(mu, sigma^2) ||
N(0, 1)) per dimension from the encoder's output h = (mu, log sigma). On numpy one primitive (both results
stacked in one array, then two slices) in place of twelve nodes; its VJP adds up the same terms in the same
order as theirs, so the same bits. ``elbo_loss(log_px, kl_dims, beta)``: the loss -mean log p(x | z) + beta mean
sum KL from them, one primitive in place of seven nodes, again the same operations.

Elsewhere (strict, cupy) all eight are the same formulas written with the backend's own array-API calls.

``reuse_buffers()``: inside this context, ``dense`` on plain numpy arrays takes its output and its silu
temporary from a per-thread pool of arrays that nothing else references any more, instead of fresh memory. A
sampling loop frees every large array of its network at the end of each step; glibc then gives the top of its
heap back to the system and the next step faults it in again, page by page (measured on the DDIM-50
checkerboard benchmark, 1000 samples: 218 faults per step, and about 20% of the loop's time on a 2-core VM).
The diffusion samplers enter it for their loop (``fast=True``, the default); values are the same bits.
``conv2d``'s outputs stay out of it (its silu temporary is pooled): with the U-Net's conv outputs pooled and
its norms, sums and skips still fresh, the faults per forward tripled (3042 -> 9829 at 256 x 8 x 8, one
thread), glibc reacting to what the pool holds; as it is, the U-Net's faults and time are unchanged. For
the same reason training does not use it: around the 64-512-512-64 MLP step of ``bench_train_step.py``
(autograd's nodes and Adam's arrays stay fresh) it measured 2.4x the faults and 9% more time.
"""

import contextlib
import math
import sys
import threading

import autograd.numpy as anp
import numpy as onp
from autograd.extend import defvjp, defvjp_argnums, primitive
from autograd.tracer import Box

from .activations import ACTIVATIONS, LEAKY_SLOPE, apply_activation, check_activation  # noqa: F401 (re-exported)
from .activations import GELU_A as _GELU_A
from .activations import GELU_C as _GELU_C
from .differentiable import astype as _astype
from .differentiable import count, summed_shape, unbroadcast

_GELU_CLIP = 10.0  # |z| beyond which gelu'(z) is 0 or 1 in float64 (avoids inf * 0 for huge z)
# activations whose derivative needs the pre-activation z (the others get it from the output y)
_NEEDS_Z = ("silu", "gelu")


# ---------------------------------------------------------------------------------------------------
# Reused buffers for loops of forward passes


_pool = threading.local()  # .arrays: {(shape, dtype): [arrays]} while reuse_buffers() is active in this thread
_POOL_PER_KEY = 16  # arrays kept per (shape, dtype); beyond, a request that finds none free gets fresh memory
_POOL_MIN_BYTES = 1 << 16  # smaller arrays come from malloc's free lists, never faulted in afresh: not pooled


def _first_free(arrays, refs):
    """The first array of ``arrays`` with exactly ``refs`` references, or None."""
    for a in arrays:
        if sys.getrefcount(a) == refs:
            return a
    return None


def _free_refs():
    """The count ``_first_free`` sees for an array held by its list alone, or None where one more holder does
    not show as exactly one more reference (then nothing is ever reused: reuse_buffers() does nothing).
    CPython with a GIL only: elsewhere a reference count is no proof that nobody holds the array."""
    if sys.implementation.name != "cpython" or not getattr(sys, "_is_gil_enabled", lambda: True)():
        return None
    arrays = [onp.empty(1)]
    free = next((k for k in range(1, 16) if _first_free(arrays, k) is not None), None)
    holder = arrays[0]
    if free is None or _first_free(arrays, free) is not None or _first_free(arrays, free + 1) is not holder:
        return None
    return free


_FREE_REFS = _free_refs()


@contextlib.contextmanager
def reuse_buffers():
    """``with reuse_buffers(): ...``: numpy ``dense`` outputs recycled within this thread.

    An array of the pool is handed out again only when nothing but the pool references it (no variable, no
    view, no autograd node: CPython's reference count says so), so what a caller still holds is never
    overwritten. The pool lives until the outermost ``with`` ends, so it keeps about the largest set of
    arrays that were alive at once. Nests; other threads are unaffected.
    """
    outer = getattr(_pool, "arrays", None) is None
    if outer:
        _pool.arrays = {}
    try:
        yield
    finally:
        if outer:
            _pool.arrays = None


def _pooled(shape, *operands):
    """An uninitialised array of ``shape`` in the result dtype of ``operands``, from this thread's pool inside
    reuse_buffers() (64 kB or more), else None (allocate afresh). The dtype is worked out only inside."""
    arrays = getattr(_pool, "arrays", None)
    if arrays is None or _FREE_REFS is None:
        return None
    dtype = onp.result_type(*operands)
    if math.prod(shape) * dtype.itemsize < _POOL_MIN_BYTES:
        return None
    key = (shape, dtype)
    kept = arrays.setdefault(key, [])
    buf = _first_free(kept, _FREE_REFS)
    if buf is None and len(kept) < _POOL_PER_KEY:
        buf = onp.empty(shape, dtype)
        kept.append(buf)
    return buf


# ---------------------------------------------------------------------------------------------------
# Forward in plain numpy


def _activate_inplace(z, name):
    """activation(z) overwriting z (z is our own buffer and nobody needs it afterwards)."""
    if name == "silu":  # z / (1 + exp(-z)): four passes, one temporary
        t = _one_plus_exp_neg(z)
        return onp.divide(z, t, out=z)
    if name == "gelu":
        return _activate_keeping_z(z, name)
    if name == "relu":
        return onp.maximum(z, 0.0, out=z)
    if name == "leaky_relu":
        return onp.maximum(z, LEAKY_SLOPE * z, out=z)
    if name == "tanh":
        return onp.tanh(z, out=z)
    if name == "sigmoid":
        z *= 0.5
        onp.tanh(z, out=z)
        z += 1.0
        z *= 0.5
        return z
    if name == "softplus":
        tail = onp.abs(z)
        onp.negative(tail, out=tail)
        onp.exp(tail, out=tail)
        onp.log1p(tail, out=tail)
        onp.maximum(z, 0.0, out=z)
        z += tail
        return z
    raise ValueError(name)


def _forward(x, W, b, name, keep_z=True):
    """(y, z) with z = x @ W + b and y = activation(z); z is None when the VJP will not need it (or
    ``keep_z`` is False: a call that will not be differentiated)."""
    return _bias_activation(_matmul_2d(x, W), b, name, keep_z)


def _bias_activation(z, b, name, keep_z):
    """(activation(z + b), z + b or None) as ``_forward``, z a fresh buffer of ours (added to in place)."""
    if b is not None:
        if onp.result_type(z, b) == z.dtype:
            z += b
        else:
            z = z + b
    if name == "identity":
        return z, None
    if keep_z and name in _NEEDS_Z:
        return _activate_keeping_z(z, name), z
    return _activate_inplace(z, name), None


def _matmul_2d(x, W):
    """x @ W for x (..., d_in) as ONE (rows, d_in) @ (d_in, d_out) BLAS call, then reshaped back.

    numpy's matmul treats a 3-d or 4-d x as a stack of matrices and calls gemm once per matrix: for conv
    patches (n, H, W, k) that is n H calls of W rows each (measured 1.5x slower forward and 2x slower dx
    than one call, (64, 8, 8, 192) @ (192, 64) float32, one thread)."""
    x2 = x if x.ndim <= 2 else onp.reshape(x, (-1, x.shape[-1]))
    out = _pooled((x2.shape[0], W.shape[-1]), x, W) if x2.ndim == 2 and W.ndim == 2 else None
    z = onp.matmul(x2, W, out=out)
    return z if x.ndim <= 2 else onp.reshape(z, x.shape[:-1] + (W.shape[-1],))


def _one_plus_exp_neg(z):
    """1 + exp(-z) in a fresh buffer; exp overflows to inf for z below about -88 (float32) or -709
    (float64), and z / inf = -0 and 1 / inf = 0 are silu's and sigmoid's limits there.

    silu and its derivative use exp rather than the tanh form of ``activations.py``: numpy's exp is
    vectorized on x86 and its tanh is not everywhere (measured 1.8x faster silu on AVX2, one thread), and
    the exp form keeps its relative accuracy in the negative tail, where 1 + tanh(z / 2) cancels.
    """
    t = onp.negative(z, out=_pooled(z.shape, z))
    with onp.errstate(over="ignore"):
        onp.exp(t, out=t)
    t += 1.0
    return t


def _activate_keeping_z(z, name):
    """silu / gelu of z into one fresh buffer (z is kept for the VJP)."""
    if name == "silu":  # z / (1 + exp(-z))
        y = _one_plus_exp_neg(z)
        return onp.divide(z, y, out=y)
    # gelu: 0.5 z (1 + tanh(c z (1 + a z^2)))
    with onp.errstate(over="ignore"):  # z^2 = inf for huge |z| is harmless: tanh(+-inf) = +-1
        y = onp.multiply(z, z)
        y *= _GELU_A
        y += 1.0
        y *= z
        y *= _GELU_C
    onp.tanh(y, out=y)
    y += 1.0
    y *= 0.5  # before the product with z, which could overflow near the float's max otherwise
    y *= z
    return y


# autograd builds a primitive's VJP right after running its forward pass, in the same thread
# (tracer.primitive -> VJPNode.__init__), so the forward hands its pre-activation to that VJP through
# this per-thread slot. The VJP takes it only if the slot holds the very output it was given (an
# identity check), else it recomputes z.
_slot = threading.local()


@primitive
def _dense_numpy(x, W, b, name):
    y, z = _forward(x, W, b, name)
    if z is not None:
        _slot.entry = (y, z)
    return y


def _take_z(ans, slot=_slot):
    """The pre-activation the forward that returned ``ans`` left in ``slot`` (None if another forward's), and
    the slot emptied."""
    entry = getattr(slot, "entry", None)
    slot.entry = None
    return entry[1] if entry is not None and entry[0] is ans else None


def _pending_z():
    """The pre-activation still held for a VJP in this thread (None once taken): for tests."""
    return getattr(_slot, "entry", None)


# ---------------------------------------------------------------------------------------------------
# Backward


def _dz_fast(g, z, y, name):
    """g * activation'(z) in plain numpy, in fresh buffers (g may be shared with other nodes)."""
    if name == "identity":
        return g
    if name == "relu":
        return onp.multiply(g, y > 0)
    if name == "leaky_relu":
        return onp.where(y > 0, g, LEAKY_SLOPE * g)
    if name == "tanh":
        d = onp.multiply(y, y)
        onp.subtract(1.0, d, out=d)
    elif name == "sigmoid":
        d = onp.subtract(1.0, y)
        d *= y
    elif name == "softplus":  # sigmoid(z) = 1 - exp(-y)
        d = onp.negative(y)
        onp.expm1(d, out=d)
        onp.negative(d, out=d)
    elif name == "silu":  # s (1 + z (1 - s)), s = sigmoid(z) = 1 / (1 + exp(-z))
        s = _one_plus_exp_neg(z)
        onp.reciprocal(s, out=s)
        d = onp.subtract(1.0, s)
        d *= z
        d += 1.0
        d *= s
    elif name == "gelu":  # 0.5 (1 + t) + 0.5 z (1 - t^2) c (1 + 3 a z^2), t = tanh(c (z + a z^3))
        z = onp.clip(z, -_GELU_CLIP, _GELU_CLIP)  # beyond, the derivative is 0 or 1 to the last bit
        z2 = onp.multiply(z, z)
        t = z2 * _GELU_A
        t += 1.0
        t *= z
        t *= _GELU_C
        onp.tanh(t, out=t)
        d = onp.multiply(t, t)
        onp.subtract(1.0, d, out=d)
        z2 *= 3.0 * _GELU_A
        z2 += 1.0
        z2 *= z
        z2 *= 0.5 * _GELU_C
        d *= z2
        t += 1.0
        t *= 0.5
        d += t
    else:
        raise ValueError(name)
    d *= g
    return d


def _dz_traced(g, z, y, name):
    """g * activation'(z) with autograd.numpy, so the result is differentiable again."""
    if name == "identity":
        return g
    if name == "relu":
        return g * (y > 0)
    if name == "leaky_relu":
        return anp.where(y > 0, g, LEAKY_SLOPE * g)
    if name == "tanh":
        return g * (1.0 - y * y)
    if name == "sigmoid":
        return g * (y * (1.0 - y))
    if name == "softplus":
        return g * -anp.expm1(-y)
    if name == "silu":
        s = 0.5 * (1.0 + anp.tanh(0.5 * z))
        return g * (s * (1.0 + z * (1.0 - s)))
    if name == "gelu":
        z = anp.clip(z, -_GELU_CLIP, _GELU_CLIP)
        t = anp.tanh(_GELU_C * (z + _GELU_A * z * z * z))
        return g * (0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _GELU_C * (1.0 + 3.0 * _GELU_A * z * z))
    raise ValueError(name)


def _dense_vjp(argnums, ans, args, kwargs):
    x, W, b, name = args
    z = _take_z(ans) if name in _NEEDS_Z else None
    traced_args = isinstance(ans, Box) or any(isinstance(a, Box) for a in (x, W, b))

    def vjp(g):
        if traced_args or isinstance(g, Box):
            zz = z
            if name in _NEEDS_Z and zz is None:
                zz = anp.matmul(x, W) if b is None else anp.matmul(x, W) + b
            dz = _dz_traced(g, zz, ans, name)
            m = anp
        else:
            zz = z
            if name in _NEEDS_Z and zz is None:
                zz = _forward(x, W, b, "identity")[0]
            dz = _dz_fast(g, zz, ans, name)
            m = onp
        d_out = W.shape[-1]
        out = {}
        # W and b first: measured 0.5 ms faster per 512x512 layer than dx first (dz and x are still in cache)
        if 1 in argnums:
            x2 = m.reshape(x, (-1, W.shape[0]))
            out[1] = _cast(m.matmul(m.swapaxes(x2, 0, 1), m.reshape(dz, (-1, d_out))), W, m)
        if 2 in argnums:
            out[2] = _cast(m.sum(m.reshape(dz, (-1, d_out)), axis=0), b, m)
        if 0 in argnums:
            dx = _matmul_2d(dz, onp.swapaxes(W, 0, 1)) if m is onp else m.matmul(dz, m.swapaxes(W, 0, 1))
            out[0] = _cast(dx, x, m)
        grads = tuple(out.get(argnum) for argnum in argnums)
        return grads

    return vjp


def _cast(grad, arg, m):
    """The gradient in its argument's floating dtype (float32 parameters get float32 gradients)."""
    if type(grad) is onp.ndarray and type(arg) is onp.ndarray and grad.dtype == arg.dtype:
        return grad  # (the common case, without result_type's ~3 us)
    dtype = onp.result_type(arg)
    if onp.result_type(grad) == dtype or not onp.issubdtype(dtype, onp.floating):
        return grad
    if m is onp:
        return grad.astype(dtype)
    return _astype(grad, dtype)  # differentiable cast


defvjp_argnums(_dense_numpy, _dense_vjp)


def _is_traced(x, W, b):
    return isinstance(x, Box) or isinstance(W, Box) or isinstance(b, Box)


def make_dense(xp, fused, epilogue=None):
    """Build ``dense(x, W, b=None, activation=None)`` for the namespace ``xp``.

    Math: y = activation(x @ W + b); x (..., d_in), W (d_in, d_out), b (d_out,) -> y (..., d_out).
    ``epilogue(z, b, name)``, where a backend has one (cupy: one fused GPU kernel), computes
    activation(z + b) in place of the composed array-API calls, for a bias of shape (d_out,) or None.
    """

    def check(x, W, b, activation):
        name = check_activation(activation)
        if len(W.shape) != 2:
            raise ValueError(f"dense: W must be 2-d (d_in, d_out), got shape {tuple(W.shape)}")
        if len(x.shape) == 0 or x.shape[-1] != W.shape[0]:
            raise ValueError(f"dense: x has shape {tuple(x.shape)} but W (shape {tuple(W.shape)}) expects a "
                             f"last axis of d_in = {W.shape[0]}")
        if b is not None and (len(b.shape) == 0 or b.shape[-1] != W.shape[1]):
            raise ValueError(f"dense: b must have a last axis of d_out = {W.shape[1]}, got shape {tuple(b.shape)}")
        return name

    def generic(x, W, b, name):
        z = xp.matmul(x, W)
        if b is not None:
            z = z + b
        return apply_activation(xp, z, name)

    if not fused:

        def dense(x, W, b=None, activation=None):
            name = check(x, W, b, activation)
            if epilogue is not None and (b is None or (len(b.shape) == 1 and b.dtype == x.dtype == W.dtype)):
                return epilogue(xp.matmul(x, W), b, name)
            return generic(x, W, b, name)

        return dense

    def dense(x, W, b=None, activation=None):
        name = check(x, W, b, activation)
        if b is not None and len(b.shape) != 1:
            return generic(x, W, b, name)  # a batched bias: the VJP below sums b's gradient over rows only
        if not _is_traced(x, W, b):
            return _forward(x, W, b, name, keep_z=False)[0]  # nothing to differentiate: skip the primitive
        return _dense_numpy(x, W, b, name)

    return dense


# ---------------------------------------------------------------------------------------------------
# im2col: the patches of a 2-D convolution, one matmul away from its output


def check_im2col_args(x, kernel_size, stride, pads, who="im2col"):
    """Validated ((kh, kw), (sh, sw), ((top, bottom), (left, right))) for an NHWC ``x``; errors start with ``who``."""
    if len(x.shape) != 4:
        raise ValueError(f"{who}: x must be NHWC (4-d), got shape {tuple(x.shape)}")
    (kh, kw), (sh, sw) = (int(k) for k in kernel_size), (int(s) for s in stride)
    (pt, pb), (pl, pr) = ((int(a), int(b)) for a, b in pads)
    if min(kh, kw, sh, sw) < 1 or min(pt, pb, pl, pr) < 0:
        raise ValueError(f"{who}: expected positive kernel sizes and strides and non-negative pads, got "
                         f"kernel_size={kernel_size}, stride={stride}, pads={pads}")
    H, W = x.shape[1] + pt + pb, x.shape[2] + pl + pr
    if H < kh or W < kw:
        raise ValueError(f"x: spatial size {tuple(x.shape[1:3])} with pads {pads} is smaller than the kernel "
                         f"{(kh, kw)}")
    return (kh, kw), (sh, sw), ((pt, pb), (pl, pr))


def _out_size(x_shape, kernel_size, stride, pads):
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_size, stride, pads
    return (x_shape[1] + pt + pb - kh) // sh + 1, (x_shape[2] + pl + pr - kw) // sw + 1


def _im2col_plain(x, kernel_size, stride, pads):
    """im2col's forward in plain numpy: (N, Ho, Wo, kh * kw * C), C-contiguous and read-only to the caller (a
    view of x for a 1x1 kernel at stride 1 without pads, else a fresh copy)."""
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_size, stride, pads
    N, H, W, C = x.shape
    Ho, Wo = _out_size(x.shape, kernel_size, stride, pads)
    if pt or pb or pl or pr:
        padded = onp.zeros((N, H + pt + pb, W + pl + pr, C), dtype=x.dtype)
        padded[:, pt:pt + H, pl:pl + W, :] = x
    else:
        padded = onp.ascontiguousarray(x)
    if C == 1 and kh * kw > 1:
        cols = onp.empty((N, Ho, Wo, kh, kw, 1), dtype=x.dtype)
        _copy_one_channel_taps(cols, padded, kernel_size, stride)
        return onp.reshape(cols, (N, Ho, Wo, kh * kw))
    sN, sH, sW, sC = padded.strides
    windows = onp.lib.stride_tricks.as_strided(
        padded, (N, Ho, Wo, kh, kw, C), (sN, sH * sh, sW * sw, sH, sW, sC), writeable=False
    )
    return onp.reshape(windows, (N, Ho, Wo, kh * kw * C))  # the one copy


def _copy_one_channel_taps(out, padded, kernel_size, stride):
    """out (n, Ho, Wo, kh, kw, 1) <- the patches of a one-channel ``padded`` (n, Hp, Wp, 1), one strided copy per
    kernel tap: with one channel the windows' copy runs kw elements at a time (measured 3.5x slower, 64 x 28 x
    28 x 1 float32, 3x3, one thread)."""
    (kh, kw), (sh, sw) = kernel_size, stride
    Ho, Wo = out.shape[1], out.shape[2]
    for a in range(kh):
        for b in range(kw):
            out[:, :, :, a, b, 0] = padded[:, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw, 0]


@primitive
def _im2col_numpy(x, kernel_size, stride, pads):
    return _im2col_plain(x, kernel_size, stride, pads)


@primitive
def _col2im_numpy(cols, x_shape, x_dtype, kernel_size, stride, pads):
    """The adjoint of im2col: every patch entry added back onto the pixel it came from."""
    (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_size, stride, pads
    N, H, W, C = x_shape
    Ho, Wo = _out_size(x_shape, kernel_size, stride, pads)
    patches = onp.reshape(cols, (N, Ho, Wo, kh, kw, C))
    padded = onp.zeros((N, H + pt + pb, W + pl + pr, C), dtype=x_dtype)
    for a in range(kh):
        for b in range(kw):
            padded[:, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw, :] += patches[:, :, :, a, b, :]
    return padded[:, pt:pt + H, pl:pl + W, :]


# both maps are linear and each other's adjoint, so gradients of any order follow
defvjp(_im2col_numpy,
       lambda ans, x, k, s, p: lambda g: _col2im_numpy(g, onp.shape(x), onp.result_type(x), k, s, p))
defvjp(_col2im_numpy,
       lambda ans, cols, shape, dtype, k, s, p: lambda g: _cast(_im2col_numpy(g, k, s, p), cols, anp))


def make_im2col(xp, fused):
    """Build ``im2col(x, kernel_size, stride, pads)`` for the namespace ``xp``.

    Math: P[n, i, j, (a, b, c)] = x_pad[n, i s_h + a, j s_w + b, c], x_pad = x with pads = ((top, bottom),
    (left, right)) zeros. x (N, H, W, C) -> P (N, H_out, W_out, kh * kw * C), patch entries ordered
    (a, b, c) like a (kh, kw, C, C_out) kernel, so conv(x) = P @ reshape(kernel, (kh * kw * C, C_out)).
    On numpy one strided copy forward and kh * kw strided adds backward; elsewhere slices and a stack.
    """

    def generic(x, kernel_size, stride, pads):
        (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = kernel_size, stride, pads
        Ho, Wo = _out_size(x.shape, kernel_size, stride, pads)
        x = _pad_axis(xp, _pad_axis(xp, x, 1, pt, pb), 2, pl, pr)
        patches = [
            x[:, a:a + sh * (Ho - 1) + 1:sh, b:b + sw * (Wo - 1) + 1:sw, :]
            for a in range(kh) for b in range(kw)
        ]
        cols = xp.stack(patches, axis=3)  # (N, H_out, W_out, kh * kw, C)
        return xp.reshape(cols, (x.shape[0], Ho, Wo, kh * kw * x.shape[-1]))

    if not fused:

        def im2col(x, kernel_size, stride=(1, 1), pads=((0, 0), (0, 0))):
            return generic(x, *check_im2col_args(x, kernel_size, stride, pads))

        return im2col

    def im2col(x, kernel_size, stride=(1, 1), pads=((0, 0), (0, 0))):
        return _im2col_numpy(x, *check_im2col_args(x, kernel_size, stride, pads))

    return im2col


def _pad_axis(xp, x, axis, before, after):
    """Zero-pad ``x`` along ``axis`` with xp.concat (differentiable on every backend)."""
    if before == 0 and after == 0:
        return x
    shape = list(x.shape)
    parts = []
    if before:
        shape[axis] = before
        parts.append(xp.zeros(tuple(shape), dtype=x.dtype, device=xp.device_of(x)))
    parts.append(x)
    if after:
        shape[axis] = after
        parts.append(xp.zeros(tuple(shape), dtype=x.dtype, device=xp.device_of(x)))
    return xp.concat(parts, axis=axis)


# ---------------------------------------------------------------------------------------------------
# conv2d: a 2-D convolution (+ bias + activation) as one primitive that owns its VJP


def check_conv2d_args(x, W, b, stride, pads, activation):
    """Validated (activation name, (kh, kw), (sh, sw), ((top, bottom), (left, right))) for conv2d."""
    name = check_activation(activation)
    if len(W.shape) != 4:
        raise ValueError(f"conv2d: W must be 4-d (kh, kw, c_in, c_out), got shape {tuple(W.shape)}")
    if len(x.shape) != 4 or x.shape[-1] != W.shape[2]:
        raise ValueError(f"conv2d: x must be NHWC with c_in = {W.shape[2]} channels (W has shape "
                         f"{tuple(W.shape)}), got shape {tuple(x.shape)}")
    if b is not None and (len(b.shape) == 0 or b.shape[-1] != W.shape[3]):
        raise ValueError(f"conv2d: b must have a last axis of c_out = {W.shape[3]}, got shape {tuple(b.shape)}")
    k, s, p = check_im2col_args(x, W.shape[:2], stride, pads, who="conv2d")
    return name, k, s, p


_CHUNK_BYTES = 1 << 21  # patches per block of images: about 2 MB, cache-sized
_SCRATCH_MAX = 1 << 23  # per-thread scratch buffers up to this size are kept for the next call
_scratch = threading.local()


def _scratch_array(slot, shape, dtype):
    """An uninitialised array of ``shape`` in this thread's scratch buffer number ``slot``, reused from call to
    call (a fresh array when larger than _SCRATCH_MAX). Valid until the next request for the same slot.

    Large temporaries freshly allocated at every step cost a page fault per 4 kB page once the allocator has
    given the memory back to the system (measured: about 3500 faults and 15-20 ms per step of the conv
    benchmark at 28x28, before blocks and scratch buffers)."""
    nbytes = math.prod(shape) * onp.dtype(dtype).itemsize
    if nbytes > _SCRATCH_MAX:
        return onp.empty(shape, dtype)
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(slot)
    if buf is None or buf.nbytes < nbytes:
        buf = bufs[slot] = onp.empty(max(nbytes, 1 << 16), onp.uint8)
    return onp.reshape(buf[:nbytes].view(dtype), shape)


def _padded_block(src, pads, slot=0):
    """src (n, H, W, C) with pads ((top, bottom), (left, right)) of zeros, a negative pad cropping instead: src
    itself when every pad is 0, else a scratch array (``slot``)."""
    ((pt, pb), (pl, pr)) = pads
    if not (pt or pb or pl or pr):
        return src
    n, H, W, C = src.shape
    Hp, Wp = H + pt + pb, W + pl + pr
    out = _scratch_array(slot, (n, Hp, Wp, C), src.dtype)
    r0, r1, c0, c1 = max(-pt, 0), H - max(-pb, 0), max(-pl, 0), W - max(-pr, 0)  # the rows / columns kept
    t, l = max(pt, 0), max(pl, 0)
    if r1 <= r0 or c1 <= c0:
        out[...] = 0.0
        return out
    out[:, :t] = 0.0
    out[:, t + r1 - r0:] = 0.0
    out[:, t:t + r1 - r0, :l] = 0.0
    out[:, t:t + r1 - r0, l + c1 - c0:] = 0.0
    out[:, t:t + r1 - r0, l:l + c1 - c0] = src[:, r0:r1, c0:c1]
    return out


def _patch_blocks(src, kernel_size, stride, pads, out_hw):
    """Yield (n0, n1, P) for blocks of images: P ((n1 - n0) Ho Wo, kh kw C) the im2col patches of src[n0:n1]
    (zero-padded by ``pads``; negative pads crop), in a scratch array (slot 1) valid until the next block.

    A block's patches take about _CHUNK_BYTES, so they are still in cache when BLAS reads them, and no patch
    matrix of the whole batch is ever allocated (nor kept: the VJP builds them again)."""
    (kh, kw), (sh, sw) = kernel_size, stride
    N, C = src.shape[0], src.shape[3]
    Ho, Wo = out_hw
    K = kh * kw * C
    step = max(1, min(N, _CHUNK_BYTES // max(Ho * Wo * K * src.itemsize, 1)))
    for n0 in range(0, N, step):
        n1 = min(n0 + step, N)
        padded = _padded_block(src[n0:n1], pads)
        P = _scratch_array(1, (n1 - n0, Ho, Wo, kh, kw, C), src.dtype)
        if C == 1 and kh * kw > 1:
            _copy_one_channel_taps(P, padded, kernel_size, stride)
        else:
            sN, sH, sW, sC = padded.strides
            windows = onp.lib.stride_tricks.as_strided(padded, P.shape, (sN, sH * sh, sW * sw, sH, sW, sC),
                                                       writeable=False)
            onp.copyto(P, windows)
        yield n0, n1, onp.reshape(P, ((n1 - n0) * Ho * Wo, K))


def _phases(size, k, s, pad):
    """Per stride phase r of one spatial axis: (r, first input index p0, count M, first row m0, taps T).

    The input positions p with (p + pad) % s == r (p0, p0 + s, ..., M of them) receive their gradient from
    the kernel taps r, r + s, ... (T of them) and the output rows m0 - T + 1 ... m0 + M - 1."""
    out = []
    for r in range(s):
        p0 = (r - pad) % s
        out.append((r, p0, len(range(p0, size, s)), (p0 + pad - r) // s, len(range(r, k, s))))
    return out


def _conv_input_grad(dz, W, x_shape, stride, pads):
    """dx for z = conv(x, W): per stride phase, one "full" correlation of dz with the flipped sub-kernel.

    With x_pad[q], q = s m + r: dx_pad[s m + r] = sum_t dz[m - t] W[r + s t] (per axis), a valid correlation
    of dz, zero-padded by T - 1 rows, with the taps W[r::s] reversed and their channels swapped: patches of dz
    then BLAS, per phase (one phase in all at stride 1), writing each phase's pixels of dx once. No dz @ W^T of
    kh * kw * c_in columns and no scatter of kh * kw strided adds as col2im does (measured at 64 x 14 x 14 x 32
    -> 32 channels, 3x3, float32, one thread: 9 ms against 23 ms at stride 1, 11 against 19 at stride 2).
    """
    N, H, Wd, c_in = x_shape
    kh, kw, _, c_out = W.shape
    (sh, sw), ((pt, _), (pl, _)) = stride, pads
    Ho, Wo = dz.shape[1], dz.shape[2]
    rows = [ph for ph in _phases(H, kh, sh, pt) if ph[2] and ph[4]]
    cols = [ph for ph in _phases(Wd, kw, sw, pl) if ph[2] and ph[4]]
    dtype = onp.result_type(dz, W)
    whole = sh == 1 and sw == 1 and bool(rows) and bool(cols)  # one phase covering every pixel
    dx = onp.empty((N, H, Wd, c_in), dtype) if whole else onp.zeros((N, H, Wd, c_in), dtype)
    dx_rows = onp.reshape(dx, (N * H * Wd, c_in))
    if not whole:  # dz zero-padded (or cropped) once for every phase: rows lo_h ... hi_h, columns lo_w ... hi_w
        lo_h, hi_h = min(m0 - T + 1 for _, _, _, m0, T in rows), max(m0 + M - 1 for _, _, M, m0, _ in rows)
        lo_w, hi_w = min(m0 - T + 1 for _, _, _, m0, T in cols), max(m0 + M - 1 for _, _, M, m0, _ in cols)
        dzp = _padded_block(dz, ((-lo_h, hi_h + 1 - Ho), (-lo_w, hi_w + 1 - Wo)), slot=2)
    for rh, ph, Mh, mh, Th in rows:
        for rw, pw, Mw, mw, Tw in cols:
            kernel = onp.reshape(onp.swapaxes(W[rh::sh, rw::sw][::-1, ::-1], 2, 3).astype(dtype, copy=False),
                                 (Th * Tw * c_out, c_in))
            # dz rows mh - Th + 1 ... mh + Mh - 1 (zeros outside 0 ... Ho - 1), columns likewise
            if whole:
                src, src_pads = dz, ((Th - 1 - mh, mh + Mh - Ho), (Tw - 1 - mw, mw + Mw - Wo))
            else:
                a, b = mh - Th + 1 - lo_h, mw - Tw + 1 - lo_w
                src, src_pads = dzp[:, a:a + Mh + Th - 1, b:b + Mw + Tw - 1, :], ((0, 0), (0, 0))
            for n0, n1, P in _patch_blocks(src, (Th, Tw), (1, 1), src_pads, (Mh, Mw)):
                if whole:
                    onp.matmul(P, kernel, out=dx_rows[n0 * H * Wd:n1 * H * Wd])
                else:
                    dx[n0:n1, ph::sh, pw::sw, :] = onp.reshape(onp.matmul(P, kernel), (n1 - n0, Mh, Mw, c_in))
    return dx


_conv_slot = threading.local()  # the forward's pre-activation for silu / gelu, handed to its VJP


def _conv_forward(x, W, b, stride, pads, name, keep_z=True):
    """(y, z): z = conv(x, W) + b, y = activation(z); z is None unless the VJP needs it (silu, gelu)."""
    kh, kw, c_in, c_out = W.shape
    Ho, Wo = _out_size(x.shape, (kh, kw), stride, pads)
    W2 = onp.reshape(W, (kh * kw * c_in, c_out))
    z = onp.empty((x.shape[0], Ho, Wo, c_out), onp.result_type(x, W))
    z_rows = onp.reshape(z, (-1, c_out))
    for n0, n1, P in _patch_blocks(x, (kh, kw), stride, pads, (Ho, Wo)):
        onp.matmul(P, W2, out=z_rows[n0 * Ho * Wo:n1 * Ho * Wo])
    return _bias_activation(z, b, name, keep_z)


@primitive
def _conv2d_numpy(x, W, b, stride, pads, name):
    """y = activation(conv(x, W) + b): x (N, H, W, c_in), W (kh, kw, c_in, c_out), b (c_out,) -> (N, Ho, Wo, c_out)."""
    y, z = _conv_forward(x, W, b, stride, pads, name)
    if z is not None:
        _conv_slot.entry = (y, z)
    return y


def _conv2d_composed(x, W, b, stride, pads, name):
    """The same conv as im2col and dense primitives, differentiable to any order (gradients of gradients)."""
    kh, kw, c_in, c_out = anp.shape(W)
    cols = _im2col_numpy(x, (kh, kw), stride, pads)
    return _dense_numpy(cols, anp.reshape(W, (kh * kw * c_in, c_out)), b, name)


def _conv2d_vjp(argnums, ans, args, kwargs):
    x, W, b, stride, pads, name = args
    z = _take_z(ans, _conv_slot) if name in _NEEDS_Z else None
    traced_args = isinstance(ans, Box) or any(isinstance(a, Box) for a in (x, W, b))

    def vjp(g):
        if traced_args or isinstance(g, Box):  # gradients of gradients: the composed graph's VJP
            from autograd.core import make_vjp

            def f(diff):
                full = [x, W, b]
                for i, d in zip(argnums, diff):
                    full[i] = d
                return _conv2d_composed(full[0], full[1], full[2], stride, pads, name)

            return tuple(make_vjp(f, tuple(args[i] for i in argnums))[0](g))
        kh, kw, c_in, c_out = W.shape
        zz = z
        if name in _NEEDS_Z and zz is None:
            zz = _conv_forward(x, W, b, stride, pads, "identity")[0]
        dz = _dz_fast(g, zz, ans, name)
        Ho, Wo = dz.shape[1], dz.shape[2]
        dz_rows = onp.reshape(dz, (-1, c_out))
        out = {}
        if 1 in argnums:  # cols^T dz, block by block, as (dz^T cols)^T (measured 1.2x faster than cols^T dz)
            dWt = None
            for n0, n1, P in _patch_blocks(x, (kh, kw), stride, pads, (Ho, Wo)):
                part = onp.matmul(onp.swapaxes(dz_rows[n0 * Ho * Wo:n1 * Ho * Wo], 0, 1), P)
                dWt = part if dWt is None else onp.add(dWt, part, out=dWt)
            if dWt is None:  # an empty batch
                dWt = onp.zeros((c_out, kh * kw * c_in), onp.result_type(dz, x))
            out[1] = _cast(onp.reshape(onp.swapaxes(dWt, 0, 1), W.shape), W, onp)
        if 2 in argnums:  # a matrix-vector product with ones: measured 5x faster than sum over axis 0
            out[2] = _cast(onp.matmul(onp.ones(dz_rows.shape[0], dz_rows.dtype), dz_rows), b, onp)
        if 0 in argnums:
            out[0] = _cast(_conv_input_grad(dz, W, onp.shape(x), stride, pads), x, onp)
        return tuple(out[i] for i in argnums)

    return vjp


defvjp_argnums(_conv2d_numpy, _conv2d_vjp)


def make_conv2d(xp, fused):
    """Build ``conv2d(x, W, b=None, stride=(1, 1), pads=((0, 0), (0, 0)), activation=None)`` for ``xp``.

    Math: y[n, i, j] = activation(sum_{a, b, c} x_pad[n, i s_h + a, j s_w + b, c] W[a, b, c] + b), x (N, H, W, c_in)
    zero-padded by pads = ((top, bottom), (left, right)), W (kh, kw, c_in, c_out), b (c_out,) -> y (N, H_out,
    W_out, c_out): dense(im2col(x), reshape(W, (kh kw c_in, c_out)), b, activation), stride (s_h, s_w).
    On numpy one primitive: the forward multiplies the patches block by block (``_patch_blocks``) and keeps none
    of them; the VJP computes dW = cols^T dz from patches built again block by block, db = sum dz, and dx as a
    correlation of dz with the flipped kernel per stride phase (``_conv_input_grad``), with no col2im. Gradients
    of gradients go through the composed im2col and dense primitives. Elsewhere (strict, cupy): im2col then
    dense, as before.
    """

    def generic(x, W, b, stride, pads, name):
        kh, kw, c_in, c_out = W.shape
        return xp.dense(xp.im2col(x, (kh, kw), stride, pads), xp.reshape(W, (kh * kw * c_in, c_out)), b, name)

    def conv2d(x, W, b=None, stride=(1, 1), pads=((0, 0), (0, 0)), activation=None):
        name, _, stride, pads = check_conv2d_args(x, W, b, stride, pads, activation)
        if not fused or (b is not None and len(b.shape) != 1):
            return generic(x, W, b, stride, pads, name)
        if not _is_traced(x, W, b):
            return _conv_forward(x, W, b, stride, pads, name, keep_z=False)[0]
        return _conv2d_numpy(x, W, b, stride, pads, name)

    return conv2d


# ---------------------------------------------------------------------------------------------------
# log_softmax_take: the categorical log-likelihood in one pass


def check_log_softmax_take_args(logits, index):
    if len(logits.shape) == 0 or tuple(index.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"log_softmax_take: index must have logits' shape without its last axis, got logits "
                         f"{tuple(logits.shape)} and index {tuple(index.shape)}")


_lst_slot = threading.local()  # the forward's softmax, handed to its VJP as the dense primitive hands z


def _row_max(logits):
    """max over the last axis, keepdims, in a fresh array.

    For a short axis (K <= 32) by doubling over the flat C-order data: after j steps m[i] is the max of
    flat[i : i + 2^j] (each step one contiguous elementwise maximum), so with 2^j <= K < 2^(j+1) a row starting
    at s has max(m[s], m[s + K - 2^j]). log2(K) + 1 vectorized passes instead of K - 1 strided ones (measured
    2.4x faster for 100 x 64 x 17 float32, one thread) or numpy's reduction along a contiguous axis of 17
    (3x). The same maxima: every element is compared, NaN propagates through np.maximum, and which of two
    equal zeros is kept does not change anything computed from m here."""
    k = logits.shape[-1]
    if k > 32 or k < 2 or logits.size == 0:
        return onp.max(logits, axis=-1, keepdims=True)
    flat = onp.reshape(logits, (-1,))  # (a copy when logits is not C-contiguous)
    rows = flat.size // k
    m, width = flat, 1
    while 2 * width <= k:
        m = onp.maximum(m[:-width], m[width:])
        width *= 2
    out = m[:(rows - 1) * k + 1:k]
    if width < k:
        out = onp.maximum(out, m[k - width:(rows - 1) * k + k - width + 1:k])
    return onp.reshape(out, logits.shape[:-1] + (1,))


def _exp_and_lse(logits):
    """(e, s, lse): e = exp(logits - m), s = sum_k e (...,), lse = log s + m (...,); plain numpy, fresh buffers.
    The sum is a matrix-vector product with ones (measured 8x faster than numpy's sum over an axis of 17);
    logits - m subtracts m repeated K times, a contiguous operand (measured 1.3x faster than broadcasting a
    (..., 1) array over an axis of 17)."""
    m = _row_max(logits)
    m[~onp.isfinite(m)] = 0.0
    k = logits.shape[-1]
    if 1 < k <= 32 and logits.flags.c_contiguous:
        e = onp.subtract(onp.reshape(logits, (-1,)), onp.repeat(onp.reshape(m, (-1,)), k))
        e = onp.reshape(e, logits.shape)
    else:
        e = onp.subtract(logits, m)
    onp.exp(e, out=e)
    s = onp.matmul(e, onp.ones(k, dtype=e.dtype))
    lse = onp.log(s)
    lse += m[..., 0]
    return e, s, lse


_row_starts_cache = {}  # (rows, k) -> arange(rows) * k, the flat offset of each row (a few kept)


def _flat_positions(index, k):
    """Flat positions of logits[..., index] in a C-contiguous (..., k) array: row * k + index (int64), or None
    when an index lies outside [0, k) (then the callers use take_along_axis, which wraps negative indices and
    raises on others, as before).

    Gathering and scattering through them (``flat[pos]``, ``flat[pos] += g``) touches the same elements as
    ``take_along_axis`` / ``put_along_axis``, without the broadcast index grids those build per call (measured
    about 70 us less per forward and backward, 100 x 64 x 17 float32)."""
    rows = index.size
    if rows == 0 or index.min() < 0 or index.max() >= k:
        return None
    starts = _row_starts_cache.get((rows, k))
    if starts is None:
        if len(_row_starts_cache) > 16:
            _row_starts_cache.clear()
        starts = _row_starts_cache[(rows, k)] = onp.arange(rows, dtype=onp.int64) * k
    return starts + onp.reshape(index, (-1,))


def _take(logits, index, pos):
    """logits[..., index] as a fresh array of index's shape."""
    if pos is None:
        return onp.take_along_axis(logits, index[..., None], axis=-1)[..., 0]
    return onp.reshape(onp.reshape(logits, (-1,))[pos], index.shape)


def _add_at_index(d, index, pos, g):
    """d[..., index] += g, in place (d is a fresh C-contiguous array)."""
    if pos is None:
        picked = onp.take_along_axis(d, index[..., None], axis=-1)
        picked += g[..., None]
        onp.put_along_axis(d, index[..., None], picked, axis=-1)
    else:
        flat = onp.reshape(d, (-1,))
        flat[pos] += onp.reshape(g, (-1,))


@primitive
def _log_softmax_take_numpy(logits, index):
    e, s, lse = _exp_and_lse(logits)
    pos = _flat_positions(index, logits.shape[-1])
    out = _take(logits, index, pos)
    out -= lse
    _lst_slot.entry = (out, e, s, pos)
    return out


def _log_softmax_take_vjp(ans, logits, index):
    entry = getattr(_lst_slot, "entry", None)
    _lst_slot.entry = None
    kept = entry[1:] if entry is not None and entry[0] is ans else None

    def vjp(g):
        if isinstance(g, Box) or isinstance(logits, Box) or isinstance(ans, Box):  # gradients of gradients
            lse = anp.log(anp.sum(anp.exp(logits - anp.max(logits, axis=-1, keepdims=True)), axis=-1,
                                  keepdims=True)) + anp.max(logits, axis=-1, keepdims=True)
            onehot = (anp.arange(logits.shape[-1]) == index[..., None]).astype(logits.dtype)
            return g[..., None] * (onehot - anp.exp(logits - lse))
        if kept is None:
            e, s = _exp_and_lse(logits)[:2]
            pos = _flat_positions(index, logits.shape[-1])
        else:
            e, s, pos = kept
        g = onp.asarray(g, dtype=logits.dtype)
        k = e.shape[-1]
        if 1 < k <= 32 and e.flags.c_contiguous:  # -g softmax, one fresh (C-contiguous) buffer: a contiguous product
            d = onp.reshape(onp.reshape(e, (-1,)) * onp.repeat(onp.reshape(-g / s, (-1,)), k), e.shape)
        else:
            d = e * (-g / s)[..., None]
        _add_at_index(d, index, pos, g)  # then + g at the index
        return d

    return vjp


defvjp(_log_softmax_take_numpy, _log_softmax_take_vjp)


def make_log_softmax_take(xp, fused):
    """Build ``log_softmax_take(logits, index)`` for the namespace ``xp``.

    Math: out[...] = logits[..., index[...]] - logsumexp_k logits[..., k]; logits (..., K) float, index (...)
    integer in {0, ..., K-1} (not checked: the caller validates its data) -> (...) in logits' dtype.
    Differentiable in logits.
    """

    def generic(logits, index):
        m = xp.max(logits, axis=-1, keepdims=True)
        m = xp.where(xp.isfinite(m), m, 0.0)
        lse = xp.log(xp.sum(xp.exp(logits - m), axis=-1)) + m[..., 0]
        return xp.take_along_axis(logits, xp.expand_dims(index, axis=-1), axis=-1)[..., 0] - lse

    def log_softmax_take(logits, index):
        check_log_softmax_take_args(logits, index)
        if not fused:
            return generic(logits, index)
        index = onp.asarray(index)
        if not isinstance(logits, Box):  # nothing to differentiate: skip the primitive and what it keeps
            out = _take(logits, index, _flat_positions(index, logits.shape[-1]))
            out -= _exp_and_lse(logits)[2]
            return out
        return _log_softmax_take_numpy(logits, index)

    return log_softmax_take


# ---------------------------------------------------------------------------------------------------
# gated_tanh: the gated activation of PixelCNN and WaveNet in one pass


def check_gated_tanh_args(a):
    if len(a.shape) == 0 or a.shape[-1] % 2:
        raise ValueError(f"gated_tanh: a must have an even last axis (the tanh half, then the sigmoid half), got "
                         f"shape {tuple(a.shape)}")


_gate_slot = threading.local()  # the forward's tanh and sigmoid halves, handed to its VJP


def _gate_parts(a):
    """(t, s): tanh(a[..., :F]) = 2 / (1 + exp(-2 a)) - 1 and sigmoid(a[..., F:]) = 1 / (1 + exp(-a)).

    One buffer r = 1 / (1 + exp(c a)) over the whole last axis (c = -2 on the tanh half, -1 on the sigmoid
    half): contiguous passes, and numpy's exp, which is vectorized on x86 where its tanh is not (measured 2x
    faster than two tanh calls, (64, 8, 8, 64) float32, one thread). t = 2 r[..., :F] - 1 is a fresh array,
    s = r[..., F:] a view of r. exp overflows to inf for very negative a, and 2 / inf - 1 = -1, 1 / inf = 0
    are the limits. Absolute (not relative) accuracy near 0, as for the dense activations.
    """
    F = a.shape[-1] // 2
    scale = onp.concatenate([onp.full(F, -2.0, dtype=a.dtype), onp.full(F, -1.0, dtype=a.dtype)])
    r = onp.multiply(a, scale)
    with onp.errstate(over="ignore"):
        onp.exp(r, out=r)
    r += 1.0
    onp.reciprocal(r, out=r)
    t = onp.multiply(r[..., :F], 2.0)
    t -= 1.0
    return t, r[..., F:]


@primitive
def _gated_tanh_numpy(a):
    t, s = _gate_parts(a)
    y = onp.multiply(t, s)
    _gate_slot.entry = (y, t, s)
    return y


def _gated_tanh_vjp(ans, a):
    entry = getattr(_gate_slot, "entry", None)
    _gate_slot.entry = None
    kept = entry[1:] if entry is not None and entry[0] is ans else None

    def vjp(g):
        if isinstance(g, Box) or isinstance(a, Box) or isinstance(ans, Box):  # gradients of gradients
            F = a.shape[-1] // 2
            t, s = anp.tanh(a[..., :F]), 0.5 * (1.0 + anp.tanh(0.5 * a[..., F:]))
            return anp.concatenate([g * s * (1.0 - t * t), g * t * s * (1.0 - s)], axis=-1)
        t, s = _gate_parts(a) if kept is None else kept
        gs = onp.multiply(g, s)
        da = onp.multiply(t, t)  # g s (1 - t^2)
        onp.subtract(1.0, da, out=da)
        da *= gs
        db = onp.subtract(1.0, s)  # g s t (1 - s)
        db *= t
        db *= gs
        # contiguous halves joined once: writing them into the two strided halves of one buffer was measured
        # 3x slower (inner runs of F floats)
        return onp.concatenate([da, db], axis=-1)

    return vjp


defvjp(_gated_tanh_numpy, _gated_tanh_vjp)


def make_gated_tanh(xp, fused):
    """Build ``gated_tanh(a)`` for the namespace ``xp``.

    Math: y = tanh(a[..., :F]) * sigmoid(a[..., F:]), a (..., 2F) -> y (..., F) (van den Oord et al.'s gated
    activation). On numpy one primitive whose forward keeps both halves for the VJP,
    (g s (1 - t^2), g t s (1 - s)); elsewhere the formula.
    """

    def generic(a):
        F = a.shape[-1] // 2
        return xp.tanh(a[..., :F]) * (0.5 * (1.0 + xp.tanh(0.5 * a[..., F:])))

    def gated_tanh(a):
        check_gated_tanh_args(a)
        if not fused:
            return generic(a)
        if not isinstance(a, Box):
            t, s = _gate_parts(a)
            t *= s
            return t
        return _gated_tanh_numpy(a)

    return gated_tanh


# ---------------------------------------------------------------------------------------------------
# adam_leaf: one leaf of the Adam update, in three fresh arrays


def make_adam_leaf(xp, fused):
    """Build ``adam_leaf(p, g, m, v, b1, b2, shift, scale, decay=None) -> (p', m', v')`` for the namespace ``xp``.

    Math (``genblocks.train.optim.adam``, with its scalars worked out once per step: shift = eps sqrt(c2), scale =
    -lr sqrt(c2) / c1, c1 and c2 the bias corrections, decay = 1 - lr wd or None)::

        m' = (g - m)(1 - b1) + m        v' = (g g - v)(1 - b2) + v
        p' = ((1 / (sqrt(v') + shift)) m') scale + p            (+ p decay in place of + p with weight decay)

    in that order, every operation rounded to the parameter's dtype (g is cast to it first; Python-float
    scalars take the arrays' dtype). Each call allocates exactly three arrays, the results, and computes in
    them in place (large temporaries cost page faults: docs/architecture.md, Numerics); the inputs are never
    modified. On numpy, plain arrays go through ufuncs with ``out=`` and ``reciprocal``, the same operations
    as the in-place operators elsewhere, so the same bits: ``reciprocal`` is the correctly rounded 1 / x, as is
    the ``**= -1.0`` of the generic form (numpy 2 sends a float power to ``power`` itself, about 3x slower; the
    two agree on every positive float32, checked exhaustively, and ``tests/test_optim.py`` pins them on
    float32 and float64). Anything else (autograd boxes: an optimizer inside a gradient) takes the generic form.
    """

    def generic(p, g, m, v, b1, b2, shift, scale, decay=None):
        if g.dtype != p.dtype:
            g = xp.astype(g, p.dtype)
        m_new = g - m
        m_new *= 1.0 - b1
        m_new += m  # = b1 m + (1 - b1) g
        v_new = g * g
        v_new -= v
        v_new *= 1.0 - b2
        v_new += v
        new = xp.sqrt(v_new)
        new += shift
        new **= -1.0
        new *= m_new
        new *= scale  # -lr m_hat / (sqrt(v_hat) + eps)
        new += p if decay is None else p * decay
        return new, m_new, v_new

    if not fused:
        return generic

    nd = onp.ndarray
    subtract, multiply, add, sqrt, reciprocal = onp.subtract, onp.multiply, onp.add, onp.sqrt, onp.reciprocal

    def adam_leaf(p, g, m, v, b1, b2, shift, scale, decay=None):
        if not (type(p) is nd and type(g) is nd and type(m) is nd and type(v) is nd):
            return generic(p, g, m, v, b1, b2, shift, scale, decay)
        if g.dtype != p.dtype:
            g = g.astype(p.dtype)
        m_new = subtract(g, m)
        multiply(m_new, 1.0 - b1, out=m_new)
        add(m_new, m, out=m_new)
        v_new = multiply(g, g)
        subtract(v_new, v, out=v_new)
        multiply(v_new, 1.0 - b2, out=v_new)
        add(v_new, v, out=v_new)
        new = sqrt(v_new)
        add(new, shift, out=new)
        reciprocal(new, out=new)
        multiply(new, m_new, out=new)
        multiply(new, scale, out=new)
        add(new, p if decay is None else p * decay, out=new)
        return new, m_new, v_new

    return adam_leaf


# ---------------------------------------------------------------------------------------------------
# normal_rsample_kl: a VAE's reparameterised draws and its KL to N(0, I), one node


def _rsample_kl_parts(h, eps):
    L = h.shape[-1] // 2
    mu, sigma = h[..., :L], onp.exp(h[..., L:2 * L])
    return L, mu, sigma


@primitive
def _normal_rsample_kl_numpy(h, eps):
    """[z_1, ..., z_k, kl] stacked on a new first axis (k + 1, ..., L): one array, so one node."""
    L, mu, sigma = _rsample_kl_parts(h, eps)
    k = eps.shape[0]
    se = onp.multiply(sigma, eps)
    kl = onp.multiply(sigma, sigma)
    kl += onp.multiply(mu, mu)
    kl -= 1.0
    kl *= 0.5
    kl -= onp.log(sigma)
    out = onp.empty((k + 1,) + se.shape[1:], dtype=onp.result_type(se, kl))
    onp.add(mu, se, out=out[:k])
    out[k] = kl
    return out


def _normal_rsample_kl_vjp(ans, h, eps):
    def vjp(g):
        if isinstance(g, Box) or isinstance(h, Box) or isinstance(eps, Box):  # gradients of gradients
            from autograd.core import make_vjp

            return make_vjp(lambda hh: _rsample_kl_stacked(anp, hh, eps), h)[0](g)
        L, mu, sigma = _rsample_kl_parts(h, eps)
        k = eps.shape[0]
        gz, gkl = g[:k], g[k]
        # what the composed graph's VJPs compute, added up in the order its backward pass adds them (the KL's
        # terms first, then the draws'), so the same bits: tests/test_vae.py compares the two bit for bit
        t = onp.multiply(gkl, 0.5)  # d kl / d (sigma^2 + mu^2): each product's two factors get mu t or sigma t
        t_mu = onp.multiply(mu, t)
        g_mu = t_mu + t_mu
        g_mu += unbroadcast(gz, mu.shape)
        t_sigma = onp.multiply(sigma, t)
        g_sigma = onp.negative(gkl)
        g_sigma /= sigma  # d(-log sigma)
        g_sigma += t_sigma
        g_sigma += t_sigma
        g_sigma += unbroadcast(onp.multiply(eps, gz), sigma.shape)
        g_sigma *= sigma  # exp's VJP
        dh = onp.zeros(onp.shape(h), dtype=onp.result_type(h))
        dh[..., :L] += g_mu
        dh[..., L:2 * L] += g_sigma
        return dh

    return vjp


defvjp(_normal_rsample_kl_numpy, _normal_rsample_kl_vjp)


def _rsample_kl_stacked(m, h, eps):
    z, kl = _rsample_kl_generic(m, h, eps)
    return m.concatenate([z, m.reshape(kl, (1,) + m.shape(kl))], axis=0)


def _rsample_kl_generic(xp, h, eps):
    L = h.shape[-1] // 2
    mu, sigma = h[..., :L], xp.exp(h[..., L:2 * L])
    z = mu + sigma * eps
    kl = 0.5 * (sigma * sigma + mu * mu - 1.0) - xp.log(sigma)
    return z, kl


def make_normal_rsample_kl(xp, fused):
    """Build ``normal_rsample_kl(h, eps) -> (z, kl)`` for the namespace ``xp``.

    Math: mu = h[..., :L], sigma = exp(h[..., L:2L]) for h (..., 2L) (a Gaussian's mean and log standard
    deviation, as a VAE's encoder gives them) and eps (k, ..., L) standard normal draws:
    z = mu + sigma eps (k, ..., L), the reparameterised draws, and kl = (sigma^2 + mu^2 - 1) / 2 - log sigma
    (..., L), KL(N(mu, sigma^2) || N(0, 1)) per dimension. Differentiable in h (eps is a constant).
    On numpy one primitive whose VJP adds up the same terms, in the same order, as the composed graph of
    slices, exp, products and sums it replaces (twelve nodes), so the same bits; elsewhere the formulas.
    """

    def normal_rsample_kl(h, eps):
        if not fused or isinstance(eps, Box):
            return _rsample_kl_generic(xp, h, eps)
        if not isinstance(h, Box):
            return _rsample_kl_generic(onp, h, eps)
        stacked = _normal_rsample_kl_numpy(h, eps)
        k = eps.shape[0]
        return stacked[:k], stacked[k]

    return normal_rsample_kl


# ---------------------------------------------------------------------------------------------------
# elbo_loss: the ELBO's means, sums and beta in one node


def _elbo_loss_generic(xp, log_px, kl_dims, beta):
    rec = xp.mean(log_px, axis=0)
    kl_mean = xp.mean(xp.sum(kl_dims, axis=-1))
    return -xp.mean(rec) + beta * kl_mean


def _elbo_loss_autograd(log_px, kl_dims, beta):
    """The composed formula in autograd.numpy, means as sum / count (autograd's mean VJP upcasts float32)."""
    rec = anp.sum(log_px, axis=0) / float(anp.shape(log_px)[0])
    kl_x = anp.sum(kl_dims, axis=-1)
    kl_mean = anp.sum(kl_x) / float(count(anp.shape(kl_x), None))
    return -(anp.sum(rec) / float(count(anp.shape(rec), None))) + beta * kl_mean


@primitive
def _elbo_loss_numpy(log_px, kl_dims, beta):
    # exactly the composed calls: mean = sum / float(count), then -, beta * and +
    rec = onp.sum(log_px, axis=0) / float(count(onp.shape(log_px), 0))
    kl_x = onp.sum(kl_dims, axis=-1)
    kl_mean = onp.sum(kl_x) / float(count(onp.shape(kl_x), None))
    return -(onp.sum(rec) / float(count(onp.shape(rec), None))) + beta * kl_mean


def _broadcast_back(g, shape, dtype, axis):
    """sum's VJP (as numpy_backend's): reshape(g, shape with the summed axes set to 1) + zeros(shape)."""
    if shape == ():
        return g
    return onp.reshape(g, summed_shape(shape, axis)) + onp.zeros(shape, dtype=dtype)


def _elbo_loss_vjp(argnums, ans, args, kwargs):
    log_px, kl_dims, beta = args

    def vjp(g):
        if isinstance(g, Box) or isinstance(log_px, Box) or isinstance(kl_dims, Box):  # gradients of gradients
            from autograd.core import make_vjp

            found = {}
            if 0 in argnums:
                found[0] = make_vjp(lambda a: _elbo_loss_autograd(a, kl_dims, beta), log_px)[0](g)
            if 1 in argnums:
                found[1] = make_vjp(lambda b: _elbo_loss_autograd(log_px, b, beta), kl_dims)[0](g)
            return tuple(found[i] for i in argnums)
        dt_px, dt_kl = onp.result_type(log_px), onp.result_type(kl_dims)
        found = {}
        if 0 in argnums:  # -mean(mean(log_px, axis=0)): negative's VJP, then the two means'
            px_shape = onp.shape(log_px)
            rec_shape = px_shape[1:]
            g_rec = _broadcast_back(onp.negative(g) / float(count(rec_shape, None)), rec_shape, dt_px, None)
            found[0] = _broadcast_back(g_rec / float(px_shape[0]), px_shape, dt_px, 0)
        if 1 in argnums:  # beta * mean(sum(kl_dims, axis=-1)): multiply's VJP (beta g), mean's, sum's
            kl_shape = onp.shape(kl_dims)
            x_shape = kl_shape[:-1]
            g_x = _broadcast_back((beta * g) / float(count(x_shape, None)), x_shape, dt_kl, None)
            found[1] = _broadcast_back(g_x, kl_shape, dt_kl, len(kl_shape) - 1)
        return tuple(found[i] for i in argnums)

    return vjp


defvjp_argnums(_elbo_loss_numpy, _elbo_loss_vjp)


def make_elbo_loss(xp, fused):
    """Build ``elbo_loss(log_px, kl_dims, beta)`` for the namespace ``xp``.

    Math: -mean_{draws, batch} log p(x | z) + beta mean_batch sum_d KL_d, for log_px (k, ...) (k draws) and
    kl_dims (..., L), beta a number: a VAE's loss (the negative ELBO with a beta-weighted analytic KL) as
    ``-mean(mean(log_px, axis=0)) + beta * mean(sum(kl_dims, axis=-1))``. On numpy one primitive in place of
    seven nodes (three means, a sum, a negation, a product and a sum), whose forward and VJP are the same
    operations as theirs, so the same bits; elsewhere that formula.
    """

    def elbo_loss(log_px, kl_dims, beta):
        if not fused or isinstance(beta, Box):
            return _elbo_loss_generic(xp, log_px, kl_dims, beta)
        return _elbo_loss_numpy(log_px, kl_dims, beta)  # (untraced, the primitive is just its forward)

    return elbo_loss


# ---------------------------------------------------------------------------------------------------


def install(ns, fused, epilogue=None):
    """Put every primitive of this module on the namespace ``ns`` (``ns.dense``, ``ns.im2col``, ...): the
    numpy backend asks for the fused versions (``fused=True``), the others for the formulas; ``epilogue`` is
    ``make_dense``'s (cupy's one-kernel bias + activation)."""
    ns.dense = make_dense(ns, fused=fused, epilogue=epilogue)
    ns.im2col = make_im2col(ns, fused=fused)
    ns.conv2d = make_conv2d(ns, fused=fused)
    ns.log_softmax_take = make_log_softmax_take(ns, fused=fused)
    ns.gated_tanh = make_gated_tanh(ns, fused=fused)
    ns.adam_leaf = make_adam_leaf(ns, fused=fused)
    ns.normal_rsample_kl = make_normal_rsample_kl(ns, fused=fused)
    ns.elbo_loss = make_elbo_loss(ns, fused=fused)
