"""Optimizers, schedules, clipping, EMA and tree helpers (genblocks.train.optim / tree)."""

import math

import numpy as np
import pytest
from conftest import assert_backend
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from genblocks.backends import to_device, to_numpy
from genblocks.train import (
    adam,
    adamw,
    clip_by_global_norm,
    clipped,
    constant,
    cosine_decay,
    ema,
    global_norm,
    linear_warmup,
    sgd,
    tree_leaves,
    tree_map,
)
from genblocks.train.tree import tree_unflatten


def quad_grad(params, a, c):
    """Gradient of 0.5 * a * (p - c)^2, leafwise."""
    return {"x": a * (params["x"] - c)}


def run(optimizer, params, grad_fn, steps):
    init, update = optimizer
    state = init(params)
    trace = [params]
    for _ in range(steps):
        params, state = update(grad_fn(params), state, params)
        trace.append(params)
    return trace, state


A = np.array([1.0, 3.0, 0.5])
C = np.array([2.0, -1.0, 0.25])
P0 = {"x": np.array([0.0, 0.5, -1.0])}


def grad_of(p):
    return quad_grad(p, A, C)


# -- update equations against hand computation ---------------------------------------------------------


def test_sgd_plain_equations():
    trace, state = run(sgd(0.1), P0, grad_of, 3)
    p = P0["x"].copy()
    for t in range(3):
        p = p - 0.1 * A * (p - C)
        np.testing.assert_allclose(trace[t + 1]["x"], p, rtol=1e-13)
    assert int(state["step"]) == 3 and state["velocity"] is None


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_equations(nesterov):
    trace, state = run(sgd(0.1, momentum=0.9, nesterov=nesterov), P0, grad_of, 4)
    p, v = P0["x"].copy(), np.zeros(3)
    for t in range(4):
        g = A * (p - C)
        v = 0.9 * v + g
        p = p - 0.1 * ((g + 0.9 * v) if nesterov else v)
        np.testing.assert_allclose(trace[t + 1]["x"], p, rtol=1e-14)
    np.testing.assert_allclose(state["velocity"]["x"], v, rtol=1e-14)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_and_adamw_equations(weight_decay):
    lr, b1, b2, eps = 0.05, 0.8, 0.95, 1e-6
    opt = adamw(lr, b1, b2, eps, weight_decay) if weight_decay else adam(lr, b1, b2, eps)
    trace, state = run(opt, P0, grad_of, 4)
    p, m, v = P0["x"].copy(), np.zeros(3), np.zeros(3)
    for t in range(1, 5):
        g = A * (p - C)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * p)
        np.testing.assert_allclose(trace[t]["x"], p, rtol=1e-13)
    assert int(state["step"]) == 4
    np.testing.assert_allclose(state["m"]["x"], m, rtol=1e-13)
    np.testing.assert_allclose(state["v"]["x"], v, rtol=1e-13)


def reference_adam(params, grads, lr, b1, b2, eps, weight_decay):
    """The docstring equations, one plain numpy expression each, arranged as ``xp.adam_leaf`` documents:
    m' = (g - m)(1 - b1) + m, v' = (g g - v)(1 - b2) + v, p' = ((1 / (sqrt(v') + eps r)) m') (-lr r / c1) + p
    (+ p (1 - lr wd) with weight decay), r = sqrt(c2). Python floats take the arrays' dtype (NEP 50)."""
    p, m, v = params, np.zeros_like(params), np.zeros_like(params)
    out = []
    for t, g in enumerate(grads, start=1):
        lr_t = lr(t - 1) if callable(lr) else lr
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t
        r = math.sqrt(c2)
        g = g.astype(p.dtype)
        m = (g - m) * (1.0 - b1) + m
        v = (g * g - v) * (1.0 - b2) + v
        step = (1.0 / (np.sqrt(v) + eps * r)) * m * (-lr_t * r / c1)
        p = step + (p * (1.0 - lr_t * weight_decay) if weight_decay else p)
        out.append((p, m, v))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.03])
