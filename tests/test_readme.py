"""README's tour runs as written (with fewer training steps)."""

import pathlib
import re


def test_tour_runs():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "steps=500" in code
    scope = {}
    exec(compile(code.replace("steps=500", "steps=20").replace("batch_size=256", "batch_size=256, progress=False"),
                 "README.md", "exec"), scope)
    assert scope["samples"].shape == (1000, 2)
    assert scope["log_p"].shape == (5,)


def test_quickstart_matches_ci():
    root = pathlib.Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme, "the README's test command and .ci/run have drifted apart"
