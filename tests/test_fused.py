"""The fused dense + activation primitive: gradients (first and second order), dtypes, fused == unfused."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads

from genblocks.backends import fused, namespace, to_device, to_numpy
from genblocks.backends.activations import ACTIVATIONS, apply_activation

xp = namespace(np.zeros(1))


def _data(x_shape, d_out=4, dtype="float64", seed=0):
    r = np.random.default_rng(seed)
    d_in = x_shape[-1]
    x = r.normal(size=x_shape).astype(dtype)
    W = r.normal(size=(d_in, d_out)).astype(dtype)
    b = r.normal(size=(d_out,)).astype(dtype)
    return x, W, b


def _unfused(x, W, b, name):
    z = anp.matmul(x, W)
    if b is not None:
        z = z + b
    return apply_activation(anp, z, name)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3)])
def test_first_order_gradients_x_W_b(name, x_shape):
    x, W, b = _data(x_shape)
    # sin makes the cotangent non-constant, so a wrong activation derivative cannot hide
    check_grads(lambda x, W, b: anp.sum(anp.sin(xp.dense(x, W, b, name))), modes=["rev"], order=1)(x, W, b)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_gradients_without_bias_and_1d_x(name):
    x, W, _ = _data((3,))
    check_grads(lambda x, W: anp.sum(anp.sin(xp.dense(x, W, None, name))), modes=["rev"], order=1)(x, W)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_second_order_gradients(name):
    """Gradients of gradients (gradient penalties, sliced score matching) go through the traced VJP."""
    x, W, b = _data((4, 3), d_out=3, seed=1)
    check_grads(lambda x, W, b: anp.sum(anp.sin(xp.dense(x, W, b, name))), modes=["rev"], order=2)(x, W, b)


def test_gradient_penalty_through_dense_matches_unfused():
    """d/dW ||d/dx sum(dense(x, W, b))||^2: x traced inside, W outside (mixed trace levels)."""
    x, W, b = _data((6, 3), d_out=5, seed=2)

    def penalty(W, f):
        gx = grad(lambda x: anp.sum(anp.cos(f(x, W, b, "silu"))))(x)
        return anp.sum(gx * gx)

    np.testing.assert_allclose(grad(penalty)(W, xp.dense), grad(penalty)(W, _unfused), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_float32_gradients_stay_float32(name):
    x, W, b = _data((5, 3), dtype="float32")
    # a float64 cotangent (from a float64 loss term) must still give float32 gradients
    gs = grad(lambda args: anp.sum(xp.dense(*args, name) * np.ones(4, dtype="float64")))((x, W, b))
    assert [g.dtype for g in gs] == [np.float32] * 3
    assert xp.dense(x, W, b, name).dtype == np.float32


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_float32_second_order_gradients_stay_float32(name):
    x, W, b = _data((4, 3), d_out=2, dtype="float32", seed=7)

    def penalty(W):
        gx = grad(lambda x: anp.sum(xp.dense(x, W, b, name) * 2.0))(x)
        return anp.sum(gx * gx)

    assert grad(penalty)(W).dtype == np.float32


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("x_shape", [(5, 3), (2, 4, 3)])
def test_fused_equals_unfused_values_and_gradients(name, x_shape):
    x, W, b = _data(x_shape, seed=3)
    x = x * 3.0  # reach the tails of every activation
    np.testing.assert_allclose(xp.dense(x, W, b, name), _unfused(x, W, b, name), rtol=1e-13, atol=1e-13)
    strict = namespace(to_device(x, "strict"))
    got = strict.dense(*to_device((x, W, b), "strict"), name)
    np.testing.assert_allclose(to_numpy(got), _unfused(x, W, b, name), rtol=1e-13, atol=1e-13)

    def loss(f):
        return lambda args: anp.sum(anp.sin(f(*args, name)))

    for g_fused, g_ref in zip(grad(loss(xp.dense))((x, W, b)), grad(loss(_unfused))((x, W, b))):
        np.testing.assert_allclose(g_fused, g_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_inputs_are_not_modified_and_the_z_slot_is_released(name):
    x, W, b = _data((5, 3), seed=4)
    copies = [a.copy() for a in (x, W, b)]
    y = xp.dense(x, W, b, name)
    assert fused._pending_z() is None  # an untraced call keeps nothing alive
    g = grad(lambda args: anp.sum(xp.dense(*args, name) ** 2))((x, W, b))
    for a, c in zip((x, W, b), copies):
        np.testing.assert_array_equal(a, c)
    assert fused._pending_z() is None
    np.testing.assert_array_equal(y, xp.dense(x, W, b, name))  # the forward output is not a reused buffer
    assert all(np.all(np.isfinite(gi)) for gi in g)


def test_shared_cotangent_is_not_overwritten():
    """add's VJP passes one cotangent object to both operands; the dense VJP must not write into it."""
    x, W, b = _data((5, 3), d_out=3, seed=5)

    def f(x):
        return anp.sum(anp.sin(xp.dense(x, W, b, "tanh") + x))

    def ref(x):
        return anp.sum(anp.sin(_unfused(x, W, b, "tanh") + x))

    np.testing.assert_allclose(grad(f)(x), grad(ref)(x), rtol=1e-12)


