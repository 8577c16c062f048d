"""The GAN example runs end to end with --quick (tiny sizes) and writes its frames."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gan_mixture_smoke_writes_frames(tmp_path):
    out = tmp_path / "frames"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "gan_mixture.py"), "--quick", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "generator EMA" in proc.stdout and "modes" in proc.stdout and "MMD^2" in proc.stdout
    frames = sorted(out.iterdir())
    assert len(frames) == 3 and all(f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for f in frames)  # steps 10, 20, EMA
    lines = len((ROOT / "examples" / "gan_mixture.py").read_text().splitlines())
    assert 60 <= lines <= 150, lines
