"""The ``genblocks`` command: help, version, the demo and its files."""

import json
import subprocess
import sys

import pytest

import genblocks
from genblocks import cli


def _run(*args):
    return subprocess.run([sys.executable, "-m", "genblocks", *args], capture_output=True, text=True)


def test_help_and_version():
    out = _run("--help")
    assert out.returncode == 0 and "demo" in out.stdout
    ver = _run("--version")
    assert ver.returncode == 0 and ver.stdout.strip() == f"genblocks {genblocks.__version__}"


def test_unknown_family_and_bad_seed_are_usage_errors():
    out = _run("demo", "--families", "nosuchfamily", "--out", "unused-dir-should-not-matter")
    assert out.returncode == 2 and "families" in out.stderr and "nosuchfamily" in out.stderr
    out = _run("demo", "--seed", "-1")
    assert out.returncode == 2 and "--seed" in out.stderr


@pytest.mark.filterwarnings("ignore")
def test_demo_smoke_writes_table_json_and_png(tmp_path, capsys):
    rows = cli.run_demo(str(tmp_path), smoke=True)
    assert [r["family"] for r in rows] == [f for f, _ in cli.DEMO_FAMILIES]
    printed = capsys.readouterr().out
    import math

    for r in rows:
        assert r["family"] in printed and r["samples"].shape[1] == 2
        assert r["value"] is None or math.isfinite(r["value"])  # a test NLL, or none where there is no likelihood
        assert (r["value"] is None) == ("no likelihood" in r["metric"])
        assert math.isfinite(r["mmd"]) and r["params"] > 0 and r["sample_ms"] > 0
    assert len({r["test"].shape[0] for r in rows}) == 1  # every row scored on the same number of points
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert [s["family"] for s in summary] == [r["family"] for r in rows]
    assert (tmp_path / "demo.md").read_text().startswith("| family |")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # flow and diffusion trace their way from noise to data for the picture's bottom row
    paths = {r["family"]: r["path"] for r in rows if "path" in r}
    assert sorted(paths) == ["diffusion", "flow"]
    for family, path in paths.items():
        assert len(path) > 2 and all(p.shape == (300, 2) for p in path), family
        assert abs(path[0] - path[-1]).mean() > 0.1, family  # it moves
    assert "path" not in summary[0]


def test_demo_shows_one_labelled_progress_bar_per_model(tmp_path, capsys):
    cli.run_demo(str(tmp_path), smoke=True, families=["baseline", "autoregressive"], progress=True)
    err = capsys.readouterr().err
    assert "baseline" in err and "autoregressive" in err and "60/60" in err


@pytest.mark.filterwarnings("ignore")
def test_demo_on_digits_scores_every_family_on_the_447_test_images(tmp_path, capsys):
    import math

    rows = cli.run_demo(str(tmp_path), smoke=True, data="digits")
    assert [r["family"] for r in rows] == [f for f, _ in cli.DIGIT_FAMILIES]
    for r in rows:
        assert r["test"].shape == (447, 64) and r["samples"].shape == (256, 64), r["family"]
        levels = r["samples"]
        assert ((levels >= 0) & (levels <= 16) & (levels == levels.round())).all(), r["family"]
        assert (r["value"] is None) == (r["family"] == "gan")
        assert r["value"] is None or math.isfinite(r["value"])
        assert math.isfinite(r["mmd"]) and math.isfinite(r["fd"]) and r["fd"] >= 0.0
    assert "| FD (digits features) |" in (tmp_path / "demo.md").read_text()
    # independent pixels: the per-pixel histograms of the training digits (about 106-108 nats per image)
    assert 100.0 < rows[0]["value"] < 112.0
    paths = {r["family"]: r["path"] for r in rows if "path" in r}
    assert sorted(paths) == ["diffusion", "flow"] and all(p.shape == (4, 64) for v in paths.values() for p in v)
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="--data: expected one of 2d, digits"):
        cli.run_demo(str(tmp_path), smoke=True, data="mnist")


def test_demo_on_digits_without_scikit_learn_says_which_extra_before_training(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    monkeypatch.setattr(cli, "DIGIT_FAMILIES", ())  # no row may run
    with pytest.raises(ValueError, match=r'--data digits: needs scikit-learn.*genblocks\[data\]'):
        cli.run_demo(str(tmp_path / "out"), smoke=True, data="digits")
    assert not (tmp_path / "out").exists()


def test_baseline_learns_two_moons():
    from genblocks.demo import mixture_row

    row = mixture_row(genblocks.Rng(0), smoke=True)
    # the initial mixture scores about 3.6 nats on these moons (std 1.7 x 1.0); 60 Adam steps must get
    # well below; the full demo reaches about 2.6 (the moons' own entropy is roughly 2.3)
    assert row["value"] < 3.2


def test_failed_demo_leaves_earlier_output_intact(tmp_path, monkeypatch):
    (tmp_path / "demo.md").write_text("earlier result\n")

    def boom(rng, smoke=False, progress=False):
        raise RuntimeError("training diverged")

    monkeypatch.setattr(cli, "DEMO_FAMILIES", (("baseline", boom),) + tuple(cli.DEMO_FAMILIES[1:]))
    with pytest.raises(RuntimeError, match="diverged"):
        cli.run_demo(str(tmp_path), smoke=True, families=["baseline"])
    assert (tmp_path / "demo.md").read_text() == "earlier result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.md"]


