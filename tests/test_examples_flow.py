"""The flow examples run end to end (``--quick``: tiny sizes) and print what they promise."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, str(ROOT / "examples" / name), "--quick"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


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
