"""Checkpoint files: round trips, atomic writes, corrupt/foreign files, compatibility checks."""

import json
import os
import tempfile

import numpy as np
import pytest
from conftest import assert_same_tree
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from genblocks.backends import Rng, to_device
from genblocks.backends import npz as host_io  # numpy.savez is called there
from genblocks.train import adam, checkpoint


def model_params(dtype=np.float32):
    rng = np.random.default_rng(0)
    return {
        "layers": [
            {"W": rng.normal(size=(4, 3)).astype(dtype), "b": np.zeros(3, dtype)},
            {"W": rng.normal(size=(3, 2)).astype(dtype), "b": np.ones(2, dtype)},
        ],
        "scale": np.asarray(1.5, dtype),
        "pair": (np.arange(3, dtype=np.int64), np.array([True, False])),
        "empty": {},
        "nothing": None,
    }


def test_round_trip_everything(tmp_path):
    params = model_params()
    params["f64"] = np.linspace(0, 1, 5)
    opt_state = adam(1e-3).init({"w": params["layers"][0]["W"]})
    rng = Rng(7, backend="numpy")
    rng.normal((3,))  # advance the stream: the saved state must continue from here
    config = {"model": "mlp", "hidden": [64, 64], "lr": 1e-3, "flag": True, "note": None}
    path = checkpoint.save(tmp_path / "ck.npz", params, opt_state, step=12, rng=rng, config=config,
                           extra={"k": 1})
    assert path == os.fspath(tmp_path / "ck.npz")
    out = checkpoint.load(path)
    assert_same_tree(out["params"], params)
    assert_same_tree(out["opt_state"], opt_state)
    assert out["step"] == 12 and out["config"] == config and out["extra"] == {"k": 1}
    np.testing.assert_array_equal(out["rng"].normal((5,)), rng.normal((5,)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]


def test_round_trip_minimal_and_from_other_backend(tmp_path, backend):
    params = to_device(model_params(np.float64), backend)
    checkpoint.save(tmp_path / "ck.npz", params)
    out = checkpoint.load(tmp_path / "ck.npz")
    assert out["opt_state"] is None and out["step"] is None and out["rng"] is None and out["config"] is None
    assert_same_tree(out["params"], model_params(np.float64))


def test_leaf_names_are_readable_paths(tmp_path):
    checkpoint.save(tmp_path / "ck.npz", {"enc": [{"W": np.ones(2)}], "a/b%": np.ones(1)}, {"step": np.int64(3)})
    with np.load(tmp_path / "ck.npz", allow_pickle=False) as f:
        names = set(f.files)
    assert names == {"params/enc/0/W", "params/a%2Fb%25", "opt_state/step", "__genblocks__"}
    tricky = {"a/b": np.ones(1), "a": {"b": np.zeros(1)}, "%2F": np.ones(2), "/": np.ones(3)}
    checkpoint.save(tmp_path / "ck.npz", tricky)
    assert_same_tree(checkpoint.load(tmp_path / "ck.npz")["params"], tricky)


keys = st.text(min_size=0, max_size=6)
leaves = hnp.arrays(
    st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8, np.bool_]),
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3),
)
trees = st.recursive(
    leaves | st.none(),
    lambda children: st.lists(children, max_size=3) | st.lists(children, max_size=3).map(tuple)
    | st.dictionaries(keys, children, max_size=3),
    max_leaves=8,
)


@given(trees, st.none() | trees)
def test_round_trip_random_trees(params, opt_state):
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ck.npz")
        checkpoint.save(path, params, opt_state, step=3)
        out = checkpoint.load(path)
    assert_same_tree(out["params"], params)
    if opt_state is not None:  # a None opt_state is "no optimizer state"
        assert_same_tree(out["opt_state"], opt_state)


# -- atomic writes ---------------------------------------------------------------------------------------


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, {"w": np.ones(3)}, step=1)
    before = path.read_bytes()
    real_savez = host_io.onp.savez

    def savez_then_crash(f, **arrays):
        real_savez(f, **arrays)  # the temporary file is fully written ...
        f.write(b"partial")
        raise OSError("disk full")  # ... and then the write fails

    monkeypatch.setattr(host_io.onp, "savez", savez_then_crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, {"w": np.zeros(3)}, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.npz"]
    assert checkpoint.load(path)["step"] == 1


def test_interrupt_mid_write_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(host_io.onp, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path / "new.npz", {"w": np.ones(3)})
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# -- corrupt, truncated, foreign files -------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "ck.npz"
    checkpoint.save(path, model_params(), adam(0.1).init({"w": np.ones(2)}), step=5, rng=Rng(1, backend="numpy"))
    return path


@pytest.mark.parametrize("cut", [0.0, 0.3, 0.9, 0.999])
def test_truncated_file(good_file, cut):
    data = good_file.read_bytes()
    good_file.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match="ck.npz"):
        checkpoint.load(good_file)


def test_text_file_and_npy_file(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(ValueError, match="notes.npz"):
        checkpoint.load(text)
    npy = tmp_path / "array.npy"
    np.save(npy, np.ones(3))
    with pytest.raises(ValueError, match="array.npy"):
        checkpoint.load(npy)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        checkpoint.load(tmp_path / "nope.npz")


def test_foreign_npz(tmp_path):
    path = tmp_path / "foreign.npz"
    np.savez(path, weights=np.ones(3), bias=np.zeros(2))
    with pytest.raises(ValueError, match=r"foreign.npz.*no '__genblocks__' entry.*bias, weights"):
        checkpoint.load(path)


def test_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, __genblocks__=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="evil.npz"):
        checkpoint.load(path)


