"""Backends: namespaces, device moves, the default-backend switch and every numpy-backend patch."""

import os
import subprocess
import sys

import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given
from hypothesis import strategies as st

from genblocks.backends import (
    BACKENDS,
    VOCAB,
    backend_of,
    get_backend,
    namespace,
    resolve_dtype,
    set_backend,
    to_device,
    to_numpy,
    use_backend,
)
from genblocks.backends.vocab import ARRAY_API, EXTRAS, LINALG

xnp = namespace(np.zeros(1))
RS = np.random.default_rng(0)


def _x(*shape):
    return RS.normal(size=shape)


# --- every VOCAB name exists everywhere -------------------------------------------------------------


@pytest.mark.parametrize("name", ["numpy", "strict"])
def test_every_vocab_name_exists(name):
    xp = namespace(to_device(np.zeros(1), name))
    missing = [n for n in VOCAB if not hasattr(xp, n)]
    missing += [f"linalg.{n}" for n in LINALG if not hasattr(xp.linalg, n)]
    assert not missing, f"{name} backend lacks {missing}"
    assert xp.backend_name == name


def test_vocab_is_array_api_plus_extras():
    assert set(ARRAY_API) | set(EXTRAS) == set(VOCAB)


# --- namespace and device moves -------------------------------------------------------------------


def test_namespace_follows_the_arrays(backend):
    x = to_device(np.ones(3), backend)
    assert namespace(x).backend_name == backend
    assert namespace({"a": [x, (x,)]}, 2.0).backend_name == backend
    assert backend_of(x) == backend


def test_namespace_mixing_backends_names_to_device():
    with pytest.raises(TypeError, match="to_device"):
        namespace(np.ones(2), {"w": to_device(np.ones(2), "strict")})


def test_namespace_without_arrays_uses_default():
    assert namespace().backend_name == get_backend() == "numpy"
    with use_backend("strict") as xp:
        assert xp.backend_name == "strict"
        assert namespace(1.0).backend_name == "strict"
    assert get_backend() == "numpy"


def test_use_backend_restores_on_error():
    with pytest.raises(RuntimeError):
        with use_backend("strict"):
            raise RuntimeError("boom")
    assert get_backend() == "numpy"


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend: expected one of"):
        set_backend("torch")
    set_backend("strict")
    try:
        assert get_backend() == "strict"
    finally:
        set_backend("numpy")


def test_env_var_sets_default_backend():
    code = "from genblocks.backends import get_backend; print(get_backend())"
    env = dict(os.environ, GENBLOCKS_BACKEND="strict")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "strict"
    env["GENBLOCKS_BACKEND"] = "jax"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "GENBLOCKS_BACKEND: expected one of" in bad.stderr and "'jax'" in bad.stderr


