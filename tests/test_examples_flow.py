"""The flow examples run end to end (``--quick``: tiny sizes) and print what they promise."""

import pathlib

from conftest import run_example as _run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name, tmp_path):
    return _run_example(name, tmp_path, timeout=120)


def test_flow_two_moons_smoke(tmp_path):
    text = run_example("flow_two_moons.py", tmp_path)
    assert "RealNVP" in text and "neural spline flow" in text
    assert text.count("test NLL") == 2 and "per-layer" in text
    assert list(tmp_path.iterdir()) == []  # --quick writes no files


def test_custom_bijector_smoke(tmp_path):
    text = run_example("custom_bijector.py", tmp_path)
    assert "check_bijector(SinhArcsinh)" in text
    assert "caught the buggy version" in text and "max_log_det_error" in text
    assert "Gaussian + SinhArcsinh" in text
