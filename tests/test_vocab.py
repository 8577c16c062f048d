"""Blocks and models call only VOCAB names on ``xp`` and never array methods (docs/architecture.md, Backends)."""

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


NAMESPACE_FUNCTIONS = {"namespace", "namespace_of"}


def _is_xp_name(identifier):
    """xp, _xp, host_xp, xp_host: an identifier that holds a namespace by the house naming."""
    return "xp" in identifier.split("_")


def is_namespace(expr):
    """True for every spelling of a namespace: ``xp``, ``some_xp``, ``self._xp``, ``rng.xp``,
    ``namespace(x)``, ``backends.namespace_of("numpy")``."""
    if isinstance(expr, ast.Name):
        return _is_xp_name(expr.id)
    if isinstance(expr, ast.Attribute):
        return _is_xp_name(expr.attr)
    if isinstance(expr, ast.Call):
        f = expr.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
        return name in NAMESPACE_FUNCTIONS
    return False


def violations(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        spelled = ast.unparse(base)
        if is_namespace(base):
            if node.attr not in VOCAB:
                found.append(f"{path.name}:{node.lineno} {spelled}.{node.attr} is not in VOCAB")
        elif isinstance(base, ast.Attribute) and base.attr == "linalg" and is_namespace(base.value):
            if node.attr not in LINALG:
                found.append(f"{path.name}:{node.lineno} {spelled}.{node.attr} is not in LINALG")
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


SPELLINGS = ["xp", "host_xp", "self._xp", "rng.xp", "namespace(x)", "namespace_of('numpy')",
             "backends.namespace_of('strict')"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_the_checker_sees_every_spelling_of_a_namespace(tmp_path, spelling):
    """Negative control: a forbidden name (einsum) is flagged in each spelling (the old checker saw only
    ``xp.``), and an allowed one (exp) is not."""
    bad = tmp_path / "bad.py"
    bad.write_text(f"def f(self, rng, x):\n    a = {spelling}.einsum('i->', x)\n    b = {spelling}.linalg.qr(x)\n"
                   f"    return {spelling}.exp(x)\n")
    found = violations(bad)
    assert [v.split(" ", 1)[1] for v in found] == [f"{spelling}.einsum is not in VOCAB",
                                                   f"{spelling}.linalg.qr is not in LINALG"], found


def test_namespace_detection_leaves_other_names_alone():
    for expr in ["exp", "self.exp", "math.exp", "ops.softplus", "self._xpath", "next_x", "f(x)"]:
        assert not is_namespace(ast.parse(expr, mode="eval").body), expr