def test_batched_bias_falls_back_to_the_generic_formula():
    x, W, _ = _data((5, 3))
    B = np.random.default_rng(6).normal(size=(5, 4))
    check_grads(lambda W, B: anp.sum(anp.sin(xp.dense(x, W, B, "silu"))), modes=["rev"], order=1)(W, B)


def test_extreme_inputs_stay_finite():
    x = np.array([[-3e38, 3e38, -1e4, 1e4, 0.0]], dtype="float32")  # up to float32's max
    W = np.eye(5, dtype="float32")
    for name in ACTIVATIONS:
        y, gs = xp.dense(x, W, None, name), grad(lambda W: anp.sum(xp.dense(x, W, None, name)))(W)
        assert np.all(np.isfinite(y)) and np.all(np.isfinite(gs)), name


def test_bad_arguments():
    x, W, b = _data((5, 3))
    with pytest.raises(ValueError, match="activation: expected one of"):
        xp.dense(x, W, b, "swish")
    with pytest.raises(ValueError, match=r"dense: x has shape \(5, 2\).*d_in = 3"):
        xp.dense(x[:, :2], W, b)
    with pytest.raises(ValueError, match="W must be 2-d"):
        xp.dense(x, W[None], b)
    with pytest.raises(ValueError, match="b must have a last axis of d_out = 4"):
        xp.dense(x, W, b[:3])


# ---------------------------------------------------------------------------------------------------
# im2col

IM2COL_CASES = [  # (x shape, kernel, stride, pads)
    ((2, 4, 5, 3), (3, 3), (1, 1), ((1, 1), (1, 1))),
    ((1, 5, 6, 2), (3, 2), (2, 1), ((1, 1), (0, 1))),
    ((2, 3, 3, 1), (2, 2), (1, 1), ((0, 0), (0, 0))),
    ((1, 6, 5, 2), (1, 1), (2, 2), ((0, 1), (2, 0))),
]


def _im2col_loops(x, k, s, pads):
    padded = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    Ho = (padded.shape[1] - k[0]) // s[0] + 1
    Wo = (padded.shape[2] - k[1]) // s[1] + 1
    out = np.empty((x.shape[0], Ho, Wo, k[0] * k[1] * x.shape[3]))
    for i in range(Ho):
        for j in range(Wo):
            patch = padded[:, i * s[0]:i * s[0] + k[0], j * s[1]:j * s[1] + k[1], :]
            out[:, i, j, :] = patch.reshape(x.shape[0], -1)
    return out


@pytest.mark.parametrize("shape, k, s, pads", IM2COL_CASES)
def test_im2col_matches_loops_on_numpy_and_strict(shape, k, s, pads):
    x = np.random.default_rng(0).normal(size=shape)
    expected = _im2col_loops(x, k, s, pads)
    np.testing.assert_array_equal(xp.im2col(x, k, s, pads), expected)
    strict = namespace(to_device(x, "strict"))
    np.testing.assert_array_equal(to_numpy(strict.im2col(to_device(x, "strict"), k, s, pads)), expected)