@pytest.mark.parametrize("backend_name", ["numpy", "strict"])
def test_adam_is_bit_identical_to_the_plain_equations(dtype, weight_decay, backend_name):
    # the numpy path (ufuncs with out= and reciprocal) and the generic one (in-place operators and **= -1.0, here
    # on array_api_strict) give exactly the bits of the plain expressions, over steps, with a schedule, with
    # gradients spanning many magnitudes and some given in the other dtype (cast to the parameter's first)
    rng = np.random.default_rng(0)
    shapes = {"w": (7, 5), "b": (5,), "s": ()}
    params = {k: (rng.standard_normal(s) * 10.0 ** rng.uniform(-3, 3, s)).astype(dtype) for k, s in shapes.items()}
    grads = [{k: (rng.standard_normal(s) * 10.0 ** rng.uniform(-9, 9, s)).astype(dtype if t % 3 else "float64")
              for k, s in shapes.items()} for t in range(12)]
    lr = cosine_decay(3e-2, 10)
    opt = adamw(lr, 0.8, 0.99, 1e-7, weight_decay) if weight_decay else adam(lr, 0.8, 0.99, 1e-7)
    p, state = to_device(params, backend_name), opt.init(to_device(params, backend_name))
    trace = []
    for g in grads:
        p, state = opt.update(to_device(g, backend_name), state, p)
        trace.append((to_numpy(p), to_numpy(state)))
    for k in shapes:
        ref = reference_adam(params[k], [g[k] for g in grads], lr, 0.8, 0.99, 1e-7, weight_decay)
        for (p_t, s_t), (p_ref, m_ref, v_ref) in zip(trace, ref):
            for got, want in ((p_t[k], p_ref), (s_t["m"][k], m_ref), (s_t["v"][k], v_ref)):
                assert got.dtype == want.dtype == np.dtype(dtype)
                np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))
    assert int(trace[-1][1]["step"]) == len(grads)


def test_adam_update_is_pure_and_returns_fresh_arrays():
    rng = np.random.default_rng(1)
    params = {"a": [rng.standard_normal((4, 3)).astype("float32")], "b": (rng.standard_normal(3), None)}
    grads = tree_map(lambda x: rng.standard_normal(x.shape).astype(x.dtype), params)
    init, update = adamw(0.1, weight_decay=0.1)
    state = init(params)
    kept = [tree_map(np.copy, t) for t in (params, grads, state["m"], state["v"])]
    new, new_state = update(grads, state, params)
    again, _ = update(grads, state, params)  # the same inputs, the same result
    for before, after in zip(kept, (params, grads, state["m"], state["v"])):
        tree_map(np.testing.assert_array_equal, before, after)
    tree_map(np.testing.assert_array_equal, new, again)
    old_leaves = tree_leaves((params, grads, state))
    for leaf in tree_leaves((new, new_state["m"], new_state["v"])):
        assert leaf.base is None and not any(np.shares_memory(leaf, o) for o in old_leaves)
    assert isinstance(new["b"], tuple) and new["b"][1] is None and new_state["m"]["b"][1] is None


def test_adam_differentiates_through_its_update():
    # autograd boxes take the generic in-place-operator path: d p' / d g by autograd against finite differences
    from genblocks.backends import value_and_grad

    init, update = adam(0.1)
    p = {"w": np.array([0.5, -1.0, 2.0])}
    state = update({"w": np.array([0.3, 0.1, -0.2])}, init(p), p)[1]

    def f(g):
        return np.sum(update(g, state, p)[0]["w"] ** 2)

    g0 = {"w": np.array([0.2, -0.4, 0.7])}
    value, dg = value_and_grad(f)(g0)
    assert value == f(g0)
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1e-6
        fd = (f({"w": g0["w"] + e}) - f({"w": g0["w"] - e})) / 2e-6
        assert dg["w"][i] == pytest.approx(fd, rel=1e-5)


def test_tree_unflatten_refills_the_structure():
    tree = {"a": [1, (2, None)], "b": None, "c": 3}
    assert tree_unflatten(tree, [10, 20, 30]) == {"a": [10, (20, None)], "b": None, "c": 30}
    with pytest.raises(ValueError, match="fewer"):
        tree_unflatten(tree, [1, 2])
    with pytest.raises(ValueError, match="more"):
        tree_unflatten(tree, [1, 2, 3, 4])


@given(hnp.arrays(np.float64, st.integers(1, 6), elements=st.floats(-1e3, 1e3).filter(lambda g: abs(g) > 1e-3)))
def test_adam_first_step_is_lr_times_sign(g):
    """With m, v started at zero and bias-corrected, the first Adam step is lr * g / (|g| + eps)."""
    init, update = adam(0.01, eps=1e-12)
    p = {"w": np.zeros_like(g)}
    new, _ = update({"w": g}, init(p), p)
    np.testing.assert_allclose(new["w"], -0.01 * np.sign(g), rtol=1e-8)


