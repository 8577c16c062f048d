"""benchmarks/profile_parts.py: the split of a step's time that ``--profile`` prints (structure only, no timings)."""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

from profile_parts import HEADER, format_parts, profile_parts, record_matmuls  # noqa: E402

from genblocks.backends import Rng, value_and_grad  # noqa: E402
from genblocks.blocks.nn import MLP  # noqa: E402


def _step(widths, batch):
    mlp = MLP(widths, activation="relu")
    params = mlp.init(Rng(0), "float64")
    x = np.random.default_rng(1).normal(size=(batch, widths[0]))
    vg = value_and_grad(lambda p: (mlp.apply(p, x) ** 2).mean())
    return lambda: vg(params)


def test_record_matmuls_sees_forward_and_backward_with_their_layout():
    calls = record_matmuls(_step((3, 5, 2), 4))
    # forward: x @ W per layer (2); backward: dW = x^T dz per layer (2), dx = dz W^T except the input (1)
    assert len(calls) == 5
    shapes = sorted((a.shape, b.shape) for a, b in calls)
    assert ((3, 4), (4, 5)) in shapes and ((4, 2), (2, 5)) in shapes
    transposed = [a for a, _ in calls if a.shape == (3, 4)][0]
    assert transposed.flags.f_contiguous and not transposed.flags.c_contiguous  # x^T stays a transposed view
    assert np.matmul is not None and np.matmul.__name__ == "matmul"  # the patch is undone


def test_profile_parts_reports_every_part():
    parts = profile_parts(_step((3, 5, 2), 4), _step((1, 1, 1), 1), n=3)
    assert set(parts) == {"total", "blas", "n_blas", "fixed", "rest", "faults", "py_calls"}
    assert parts["n_blas"] == 5 and parts["py_calls"] > 0
    assert all(parts[k] >= 0.0 for k in ("total", "blas", "fixed", "rest", "faults"))
    assert len(format_parts("step", parts)) == len(HEADER)
