"""Blocks and models call only VOCAB names on ``xp`` and never array methods (ARCHITECTURE.md section 2)."""

import ast
import pathlib

import pytest

from genblocks.backends.vocab import LINALG, VOCAB

ROOT = pathlib.Path(__file__).resolve().parents[1] / "genblocks"
FILES = sorted(p for d in ("blocks", "models") for p in (ROOT / d).rglob("*.py"))

# Methods only arrays have (names that distributions also use as properties, like mean and variance,
# are left to review).
ARRAY_METHODS = {
    "reshape", "sum", "astype", "transpose", "dot", "ravel", "flatten", "squeeze", "argmax", "argmin",
    "cumsum", "clip", "prod", "item", "tolist", "T", "swapaxes", "fill", "nonzero", "to_device", "mT",
}


def violations(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id == "xp":
            if node.attr not in VOCAB:
                found.append(f"{path.name}:{node.lineno} xp.{node.attr} is not in VOCAB")
        elif isinstance(base, ast.Attribute) and base.attr == "linalg" and isinstance(base.value, ast.Name) \
                and base.value.id == "xp":
            if node.attr not in LINALG:
                found.append(f"{path.name}:{node.lineno} xp.linalg.{node.attr} is not in LINALG")
        elif node.attr in ARRAY_METHODS and not (isinstance(base, ast.Name) and base.id in ("math", "ops")):
            found.append(f"{path.name}:{node.lineno} array method .{node.attr} (use xp.{node.attr}(...))")
    return found


def test_files_exist():
    assert FILES, "no block or model files found"


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_only_vocab_names_and_no_array_methods(path):
    assert violations(path) == []


def test_the_checker_catches_violations(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(xp, x):\n    y = xp.einsum('i->', x)\n    z = xp.linalg.qr(x)\n    return x.reshape(2)\n")
    found = violations(bad)
    assert any("xp.einsum" in v for v in found)
    assert any("xp.linalg.qr" in v for v in found)
    assert any(".reshape" in v for v in found)