def test_cupy_missing_gives_install_hint():
    try:
        import cupy  # noqa: F401

        pytest.skip("cupy is installed here: the missing-cupy message cannot be observed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r'pip install "genblocks\[gpu\]"'):
        set_backend("cupy")
    assert get_backend() == "numpy"


def test_to_device_round_trip_and_dtype(backend):
    tree = {"w": np.arange(6.0).reshape(2, 3), "b": [np.ones(2, np.float32), (np.int64(3) * np.ones(1, np.int64),)]}
    moved = to_device(tree, backend, dtype="float32")
    assert backend_of(moved["w"]) == backend
    back = to_numpy(moved)
    assert back["w"].dtype == np.float32 and back["b"][1][0].dtype == np.int64
    np.testing.assert_array_equal(back["w"], tree["w"])
    with pytest.raises(ValueError, match="dtype"):
        to_device(tree, backend, dtype="int8")
    with pytest.raises(ValueError, match="backend"):
        to_device(tree, "tpu")


def test_resolve_dtype():
    assert resolve_dtype(xnp, "float32") == np.float32
    assert resolve_dtype(xnp, np.dtype("float64")) == np.float64
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(xnp, "int32")


def test_numpy_backend_has_only_host_device():
    with pytest.raises(ValueError, match="device"):
        xnp.zeros(3, device="cuda")


# --- patches: gradients against finite differences (float64) --------------------------------------

# Each case is written once in array-API form, ``case(xp, x, c)`` with ``c`` moving a host constant to
# x's backend, and runs on numpy (gradients) and on array_api_strict (the referee for values).
PATCH_CASES = {
    "concat": lambda xp, x, c: xp.concat([x, 2.0 * x], axis=1),
    "concat_none": lambda xp, x, c: xp.concat([x, x[:1, ...]], axis=None),
    "permute_dims": lambda xp, x, c: xp.permute_dims(x, (1, 0)),
    "matrix_transpose": lambda xp, x, c: xp.matrix_transpose(x),
    "take": lambda xp, x, c: xp.take(x, c(np.array([2, 0, 2])), axis=1),
    "take_along_axis": lambda xp, x, c: xp.take_along_axis(x, c(np.array([[0, 0], [2, 1], [1, 1]])), axis=1),
    "flip": lambda xp, x, c: xp.flip(x, axis=0) * c(np.arange(1.0, 4.0)[:, None]),
    "flip_all": lambda xp, x, c: xp.flip(x) * c(np.arange(9.0).reshape(3, 3)),
    "cumulative_sum": lambda xp, x, c: xp.cumulative_sum(x, axis=1),
    "cumulative_sum_initial": lambda xp, x, c: xp.cumulative_sum(x, axis=0, include_initial=True),
    "vector_norm": lambda xp, x, c: xp.vector_norm(x, axis=1),
    "vector_norm_1": lambda xp, x, c: xp.vector_norm(x, axis=0, ord=1),
    "linalg.vector_norm": lambda xp, x, c: xp.linalg.vector_norm(x),
    "matrix_norm": lambda xp, x, c: xp.linalg.matrix_norm(x),
    "mean": lambda xp, x, c: xp.mean(x, axis=0),
    "var": lambda xp, x, c: xp.var(x, axis=1, correction=1),
    "std": lambda xp, x, c: xp.std(x, axis=0, correction=0.5, keepdims=True),
    "astype": lambda xp, x, c: xp.astype(x, xp.float64) * x,
    "max": lambda xp, x, c: xp.max(x, axis=1),
    "min": lambda xp, x, c: xp.min(x, axis=0, keepdims=True),
    "maximum": lambda xp, x, c: xp.maximum(x, 0.1) + xp.maximum(0.2, xp.flip(x, axis=0)),
    "minimum": lambda xp, x, c: xp.minimum(x, x[:, :1] * 0.5),
    "broadcast_to": lambda xp, x, c: xp.broadcast_to(x[:1, ...], (2, 3, 3)) * c(np.arange(18.0).reshape(2, 3, 3)),
    "where": lambda xp, x, c: xp.where(x > 0, x * x, 3.0 * x),
    "where_broadcast": lambda xp, x, c: xp.where(x > 0, x, xp.sum(x, axis=0)),
    "copysign": lambda xp, x, c: xp.copysign(x, xp.flip(x, axis=0)),
    "diagonal": lambda xp, x, c: xp.linalg.diagonal(x),
    "diagonal_offset": lambda xp, x, c: xp.linalg.diagonal(x, offset=-1) * xp.linalg.diagonal(x, offset=1),
    "tensordot": lambda xp, x, c: xp.tensordot(x, x, axes=1),
    "vecdot": lambda xp, x, c: xp.vecdot(x, 2.0 * x),
    "pow": lambda xp, x, c: xp.pow(xp.abs(x) + 1.0, 1.5),
    "atan2": lambda xp, x, c: xp.atan2(x, xp.abs(x) + 1.0),
    "asinh": lambda xp, x, c: xp.asinh(x),
    "slogdet": lambda xp, x, c: xp.linalg.slogdet(x @ xp.matrix_transpose(x) + c(3.0 * np.eye(3)))[1],
    "solve": lambda xp, x, c: xp.linalg.solve(x @ xp.matrix_transpose(x) + c(3.0 * np.eye(3)), x),
    "dense_silu": lambda xp, x, c: xp.dense(x, xp.flip(x, axis=1) * 0.5, x[0, ...], activation="silu"),
}
X3 = np.array([[0.3, -1.2, 0.8], [1.1, 0.4, -0.7], [-0.5, 0.9, 1.6]])


def _on_numpy(name):
    return lambda x: PATCH_CASES[name](xnp, x, np.asarray)


@pytest.mark.parametrize("name", sorted(PATCH_CASES))
def test_patch_gradients(name):
    check_grads(_on_numpy(name), modes=["rev"], order=1)(X3)


@pytest.mark.parametrize("name", sorted(PATCH_CASES))
def test_patch_values_match_strict(name):
    """The numpy patches compute what the array API says they compute (array_api_strict is the referee)."""
    xs = namespace(to_device(X3, "strict"))
    got = to_numpy(PATCH_CASES[name](xs, to_device(X3, "strict"), lambda a: to_device(a, "strict")))
    np.testing.assert_allclose(_on_numpy(name)(X3), got, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["mean", "var", "where", "max", "min", "maximum", "minimum", "broadcast_to",
                                  "copysign", "astype", "concat", "take_along_axis", "dense_silu"])
def test_float32_gradients_stay_float32(name):
    x = np.array([[0.3, -1.2, 0.8], [1.1, 0.4, -0.7], [-0.5, 0.9, 1.6]], dtype=np.float32)
    fn = _on_numpy(name) if name != "astype" else lambda a: xnp.astype(xnp.astype(a, xnp.float64), xnp.float32)
    g = grad(lambda a: xnp.sum(fn(a) * 1.5))(x)
    assert g.dtype == np.float32, f"{name}: gradient upcast to {g.dtype}"


def test_take_along_axis_accumulates_repeated_indices():
    x = np.array([1.0, 2.0, 3.0])
    g = grad(lambda a: xnp.sum(xnp.take_along_axis(a, np.array([0, 0, 2]), axis=0)))(x)
    np.testing.assert_array_equal(g, [2.0, 0.0, 1.0])


def test_searchsorted_passes_through_traced_values():
    edges = np.array([0.0, 1.0, 2.0])
    g = grad(lambda a: xnp.sum(a * xnp.astype(xnp.searchsorted(edges, a), xnp.float64)))(np.array([0.5, 1.5]))
    np.testing.assert_array_equal(g, [1.0, 2.0])


@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from(["float32", "float64"]))
def test_reductions_preserve_dtype(n, m, dtype):
    x = np.ones((n, m), dtype=dtype)
    for fn in (xnp.mean, xnp.var, xnp.std, xnp.sum, xnp.max):
        assert fn(x, axis=0).dtype == np.dtype(dtype)
    assert BACKENDS == ("numpy", "cupy", "strict")


