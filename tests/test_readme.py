"""README's code runs as written (with fewer training steps, and the strict backend standing in for cupy)."""

import pathlib
import re
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def _short(code):
    """The same code with tiny training runs, no progress bars, and strict arrays where cupy would be."""
    code = re.sub(r"steps=\d+", "steps=20", code)
    code = code.replace("batch_size=256)", "batch_size=256, progress=False)")
    return code.replace('"cupy"', '"strict"').replace("100_000", "64")


def test_every_readme_block_runs_in_order():
    assert len(BLOCKS) >= 3
    scope = {}
    for i, code in enumerate(BLOCKS):
        exec(compile(_short(code), f"README.md block {i}", "exec"), scope)
    assert scope["samples"].shape == (1000, 2) and scope["log_px"].shape == (5,)
    assert np.all(np.isfinite(scope["log_px"]))
    assert tuple(scope["x"].shape) == (64, 2) and "strict" in type(scope["x"]).__module__


def test_the_tour_needs_only_what_quickstart_installs():
    """Quickstart 1 installs the core and the plot extra: no array_api_strict, no cupy, no sklearn."""
    blocked = "import sys\nfor m in ('array_api_strict', 'cupy', 'sklearn', 'torch'):\n    sys.modules[m] = None\n"
    out = subprocess.run([sys.executable, "-c", blocked + _short(BLOCKS[0])], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_gpu_snippet_is_complete():
    gpu = next(code for code in BLOCKS if '"cupy"' in code)
    names = set(re.findall(r"\b([a-z_]+)\b", gpu))
    defined_before = "".join(BLOCKS[:BLOCKS.index(gpu)])
    for name in ("model", "params", "scaling", "unstandardize"):
        assert name in names and re.search(rf"\b{name}\b", defined_before), name


def test_quickstart_matches_ci():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README, "the README's test command and .ci/run have drifted apart"


def test_license_file_and_metadata_agree():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "License :: OSI Approved :: MIT License" in project["classifiers"] and project["keywords"]
