"""The VAE examples run end to end (``--quick``: tiny sizes) and print what they promise."""

import pathlib

from conftest import run_example as _run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_example(name, tmp_path):
    return _run_example(name, tmp_path, timeout=120)


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