def test_clip_on_every_backend(backend):
    """xp.clip: scalar, one-sided and array bounds; dtype kept (cupy has its own one-kernel clip)."""
    host = np.linspace(-3.0, 3.0, 13).astype(np.float32).reshape(13, 1)
    x = to_device(host, backend)
    xp = namespace(x)
    lo = to_device(np.full((1, 1), -0.5, np.float32), backend)
    cases = [(dict(min=-1.0, max=2.0), np.clip(host, -1.0, 2.0)), (dict(min=0.5), np.maximum(host, 0.5)),
             (dict(max=-0.25), np.minimum(host, -0.25)), (dict(min=lo, max=1.0), np.clip(host, -0.5, 1.0)),
             (dict(), host)]
    for kw, want in cases:
        got = xp.clip(x, **kw)
        assert str(got.dtype).endswith("float32") and tuple(got.shape) == (13, 1)
        np.testing.assert_array_equal(to_numpy(got), want)


_SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0]


@pytest.mark.parametrize("name", ["maximum", "minimum"])
def test_maximum_minimum_propagate_nan_like_numpy(backend, name):
    """Values on every pair of NaN, +-inf, signed zeros and finite numbers equal NumPy's (old numpy backend:
    maximum(nan, 0) was 0). Signed zeros: ties return x2, as NumPy's does."""
    a, b = (np.array(v, dtype="float64") for v in zip(*[(p, q) for p in _SPECIALS for q in _SPECIALS]))
    want = getattr(np, name)(a, b)
    got = to_numpy(getattr(namespace(to_device(a, backend)), name)(*to_device((a, b), backend)))
    np.testing.assert_array_equal(got, want)  # NaN == NaN here
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    num = ~np.isnan(want)  # signed zeros bit for bit (assert_array_equal takes -0.0 == 0.0)
    np.testing.assert_array_equal(np.signbit(got[num]), np.signbit(want[num]))