def _rewrite(path, edit):
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    header = json.loads(str(arrays["__genblocks__"][()]))
    edit(arrays, header)
    arrays["__genblocks__"] = np.asarray(json.dumps(header))
    np.savez(path, **arrays)


@pytest.mark.parametrize("edit, message", [
    (lambda a, h: a.pop("params/layers/1/W"), "'params/layers/1/W' is missing"),
    (lambda a, h: a.update({"params/layers/0/b": np.zeros(4, np.float32)}), r"shape \(4,\).*header says \(3,\)"),
    (lambda a, h: a.update({"params/scale": np.asarray(1.5)}), "float64.*header says.*float32"),
    (lambda a, h: a.update({"params/stray": np.ones(1)}), "not listed in the header"),
    (lambda a, h: h.update(format="something-else"), "not a genblocks checkpoint"),
    (lambda a, h: h.update(version=99), "version 99"),
    (lambda a, h: h.pop("rng"), "no 'rng' field"),
    (lambda a, h: h.update(step=-3), "step -3"),
    (lambda a, h: h["trees"].pop("params"), "no params tree"),
    (lambda a, h: h["trees"]["params"].update(extra=1), "malformed"),
    (lambda a, h: h["trees"].update(params={"set": []}), "malformed"),
    (lambda a, h: h.update(rng={"backend": "numpy"}), "rng state"),
])
def test_damaged_checkpoint(good_file, edit, message):
    _rewrite(good_file, edit)
    with pytest.raises(ValueError, match=message) as info:
        checkpoint.load(good_file)
    assert "ck.npz" in str(info.value)


@pytest.mark.parametrize("header, message", [
    (np.asarray("{not json"), "not valid JSON"), (np.arange(3), "not a JSON string"),
    (np.asarray("[1, 2]"), "not a genblocks checkpoint"),
])
def test_header_that_is_not_a_json_object(good_file, header, message):
    with np.load(good_file, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["__genblocks__"] = header
    np.savez(good_file, **arrays)
    with pytest.raises(ValueError, match=message):
        checkpoint.load(good_file)


# -- compatibility with a model --------------------------------------------------------------------------


def test_check_compatible_lists_every_difference(good_file):
    model = model_params()
    assert checkpoint.load(good_file, like=model)["step"] == 5
    other = model_params()
    other["layers"][0]["W"] = np.zeros((5, 3), np.float32)
    other["layers"][1]["b"] = np.ones(2, np.float64)
    other["new"] = np.ones(1, np.float32)
    del other["scale"]
    with pytest.raises(ValueError) as info:
        checkpoint.load(good_file, like=other)
    msg = str(info.value)
    assert "params: the checkpoint from" in msg and "ck.npz" in msg and "(4 differences)" in msg
    assert "shape of params/layers/0/W: (4, 3) in the checkpoint, (5, 3) in the model" in msg
    assert "dtype of params/layers/1/b: float32 in the checkpoint, float64 in the model" in msg
    assert "missing params/new" in msg and "unexpected params/scale" in msg


def test_check_compatible_against_other_backend(backend):
    params = model_params()
    checkpoint.check_compatible(to_device(params, backend), params)
    with pytest.raises(ValueError, match="float64 in the model"):
        checkpoint.check_compatible(to_device(params, backend, dtype="float64"), params)


# -- bad input to save -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, name", [
    ({"params": {"w": 1.0}}, TypeError, "params: expected arrays as leaves, got float at params/w"),
    ({"params": {1: np.ones(1)}}, TypeError, "params: dict keys must be str"),
    ({"params": {"s": np.array(["a"])}}, TypeError, "params: leaf params/s has dtype <U1"),
    ({"params": {"o": np.array([None])}}, TypeError, "params: leaf params/o has dtype object"),
    ({"params": {}, "opt_state": {"m": [2]}}, TypeError, "opt_state: expected arrays"),
    ({"params": {}, "step": -1}, ValueError, "step"),
    ({"params": {}, "step": 1.5}, ValueError, "step"),
    ({"params": {}, "rng": 3}, TypeError, "rng"),
    ({"params": {}, "config": {"x": np.ones(2)}}, TypeError, "config"),
    ({"params": {}, "config": {"x": float("nan")}}, TypeError, "config"),
    ({"params": {}, "config": [1, 2]}, TypeError, "config"),
])
def test_bad_save_arguments(tmp_path, kwargs, error, name):
    with pytest.raises(error, match=name):
        checkpoint.save(tmp_path / "ck.npz", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_state_tree_round_trips_beside_params(tmp_path):
    path = tmp_path / "s.npz"
    state = {"loss_history": np.arange(6.0).reshape(3, 2), "counts": np.array([1, 2, 3], np.int64), "bn": [{}]}
    checkpoint.save(path, {"w": np.ones(2, np.float32)}, state=state)
    loaded = checkpoint.load(path)
    np.testing.assert_array_equal(loaded["state"]["loss_history"], state["loss_history"])
    assert loaded["state"]["counts"].dtype == np.int64 and loaded["state"]["bn"] == [{}]
    assert checkpoint.load(_saved_without_state(tmp_path))["state"] is None


def _saved_without_state(tmp_path):
    path = tmp_path / "plain.npz"
    checkpoint.save(path, {"w": np.ones(2, np.float32)})
    return path
