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


def test_gpu_snippet_runs_on_the_strict_stand_in():
    """The GPU snippet's calls are real: run it with the strict backend in place of cupy."""
    from genblocks.backends import Rng
    from genblocks.blocks.schedules import DiscreteSchedule
    from genblocks.blocks.score_nets import MLPScoreNet
    from genblocks.models.diffusion import Diffusion

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[1]
    assert '"cupy"' in code and "model.sample(gpu_params" in code
    model = Diffusion(MLPScoreNet(2, (8,)), DiscreteSchedule("squaredcos_cap_v2", 50))
    scope = {"model": model, "params": model.init(Rng(0))}
    exec(compile(code.replace('"cupy"', '"strict"').replace("100_000", "64"), "README.md", "exec"), scope)
    assert tuple(scope["x"].shape) == (64, 2) and "strict" in type(scope["x"]).__module__