@pytest.mark.parametrize("name", ["maximum", "minimum"])
def test_maximum_minimum_gradients_follow_the_returned_operand(name):
    """The gradient goes to the operand returned; NaN to the NaN operand; ties to x2; dtype is kept."""
    xp = namespace(np.zeros(1))
    a = np.array([np.nan, 1.0, 2.0, 0.0, -0.0, np.nan, -np.inf], dtype="float32")
    b = np.array([0.0, np.nan, 2.0, -0.0, 0.0, np.nan, np.inf], dtype="float32")
    ga = grad(lambda u: xp.sum(getattr(xp, name)(u, b)))(a)
    gb = grad(lambda v: xp.sum(getattr(xp, name)(a, v)))(b)
    assert ga.dtype == np.float32 and gb.dtype == np.float32
    ret_a = ((a > b) if name == "maximum" else (a < b)) | np.isnan(a)  # ties return x2, as NumPy's
    np.testing.assert_array_equal(ga, ret_a.astype("float32"))
    np.testing.assert_array_equal(gb, (~ret_a).astype("float32"))


def test_registry_records_and_namespace_of(backend):
    """namespace_of(name) is the namespace() of that backend's arrays and leaves the default alone (the old
    private copies flipped the global default through use_backend to get it)."""
    from genblocks.backends import namespace_of, record

    before = get_backend()
    xp = namespace_of(backend)
    assert get_backend() == before and xp is namespace(to_device(np.zeros(2), backend))
    rec = record(backend)
    assert rec.name == backend and rec.differentiable == (backend == "numpy")
    host = np.arange(3.0)
    x = rec.from_host(host)
    assert backend_of(x) == backend
    np.testing.assert_array_equal(rec.to_host(x), host)
    assert not rec.is_traced(x) and rec.stop_gradient(x) is x
    with pytest.raises(ValueError, match=r"backend: expected one of \('numpy', 'cupy', 'strict'\), got 'jax'"):
        namespace_of("jax")


def test_is_traced_and_stop_gradient_under_autograd():
    from genblocks.backends import is_traced, stop_gradient

    seen = []

    def f(x):
        seen.append((is_traced(x), is_traced(stop_gradient(x))))
        return namespace(x).sum(x * stop_gradient(x))

    g = grad(f)(np.array([1.0, 2.0]))
    np.testing.assert_array_equal(g, [1.0, 2.0])  # d/dx sum(x * c) with c = x held constant
    assert seen == [(True, False)]
    assert not is_traced(np.ones(2)) and not is_traced(1.0) and stop_gradient(1.0) == 1.0


# ---------------------------------------------------------------------------------------------------
# The gradient of x[idx]: a slice add for basic indices, autograd's add.at for the rest

INDICES = [
    (Ellipsis, slice(None, 2)), (Ellipsis, slice(2, None)), (slice(None), slice(None, None, -2)), 1, -1,
    (slice(1, 3), 0), (None, slice(None), 3), (np.int64(2),), (Ellipsis, None, slice(1, 4)),
    np.array([0, 0, 2]),  # repeated rows: each occurrence adds (add.at)
    (slice(None), np.array([1, 1, 3])), np.array([True, False, True]),
]


