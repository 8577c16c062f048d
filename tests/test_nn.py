"""genblocks.blocks.nn: gradients, shapes and dtypes, backends agree, MADE / PixelCNN masks, conv reference."""

import math

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad, jacobian
from autograd.test_util import check_grads
from hypothesis import given
from hypothesis import strategies as st

from genblocks.backends import Rng, backend_of, to_device, to_numpy
from genblocks.blocks import nn


def _normal(shape, seed=0, dtype="float64"):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def _params(block, dtype="float64", seed=0, nonzero_bias=True):
    """Params on numpy; biases and LayerNorm affine made non-trivial so gradient checks see them."""
    params = block.init(Rng(seed, backend="numpy"), dtype)
    if not nonzero_bias:
        return params
    r = np.random.default_rng(seed + 100)

    def jitter(tree):
        if isinstance(tree, dict):
            return {k: (v + 0.3 * r.normal(size=v.shape).astype(v.dtype)) if k in ("b", "scale", "shift")
                    else jitter(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [jitter(v) for v in tree]
        return tree

    return jitter(params)


# Every block with a factory for an input of batch shape (3,): name -> (block, input shape, extra kwargs)
def _cases():
    return {
        "dense": (nn.Dense(4, 3, activation="tanh"), (3, 4), {}),
        "dense_nobias": (nn.Dense(4, 3, bias=False), (3, 4), {}),
        "dense_callable": (nn.Dense(4, 3, activation=anp.sin), (3, 4), {}),
        "mlp": (nn.MLP((4, 8, 8, 2), activation="silu", final_activation="softplus"), (3, 4), {}),
        "masked_dense": (nn.MaskedDense(np.triu(np.ones((4, 5))), activation="gelu"), (3, 4), {}),
        "made": (nn.MADE(4, (8, 8), out_multiplier=2, activation="tanh"), (3, 4), {}),
        "made_context": (nn.MADE(3, (6,), context_dim=2, order=[2, 0, 1]), (3, 3), {"context": (3, 2)}),
        "made_no_hidden": (nn.MADE(3, (), context_dim=1), (3, 3), {"context": (3, 1)}),
        "conv": (nn.Conv2d(2, 3, 3), (2, 4, 5, 2), {}),
        "conv_strided": (nn.Conv2d(2, 3, (3, 2), stride=2, padding="valid", activation="relu"), (2, 5, 6, 2), {}),
        "masked_conv_a": (nn.MaskedConv2d(2, 3, 3, mask_type="A"), (2, 4, 4, 2), {}),
        "masked_conv_b": (nn.MaskedConv2d(2, 3, 5, mask_type="B"), (2, 4, 4, 2), {}),
        "layernorm": (nn.LayerNorm(5), (3, 5), {}),
        "residual": (nn.ResidualMLPBlock(4, 6), (3, 4), {}),
    }


CASES = _cases()


def _inputs(shape, kwargs, dtype="float64", seed=1):
    x = _normal(shape, seed, dtype)
    extra = {k: _normal(s, seed + 1, dtype) for k, s in kwargs.items()}
    return x, extra


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_float64(case):
    block, shape, kw = CASES[case]
    params = _params(block)
    x, extra = _inputs(shape, kw)
    check_grads(lambda p, x: anp.sum(anp.sin(block.apply(p, x, **extra))), modes=["rev"], order=1)(params, x)


def test_made_context_gradient():
    block, shape, kw = CASES["made_context"]
    x, extra = _inputs(shape, kw)
    check_grads(lambda c: anp.sum(anp.sin(block.apply(_params(block), x, context=c))), modes=["rev"], order=1)(
        extra["context"])


def test_sinusoidal_embedding_gradient_and_values():
    emb = nn.SinusoidalEmbedding(7, max_period=100.0)
    t = np.array([0.0, 0.5, 3.0, 50.0])
    check_grads(lambda t: anp.sum(anp.sin(emb.apply({}, t))), modes=["rev"], order=1)(t)
    half = 3
    freqs = 100.0 ** (-np.arange(half) / half)
    expected = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs), np.zeros((4, 1))], axis=1)
    np.testing.assert_allclose(emb.apply({}, t), expected, rtol=1e-12, atol=1e-12)
    assert emb.apply({}, np.arange(4)).dtype == np.float32
    assert emb.apply({}, t.astype("float32")).dtype == np.float32
    assert emb.apply({}, np.zeros((2, 3))).shape == (2, 3, 7)
    assert emb.init(Rng(0)) == {}


