"""Shared fixtures: the ``backend`` fixture runs a test on numpy, strict and (with a GPU) cupy."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from genblocks.backends import to_device, to_numpy

settings.register_profile(
    "ci", derandomize=True, deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", deadline=None, max_examples=40)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cupy_reason():
    try:
        from genblocks.backends.cupy_backend import load_cupy

        load_cupy()
    except ImportError as err:
        return str(err)
    return None


_CUPY_SKIP = _cupy_reason()
BACKENDS = ["numpy", "strict", pytest.param("cupy", marks=pytest.mark.skipif(
    _CUPY_SKIP is not None, reason=f"no GPU backend here: {_CUPY_SKIP}"))]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """A backend name; tests move inputs with ``to_device`` and compare ``to_numpy`` of the results."""
    return request.param


@pytest.fixture
def on(backend):
    """``on(tree)`` moves a host tree to the current test's backend."""
    return lambda tree, dtype=None: to_device(tree, backend, dtype=dtype)


def assert_backend(x, backend):
    """Fail unless every array leaf of ``x`` belongs to ``backend``."""
    from genblocks.backends import backend_of, to_numpy  # noqa: F401

    leaves = x.values() if isinstance(x, dict) else (x if isinstance(x, (list, tuple)) else [x])
    for leaf in leaves:
        if isinstance(leaf, (dict, list, tuple)):
            assert_backend(leaf, backend)
        elif backend_of(leaf) is not None:
            assert backend_of(leaf) == backend, f"expected a {backend} array, got {type(leaf)}"


def assert_same_tree(a, b, *, values="bits"):
    """Same container types, keys in order, leaf dtypes and shapes; leaves bit-equal (``values="bits"``)
    or not compared (``values=None``)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_tree(a[k], b[k], values=values)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tree(x, y, values=values)
    elif a is None:
        assert b is None
    else:
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
        if values == "bits":
            assert a.tobytes() == b.tobytes()


def perturb_params(params, seed, scale):
    """params + scale * N(0, 1) noise on every leaf, in float64: tests never run at an identity init."""
    gen = np.random.default_rng(seed)

    def go(p):
        if isinstance(p, dict):
            return {k: go(v) for k, v in p.items()}
        if isinstance(p, list):
            return [go(v) for v in p]
        p = np.asarray(p, dtype=np.float64)
        return p + scale * gen.standard_normal(p.shape)

    return go(params)


def assert_close_to_numpy(result, reference, rtol=1e-6, atol=1e-6):
    np.testing.assert_allclose(to_numpy(result), to_numpy(reference), rtol=rtol, atol=atol)


EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(script, cwd, *args, timeout=300):
    """Run ``examples/<script> --quick *args`` in ``cwd`` (headless matplotlib, this checkout first on the
    path); fail with its stderr if it exits non-zero. Returns its stdout."""
    import subprocess
    import sys

    root = os.path.dirname(EXAMPLES_DIR)
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES_DIR, script), "--quick", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