def test_schedule_lr_is_used_per_step():
    lrs = []
    sched = lambda t: lrs.append(t) or 0.1 / (t + 1)
    trace, _ = run(sgd(sched), P0, grad_of, 3)
    assert lrs == [0, 1, 2]
    p = P0["x"]
    for t in range(3):
        p = p - 0.1 / (t + 1) * A * (p - C)
    np.testing.assert_allclose(trace[-1]["x"], p, rtol=1e-15)


def test_schedule_returning_bad_value_raises():
    init, update = sgd(lambda t: float("nan"))
    with pytest.raises(ValueError, match="lr"):
        update(grad_of(P0), init(P0), P0)
    init, update = sgd(lambda t: "fast")
    with pytest.raises(TypeError, match="lr"):
        update(grad_of(P0), init(P0), P0)


# -- convergence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer, steps", [
    (sgd(0.3), 200), (sgd(0.1, momentum=0.9), 300), (sgd(0.1, momentum=0.9, nesterov=True), 300),
    (adam(0.05), 800), (adamw(0.05, weight_decay=1e-4), 800),
    (adam(cosine_decay(0.1, 800, 1e-3)), 800), (clipped(sgd(0.3), 0.5), 300),
])
def test_converges_on_quadratic(optimizer, steps):
    trace, _ = run(optimizer, P0, grad_of, steps)
    # adamw's decay shifts the optimum to c * a / (a + wd) (tiny here)
    np.testing.assert_allclose(trace[-1]["x"], C, atol=2e-3)


# -- schedules -----------------------------------------------------------------------------------------


def test_constant_schedule():
    assert [constant(0.3)(t) for t in (0, 5, 10**6)] == [0.3, 0.3, 0.3]


def test_cosine_decay_values():
    s = cosine_decay(1.0, 100, final_lr=0.1)
    assert s(0) == 1.0
    assert math.isclose(s(50), 0.55, rel_tol=1e-12)
    assert math.isclose(s(25), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), rel_tol=1e-12)
    assert math.isclose(s(100), 0.1) and math.isclose(s(1000), 0.1)
    assert all(s(t) >= s(t + 1) for t in range(120))


def test_linear_warmup_values():
    s = linear_warmup(0.4, 4)
    assert [s(t) for t in range(6)] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4], rel=1e-15)
    w = linear_warmup(cosine_decay(1.0, 10), 5)
    assert w(0) == pytest.approx(0.2) and w(4) == pytest.approx(1.0)
    assert w(5) == 1.0 and w(10) == pytest.approx(0.5) and w(15) == pytest.approx(0.0, abs=1e-15)
    assert linear_warmup(0.3, 0)(0) == 0.3


# -- clipping --------------------------------------------------------------------------------------------


