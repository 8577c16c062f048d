"""The GAN example runs end to end with --quick (tiny sizes) and writes its frames."""

import pathlib

from conftest import run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gan_mixture_smoke_writes_frames(tmp_path):
    out = tmp_path / "frames"
    stdout = run_example("gan_mixture.py", tmp_path, "--out", out)
    assert "generator EMA" in stdout and "modes" in stdout and "MMD^2" in stdout
    frames = sorted(out.iterdir())
    assert len(frames) == 3 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in frames)  # steps 10, 20, EMA
    lines = len((ROOT / "examples" / "gan_mixture.py").read_text().splitlines())
    assert 60 <= lines <= 150, lines
