"""Checkpoints: one ``.npz`` holding parameter and optimizer trees, step, rng state and config.

File layout (format ``genblocks-checkpoint``, version 1):

- one array per tree leaf, named by its path: ``params/0/W``, ``opt_state/m/0/W``, ``opt_state/step``,
  ``state/loss_history`` (the model's non-trained ``state`` tree, when there is one)
  (dict keys are escaped: ``%`` -> ``%25``, ``/`` -> ``%2F``);
- ``__genblocks__``: a 0-d unicode array holding a JSON header: format and version, the structure of
  each tree (dict / list / tuple / None nodes; leaves with their name, shape and dtype), ``step``, the
  ``Rng`` state, the model ``config`` and ``extra`` (the caller's own JSON bookkeeping).

Writes go through :func:`genblocks.io.save_npz_atomic` (temporary file, fsync, rename), so
an interrupted save never leaves a half-written file under ``path``. Loading reads with
``allow_pickle=False`` and checks every name, shape and dtype against the header: a truncated, foreign
or tampered file raises ``ValueError`` naming the path and the problem, and never returns half a tree.
"""

import json
import os

from genblocks.backends import Rng, backend_of, to_numpy
from genblocks.io import load_npz, save_npz_atomic

__all__ = ["save", "load", "check_compatible", "FORMAT", "VERSION"]

FORMAT = "genblocks-checkpoint"
VERSION = 1
HEADER = "__genblocks__"
TREES = ("params", "opt_state", "state")
_ARRAY_KINDS = "biufc"  # bool, int, uint, float, complex: the dtypes an .npz stores without pickle


def _escape(key):
    return key.replace("%", "%25").replace("/", "%2F")


def _flatten(tree, name, arrays, argname):
    """JSON structure of ``tree``; its leaves go to ``arrays`` as host arrays under their path names."""
    if isinstance(tree, dict):
        children = []
        for key, value in tree.items():
            if not isinstance(key, str):
                raise TypeError(f"{argname}: dict keys must be str, got {key!r} ({type(key).__name__}) at {name}")
            children.append([key, _flatten(value, f"{name}/{_escape(key)}", arrays, argname)])
        return {"dict": children}
    if isinstance(tree, (list, tuple)):
        kind = "tuple" if isinstance(tree, tuple) else "list"
        return {kind: [_flatten(v, f"{name}/{i}", arrays, argname) for i, v in enumerate(tree)]}
    if tree is None:
        return None
    if backend_of(tree) is None:
        raise TypeError(f"{argname}: expected arrays as leaves, got {type(tree).__name__} at {name}")
    host = to_numpy(tree)
    if host.dtype.kind not in _ARRAY_KINDS:
        raise TypeError(f"{argname}: leaf {name} has dtype {host.dtype}, expected a numeric or bool dtype")
    arrays[name] = host
    return {"leaf": name, "shape": list(host.shape), "dtype": host.dtype.name}


def _check_json(value, argname, expected="a JSON-serialisable dict"):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"{argname}: expected {expected} or None, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{argname}: expected {expected} (str keys; numbers, strings, lists), {err}") from None
    return value


def save(path, params, opt_state=None, step=None, rng=None, config=None, extra=None, state=None):
    """Write ``params`` (and optimizer state, step, ``Rng`` state, config) to one ``.npz`` at ``path``.

    ``state`` is the model's non-trained tree (running statistics, loss histories; see
    ``Block.init_state``), saved beside the params and returned by :func:`load` as ``"state"``.

    Trees are dict/list/tuple/None of arrays of any backend (copied to the host). ``step`` is an int
    >= 0 or None; ``rng`` an :class:`Rng` (numpy or strict backend) or None; ``config`` and ``extra``
    JSON-serialisable dicts or None. Atomic: ``path`` holds either the old file or the new one.
    Returns ``path``.
    """
    arrays = {}
    structures = {"params": _flatten(params, "params", arrays, "params")}
    if opt_state is not None:
        structures["opt_state"] = _flatten(opt_state, "opt_state", arrays, "opt_state")
    if state is not None:
        structures["state"] = _flatten(state, "state", arrays, "state")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise ValueError(f"step: expected a non-negative int or None, got {step!r}")
    if rng is not None and not isinstance(rng, Rng):
        raise TypeError(f"rng: expected a genblocks Rng or None, got {type(rng).__name__}")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "trees": structures,
        "step": step,
        "rng": None if rng is None else rng.state(),
        "config": _check_json(config, "config"),
        "extra": _check_json(extra, "extra"),
    }
    arrays[HEADER] = json.dumps(header, allow_nan=False)
    return save_npz_atomic(path, arrays)


# ---------------------------------------------------------------------------------------------------
# loading


class _Corrupt(Exception):
    """Raised inside the loader; turned into a ValueError naming the path."""


def _leaf(node, arrays, used, where):
    name, shape, dtype = node.get("leaf"), node.get("shape"), node.get("dtype")
    if not isinstance(name, str) or not isinstance(shape, list) or not isinstance(dtype, str):
        raise _Corrupt(f"malformed leaf at {where}")
    if name not in arrays:
        raise _Corrupt(f"array {name!r} is missing")
    if name in used:
        raise _Corrupt(f"array {name!r} is listed twice")
    arr = arrays[name]
    if list(arr.shape) != shape or arr.dtype.name != dtype:
        raise _Corrupt(
            f"array {name!r} has shape {tuple(arr.shape)} and dtype {arr.dtype.name}, "
            f"the header says {tuple(shape)} and {dtype}"
        )
    used.add(name)
    return arr


