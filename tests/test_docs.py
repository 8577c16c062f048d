"""docs/architecture.md names every module of the package and nothing that is gone, so the page stays true."""

import pathlib
import re

import genblocks

ROOT = pathlib.Path(genblocks.__file__).parent.parent
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def test_architecture_page_names_every_python_file():
    missing = [p.relative_to(ROOT).as_posix() for p in sorted((ROOT / "genblocks").rglob("*.py"))
               if f"`{p.relative_to(ROOT).as_posix()}`" not in PAGE]
    assert not missing, f"docs/architecture.md does not name {missing}"


def test_architecture_page_names_no_missing_file():
    named = set(re.findall(r"`(genblocks/[\w/]+\.py)`", PAGE))
    assert named, "the file table was not found"
    gone = sorted(n for n in named if not (ROOT / n).exists())
    assert not gone, f"docs/architecture.md names files that do not exist: {gone}"