def _genblocks_imports(path):
    """Every genblocks module a file imports (absolute names), read with ast: nothing is executed."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("genblocks")}


def test_layering_models_import_blocks_only_and_blocks_import_no_models():
    # the old models/{mixture,flow,diffusion}.py imported genblocks.data and genblocks.train in their demo()
    import pathlib

    root = pathlib.Path(genblocks.__file__).parent
    above_models = ("genblocks.train", "genblocks.data", "genblocks.metrics", "genblocks.demo", "genblocks.cli")
    bad = []
    for path in sorted((root / "models").glob("*.py")):
        bad += [f"{path.name}: {n}" for n in _genblocks_imports(path) if n.startswith(above_models)]
    for path in sorted((root / "blocks").glob("*.py")):
        bad += [f"blocks/{path.name}: {n}" for n in _genblocks_imports(path)
                if n.startswith(above_models + ("genblocks.models", "genblocks.checks"))]
    assert not bad, bad
    assert not any(hasattr(__import__(f"genblocks.models.{m}", fromlist=["_"]), "demo")
                   for m in ("mixture", "flow", "diffusion"))


def test_flow_drives_bijectors_through_public_call_bijector():
    # the old flow.py reached into bijectors' private _call
    import pathlib

    import genblocks.blocks.bijectors as bj

    text = (pathlib.Path(genblocks.__file__).parent / "models" / "flow.py").read_text()
    assert "._call(" not in text and "call_bijector" in text
    with pytest.raises(ValueError, match="direction"):
        bj.call_bijector(bj.Identity(), "sideways", {}, None)


def test_a_bad_out_or_empty_families_fail_in_one_line_before_any_training(tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a demo row ran although the arguments were bad")

    monkeypatch.setattr(cli, "DEMO_FAMILIES", [(f, no_training) for f, _ in cli.DEMO_FAMILIES])
    occupied = tmp_path / "a-file"
    occupied.write_text("keep me")
    cases = [(["--out", str(occupied)], "is a file; expected a folder"),
             (["--out", str(occupied / "sub")], "cannot write into"),
             (["--families", ",,", "--out", str(tmp_path / "new")], "--families: expected a comma-separated subset")]
    for args, message in cases:
        err = []
        monkeypatch.setattr(sys, "stderr", type("E", (), {"write": lambda self, s: err.append(s),
                                                           "flush": lambda self: None})())
        assert cli.main(["demo", *args]) == 2
        text = "".join(err).strip()
        assert message in text and len(text.splitlines()) == 1, text
    assert occupied.read_text() == "keep me" and not (tmp_path / "new").exists()


def test_a_bad_backend_variable_names_itself_and_spares_help_and_version():
    import os

    env = dict(os.environ, GENBLOCKS_BACKEND="bogus")
    for args in (["--version"], ["--help"]):
        out = subprocess.run([sys.executable, "-m", "genblocks", *args], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-c", "from genblocks.backends import Rng; Rng(0)"], capture_output=True,
                         text=True, env=env)
    assert out.returncode != 0 and "GENBLOCKS_BACKEND: expected one of ('numpy', 'cupy', 'strict')" in out.stderr
    assert "'bogus'" in out.stderr


def test_training_under_a_strict_default_says_which_variable_to_unset():
    import os

    code = ("from genblocks.backends import Rng\nfrom genblocks.data import moons\n"
            "from genblocks.models.mixture import GaussianMixture\nfrom genblocks.train.loop import fit\n"
            "from genblocks.train.optim import adam\nrng = Rng(0)\nm = GaussianMixture(2, 2)\n"
            "fit(m.loss, m.init(rng), moons(rng, 64), rng, adam(0.1), steps=1, progress=False)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, GENBLOCKS_BACKEND="strict"))
    assert out.returncode != 0 and "GENBLOCKS_BACKEND=strict" in out.stderr and "unset it" in out.stderr


def test_output_files_honour_the_umask(tmp_path):
    import os
    import stat

    from genblocks.io import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.bin").st_mode) == 0o640


def test_train_sample_eval_end_to_end_on_a_npy_file_with_resume(tmp_path):
    """train -> sample -> eval with no code in between; an interrupted run resumed equals an uninterrupted one."""
    import numpy as np

    from genblocks.train.checkpoint import load

    x = np.random.default_rng(0).normal([100.0, -20.0], [30.0, 5.0], size=(512, 2)).astype("float32")
    data = tmp_path / "mine.npy"
    np.save(data, x)
    whole, part = str(tmp_path / "whole.npz"), str(tmp_path / "part.npz")
    common = ["--data", str(data), "--batch-size", "64"]
    assert cli.main(["train", "mixture", *common, "--steps", "30", "--out", whole]) == 0
    assert cli.main(["train", "mixture", *common, "--steps", "12", "--out", part]) == 0  # "interrupted" at 12
    assert cli.main(["train", "mixture", *common, "--steps", "30", "--out", part]) == 2  # no silent overwrite
    assert cli.main(["train", "mixture", *common, "--steps", "30", "--out", part, "--resume"]) == 0
    a, b = load(whole), load(part)
    assert a["step"] == b["step"] == 30
    for k in a["params"]:
        np.testing.assert_array_equal(a["params"][k], b["params"][k])
    assert cli.main(["train", "mixture", "--data", "moons", "--steps", "30", "--out", part, "--resume"]) == 2

    out = str(tmp_path / "s.npy")
    assert cli.main(["sample", whole, "--n", "4000", "--out", out]) == 0
    s = np.load(out)
    assert s.shape == (4000, 2)
    np.testing.assert_allclose(s.mean(0), x.mean(0), atol=0.15 * x.std(0).max())  # back in the data's units
    report = cli.run_eval(whole, str(data))
    scaling = load(whole)["config"]["scaling"]
    from genblocks.families import build_model

    model = build_model("mixture", load(whole)["config"]["model"])
    z = (x - np.array(scaling["mean"], dtype="float32")) / np.array(scaling["std"], dtype="float32")
    want = -model.log_prob(a["params"], z).mean() + np.log(scaling["std"]).sum()
    assert abs(report["nll_nats"] - want) < 1e-4 and report["likelihood"] == "exact" and report["points"] == 512
    assert np.isfinite(report["mmd_standardised"])


SMALL = {"flow": ["layers=1", "hidden=[8]"], "made": ["hidden=[8]", "num_components=2"],
         "diffusion": ["hidden=[8]", "num_train_timesteps=20"], "vae": ["hidden=[8]", "num_samples=2"]}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_every_family_trains_samples_and_evaluates_from_its_checkpoint(family, tmp_path):
    ckpt, out = str(tmp_path / "c.npz"), str(tmp_path / "s.npz")
    options = [a for o in SMALL[family] for a in ("--option", o)]
    assert cli.main(["train", family, "--data", "moons", "--n", "256", "--steps", "3", "--out", ckpt,
                     "--batch-size", "64", *options]) == 0
    extra = ["--sampler", "ddim", "--num-inference-steps", "5"] if family == "diffusion" else []
    assert cli.main(["sample", ckpt, "--n", "10", "--out", out, *extra]) == 0
    import numpy as np

    assert np.load(out)["samples"].shape == (10, 2)
    report = cli.run_eval(ckpt, "moons", n=32)
    assert np.isfinite(report["nll_nats"]) and report["points"] == 32


def test_train_sample_eval_refuse_bad_arguments_in_one_line(tmp_path, capsys):
    ckpt = str(tmp_path / "c.npz")
    assert cli.main(["train", "mixture", "--data", "moons", "--n", "64", "--steps", "2", "--out", ckpt]) == 0
    bad = [
        (["train", "nope", "--data", "moons", "--steps", "2", "--out", str(tmp_path / "g.npz")], "family: expected"),
        (["train", "mixture", "--data", "moons", "--steps", "2", "--out", str(tmp_path / "g.npz"), "--option",
          "depth=3"], "--option: the mixture family takes ['num_components'], got ['depth']"),
        (["train", "mixture", "--data", "nope", "--steps", "2", "--out", str(tmp_path / "g.npz")], "--data: expected"),
        (["train", "mixture", "--data", "moons", "--steps", "2", "--out", str(tmp_path / "g.txt")], "ending in .npz"),
        (["train", "mixture", "--data", "moons", "--steps", "0", "--out", str(tmp_path / "g.npz")], "--steps"),
        (["sample", ckpt, "--out", str(tmp_path / "s.txt")], "--out: expected a path ending in"),
        (["sample", ckpt, "--out", str(tmp_path / "s.npy"), "--sampler", "ddim"], "takes no sampling options"),
        (["sample", str(tmp_path / "none.npz"), "--out", str(tmp_path / "s.npy")], "checkpoint: path: no file"),
        (["eval", ckpt, "--data", str(tmp_path / "none.npy")], "--data: path: no file"),
    ]
    capsys.readouterr()
    for args, message in bad:
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, (args, err)
    assert not (tmp_path / "g.npz").exists()