@pytest.mark.parametrize("case", sorted(set(CASES) - {"dense_callable"}))  # anp.sin is numpy-only; see below
def test_forward_on_every_backend_matches_numpy(case, backend):
    block, shape, kw = CASES[case]
    for dtype in ("float32", "float64"):
        params = _params(block, dtype)
        x, extra = _inputs(shape, kw, dtype)
        ref = block.apply(params, x, **extra)
        got = block.apply(to_device(params, backend), to_device(x, backend), **to_device(extra, backend))
        assert backend_of(got) == backend
        tol = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(to_numpy(got), ref, rtol=tol, atol=tol)
        assert to_numpy(got).dtype == np.dtype(dtype)


def test_callable_activation_on_every_backend(backend):
    def square(z):
        return z * z

    block = nn.MLP((3, 5, 2), activation=square, final_activation=square)
    params = block.init(Rng(0, backend="numpy"), "float64")
    x = _normal((4, 3))
    ref = block.apply(params, x)
    h = x @ params[0]["W"] + params[0]["b"]
    np.testing.assert_allclose(ref, (h * h @ params[1]["W"] + params[1]["b"]) ** 2, rtol=1e-12)
    got = block.apply(to_device(params, backend), to_device(x, backend))
    np.testing.assert_allclose(to_numpy(got), ref, rtol=1e-12)


def test_sinusoidal_embedding_on_every_backend(backend):
    emb = nn.SinusoidalEmbedding(6)
    t = np.linspace(0.0, 999.0, 5)
    np.testing.assert_allclose(to_numpy(emb.apply({}, to_device(t, backend))), emb.apply({}, t), rtol=1e-12)


def test_init_on_every_backend_matches_numpy(backend):
    for block in (nn.MLP((3, 4, 2)), nn.MADE(3, (5,), context_dim=2), nn.Conv2d(2, 3, 3), nn.LayerNorm(3)):
        ref = block.init(Rng(7, backend="numpy"), "float64")
        got = block.init(Rng(7, backend=backend, host_draws=True), "float64")
        flat = lambda tree: [v for v in _leaves(tree)]
        for a, b in zip(flat(ref), flat(got)):
            assert backend_of(b) == backend
            np.testing.assert_array_equal(to_numpy(b), a)


def _leaves(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k])
    elif isinstance(tree, list):
        for v in tree:
            yield from _leaves(v)
    else:
        yield tree


# ---------------------------------------------------------------------------------------------------
# Properties: shapes and dtypes

batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
activations = st.sampled_from(nn.ACTIVATIONS)
dtypes = st.sampled_from(["float32", "float64"])


@given(batch=batch_shapes, d_in=st.integers(1, 5), d_out=st.integers(1, 5), act=activations, dtype=dtypes)
def test_dense_shape_and_dtype(batch, d_in, d_out, act, dtype):
    block = nn.Dense(d_in, d_out, activation=act)
    params = block.init(Rng(0), dtype)
    assert params["W"].shape == (d_in, d_out) and params["W"].dtype == np.dtype(dtype)
    assert params["b"].shape == (d_out,) and params["b"].dtype == np.dtype(dtype)
    y = block.apply(params, np.ones(batch + (d_in,), dtype=dtype))
    assert y.shape == batch + (d_out,) and y.dtype == np.dtype(dtype)
    assert np.all(np.isfinite(y))


@given(batch=batch_shapes, widths=st.lists(st.integers(1, 6), min_size=2, max_size=4), act=activations,
       dtype=dtypes)
def test_mlp_shape_dtype_and_gradient_dtype(batch, widths, act, dtype):
    block = nn.MLP(widths, activation=act)
    params = block.init(Rng(1), dtype)
    x = np.ones(batch + (widths[0],), dtype=dtype)
    y = block.apply(params, x)
    assert y.shape == batch + (widths[-1],) and y.dtype == np.dtype(dtype)
    grads = grad(lambda p: anp.sum(block.apply(p, x)))(params)
    assert all(g.dtype == np.dtype(dtype) for g in _leaves(grads))


@given(batch=batch_shapes, dim=st.integers(1, 5), hidden=st.lists(st.integers(1, 8), max_size=2),
       mult=st.integers(1, 3), ctx=st.integers(0, 2), dtype=dtypes)
