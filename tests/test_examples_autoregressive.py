"""The autoregressive examples run end to end with --quick (tiny sizes) and write their pictures."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["pixelcnn_digits.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_with_smoke(script, tmp_path):
    out = tmp_path / "picture.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 1000
    assert "wrote" in proc.stdout and "test NLL" in proc.stdout
    lines = len((ROOT / "examples" / script).read_text().splitlines())
    assert 40 <= lines <= 150, f"{script} has {lines} lines"

