"""Pytrees: nested dicts, lists and tuples whose leaves are arrays (``None`` is an empty subtree).

- ``tree_map(fn, tree, *rest)``: ``fn`` applied leafwise to trees of the same structure.
- ``tree_leaves(tree)``: the leaves in order (dicts in insertion order).
- ``tree_unflatten(tree, leaves)``: ``tree``'s structure with the leaves taken in that order from ``leaves``.
- ``global_norm(tree)``: ``sqrt(sum_i sum(leaf_i ** 2))`` as a Python float, accumulated in float64.
- ``tree_all_finite(tree)``: True when no leaf holds NaN or inf.
"""

import math

from genblocks.backends import namespace

__all__ = ["tree_map", "tree_leaves", "tree_unflatten", "global_norm", "tree_all_finite"]


def _where(path):
    return path or "the root"


def tree_map(fn, tree, *rest, path=""):
    """``fn(leaf, *other_leaves)`` at every leaf; the trees must share ``tree``'s structure.

    Structure differences (missing dict keys, list lengths, a dict where a leaf was expected) raise
    ValueError naming the path, e.g. ``"[1]['W']"``. The walk itself carries no path (it runs in every
    optimizer step): on a mismatch, ``_check_same`` walks again, with paths, to name it.
    """
    try:
        return _map(fn, tree, rest)
    except _Mismatch:
        _check_same(tree, rest, path)
        raise AssertionError("tree_map: a structure mismatch was detected but not located") from None


class _Mismatch(Exception):
    """Raised by ``_map`` at the first structure difference; ``tree_map`` then locates it."""


def _map(fn, tree, rest):
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or other.keys() != tree.keys():
                raise _Mismatch
        return {k: _map(fn, v, [o[k] for o in rest]) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        for other in rest:
            if not isinstance(other, (list, tuple)) or len(other) != len(tree):
                raise _Mismatch
        out = [_map(fn, v, [o[i] for o in rest]) for i, v in enumerate(tree)]
        return tuple(out) if isinstance(tree, tuple) else out
    if tree is None:
        for other in rest:
            if other is not None:
                raise _Mismatch
        return None
    for other in rest:
        if isinstance(other, (dict, list, tuple)) or other is None:
            raise _Mismatch
    return fn(tree, *rest)


def _check_same(tree, rest, path):
    """Raise ValueError naming the first place where ``rest`` differs from ``tree``'s structure."""
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or set(other) != set(tree):
                raise ValueError(f"trees differ at {_where(path)}: {_describe(tree)} vs {_describe(other)}")
        for k, v in tree.items():
            _check_same(v, [o[k] for o in rest], f"{path}[{k!r}]")
    elif isinstance(tree, (list, tuple)):
        for other in rest:
            if not isinstance(other, (list, tuple)) or len(other) != len(tree):
                raise ValueError(f"trees differ at {_where(path)}: {_describe(tree)} vs {_describe(other)}")
        for i, v in enumerate(tree):
            _check_same(v, [o[i] for o in rest], f"{path}[{i}]")
    elif tree is None:
        for other in rest:
            if other is not None:
                raise ValueError(f"trees differ at {_where(path)}: None vs {_describe(other)}")
    else:
        for other in rest:
            if isinstance(other, (dict, list, tuple)) or other is None:
                raise ValueError(f"trees differ at {_where(path)}: a leaf vs {_describe(other)}")


def _describe(node):
    if isinstance(node, dict):
        return f"dict with keys {sorted(map(str, node))}"
    if isinstance(node, (list, tuple)):
        return f"{type(node).__name__} of length {len(node)}"
    if node is None:
        return "None"
    return f"a leaf ({type(node).__name__})"


def tree_leaves(tree):
    """The leaves of ``tree`` as a list, depth first, dicts in insertion order; ``None`` has none."""
    out = []

    def visit(node):
        if isinstance(node, dict):
            for v in node.values():
                visit(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                visit(v)
        elif node is not None:
            out.append(node)

    visit(tree)
    return out


def tree_unflatten(tree, leaves):
    """``tree``'s structure (as ``tree_map`` returns it: tuples stay tuples, ``None`` stays ``None``) with its
    leaves replaced, in ``tree_leaves`` order, by the items of ``leaves``; ValueError when their counts differ."""
    items = iter(leaves)
    out = _fill(tree, items)
    if next(items, _END) is not _END:
        raise ValueError("tree_unflatten: more leaves than the tree has")
    return out


_END = object()


def _fill(node, items):
    # a module-level function, not a closure calling itself: such a closure is a reference cycle, which would
    # keep ``leaves`` (and every array in it) alive until the cyclic garbage collector runs
    if isinstance(node, dict):
        return {k: _fill(v, items) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        out = [_fill(v, items) for v in node]
        return tuple(out) if isinstance(node, tuple) else out
    if node is None:
        return None
    try:
        return next(items)
    except StopIteration:
        raise ValueError("tree_unflatten: fewer leaves than the tree has") from None


def global_norm(tree):
    """``||tree||_2 = sqrt(sum_i sum(leaf_i ** 2))`` as a Python float (0.0 for no leaves).

    Squares are summed in float64 so float32 gradients with entries up to ~1e150 do not overflow;
    NaN or inf anywhere gives a non-finite result.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        return 0.0
    xp = namespace(leaves)
    total = 0.0
    for leaf in leaves:
        wide = leaf if leaf.dtype == xp.float64 else xp.astype(leaf, xp.float64)  # float64: no copy
        flat = xp.reshape(wide, (-1,))
        total += float(xp.vecdot(flat, flat))
    return math.sqrt(total)


def tree_all_finite(tree):
    """True when every leaf is free of NaN and inf."""
    leaves = tree_leaves(tree)
    if not leaves:
        return True
    xp = namespace(leaves)
    return all(bool(xp.all(xp.isfinite(leaf))) for leaf in leaves)