def test_made_shape_and_dtype(batch, dim, hidden, mult, ctx, dtype):
    block = nn.MADE(dim, hidden, out_multiplier=mult, context_dim=ctx)
    params = block.init(Rng(2), dtype)
    context = np.ones(batch + (ctx,), dtype=dtype) if ctx else None
    y = block.apply(params, np.ones(batch + (dim,), dtype=dtype), context=context)
    assert y.shape == batch + (dim, mult) and y.dtype == np.dtype(dtype)


@given(n=st.integers(1, 2), h=st.integers(1, 5), w=st.integers(1, 5), k=st.sampled_from([1, 3]),
       stride=st.integers(1, 2), dtype=dtypes)
def test_conv_same_padding_shape(n, h, w, k, stride, dtype):
    block = nn.Conv2d(2, 3, k, stride=stride)
    y = block.apply(block.init(Rng(3), dtype), np.ones((n, h, w, 2), dtype=dtype))
    assert y.shape == (n, math.ceil(h / stride), math.ceil(w / stride), 3) and y.dtype == np.dtype(dtype)


@given(batch=batch_shapes, dim=st.integers(1, 6), dtype=dtypes)
def test_layernorm_and_residual_shapes(batch, dim, dtype):
    x = np.arange(math.prod(batch + (dim,)), dtype=dtype).reshape(batch + (dim,))
    for block in (nn.LayerNorm(dim), nn.ResidualMLPBlock(dim, 4)):
        y = block.apply(block.init(Rng(4), dtype), x)
        assert y.shape == x.shape and y.dtype == np.dtype(dtype)


# ---------------------------------------------------------------------------------------------------
# Semantics


def test_dense_is_the_affine_map_and_mlp_composes_layers():
    block = nn.MLP((3, 4, 2), activation="relu", final_activation="sigmoid")
    params = _params(block)
    x = _normal((5, 3))
    h = np.maximum(x @ params[0]["W"] + params[0]["b"], 0.0)
    expected = 1.0 / (1.0 + np.exp(-(h @ params[1]["W"] + params[1]["b"])))
    np.testing.assert_allclose(block.apply(params, x), expected, rtol=1e-12)
    assert "b" not in nn.Dense(3, 2, bias=False).init(Rng(0))


def test_masked_dense_uses_the_mask_and_keeps_it_constant():
    mask = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    block = nn.MaskedDense(mask)
    params = _params(block)
    x = _normal((4, 3))
    np.testing.assert_allclose(block.apply(params, x), x @ (params["W"] * mask) + params["b"], rtol=1e-12)
    assert set(params) == {"W", "b"}
    gW = jacobian(lambda W: anp.sum(block.apply({"W": W, "b": params["b"]}, x)))(params["W"])
    assert np.all(gW[mask == 0] == 0.0)


def test_layernorm_normalises_then_scales():
    block = nn.LayerNorm(6, eps=1e-12)
    x = _normal((4, 6)) * 5.0 + 3.0
    y = block.apply(block.init(Rng(0), "float64"), x)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-9)
    params = {"scale": np.full(6, 2.0), "shift": np.full(6, -1.0)}
    np.testing.assert_allclose(block.apply(params, x), 2.0 * y - 1.0, rtol=1e-9)


def test_residual_block_is_x_plus_mlp_of_layernorm():
    block = nn.ResidualMLPBlock(4, 6, activation="gelu")
    params = _params(block)
    x = _normal((3, 4))
    inner = nn.MLP((4, 6, 4), activation="gelu").apply(params["mlp"], nn.LayerNorm(4).apply(params["norm"], x))
    np.testing.assert_allclose(block.apply(params, x), x + inner, rtol=1e-12)


def test_made_degrees_and_masks():
    degrees = nn.made_degrees(3, (4,), order=[2, 0, 1])
    assert degrees == [(3, 1, 2), (1, 2, 1, 2)]
    masks = nn.made_masks(3, (4,), order=[2, 0, 1], out_multiplier=2)
    assert [m.shape for m in masks] == [(3, 4), (4, 6)]
    np.testing.assert_array_equal(masks[0], [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]])
    # output units 2i, 2i+1 belong to variable i (degree 3, 1, 2)
    np.testing.assert_array_equal(masks[1][:, :2], np.ones((4, 2)))
    np.testing.assert_array_equal(masks[1][:, 2:4], np.zeros((4, 2)))
    np.testing.assert_array_equal(masks[1][:, 4:], [[1, 1], [0, 0], [1, 1], [0, 0]])


