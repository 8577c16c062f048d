"""Argument checks for every module: each returns the checked value or raises naming the argument, what was
expected and what was given.

Integers refuse bools and floats (``3.0`` is not a step count); reals refuse bools, NaN and inf and come back
as Python floats. Checks that belong to one block (a coupling's mask, a metric's sample array) stay with it;
array checks (``check_array``, ``check_dtype``) live in ``blocks.base``.
"""

import math
import numbers

__all__ = ["check_int", "check_positive_int", "check_nonnegative_int", "check_real", "check_positive_real",
           "check_choice", "check_callable"]


def check_int(value, name, *, low=None, optional=False):
    """An int (not a bool) >= ``low``; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or (low is not None and value < low):
        what = {None: "an int", 0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
        raise ValueError(f"{name}: expected {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)


def check_positive_int(value, name):
    """An int >= 1."""
    return check_int(value, name, low=1)


def check_nonnegative_int(value, name):
    """An int >= 0."""
    return check_int(value, name, low=0)


def check_real(value, name, *, low=None, high=None, low_open=False, high_open=False):
    """A finite real number in the interval given by ``low`` / ``high`` (closed unless ``*_open``), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite real number, got {value!r}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        left, right = "(" if low_open or low is None else "[", ")" if high_open or high is None else "]"
        lo, hi = "-inf" if low is None else low, "inf" if high is None else high
        raise ValueError(f"{name}: expected a value in {left}{lo}, {hi}{right}, got {value!r}")
    return float(value)


def check_positive_real(value, name):
    """A finite real number > 0, as a float."""
    return check_real(value, name, low=0.0, low_open=True)


def check_choice(value, name, choices):
    """One of ``choices`` (a tuple of names)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_callable(value, name, expected="a callable"):
    """A callable; ``expected`` says which (e.g. "a callable callback(step, t, x)")."""
    if not callable(value):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    return value
