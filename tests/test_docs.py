"""The docs stay true: docs/architecture.md names every module of the package and nothing that is gone, and
every ``python`` block of docs/writing-a-block.md runs as written, top to bottom in one namespace."""

import pathlib
import re

from test_vocab import violations

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


WRITING_A_BLOCK = "docs/writing-a-block.md"


def python_blocks(relpath):
    """[(line of the block's first code line, code)] for every ```python block of a docs page."""
    text = (ROOT / relpath).read_text()
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


def test_writing_a_block_runs_top_to_bottom():
    blocks = python_blocks(WRITING_A_BLOCK)
    assert len(blocks) >= 5, f"{WRITING_A_BLOCK}: expected its python blocks, found {len(blocks)}"
    scope = _run_page(WRITING_A_BLOCK)
    assert {"TailPower", "GatedResidual", "gaussian_eps"} <= scope.keys()


def test_writing_a_block_follows_its_own_rules(tmp_path):
    """The page's code calls only VOCAB names on xp and no array methods (the check block files pass)."""
    code = tmp_path / "writing_a_block.py"
    code.write_text("\n".join(c for _, c in python_blocks(WRITING_A_BLOCK)))
    assert violations(code) == []
    assert "import numpy" not in code.read_text()


def _run_page(relpath):
    scope = {"__name__": relpath}
    for i, (line, code) in enumerate(python_blocks(relpath)):
        compiled = compile("\n" * (line - 1) + code, relpath, "exec")
        try:
            exec(compiled, scope)
        except Exception as err:
            raise AssertionError(f"{relpath}: python block {i} (line {line}) raised "
                                 f"{type(err).__name__}: {err}") from err
    return scope


def test_every_other_docs_page_runs_its_python_blocks():
    """Every ```python block of every docs/ page runs, page by page in order (writing-a-block has its own test)."""
    pages = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    assert WRITING_A_BLOCK in pages and "docs/architecture.md" in pages
    for page in pages:
        if page != WRITING_A_BLOCK and python_blocks(page):
            _run_page(page)
