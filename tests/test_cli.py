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
    for r in rows:
        assert r["family"] in printed and r["samples"].shape[1] == 2
        assert r["value"] == r["value"]  # finite metric (not NaN)
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert [s["family"] for s in summary] == [r["family"] for r in rows]
    assert (tmp_path / "demo.md").read_text().startswith("| family |")
    assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_baseline_learns_two_moons():
    from genblocks.demo import mixture_row

    row = mixture_row(genblocks.Rng(0), smoke=True)
    # the initial mixture scores about 3.6 nats on these moons (std 1.7 x 1.0); 60 Adam steps must get
    # well below; the full demo reaches about 2.6 (the moons' own entropy is roughly 2.3)
    assert row["value"] < 3.2


def test_failed_demo_leaves_earlier_output_intact(tmp_path, monkeypatch):
    (tmp_path / "demo.md").write_text("earlier result\n")

    def boom(rng, smoke=False):
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