def _rebuild_tree(node, arrays, used, where):
    # leaves are dicts with "leaf", "shape", "dtype"; every other node has exactly one key
    if isinstance(node, dict) and "leaf" in node:
        return _leaf(node, arrays, used, where)
    if isinstance(node, dict) and len(node) == 1:
        (kind, body), = node.items()
        if kind == "dict" and isinstance(body, list) and all(isinstance(kv, list) and len(kv) == 2 for kv in body):
            out = {}
            for key, child in body:
                if not isinstance(key, str):
                    raise _Corrupt(f"malformed dict key {key!r} at {where}")
                out[key] = _rebuild_tree(child, arrays, used, f"{where}/{_escape(key)}")
            return out
        if kind in ("list", "tuple") and isinstance(body, list):
            items = [_rebuild_tree(child, arrays, used, f"{where}/{i}") for i, child in enumerate(body)]
            return tuple(items) if kind == "tuple" else items
    if node is None:
        return None
    raise _Corrupt(f"malformed tree structure at {where}")


def _read_header(arrays):
    raw = arrays.pop(HEADER, None)
    if raw is None:
        names = sorted(arrays)
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise _Corrupt(f"not a genblocks checkpoint: no {HEADER!r} entry (the file holds [{shown}])")
    if raw.dtype.kind != "U" or raw.shape != ():
        raise _Corrupt(f"the {HEADER!r} entry is not a JSON string (dtype {raw.dtype}, shape {raw.shape})")
    try:
        header = json.loads(str(raw[()]))
    except ValueError as err:
        raise _Corrupt(f"the {HEADER!r} entry is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise _Corrupt(f"not a genblocks checkpoint (header format {found!r}, expected {FORMAT!r})")
    version = header.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise _Corrupt(f"checkpoint format version {version!r} is not supported (this genblocks reads <= {VERSION})")
    for key in ("trees", "step", "rng", "config", "extra"):
        if key not in header:
            raise _Corrupt(f"the header has no {key!r} field")
    if not isinstance(header["trees"], dict) or "params" not in header["trees"]:
        raise _Corrupt("the header has no params tree")
    unknown = set(header["trees"]) - set(TREES)
    if unknown:
        raise _Corrupt(f"unknown trees {sorted(unknown)} in the header")
    step = header["step"]
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise _Corrupt(f"step {step!r} is not a non-negative int")
    for key in ("config", "extra"):
        if header[key] is not None and not isinstance(header[key], dict):
            raise _Corrupt(f"{key} is not a dict")
    return header


def load(path, like=None):
    """Read a checkpoint written by :func:`save`: ``dict(params, opt_state, state, step, rng, config, extra)``.

    Arrays come back as host (numpy) arrays in their saved dtypes, trees with their dict/list/tuple
    structure; ``rng`` is an :class:`Rng` that continues where the saved one was (or None). With
    ``like=params`` the loaded params are checked by :func:`check_compatible` first.
    Raises FileNotFoundError for a missing file and ValueError (naming ``path``) for anything else
    wrong: not an .npz, truncated, not a genblocks checkpoint, missing or mismatched arrays.
    """
    path = os.fspath(path)
    arrays = load_npz(path)
    try:
        header = _read_header(arrays)
        used = set()
        trees = {name: _rebuild_tree(node, arrays, used, name) for name, node in header["trees"].items()}
        extra_names = sorted(set(arrays) - used)
        if extra_names:
            raise _Corrupt(f"arrays {extra_names[:8]} are not listed in the header")
        rng = None
        if header["rng"] is not None:
            try:
                rng = Rng.from_state(header["rng"])
            except ValueError as err:
                raise _Corrupt(f"the rng state is invalid ({err})") from None
    except _Corrupt as err:
        raise ValueError(f"path: {path!r} is not a valid genblocks checkpoint: {err}") from None
    out = {
        "params": trees["params"],
        "opt_state": trees.get("opt_state"),
        "state": trees.get("state"),
        "step": header["step"],
        "rng": rng,
        "config": header["config"],
        "extra": header["extra"],
    }
    if like is not None:
        check_compatible(like, out["params"], source=path)
    return out


def _specs(tree, name):
    arrays = {}
    _flatten(tree, name, arrays, name)
    return {k: (tuple(a.shape), a.dtype.name) for k, a in arrays.items()}


def check_compatible(template, loaded, name="params", source=None, max_lines=20):
    """Raise ValueError unless ``loaded`` has exactly ``template``'s leaf names, shapes and dtypes.

    ``template`` is typically ``model.init(rng)``; the message lists every missing and unexpected
    array and every shape or dtype difference (the "checkpoint from another model" error).
    """
    want, have = _specs(template, name), _specs(loaded, name)
    problems = []
    for key in want.keys() - have.keys():
        problems.append(f"missing {key} (the model has shape {want[key][0]}, {want[key][1]})")
    for key in have.keys() - want.keys():
        problems.append(f"unexpected {key} (shape {have[key][0]}, {have[key][1]}) not in the model")
    for key in want.keys() & have.keys():
        (ws, wd), (hs, hd) = want[key], have[key]
        if ws != hs:
            problems.append(f"shape of {key}: {hs} in the checkpoint, {ws} in the model")
        if wd != hd:
            problems.append(f"dtype of {key}: {hd} in the checkpoint, {wd} in the model")
    if problems:
        problems.sort()
        shown = problems[:max_lines]
        if len(problems) > max_lines:
            shown.append(f"... and {len(problems) - max_lines} more")
        where = f" from {source!r}" if source is not None else ""
        raise ValueError(
            f"{name}: the checkpoint{where} does not match the model ({len(problems)} differences):\n  "
            + "\n  ".join(shown)
        )
