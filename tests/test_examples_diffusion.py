"""The diffusion examples run end to end with --quick (tiny sizes) and write their pictures."""

import pathlib

import pytest
from conftest import run_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["ddpm_checkerboard.py", "ddim_vs_ddpm.py", "guidance_digits.py"]  # diffusion_digits.py: below


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_with_smoke(script, tmp_path):
    out = tmp_path / "picture.png"
    stdout = run_example(script, tmp_path, "--out", out)
    assert out.exists() and out.stat().st_size > 1000
    assert "wrote" in stdout
    lines = len((ROOT / "examples" / script).read_text().splitlines())
    assert 40 <= lines <= 150, f"{script} has {lines} lines"


def test_diffusion_digits_writes_samples_and_the_lt_plot_and_reports_the_bound(tmp_path):
    out = tmp_path / "digits.png"
    stdout = run_example("diffusion_digits.py", tmp_path, "--out", out)
    assert out.exists() and out.stat().st_size > 1000
    assert (tmp_path / "digits_lt.png").stat().st_size > 1000
    assert "nats per image" in stdout and "bits/dim" in stdout and "wrote" in stdout
    lines = len((ROOT / "examples" / "diffusion_digits.py").read_text().splitlines())
    assert 60 <= lines <= 150, f"diffusion_digits.py has {lines} lines"


def test_examples_write_into_an_output_folder_never_the_repository_root():
    import re

    for script in sorted((ROOT / "examples").glob("*.py")):
        for default in re.findall(r'add_argument\("--out",\s*default="([^"]+)"', script.read_text()):
            assert default.startswith("examples-out/"), (script.name, default)
    assert "/examples-out/" in (ROOT / ".gitignore").read_text().splitlines()


def test_one_flag_for_small_runs_across_examples_benchmarks_and_the_demo():
    scripts = sorted((ROOT / "examples").glob("*.py")) + sorted((ROOT / "benchmarks").glob("bench_*.py"))
    scripts.append(ROOT / "genblocks" / "cli.py")
    for script in scripts:
        text = script.read_text()
        assert '"--smoke"' not in text, script.name
    assert all('"--quick"' in p.read_text() for p in sorted((ROOT / "examples").glob("*.py")))