def test_clip_by_global_norm():
    g = {"a": np.array([3.0, 0.0]), "b": [np.array([[4.0]])]}
    clipped_g, norm = clip_by_global_norm(g, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(clipped_g["a"], [0.6, 0.0])
    np.testing.assert_allclose(clipped_g["b"][0], [[0.8]])
    assert global_norm(clipped_g) == pytest.approx(1.0)
    same, norm = clip_by_global_norm(g, 10.0)
    assert norm == 5.0 and same["a"] is g["a"]


def test_clip_keeps_non_finite_gradients_visible():
    g = {"a": np.array([np.inf, 1.0])}
    out, norm = clip_by_global_norm(g, 1.0)
    assert norm == math.inf and out["a"] is g["a"]


def test_clipped_wrapper_clips_before_update():
    init, update = clipped(sgd(1.0), 1.0)
    p = {"x": np.zeros(2)}
    new, _ = update({"x": np.array([30.0, 40.0])}, init(p), p)
    np.testing.assert_allclose(new["x"], [-0.6, -0.8])


def test_global_norm_float32_does_not_overflow():
    g = [np.full(4, 1e30, np.float32)]
    assert global_norm(g) == pytest.approx(2e30, rel=1e-6)
    assert global_norm({}) == 0.0


# -- EMA -------------------------------------------------------------------------------------------------


def test_ema_equations_and_copy():
    init, update = ema(0.9)
    p0 = {"w": np.array([1.0, 2.0])}
    avg = init(p0)
    assert avg["w"] is not p0["w"]
    np.testing.assert_array_equal(avg["w"], p0["w"])
    expected = p0["w"].copy()
    for k in range(1, 4):
        p = {"w": np.array([1.0, 2.0]) * (k + 1)}
        avg = update(p, avg)
        expected = 0.9 * expected + 0.1 * p["w"]
        np.testing.assert_allclose(avg["w"], expected, rtol=1e-15)


# -- dtypes and backends ---------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", [sgd(0.1), sgd(0.1, momentum=0.5), adam(1e-3), adamw(1e-3)])
def test_float32_params_stay_float32(optimizer):
    init, update = optimizer
    p = {"w": np.ones((2, 3), np.float32), "b": [np.zeros(3, np.float32)]}
    grads = {"w": np.full((2, 3), 0.25), "b": [np.ones(3)]}  # float64 gradients
    state = init(p)
    for _ in range(2):
        p, state = update(grads, state, p)
    assert all(leaf.dtype == np.float32 for leaf in tree_leaves(p))
    for name, leaf in _named(state):
        assert leaf.dtype == (np.int64 if name == "step" else np.float32), name
    avg = ema(0.99).update(p, ema(0.99).init(p))
    assert all(leaf.dtype == np.float32 for leaf in tree_leaves(avg))


def _named(state):
    for key, value in state.items():
        for leaf in tree_leaves(value):
            yield key, np.asarray(leaf)


@pytest.mark.parametrize("optimizer", [sgd(0.1, momentum=0.9, nesterov=True), adamw(0.01)])
def test_optimizers_run_on_every_backend(backend, optimizer):
    init, update = optimizer
    host = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": [np.ones(3, np.float32)]}
    grads = tree_map(lambda x: 0.5 * x + 0.25, host)
    p, s = to_device(host, backend), init(to_device(host, backend))
    q, r = host, init(host)
    for _ in range(3):
        p, s = update(to_device(grads, backend), s, p)
        q, r = update(grads, r, q)
    assert_backend(p, backend)
    tree_map(lambda a, b: np.testing.assert_allclose(to_numpy(a), b, rtol=1e-6), p, q)


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make, name", [
    (lambda: sgd(0.0), "lr"), (lambda: sgd(-1.0), "lr"), (lambda: sgd(float("nan")), "lr"),
    (lambda: sgd("0.1"), "lr"), (lambda: sgd(0.1, momentum=1.0), "momentum"),
    (lambda: sgd(0.1, momentum=-0.1), "momentum"), (lambda: sgd(0.1, nesterov=True), "nesterov"),
    (lambda: adam(0.1, b1=1.0), "b1"), (lambda: adam(0.1, b2=-0.5), "b2"), (lambda: adam(0.1, eps=0.0), "eps"),
    (lambda: adamw(0.1, weight_decay=-1e-3), "weight_decay"), (lambda: ema(1.0), "decay"),
    (lambda: cosine_decay(1.0, 0), "total_steps"), (lambda: cosine_decay(1.0, 10, final_lr=2.0), "final_lr"),
    (lambda: linear_warmup(1.0, -1), "warmup_steps"), (lambda: linear_warmup(1.0, 2.5), "warmup_steps"),
    (lambda: clip_by_global_norm({"a": np.ones(2)}, 0.0), "max_norm"), (lambda: clipped(sgd(0.1), -1), "max_norm"),
])
def test_bad_hyperparameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_bad_params_and_optimizer():
    with pytest.raises(TypeError, match="params"):
        adam(0.1).init({"w": np.arange(3)})
    with pytest.raises(TypeError, match="optimizer"):
        clipped(lambda: None, 1.0)


def test_tree_map_reports_structure_mismatch():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        tree_map(lambda a, b: a + b, {"a": 1.0, "b": [1.0, 2.0]}, {"a": 1.0, "b": [1.0]})
    with pytest.raises(ValueError, match="keys"):
        tree_map(lambda a, b: a + b, {"a": 1.0}, {"b": 1.0})
    assert tree_map(lambda a, b: a + b, (1, [2, None]), (10, [20, None])) == (11, [22, None])
    assert tree_leaves({"a": [1, (2, 3)], "b": None, "c": 4}) == [1, 2, 3, 4]
