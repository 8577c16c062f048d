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
    out = _run("demo", "--families", "gan", "--out", "unused-dir-should-not-matter")
    assert out.returncode == 2 and "families" in out.stderr and "gan" in out.stderr
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
    row = cli.run_demo.__globals__["importlib"].import_module("genblocks.models.mixture").demo(
        genblocks.Rng(0), smoke=True)
    # the initial mixture scores about 3.6 nats on these moons (std 1.7 x 1.0); 60 Adam steps must get
    # well below; the full demo reaches about 2.6 (the moons' own entropy is roughly 2.3)
    assert row["value"] < 3.2


def test_failed_demo_leaves_earlier_output_intact(tmp_path, monkeypatch):
    (tmp_path / "demo.md").write_text("earlier result\n")

    def boom(rng, smoke=False):
        raise RuntimeError("training diverged")

    import genblocks.models.mixture as mixture

    monkeypatch.setattr(mixture, "demo", boom)
    with pytest.raises(RuntimeError, match="diverged"):
        cli.run_demo(str(tmp_path), smoke=True, families=["baseline"])
    assert (tmp_path / "demo.md").read_text() == "earlier result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.md"]