@pytest.mark.parametrize("shape, k, s, pads", IM2COL_CASES)
def test_im2col_gradients_first_and_second_order(shape, k, s, pads):
    x = np.random.default_rng(1).normal(size=shape)
    check_grads(lambda x: anp.sum(anp.sin(xp.im2col(x, k, s, pads))), modes=["rev"], order=2)(x)


def test_col2im_is_the_adjoint_and_float32_stays_float32():
    shape, k, s, pads = IM2COL_CASES[1]
    r = np.random.default_rng(2)
    x = r.normal(size=shape).astype("float32")
    c = r.normal(size=xp.im2col(x, k, s, pads).shape)
    # <im2col(x), c> = <x, im2col^T(c)>, and im2col^T(c) is the VJP
    g = grad(lambda x: anp.sum(xp.im2col(x, k, s, pads) * c))(x)
    assert g.dtype == np.float32
    np.testing.assert_allclose(np.sum(xp.im2col(x, k, s, pads) * c), np.sum(x * g), rtol=1e-5)


def test_im2col_bad_arguments():
    with pytest.raises(ValueError, match="x must be NHWC"):
        xp.im2col(np.ones((3, 3, 1)), (1, 1))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        xp.im2col(np.ones((1, 2, 2, 1)), (3, 3))
    with pytest.raises(ValueError, match="non-negative pads"):
        xp.im2col(np.ones((1, 4, 4, 1)), (3, 3), (1, 1), ((-1, 0), (0, 0)))