@pytest.mark.parametrize("idx", INDICES, ids=repr)
def test_getitem_gradient_equals_autograds_scatter_first_and_second_order(idx):
    from autograd.numpy.numpy_vjps import untake

    from genblocks.backends.numpy_backend import _is_basic_index
    x = RS.normal(size=(3, 5))
    w = RS.normal(size=np.shape(x[idx]))
    f = lambda x: np.sum(xnp.sin(x[idx]) * w)  # noqa: E731
    g = grad(f)(x)
    # the reference: autograd's own scatter of the cotangent cos(x[idx]) w
    from autograd.extend import vspace
    ref = untake(np.cos(x[idx]) * w, idx, vspace(x)).mut_add(np.zeros_like(x))
    np.testing.assert_allclose(g, ref, rtol=1e-14, atol=1e-15)
    check_grads(f, modes=["rev"], order=2)(x)
    assert _is_basic_index(idx) == (not any(isinstance(i, np.ndarray) for i in (idx if isinstance(idx, tuple)
                                                                                else (idx,))))


def test_overlapping_slices_accumulate_and_float32_stays_float32():
    x = RS.normal(size=(4, 6)).astype(np.float32)
    g = grad(lambda x: np.sum(x[:, :4] * 2.0) + np.sum(x[:, 2:] * 3.0) + np.sum(x[1]))(x)
    want = np.zeros((4, 6), np.float32)
    want[:, :4] += 2.0
    want[:, 2:] += 3.0
    want[1] += 1.0
    assert g.dtype == np.float32
    np.testing.assert_array_equal(g, want)


SUM_CASES = [((4, 3), None, False), ((4, 3), 0, False), ((2, 3, 4), -1, True), ((2, 3, 4), (0, 2), False),
             ((1, 5, 3), 0, False), ((5,), 0, True), ((), None, False)]


@pytest.mark.parametrize("shape, axis, keepdims", SUM_CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sum_and_mean_gradients_are_autograds_bit_for_bit(shape, axis, keepdims, dtype):
    # the numpy backend's VJP of sum (and its one-node mean) against autograd's own VJP of sum composed with
    # divide's, on cotangents with signed zeros; then second order through both
    from autograd.numpy.numpy_vjps import grad_np_sum

    x = RS.normal(size=shape).astype(dtype)
    xp = namespace(x)
    out_shape = np.shape(np.sum(x, axis=axis, keepdims=keepdims))
    g = RS.normal(size=out_shape).astype(dtype)
    g[...] = np.where(RS.uniform(size=out_shape) < 0.3, -0.0, g) if out_shape else g
    ans = np.sum(x, axis=axis, keepdims=keepdims)
    want_sum = grad_np_sum(ans, x, axis=axis, keepdims=keepdims)(g)
    n = float(x.size // max(ans.size, 1))
    want_mean = grad_np_sum(ans, x, axis=axis, keepdims=keepdims)(g / n)
    for fn, want in ((lambda v: xp.sum(v, axis=axis, keepdims=keepdims), want_sum),
                     (lambda v: xp.mean(v, axis=axis, keepdims=keepdims), want_mean)):
        value, got = autograd_vjp(fn, x, g)
        assert got.dtype == want.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got).view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
    assert float(xp.mean(x, axis=axis, keepdims=keepdims).sum()) == float((np.sum(x, axis=axis, keepdims=keepdims)
                                                                          / n).sum())
    check_grads(lambda v: xnp.sin(xp.mean(xnp.sin(v), axis=axis, keepdims=keepdims)), modes=["rev"],
                order=2)(x.astype("float64"))


def autograd_vjp(fn, x, g):
    from autograd.core import make_vjp

    vjp, value = make_vjp(fn, x)
    return value, vjp(g)
