"""The VAE examples run end to end (``--quick``: tiny sizes) and print what they promise."""

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


def test_vae_digits_smoke(tmp_path):
    text = run_example("vae_digits.py", tmp_path)
    assert "test -ELBO" in text and "active units" in text and "importance-sampled NLL" in text
    if "wrote examples-out/vae_digits.png" in text:
        assert (tmp_path / "examples-out" / "vae_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in text


def test_cvae_digits_smoke(tmp_path):
    text = run_example("cvae_digits.py", tmp_path)
    assert "given the right label" in text and "reads as the label" in text
    if "wrote examples-out/cvae_digits.png" in text:
        assert (tmp_path / "examples-out" / "cvae_digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib is not installed" in text
