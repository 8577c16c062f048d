"""genblocks.backends.treegrad: same values and gradients as autograd over parameter trees, and faster."""

import warnings
from collections import namedtuple

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from conftest import assert_same_tree

from genblocks import backends
from genblocks.backends import treegrad

Pair = namedtuple("Pair", ["a", "b"])


def _tree(dtype="float64"):
    r = np.random.default_rng(0)
    n = lambda *s: r.normal(size=s).astype(dtype)
    return {"layers": [{"W": n(3, 4), "b": n(4)}, {"W": n(4, 2), "b": n(2)}], "pair": (n(2), (n(3), n(1)))}


def _loss(params, x, scale=1.0):
    h = x
    for layer in params["layers"]:
        h = anp.tanh(anp.dot(h, layer["W"]) + layer["b"])
    a, (c, d) = params["pair"]
    return scale * (anp.sum(h * a) + anp.sum(c ** 2) * d[0])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_autograd_on_nested_trees(dtype):
    params, x = _tree(dtype), np.ones((5, 3), dtype=dtype)
    v, g = treegrad.value_and_grad(_loss)(params, x, scale=2.0)
    v_ref, g_ref = autograd.value_and_grad(_loss)(params, x, scale=2.0)
    assert v == v_ref
    assert_same_tree(g, g_ref, values=None)
    assert_same_tree(treegrad.grad(_loss)(params, x), autograd.grad(_loss)(params, x), values=None)


def test_other_argnum_and_fallbacks():
    params, x = _tree(), np.ones((5, 3))
    np.testing.assert_allclose(treegrad.grad(_loss, 1)(params, x), autograd.grad(_loss, 1)(params, x))
    f = lambda a, b: anp.sum(a * b)
    assert treegrad.grad(f, (0, 1))(np.ones(2), np.full(2, 3.0))[1].tolist() == [1.0, 1.0]  # tuple argnum
    assert treegrad.grad(lambda t: t[0] * t[1])((2.0, 5.0)) == (5.0, 2.0)  # float leaves: autograd's path


def test_unused_leaf_gets_zeros_and_shared_leaf_sums():
    w = np.array([1.0, 2.0])
    g = treegrad.grad(lambda p: anp.sum(p["a"] * p["a"]))({"a": w, "unused": np.ones(3), "same": w})
    np.testing.assert_array_equal(g["a"], 2 * w)
    np.testing.assert_array_equal(g["unused"], np.zeros(3))
    np.testing.assert_array_equal(g["same"], np.zeros(2))  # the same array in two places: separate leaves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v, g = treegrad.value_and_grad(lambda p: 3.0)({"a": w})
    assert v == 3.0 and np.all(g["a"] == 0.0) and "independent" in str(caught[0].message)


def test_second_order_matches_autograd():
    """A gradient penalty: d/dparams of ||d loss / d x||^2, with treegrad on the outside and inside."""
    params, x = _tree(), np.random.default_rng(1).normal(size=(5, 3))

    def penalty(params, grad_fn):
        gx = grad_fn(lambda x: _loss(params, x), 0)(x)
        return anp.sum(gx * gx)

    got = treegrad.grad(lambda p: penalty(p, treegrad.grad))(params)
    ref = autograd.grad(lambda p: penalty(p, autograd.grad))(params)
    assert_same_tree(got, ref, values=None)

    # treegrad inside an autograd trace (the leaves arrive boxed)
    def scaled(s):
        first = {"W": params["layers"][0]["W"] * s, "b": params["layers"][0]["b"]}
        return {**params, "layers": [first, params["layers"][1]]}

    def inner(grad_fn):
        return autograd.grad(lambda s: anp.sum(grad_fn(_loss)(scaled(s), x)["layers"][0]["W"]))(1.5)

    np.testing.assert_allclose(inner(treegrad.grad), inner(autograd.grad), rtol=1e-12)


def test_namedtuple_structure_is_kept():
    g = treegrad.grad(lambda p: anp.sum(p.a * p.b))(Pair(np.ones(2), np.full(2, 3.0)))
    assert isinstance(g, Pair) and g.a.tolist() == [3.0, 3.0] and g.b.tolist() == [1.0, 1.0]


def test_non_scalar_output_raises():
    with pytest.raises(TypeError, match="scalar-output"):
        treegrad.grad(lambda p: p["a"] * 2.0)({"a": np.ones(3)})


def test_backends_export_treegrad():
    assert backends.value_and_grad is treegrad.value_and_grad and backends.grad is treegrad.grad


def test_fewer_nodes_than_autograd():
    """The point of treegrad: no container_take nodes, so no whole-tree zero copies per leaf."""
    import autograd.builtins as ab

    params, x = _tree(), np.ones((5, 3))
    calls = {"n": 0}
    original = ab.container_take

    def counting(*args, **kw):
        calls["n"] += 1
        return original(*args, **kw)

    ab.container_take = counting
    try:
        treegrad.grad(_loss)(params, x)
    finally:
        ab.container_take = original
    assert calls["n"] == 0