@pytest.mark.parametrize("order, hidden, ctx", [(None, (10, 10), 0), ([3, 1, 4, 0, 2], (12,), 2), (None, (), 0)])
def test_made_is_autoregressive_by_jacobian(order, hidden, ctx):
    dim = 5
    block = nn.MADE(dim, hidden, out_multiplier=2, context_dim=ctx, activation="tanh", order=order)
    params = _params(block)
    order = list(range(dim)) if order is None else order
    context = _normal((ctx,), 3) if ctx else None
    J = jacobian(lambda x: block.apply(params, x, context=context))(_normal((dim,), 2))  # (dim, 2, dim)
    allowed = np.array([[order[j] < order[i] for j in range(dim)] for i in range(dim)])
    dep = np.any(J != 0.0, axis=1)
    assert np.all(dep[~allowed] == 0), "an output depends on a later input"
    assert np.array_equal(dep, allowed), "the network should use every allowed connection"
    if ctx:  # every output, including the first variable's, sees the context
        Jc = jacobian(lambda c: block.apply(params, _normal((dim,), 2), context=c))(context)
        assert np.all(np.any(Jc != 0.0, axis=-1))


@pytest.mark.parametrize("mask_type", ["A", "B"])
def test_masked_conv_receptive_field_by_jacobian(mask_type):
    block = nn.MaskedConv2d(2, 3, 3, mask_type=mask_type)
    params = _params(block)
    x = _normal((1, 5, 5, 2), 4)
    J = jacobian(lambda x: block.apply(params, x)[0, 2, 2, :])(x)  # (3, 1, 5, 5, 2)
    seen = np.any(J != 0.0, axis=(0, 1, 4))
    expected = np.zeros((5, 5), dtype=bool)
    expected[1, 1:4] = True
    expected[2, 1] = True
    expected[2, 2] = mask_type == "B"
    np.testing.assert_array_equal(seen, expected)


def test_conv_kernel_mask_multiplies_the_kernel_and_bad_masks_are_named():
    mask = np.zeros((3, 3, 2, 3))
    mask[0, 1, 1, 2] = 1.0  # output channel 2 sees input channel 1 one row up, nothing else
    block = nn.Conv2d(2, 3, 3, mask=mask)
    params = _params(block)
    x = _normal((1, 5, 5, 2), 4)
    want = nn.Conv2d(2, 3, 3).apply({"W": params["W"] * mask, "b": params["b"]}, x)
    np.testing.assert_allclose(to_numpy(block.apply(params, x)), to_numpy(want), atol=1e-12)
    J = jacobian(lambda x: block.apply(params, x)[0, 2, 2, :])(x)  # (3, 1, 5, 5, 2)
    assert np.array_equal(np.argwhere(J != 0.0), [[2, 0, 1, 2, 1]])
    with pytest.raises(ValueError, match=r"mask: expected a 0/1 array broadcasting to the kernel shape \(3, 3, 2, 3\)"):
        nn.Conv2d(2, 3, 3, mask=np.ones((2, 2)))
    with pytest.raises(ValueError, match="mask: expected only 0/1 entries"):
        nn.Conv2d(2, 3, 3, mask=np.full((3, 3, 1, 1), 0.5))


def _conv_reference(x, W, b, stride, pads):
    (pt, pb), (pl, pr) = pads
    xp_ = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    kh, kw, _, c_out = W.shape
    H_out = (xp_.shape[1] - kh) // stride[0] + 1
    W_out = (xp_.shape[2] - kw) // stride[1] + 1
    out = np.zeros((x.shape[0], H_out, W_out, c_out))
    for n in range(x.shape[0]):
        for i in range(H_out):
            for j in range(W_out):
                for o in range(c_out):
                    patch = xp_[n, i * stride[0]:i * stride[0] + kh, j * stride[1]:j * stride[1] + kw, :]
                    out[n, i, j, o] = np.sum(patch * W[..., o]) + b[o]
    return out


