"""The autoregressive examples run end to end with --quick (tiny sizes) and write their pictures."""

import pathlib

import pytest
from conftest import run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["pixelcnn_digits.py", "made_digits.py"]


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_with_smoke(script, tmp_path):
    out = tmp_path / "picture.png"
    stdout = run_example(script, tmp_path, "--out", out)
    assert out.exists() and out.stat().st_size > 1000
    assert "wrote" in stdout and "test NLL" in stdout
    lines = len((ROOT / "examples" / script).read_text().splitlines())
    assert 40 <= lines <= 150, f"{script} has {lines} lines"

