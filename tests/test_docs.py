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
    scope = {"__name__": "writing_a_block"}
    for i, (line, code) in enumerate(blocks):
        # padded so that a traceback's line numbers are the page's
        compiled = compile("\n" * (line - 1) + code, WRITING_A_BLOCK, "exec")
        try:
            exec(compiled, scope)
        except Exception as err:
            raise AssertionError(f"{WRITING_A_BLOCK}: python block {i} (line {line}) raised "
                                 f"{type(err).__name__}: {err}") from err
    assert {"TailPower", "GatedResidual", "gaussian_eps"} <= scope.keys()


def test_writing_a_block_follows_its_own_rules(tmp_path):
    """The page's code calls only VOCAB names on xp and no array methods (the check block files pass)."""
    code = tmp_path / "writing_a_block.py"
    code.write_text("\n".join(c for _, c in python_blocks(WRITING_A_BLOCK)))
    assert violations(code) == []
    assert "import numpy" not in code.read_text()


def test_autoregressive_page_runs_top_to_bottom():
    page = "docs/autoregressive.md"
    scope = {"__name__": "autoregressive_page"}
    blocks = python_blocks(page)
    assert blocks, f"{page}: expected its python blocks"
    for line, code in blocks:
        exec(compile("\n" * (line - 1) + code, page, "exec"), scope)
    assert "report" in scope