@pytest.mark.parametrize("kernel, stride, padding, pads", [
    (3, 1, "same", ((1, 1), (1, 1))),
    ((3, 2), 1, "same", ((1, 1), (0, 1))),
    (3, 2, "same", ((1, 1), (0, 1))),  # H=5 -> 3 rows (total pad 2), W=6 -> 3 cols (total pad 1)
    (2, 1, "valid", ((0, 0), (0, 0))),
    (3, (2, 1), 1, ((1, 1), (1, 1))),
    ((2, 3), 1, ((1, 0), (1, 1)), ((1, 0), (1, 1))),  # explicit: a causal conv's rows above only
    ((1, 2), 1, [[0, 0], [1, 0]], ((0, 0), (1, 0))),  # lists work too
])
def test_conv_matches_explicit_loops(kernel, stride, padding, pads):
    block = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding)
    params = _params(block)
    x = _normal((2, 5, 6, 2), 5)
    got = block.apply(params, x)
    np.testing.assert_allclose(got, _conv_reference(x, params["W"], params["b"], block.stride, pads), rtol=1e-12)
    # the same conv, padded by hand and applied with a per-call "valid" override
    (pt, pb), (pl, pr) = pads
    padded = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    np.testing.assert_allclose(block.apply(params, padded, padding="valid"), got, rtol=1e-12)


def test_init_schemes_statistics_and_determinism():
    rng_shape = (200, 300)
    W = nn.glorot(Rng(0), rng_shape, "float64")
    var = 2.0 / (200 + 300)
    limit = math.sqrt(3.0 * var)
    assert W.dtype == np.float64 and np.all(np.abs(W) <= limit)
    # var of a uniform sample: standard error of the sample variance is var * sqrt(0.8 / n)
    assert abs(W.var() - var) < 5 * var * math.sqrt(0.8 / W.size)
    H = nn.he(Rng(0), rng_shape, "float32")
    assert H.dtype == np.float32
    assert abs(H.var() - 2.0 / 200) < 5 * (2.0 / 200) * math.sqrt(2.0 / H.size)
    Wc = nn.he(Rng(0), (3, 3, 20, 30), "float64")
    assert abs(Wc.var() - 2.0 / 180) < 5 * (2.0 / 180) * math.sqrt(2.0 / Wc.size)
    np.testing.assert_array_equal(nn.zeros(Rng(0), (2, 3), "float64"), np.zeros((2, 3)))
    np.testing.assert_array_equal(nn.MLP((3, 4, 2)).init(Rng(5))[1]["W"], nn.MLP((3, 4, 2)).init(Rng(5))[1]["W"])
    assert not np.array_equal(nn.MLP((3, 4, 2)).init(Rng(5))[1]["W"], nn.MLP((3, 4, 2)).init(Rng(6))[1]["W"])
    assert np.all(nn.Dense(3, 4, init="zeros").init(Rng(0))["W"] == 0.0)
    custom = nn.Dense(3, 4, init=lambda rng, shape, dtype: nn.zeros(rng, shape, dtype) + 0.5)
    assert np.all(custom.init(Rng(0))["W"] == 0.5)


