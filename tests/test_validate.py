"""The shared argument checks: each names the argument, what was expected and what was given."""

import math

import numpy as np
import pytest

from genblocks.blocks.validate import (
    check_callable,
    check_choice,
    check_int,
    check_nonnegative_int,
    check_positive_int,
    check_positive_real,
    check_real,
)


@pytest.mark.parametrize("check,good,bad,expected", [
    (check_positive_int, [1, 7, np.int64(3)], [0, -1, 2.0, True, "3", None], "a positive int"),
    (check_nonnegative_int, [0, 5], [-1, 0.0, False, None], "a non-negative int"),
    (lambda v, n: check_int(v, n, low=2), [2, 9], [1, 2.5], "an int >= 2"),
    (lambda v, n: check_int(v, n), [-4, 0], [1.0, True], "an int"),
])
def test_int_checks_refuse_bools_floats_and_values_below_low(check, good, bad, expected):
    for v in good:
        out = check(v, "steps")
        assert out == v and type(out) is int
    for v in bad:
        with pytest.raises(ValueError, match=rf"^steps: expected {expected}, got {v!r}$"):
            check(v, "steps")


def test_optional_int_takes_none_and_says_so():
    assert check_int(None, "eval_every", low=1, optional=True) is None
    with pytest.raises(ValueError, match=r"eval_every: expected a positive int or None, got 0"):
        check_int(0, "eval_every", low=1, optional=True)


def test_real_checks_intervals_and_finiteness():
    assert check_real(3, "lr") == 3.0 and type(check_real(3, "lr")) is float
    assert check_real(np.float32(0.5), "b1", low=0.0, high=1.0, high_open=True) == 0.5
    for v in (math.nan, math.inf, -math.inf, True, "1", None):
        with pytest.raises(ValueError, match=rf"lr: expected a finite real number, got {v!r}"):
            check_real(v, "lr")
    with pytest.raises(ValueError, match=r"b1: expected a value in \[0.0, 1.0\), got 1.0"):
        check_real(1.0, "b1", low=0.0, high=1.0, high_open=True)
    with pytest.raises(ValueError, match=r"eps: expected a value in \(0.0, inf\), got 0.0"):
        check_positive_real(0.0, "eps")
    with pytest.raises(ValueError, match=r"x: expected a value in \(-inf, 2\], got 3"):
        check_real(3, "x", high=2)


def test_choice_and_callable():
    assert check_choice("heun", "method", ("euler", "heun")) == "heun"
    with pytest.raises(ValueError, match=r"method: expected one of \('euler', 'heun'\), got 'rk4'"):
        check_choice("rk4", "method", ("euler", "heun"))
    with pytest.raises(ValueError, match="method: expected one of"):
        check_choice(["heun"], "method", ("euler", "heun"))
    f = check_callable(len, "callback")
    assert f is len
    with pytest.raises(TypeError, match=r"callback: expected a callable callback\(step, t, x\), got int"):
        check_callable(3, "callback", "a callable callback(step, t, x)")
