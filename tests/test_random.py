"""Rng: determinism, independence of children, backends, state snapshots and argument checks."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from genblocks.backends import Rng, backend_of, to_numpy


def _draws(rng):
    return [
        rng.normal((3, 2)), rng.uniform(4, low=-1.0, high=2.0), rng.integers(0, 10, (5,)),
        rng.bernoulli(0.3, (6,)), rng.categorical(np.log(np.array([0.2, 0.3, 0.5])), (4,)), rng.permutation(7),
    ]


def test_same_seed_same_numbers_and_backend_equality(backend):
    a, b = _draws(Rng(123, backend)), _draws(Rng(123, backend))
    for x, y in zip(a, b):
        assert backend_of(x) == backend
        np.testing.assert_array_equal(to_numpy(x), to_numpy(y))
    if backend == "strict":  # the strict stand-in draws exactly the numpy numbers
        for x, y in zip(a, _draws(Rng(123, "numpy"))):
            np.testing.assert_array_equal(to_numpy(x), to_numpy(y))
    # host draws: numpy's numbers on every backend, children included
    host = Rng(123, backend, host_draws=True)
    for x, y in zip(_draws(host) + _draws(host.split(2)[1]), _draws(Rng(123)) + _draws(Rng(123).split(2)[1])):
        assert backend_of(x) == backend
        np.testing.assert_array_equal(to_numpy(x), to_numpy(y))


def test_draws_have_the_right_distribution(backend):
    """Each backend's own generator (cupy's on the GPU) draws from the distribution it names."""
    rng, n = Rng(5, backend), 200_000
    z = to_numpy(rng.normal((n,), "float64", loc=1.0, scale=2.0))
    assert abs(z.mean() - 1.0) < 0.02 and abs(z.std() - 2.0) < 0.02
    u = to_numpy(rng.uniform((n,), "float32", low=-1.0, high=3.0))
    assert u.dtype == np.float32 and u.min() >= -1.0 and u.max() < 3.0 and abs(u.mean() - 1.0) < 0.02
    k = to_numpy(rng.integers(2, 7, (n,)))
    assert k.dtype == np.int64 and set(np.unique(k).tolist()) == {2, 3, 4, 5, 6}
    assert abs(to_numpy(rng.bernoulli(0.3, (n,))).mean() - 0.3) < 0.01
    c = to_numpy(rng.categorical(np.log(np.array([0.2, 0.3, 0.5])), (n,)))
    np.testing.assert_allclose(np.bincount(c, minlength=3) / n, [0.2, 0.3, 0.5], atol=0.01)
    perm = to_numpy(rng.permutation(1000))
    assert perm.dtype == np.int64 and sorted(perm.tolist()) == list(range(1000)) and perm.tolist() != list(range(1000))


def test_host_draws_state_and_arguments():
    rng = Rng(3, host_draws=True)
    assert "host_draws=True" in repr(rng) and "host_draws" not in repr(Rng(3))
    rng.normal(4)
    again = Rng.from_state(rng.state())
    assert again.host_draws
    np.testing.assert_array_equal(again.normal(5), rng.normal(5))
    with pytest.raises(TypeError, match="host_draws"):
        Rng(0, host_draws="yes")


def test_different_seeds_and_children_differ():
    assert not np.array_equal(Rng(1).normal(8), Rng(2).normal(8))
    c1, c2 = Rng(5).split(2)
    assert not np.array_equal(c1.normal(8), c2.normal(8))
    again = Rng(5).split(2)[0]
    np.testing.assert_array_equal(Rng(5).split(2)[0].normal(8), again.normal(8))


@given(st.sampled_from(["float32", "float64"]), st.lists(st.integers(0, 4), max_size=3))
def test_dtypes_and_shapes(dtype, shape):
    rng = Rng(0)
    assert rng.normal(tuple(shape), dtype=dtype).dtype == np.dtype(dtype)
    assert rng.uniform(tuple(shape), dtype=dtype).shape == tuple(shape)
    assert rng.integers(3, shape=tuple(shape)).dtype == np.int64


def test_distributions_of_draws():
    rng = Rng(42)
    n = 200_000
    z = rng.normal(n, dtype="float64", loc=1.0, scale=2.0)
    assert abs(z.mean() - 1.0) < 5 * 2.0 / np.sqrt(n)
    assert abs(z.std() - 2.0) < 5 * 2.0 / np.sqrt(2 * n)
    u = rng.uniform(n, dtype="float64")
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    p = np.array([0.1, 0.6, 0.3])
    counts = np.bincount(rng.categorical(np.log(p), (n,)), minlength=3) / n
    assert np.all(np.abs(counts - p) < 5 * np.sqrt(p * (1 - p) / n))
    b = rng.bernoulli(0.25, (n,))
    assert abs(b.mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)
    assert sorted(rng.permutation(50).tolist()) == list(range(50))


def test_categorical_extreme_logits_are_finite():
    rng = Rng(0)
    idx = rng.categorical(np.array([[1e4, -1e4, 0.0], [-np.inf, 0.0, -np.inf]]))
    np.testing.assert_array_equal(idx, [0, 1])


def test_state_round_trip_continues_the_stream():
    rng = Rng(9)
    rng.normal(5)
    snap = rng.state()
    expected = rng.normal(5)
    np.testing.assert_array_equal(Rng.from_state(snap).normal(5), expected)
    with pytest.raises(ValueError, match="state"):
        Rng.from_state({"nope": 1})


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Rng(-1), "seed"),
        (lambda: Rng(1.5), "seed"),
        (lambda: Rng(0, "torch"), "backend"),
        (lambda: Rng(0).normal((-1, 2)), "shape"),
        (lambda: Rng(0).normal(3, dtype="int32"), "dtype"),
        (lambda: Rng(0).uniform(3, low=1.0, high=1.0), "high"),
        (lambda: Rng(0).integers(5, 5), "high"),
        (lambda: Rng(0).bernoulli(1.5), "p"),
        (lambda: Rng(0).split(0), "n"),
        (lambda: Rng(0).permutation(-3), "n"),
        (lambda: Rng(0).categorical(np.float64(1.0)), "logits"),
    ],
)
def test_bad_arguments_name_themselves(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