def test_reprs_are_readable():
    expected = "Dense(d_in=3, d_out=4, activation='relu', init='glorot', bias=True)"
    assert repr(nn.Dense(3, 4, activation="relu")) == expected
    assert repr(nn.MLP((2, 8, 1))) == "MLP(widths=(2, 8, 1), activation='relu', final_activation=None, init='he')"
    assert repr(nn.MADE(3, (8,))).startswith("MADE(dim=3, hidden_widths=(8,), out_multiplier=1")
    assert repr(nn.MaskedConv2d(1, 4, 3, mask_type="B")).startswith("MaskedConv2d(c_in=1, c_out=4, kernel_size=(3, 3)")
    assert repr(nn.LayerNorm(4)) == "LayerNorm(dim=4, eps=1e-05)"
    assert repr(nn.SinusoidalEmbedding(8)) == "SinusoidalEmbedding(dim=8, max_period=10000.0)"
    assert "activation='sin'" in repr(nn.Dense(2, 2, activation=np.sin))


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_wrong_trailing_dimension_names_the_argument_and_both_sizes():
    for block, x in [(nn.Dense(4, 3), np.ones((2, 5))), (nn.MLP((4, 3)), np.ones((2, 5))),
                     (nn.MADE(4, (8,)), np.ones((2, 5))), (nn.LayerNorm(4), np.ones((2, 5))),
                     (nn.Conv2d(4, 3, 3), np.ones((1, 3, 3, 5)))]:
        with pytest.raises(ValueError, match=r"x: expected .*4.* got shape .*5\)"):
            block.apply(block.init(Rng(0)), x)
    made = nn.MADE(3, (6,), context_dim=2)
    params = made.init(Rng(0))
    with pytest.raises(ValueError, match=r"context: expected a last axis of size 2, got shape \(4, 3\)"):
        made.apply(params, np.ones((4, 3), "float32"), context=np.ones((4, 3), "float32"))
    with pytest.raises(ValueError, match="context: this MADE expects a context of size 2"):
        made.apply(params, np.ones((4, 3), "float32"))
    with pytest.raises(ValueError, match="context: batch shape"):
        made.apply(params, np.ones((4, 3), "float32"), context=np.ones((3, 2), "float32"))
    with pytest.raises(ValueError, match="context_dim=0"):
        nn.MADE(3, (6,)).apply(nn.MADE(3, (6,)).init(Rng(0)), np.ones((4, 3)), context=np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"x: expected a 4-d array"):
        nn.Conv2d(2, 3, 3).apply(nn.Conv2d(2, 3, 3).init(Rng(0)), np.ones((3, 3, 2)))
    with pytest.raises(TypeError, match="x: expected a floating array"):
        nn.Dense(2, 2).apply(nn.Dense(2, 2).init(Rng(0)), np.ones((3, 2), dtype=int))


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match=r"activation: expected one of \('identity', 'relu'"):
        nn.Dense(2, 3, activation="swish")
    with pytest.raises(ValueError, match=r"final_activation: expected one of"):
        nn.MLP((2, 3), final_activation="softmax")
    with pytest.raises(ValueError, match=r"init: expected one of \('glorot', 'he', 'zeros'\)"):
        nn.Dense(2, 3, init="xavier")
    with pytest.raises(ValueError, match=r"mask_type: expected one of \('A', 'B'\)"):
        nn.MaskedConv2d(1, 1, 3, mask_type="C")
    with pytest.raises(ValueError, match="dtype: expected"):
        nn.Dense(2, 3).init(Rng(0), "float16")


def test_invalid_hyperparameters():
    with pytest.raises(ValueError, match="widths: expected"):
        nn.MLP((3,))
    with pytest.raises(ValueError, match=r"widths\[1\]: expected a positive int"):
        nn.MLP((3, 0, 2))
    with pytest.raises(ValueError, match="order: expected a permutation of range"):
        nn.MADE(3, (4,), order=[0, 0, 1])
    with pytest.raises(ValueError, match="mask: expected only 0/1"):
        nn.MaskedDense(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="mask: expected a 2-d"):
        nn.MaskedDense(np.ones(3))
    with pytest.raises(ValueError, match="kernel_size: expected odd"):
        nn.MaskedConv2d(1, 1, 2)
    for bad in ("full", ((1, -1), (0, 0)), ((1, 0), (0,)), (1, 2, 3), ((1.5, 0), (0, 0)), True):
        with pytest.raises(ValueError, match="padding: expected"):
            nn.Conv2d(1, 1, 3, padding=bad)
    with pytest.raises(ValueError, match="padding: expected"):
        nn.Conv2d(1, 1, 3).apply(nn.Conv2d(1, 1, 3).init(Rng(0)), np.ones((1, 3, 3, 1)), padding="full")
    with pytest.raises(ValueError, match="d_in: expected a positive int"):
        nn.Dense(0, 3)
    with pytest.raises(ValueError, match="x: spatial size"):
        nn.Conv2d(1, 1, 5, padding="valid").apply(nn.Conv2d(1, 1, 5).init(Rng(0)), np.ones((1, 3, 3, 1)))


def test_im2col_padding_forms_agree(backend):
    x = to_device(_normal((2, 5, 4, 3)), backend)
    same = nn.im2col(x, 3, padding="same")
    assert backend_of(same) == backend and tuple(same.shape) == (2, 5, 4, 27)
    np.testing.assert_array_equal(to_numpy(nn.im2col(x, 3, padding=1)), to_numpy(same))
    np.testing.assert_array_equal(to_numpy(nn.im2col(x, (3, 3), padding=(1, 1))), to_numpy(same))
    assert tuple(nn.im2col(x, 3, stride=2, padding="valid").shape) == (2, 2, 1, 27)
    assert nn.conv_pads((2, 5, 4, 3), (3, 3), (2, 2), "same") == ((1, 1), (0, 1))  # odd extra: bottom/right