@pytest.mark.parametrize("name", ["silu", "gelu"])
def test_pre_activation_is_reused_not_recomputed(name, monkeypatch):
    x, W, b = _data((5, 3), seed=8)
    calls = []
    forward = fused._forward
    monkeypatch.setattr(fused, "_forward", lambda *a: calls.append(a[-1]) or forward(*a))
    g = grad(lambda W: anp.sum(anp.sin(xp.dense(x, W, b, name))))(W)
    assert calls == [name]  # one forward pass, no x @ W in the VJP
    # and when the slot does not match (another thread overwrote it), z is recomputed: same gradient
    monkeypatch.setattr(fused, "_take_z", lambda ans: None)
    np.testing.assert_allclose(grad(lambda W: anp.sum(anp.sin(xp.dense(x, W, b, name))))(W), g, rtol=1e-14)
    assert calls == [name, name, "identity"]


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_every_backend_computes_the_same_dense(name, dtype, backend):
    """numpy's fused forward, strict's composed calls and cupy's one-kernel epilogue agree, extremes included."""
    x, W, b = _data((7, 3), d_out=5, dtype=dtype, seed=3)
    x[0] = [1e3, -1e3, 0.0]  # pre-activations far in both tails: finite everywhere
    x[1] = [-1e3, 1e3, 0.0]
    tol = dict(rtol=2e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    for bias in (b, None):
        ref = xp.dense(x, W, bias, name)
        xs, Ws, bs = to_device((x, W, bias), backend)
        got = namespace(xs).dense(xs, Ws, bs, name)
        assert str(got.dtype).endswith(dtype)
        out = to_numpy(got)
        assert np.all(np.isfinite(out))
        np.testing.assert_allclose(out, ref, **tol)


def test_backend_modules_import_each_other_without_cycles():
    """Old code: fused.py imported numpy_backend (inside _cast) and numpy_backend imported fused. Every import
    between backends/ modules, at any depth in the file, must form an acyclic graph; activations.py imports
    no array library."""
    import ast
    import pathlib

    folder = pathlib.Path(__file__).resolve().parents[1] / "genblocks" / "backends"
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.add(node.module or "__init__")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[path.stem] = deps
    assert not graph["activations"] & {"numpy", "autograd", "cupy", "array_api_strict"}

    def visit(name, stack):
        assert name not in stack, f"import cycle: {' -> '.join(stack + [name])}"
        for dep in graph.get(name, ()):
            if dep in graph and dep != "__init__":
                visit(dep, stack + [name])

    for name in graph:
        visit(name, [])
    assert "__init__" not in {d for n, deps in graph.items() if n != "__init__" for d in deps}, \
        "a backends module imports back from its package"


# ---------------------------------------------------------------------------------------------------
# log_softmax_take: the categorical log-likelihood


def _lst_data(shape=(3, 5), k=4, dtype="float64", seed=0):
    r = np.random.default_rng(seed)
    return r.normal(size=shape + (k,)).astype(dtype) * 3.0, r.integers(0, k, size=shape)


def _lst_composed(logits, index):
    lse = anp.log(anp.sum(anp.exp(logits), axis=-1))
    return anp.sum(logits * (np.arange(logits.shape[-1]) == index[..., None]), axis=-1) - lse


def test_log_softmax_take_value_and_gradients_first_and_second_order():
    logits, index = _lst_data()
    np.testing.assert_allclose(xp.log_softmax_take(logits, index), _lst_composed(logits, index), rtol=1e-12)
    check_grads(lambda l: anp.sum(anp.sin(xp.log_softmax_take(l, index))), modes=["rev"], order=2)(logits)
    g = grad(lambda l: anp.sum(anp.sin(xp.log_softmax_take(l, index))))(logits)
    np.testing.assert_allclose(g, grad(lambda l: anp.sum(anp.sin(_lst_composed(l, index))))(logits), atol=1e-12)


def test_log_softmax_take_float32_stays_float32_and_is_stable_for_large_logits():
    logits, index = _lst_data(dtype="float32")
    logits = logits + np.float32(1e4)
    out = xp.log_softmax_take(logits, index)
    g = grad(lambda l: anp.sum(xp.log_softmax_take(l, index)))(logits)
    assert out.dtype == np.float32 and g.dtype == np.float32
    assert np.all(np.isfinite(out)) and np.all(out <= 0.0) and np.all(np.isfinite(g))
    np.testing.assert_allclose(np.sum(g, axis=-1), 0.0, atol=1e-5)  # onehot - softmax sums to 0
    saved = logits.copy()
    grad(lambda l: anp.sum(xp.log_softmax_take(l, index)))(logits)
    np.testing.assert_array_equal(logits, saved)  # inputs not modified


def test_log_softmax_take_bad_shapes_and_every_backend(backend):
    logits, index = _lst_data()
    with pytest.raises(ValueError, match="index must have logits' shape"):
        xp.log_softmax_take(logits, index[:, :2])
    ons = lambda t: to_device(t, backend)  # noqa: E731
    got = namespace(ons(logits)).log_softmax_take(ons(logits), ons(index))
    np.testing.assert_allclose(to_numpy(got), xp.log_softmax_take(logits, index), rtol=1e-12)


# ---------------------------------------------------------------------------------------------------
# dense on stacked inputs: one BLAS call over every row


@pytest.mark.parametrize("name", ["identity", "relu", "silu"])
def test_dense_on_4d_and_non_contiguous_inputs_equals_the_row_by_row_product(name):
    """x (n, H, W, k) goes to BLAS as one (n H W, k) matrix: the same values and gradients as the stacked
    matmul, for a contiguous x and for a strided view."""
    x, W, b = _data((2, 3, 4, 6), d_out=5, seed=4)
    for xx in (x, x[:, :, ::2, :], np.swapaxes(x, 1, 2)):
        np.testing.assert_allclose(xp.dense(xx, W, b, name), _unfused(xx, W, b, name), rtol=1e-13, atol=1e-13)

        def loss(f):
            return lambda args: anp.sum(anp.sin(f(*args, name)))

        for g_fused, g_ref in zip(grad(loss(xp.dense))((xx, W, b)), grad(loss(_unfused))((xx, W, b))):
            assert g_fused.shape == g_ref.shape
            np.testing.assert_allclose(g_fused, g_ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------
# gated_tanh: PixelCNN's gate


def _gate_composed(a):
    F = a.shape[-1] // 2
    return anp.tanh(a[..., :F]) * (1.0 / (1.0 + anp.exp(-a[..., F:])))


def test_gated_tanh_value_and_gradients_first_and_second_order():
    a = np.random.default_rng(5).normal(size=(3, 2, 8)) * 2.0
    np.testing.assert_allclose(xp.gated_tanh(a), _gate_composed(a), rtol=1e-12, atol=1e-14)
    check_grads(lambda a: anp.sum(anp.sin(xp.gated_tanh(a))), modes=["rev"], order=2)(a)
    g = grad(lambda a: anp.sum(anp.sin(xp.gated_tanh(a))))(a)
    np.testing.assert_allclose(g, grad(lambda a: anp.sum(anp.sin(_gate_composed(a))))(a), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gated_tanh_dtype_extremes_and_inputs_untouched(dtype):
    a = np.array([[-1e4, -90.0, -1.0, 0.0, 1e-8, 1.0, 90.0, 1e4] * 2], dtype=dtype)
    saved = a.copy()
    y = xp.gated_tanh(a)
    g = grad(lambda a: anp.sum(xp.gated_tanh(a)))(a)
    assert y.dtype == g.dtype == np.dtype(dtype) and y.shape == (1, 8)
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(g))
    with np.errstate(over="ignore"):
        want = np.tanh(saved[:, :8]) / (1.0 + np.exp(-saved[:, 8:].astype(np.float64)))
    np.testing.assert_allclose(y, want, atol=1e-6 if dtype == "float32" else 1e-15)
    np.testing.assert_array_equal(a, saved)


def test_gated_tanh_bad_shape_and_every_backend(backend):
    with pytest.raises(ValueError, match="gated_tanh: a must have an even last axis"):
        xp.gated_tanh(np.zeros((2, 3)))
    a = np.random.default_rng(6).normal(size=(4, 6)) * 3.0
    got = namespace(to_device(a, backend)).gated_tanh(to_device(a, backend))
    np.testing.assert_allclose(to_numpy(got), xp.gated_tanh(a), rtol=1e-12, atol=1e-14)


def test_log_softmax_take_flat_gather_and_scatter_equal_the_along_axis_ones():
    # the flat positions row * K + index pick and add into exactly the elements take_along_axis /
    # put_along_axis do; an index outside [0, K) falls back to those (negative ones wrap, as before)
    logits, index = _lst_data(shape=(2, 5, 3), k=7)
    pos = fused._flat_positions(index, 7)
    want = np.take_along_axis(logits, index[..., None], -1)[..., 0]
    np.testing.assert_array_equal(fused._take(logits, index, pos), want)
    g = np.random.default_rng(2).normal(size=index.shape)
    d1, d2 = logits.copy(), logits.copy()
    fused._add_at_index(d1, index, pos, g)
    picked = np.take_along_axis(d2, index[..., None], -1) + g[..., None]
    np.put_along_axis(d2, index[..., None], picked, -1)
    np.testing.assert_array_equal(d1, d2)
    wrapped = index - 7
    assert fused._flat_positions(wrapped, 7) is None and fused._flat_positions(index + 1, 7) is None
    np.testing.assert_array_equal(xp.log_softmax_take(logits, wrapped), xp.log_softmax_take(logits, index))
    gw = grad(lambda l: anp.sum(anp.sin(xp.log_softmax_take(l, wrapped))))(logits)
    np.testing.assert_array_equal(gw, grad(lambda l: anp.sum(anp.sin(xp.log_softmax_take(l, index))))(logits))


@pytest.mark.parametrize("k", [1, 2, 3, 5, 8, 16, 17, 31, 32, 33])
def test_row_max_by_doubling_equals_numpys_max(k):
    r = np.random.default_rng(k)
    logits = r.normal(size=(3, 7, 5, k)).astype("float32") * 10.0
    logits[0, 0, 0, -1] = np.nan
    logits[0, 1, 0, 0] = np.inf
    logits[1, 0, 0] = -np.inf
    for x in (logits, logits[:, ::2], np.swapaxes(logits, 0, 1)):
        got = fused._row_max(x)
        np.testing.assert_array_equal(got, np.max(x, axis=-1, keepdims=True))
        got[...] = 0.0  # a fresh array: writing to it leaves the logits alone
    assert not np.all(logits == 0.0)


# ---------------------------------------------------------------------------------------------------
# reuse_buffers(): outputs recycled once nothing references them, never while something does


def _address(a):
    return a.__array_interface__["data"][0]


def test_reuse_buffers_recycles_dropped_outputs_and_never_overwrites_held_ones():
    from genblocks.backends import reuse_buffers

    x, W, b = _data((1024, 8), d_out=32, dtype="float32")  # 128 kB outputs: pooled (64 kB or more)
    expected = xp.dense(x, W, b, "silu")
    with reuse_buffers():
        held = xp.dense(x, W, b, "silu")
        view = xp.dense(x, W, b, "relu")[:3]  # a view keeps its base referenced
        dropped = _address(xp.dense(x, W, b, "silu"))
        again = xp.dense(x * 2.0, W, b, "silu")
        assert _address(again) == dropped  # the dropped output's memory, handed out again
        for _ in range(5):  # later calls write elsewhere: what is held keeps its values
            xp.dense(-x, W, b, "silu")
        np.testing.assert_array_equal(held, expected)
        np.testing.assert_array_equal(view, xp.dense(x, W, b, "relu")[:3])
        keys = set(fused._pool.arrays)
        xp.dense(x[:100], W, b, "silu")  # 12.8 kB: from malloc's free lists, not pooled
        assert set(fused._pool.arrays) == keys
        assert _address(held) != _address(again) and not np.shares_memory(view, again)
    np.testing.assert_array_equal(held, expected)  # and after the block


def test_reuse_buffers_gives_the_same_bits_and_is_scoped_nested_and_per_thread():
    import threading

    from genblocks.backends import reuse_buffers

    x, W, b = _data((1024, 6), d_out=16, dtype="float32")
    plain = [xp.dense(x, W, b, name) for name in ACTIVATIONS]
    with reuse_buffers():
        with reuse_buffers():  # nested: one pool, kept until the outer block ends
            inner = [xp.dense(x, W, b, name) for name in ACTIVATIONS]
        assert fused._pool.arrays  # still the outer block's pool
        seen = []
        worker = threading.Thread(target=lambda: seen.append(getattr(fused._pool, "arrays", None)))
        worker.start()
        worker.join()
        assert seen == [None]  # another thread has no pool of this block
    assert fused._pool.arrays is None
    for a, c in zip(plain, inner):
        np.testing.assert_array_equal(a, c)
    a1, a2 = xp.dense(x, W, b, "silu"), xp.dense(x, W, b, "silu")
    assert not np.shares_memory(a1, a2)  # outside the block: fresh arrays


def test_reuse_buffers_keeps_gradients_and_leaves_conv2d_alone():
    from genblocks.backends import reuse_buffers

    x, W, b = _data((2048, 5), d_out=7)
    loss = lambda W: anp.sum(anp.sin(xp.dense(xp.dense(x, W[:, :5], b[:5], "silu"), W[:5, :], b, "tanh")))
    W = np.random.default_rng(1).normal(size=(5, 7))
    g_plain = grad(loss)(W)
    img = np.random.default_rng(2).normal(size=(64, 12, 12, 2)).astype("float32")
    K = np.random.default_rng(3).normal(size=(3, 3, 2, 4)).astype("float32")
    conv_plain = xp.conv2d(img, K, None, (1, 1), ((1, 1), (1, 1)), "silu")
    with reuse_buffers():
        np.testing.assert_array_equal(grad(loss)(W), g_plain)
        first = xp.conv2d(img, K, None, (1, 1), ((1, 1), (1, 1)), "silu")
        second = xp.conv2d(-img, K, None, (1, 1), ((1, 1), (1, 1)), "silu")
        np.testing.assert_array_equal(first, conv_plain)
        pooled = [a for arrays in fused._pool.arrays.values() for a in arrays]
        assert not any(np.shares_memory(a, c) for a in pooled for c in (first, second))  # conv outputs: fresh
        np.testing.assert_array_equal(-second, -xp.conv2d(-img, K, None, (1, 1), ((1, 1), (1, 1)), "silu"))


def test_reuse_buffers_does_nothing_where_reference_counts_prove_nothing(monkeypatch):
    from genblocks.backends import reuse_buffers

    assert fused._FREE_REFS is not None  # CPython with a GIL, as in CI
    monkeypatch.setattr(fused, "_FREE_REFS", None)
    x, W, b = _data((2048, 4), d_out=8)
    with reuse_buffers():
        y = xp.dense(x, W, b, "silu")
        assert fused._pooled((2048, 8), "float64") is None
        np.testing.assert_array_equal(y, xp.dense(x, W, b, "silu"))
        assert not fused._pool.arrays  # nothing was pooled
