"""The training loop: convergence, batching, NaN guard, evals, checkpoints, exact resume, bad input."""

import math

import numpy as np
import pytest
from conftest import assert_same_tree

from genblocks.backends import Rng, namespace, to_device
from genblocks.train import NonFiniteLossError, adam, checkpoint, fit, sgd

N, D = 50, 3
TRUE_W = np.array([1.0, -2.0, 0.5], np.float32)


def make_data(n=N, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, D)).astype(np.float32)
    y = (x @ TRUE_W + 0.3).astype(np.float32)
    return x, y


def linear_loss(params, batch, rng):
    """Mean squared error of a linear model, plus a little rng noise on the inputs."""
    x, y = batch
    xp = namespace(x, params)
    x = x + 0.01 * rng.normal(x.shape, dtype="float32")
    r = xp.matmul(x, params["w"]) + params["b"][0] - y
    return xp.mean(r * r)


def init_params():
    return {"w": np.zeros(D, np.float32), "b": [np.zeros(1, np.float32)]}


def run(steps=30, seed=0, **kw):
    kw.setdefault("batch_size", 16)
    kw.setdefault("progress", False)
    return fit(linear_loss, init_params(), make_data(), Rng(seed, backend="numpy"), adam(0.1), steps, **kw)


# -- training ------------------------------------------------------------------------------------------


def test_fits_linear_regression_in_float32():
    result = run(steps=300, ema_decay=0.9)
    np.testing.assert_allclose(result.params["w"], TRUE_W, atol=0.02)
    np.testing.assert_allclose(result.params["b"][0], [0.3], atol=0.02)
    losses = result.history["loss"]
    assert len(losses) == len(result.history["grad_norm"]) == 300 == result.step
    assert np.mean(losses[-20:]) < 1e-2 * np.mean(losses[:5])
    assert result.params["w"].dtype == np.float32 and result.ema_params["w"].dtype == np.float32
    np.testing.assert_allclose(result.ema_params["w"], TRUE_W, atol=0.05)
    assert int(result.opt_state["step"]) == 300


def test_same_seed_same_result_other_seed_differs():
    a, b, c = run(seed=3), run(seed=3), run(seed=4)
    assert_same_tree(a.params, b.params)
    assert a.history["loss"] == b.history["loss"]
    assert a.history["loss"] != c.history["loss"]


def test_epochs_are_permutations_and_rngs_fresh_per_step():
    seen, noises = [], []
    x = np.arange(10, dtype=np.float64)[:, None]

    def loss(params, batch, rng):
        seen.append(batch[:, 0].astype(int).tolist())
        noises.append(float(rng.normal(())))
        return namespace(params).sum(params["w"] ** 2)

    fit(loss, {"w": np.ones(1)}, x, Rng(0, backend="numpy"), sgd(0.1), 9, batch_size=4, progress=False)
    assert all(len(b) == 4 for b in seen)  # 10 // 4 = 2 full batches per epoch, 2 rows sit out
    epochs = [seen[i] + seen[i + 1] for i in range(0, 8, 2)]
    for rows in epochs:
        assert len(set(rows)) == 8 and set(rows) <= set(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # a new permutation each epoch
    assert len(set(noises)) == 9


def test_batch_size_larger_than_data_is_clipped():
    shapes = []

    def loss(params, batch, rng):
        shapes.append(batch[0].shape)
        return namespace(params).sum(params["w"] ** 2)

    data = (np.ones((5, 2)), np.arange(5))
    fit(loss, {"w": np.ones(1)}, data, Rng(0, backend="numpy"), sgd(0.1), 3, batch_size=1000, progress=False)
    assert shapes == [(5, 2)] * 3


def test_list_data_gives_list_batches_and_inputs_stay_untouched():
    kinds = []

    def loss(params, batch, rng):
        kinds.append(type(batch))
        return linear_loss(params, tuple(batch), rng)

    params, data = init_params(), list(make_data())
    fit(loss, params, data, Rng(0, backend="numpy"), adam(0.1), 2, batch_size=8, progress=False)
    assert kinds == [list, list]
    assert_same_tree(params, init_params())


def test_zero_steps_returns_inputs():
    result = run(steps=0)
    assert_same_tree(result.params, init_params())
    assert result.history == {"loss": [], "grad_norm": [], "eval": []} and result.step == 0


def test_clip_norm_bounds_the_step():
    def loss(params, batch, rng):
        return 1e6 * namespace(params).sum(params["w"])

    result = fit(loss, {"w": np.zeros(2)}, np.ones((4, 1)), Rng(0, backend="numpy"), sgd(1.0), 1,
                 clip_norm=1.0, progress=False)
    np.testing.assert_allclose(result.params["w"], [-1 / math.sqrt(2)] * 2)
    assert result.history["grad_norm"] == [pytest.approx(1e6 * math.sqrt(2))]


def test_progress_bar_shows_loss(capsys):
    run(steps=5, progress=True)
    err = capsys.readouterr().err
    assert "loss=" in err and "5/5" in err and err.lstrip("\r").startswith("fit")


def test_a_string_progress_labels_the_bar(capsys):
    run(steps=3, progress="flow")
    err = capsys.readouterr().err
    assert "flow" in err and "3/3" in err and "fit" not in err


# -- NaN / inf -----------------------------------------------------------------------------------------


def test_nan_loss_stops_with_last_finite_params():
    calls = []

    def loss(params, batch, rng):
        calls.append(1)
        value = linear_loss(params, batch, rng)
        return value * float("nan") if len(calls) > 5 else value

    before = run(steps=4)  # step 5's params came out of step 4, the last completed step
    with pytest.raises(NonFiniteLossError, match="step 5 the loss is nan.*params of step 4") as info:
        fit(loss, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 20, batch_size=16,
            progress=False)
    err = info.value
    assert isinstance(err, FloatingPointError) and err.step == 5
    assert len(err.history["loss"]) == 5
    assert_same_tree(err.params, before.params)
    assert err.params_step == 4 and err.params_loss == err.history["loss"][4]


def test_infinite_gradient_stops():
    def loss(params, batch, rng):  # d/dw sqrt(|w|) is infinite at w = 0, the loss is finite
        xp = namespace(params)
        return xp.sum(xp.sqrt(xp.abs(params["w"])))

    with np.errstate(divide="ignore", invalid="ignore"):
        with pytest.raises(NonFiniteLossError, match="gradient norm is") as info:
            fit(loss, {"w": np.zeros(2)}, np.ones((4, 1)), Rng(0, backend="numpy"), sgd(0.1), 3, progress=False)
    assert info.value.step == 0
    np.testing.assert_array_equal(info.value.params["w"], np.zeros(2))


def test_overflowing_update_keeps_the_params_before_it():
    def loss(params, batch, rng):
        return namespace(params).sum(params["w"] ** 2)

    with np.errstate(over="ignore", invalid="ignore"):
        with pytest.raises(NonFiniteLossError) as info:
            fit(loss, {"w": np.ones(2)}, np.ones((4, 1)), Rng(0, backend="numpy"), sgd(1e308), 3,
                progress=False)
    # step 0: w = 1 - 2e308 = -inf; step 1 sees a non-finite loss from non-finite params
    assert info.value.step == 1
    np.testing.assert_array_equal(info.value.params["w"], np.ones(2))


# -- evals ---------------------------------------------------------------------------------------------


def test_eval_callback_schedule_and_results():
    seen = []

    def eval_fn(params):
        seen.append(params["w"].copy())
        return {"w0": float(params["w"][0])}

    result = run(steps=10, eval_fn=eval_fn, eval_every=3)
    assert [s for s, _ in result.history["eval"]] == [3, 6, 9, 10]
    np.testing.assert_array_equal(seen[-1], result.params["w"])
    assert result.history["eval"][-1][1] == {"w0": float(result.params["w"][0])}
    only_end = run(steps=4, eval_fn=lambda p: 1.0)
    assert only_end.history["eval"] == [(4, 1.0)]


# -- checkpoints and exact resume ----------------------------------------------------------------------


def test_checkpoints_are_written(tmp_path):
    path = tmp_path / "run.npz"
    result = run(steps=7, checkpoint_path=path, checkpoint_every=3, config={"lr": 0.1})
    saved = checkpoint.load(path, like=init_params())
    assert saved["step"] == 7 and saved["config"] == {"lr": 0.1}
    assert_same_tree(saved["params"], result.params)
    assert_same_tree(saved["opt_state"]["optimizer"], result.opt_state)
    assert [p.name for p in tmp_path.iterdir()] == ["run.npz"]


@pytest.mark.parametrize("stop_at", [4, 8])
def test_resume_is_bit_identical(tmp_path, stop_at):
    """Interrupt a run (an exception at step 9 or 10) and resume from its last checkpoint."""
    kw = dict(batch_size=16, clip_norm=0.5, ema_decay=0.8, eval_every=5)  # 50 % 16: epochs wrap mid-run
    evals = lambda p: {"w0": float(p["w"][0])}
    straight = run(steps=14, eval_fn=evals, **kw)

    path = tmp_path / "run.npz"
    calls = []

    def crashing_loss(params, batch, rng):
        calls.append(1)
        if len(calls) > stop_at + 1:
            raise KeyboardInterrupt("power cut")
        return linear_loss(params, batch, rng)

    with pytest.raises(KeyboardInterrupt):
        fit(crashing_loss, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 14,
            checkpoint_path=path, checkpoint_every=stop_at, eval_fn=evals, progress=False, **kw)
    assert checkpoint.load(path)["step"] == stop_at
    resumed = run(steps=14, eval_fn=evals, checkpoint_path=path, checkpoint_every=stop_at, resume=True, **kw)
    assert_same_tree(resumed.params, straight.params)
    assert_same_tree(resumed.opt_state, straight.opt_state)
    assert_same_tree(resumed.ema_params, straight.ema_params)
    assert resumed.history == straight.history
    assert checkpoint.load(path)["step"] == 14


def test_resume_without_checkpoint_starts_fresh_and_finished_run_returns(tmp_path):
    path = tmp_path / "run.npz"
    fresh = run(steps=6, checkpoint_path=path, resume=True)
    assert_same_tree(fresh.params, run(steps=6).params)
    again = run(steps=6, checkpoint_path=path, resume=True)
    assert_same_tree(again.params, fresh.params) and again.history == fresh.history


def test_resume_refuses_mismatches(tmp_path):
    path = tmp_path / "run.npz"
    run(steps=4, checkpoint_path=path)
    with pytest.raises(ValueError, match="shape of params/w"):
        fit(linear_loss, {"w": np.zeros(5, np.float32), "b": [np.zeros(1, np.float32)]}, make_data(),
            Rng(0, backend="numpy"), adam(0.1), 8, checkpoint_path=path, resume=True, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        run(steps=8, checkpoint_path=path, resume=True, batch_size=8)
    with pytest.raises(ValueError, match="opt_state"):
        fit(linear_loss, init_params(), make_data(), Rng(0, backend="numpy"), sgd(0.1), 8, batch_size=16,
            checkpoint_path=path, resume=True, progress=False)
    with pytest.raises(ValueError, match="ema_decay"):
        run(steps=8, checkpoint_path=path, resume=True, ema_decay=0.9)
    with pytest.raises(ValueError, match="steps"):
        run(steps=2, checkpoint_path=path, resume=True)
    checkpoint.save(path, init_params())
    with pytest.raises(ValueError, match="not written by fit"):
        run(steps=8, checkpoint_path=path, resume=True)


# -- bad input -----------------------------------------------------------------------------------------


def _call(**changes):
    args = dict(loss=linear_loss, params=init_params(), data=make_data(), rng=Rng(0, backend="numpy"),
                optimizer=adam(0.1), steps=3, progress=False)
    args.update(changes)
    return fit(**args)


@pytest.mark.parametrize("changes, error, message", [
    ({"data": (np.full((N, D), np.nan, np.float32), make_data()[1])}, ValueError, r"data\[0\]: expected finite"),
    ({"data": np.array([[1.0], [np.inf]])}, ValueError, "data: expected finite"),
    ({"data": (np.ones((N, D)), np.ones(N + 1))}, ValueError, r"data\[1\]: expected 50 rows"),
    ({"data": np.ones((0, 3))}, ValueError, "data: expected at least one"),
    ({"data": np.float64(1.0)}, ValueError, "data: expected an array with a leading axis"),
    ({"data": ()}, ValueError, "data"),
    ({"data": [[1.0, 2.0]]}, TypeError, "data"),
    ({"batch_size": 0}, ValueError, "batch_size"), ({"batch_size": 2.5}, ValueError, "batch_size"),
    ({"batch_size": True}, ValueError, "batch_size"), ({"steps": -1}, ValueError, "steps"),
    ({"steps": 2.0}, ValueError, "steps"), ({"log_every": 0}, ValueError, "log_every"),
    ({"eval_every": 2}, ValueError, "eval_every"), ({"eval_fn": 3}, TypeError, "eval_fn"),
    ({"checkpoint_every": 2}, ValueError, "checkpoint_every"), ({"resume": True}, ValueError, "resume"),
    ({"clip_norm": 0.0}, ValueError, "clip_norm"), ({"ema_decay": 1.0}, ValueError, "decay"),
    ({"config": {"f": np.ones(2)}}, TypeError, "config"), ({"loss": None}, TypeError, "loss"),
    ({"optimizer": "adam"}, TypeError, "optimizer"), ({"rng": 0}, TypeError, "rng"),
    ({"rng": Rng(0, backend="strict")}, TypeError, "rng: training runs on the numpy backend"),
    ({"params": to_device(init_params(), "strict")}, TypeError, r"params: .*strict.*to_device"),
    ({"loss": lambda p, b, r: p["w"] * 2.0}, ValueError, "loss: expected a scalar"),
])
def test_bad_input(changes, error, message):
    with pytest.raises(error, match=message):
        _call(**changes)


def _huge_lr_models():
    from genblocks.blocks.schedules import DiscreteSchedule
    from genblocks.blocks.score_nets import MLPScoreNet
    from genblocks.models.diffusion import Diffusion
    from genblocks.models.flow import real_nvp
    from genblocks.models.mixture import GaussianMixture

    return {
        "mixture": GaussianMixture(2, 4),
        "realnvp": real_nvp(2, layers=2, hidden=(16,)),
        "diffusion": Diffusion(MLPScoreNet(2, (16, 16), time_embed_dim=4), DiscreteSchedule("linear", 100)),
    }


@pytest.mark.parametrize("name", ["mixture", "realnvp", "diffusion"])
def test_divergence_keeps_the_last_params_whose_loss_was_finite(name):
    # issue: with lr 1e6 the kept params used to be the failing step's, whose loss was already 2e6 or inf
    model = _huge_lr_models()[name]
    dtype = "float32" if name == "diffusion" else "float64"  # (in float64 this net's loss stays finite)
    data = np.random.default_rng(0).standard_normal((64, 2)).astype(dtype)
    params = model.init(Rng(1), dtype=dtype)
    with np.errstate(all="ignore"):
        with pytest.raises(NonFiniteLossError) as info:
            fit(model.loss, params, data, Rng(0, backend="numpy"), adam(1e6), 50, batch_size=64, progress=False)
    err = info.value
    assert err.params is not None and err.params_step is not None and err.params_step < err.step
    assert f"params of step {err.params_step}" in str(err)
    assert err.params_loss == err.history["loss"][err.params_step]
    again = float(model.loss(err.params, data, Rng(2)))  # each batch is all 64 rows: the same mean
    assert np.isfinite(again) and np.isfinite(err.params_loss)
    if name != "diffusion":  # (the diffusion loss draws fresh t and noise)
        np.testing.assert_allclose(again, err.params_loss, rtol=1e-6)


# -- model state carried beside params -----------------------------------------------------------------


def stateful_loss(params, state, batch, rng):
    """linear_loss, plus a running mean of the residuals kept in ``state`` (and used in the loss, so a
    wrong or stale state changes the params)."""
    x, y = batch
    xp = namespace(x, params)
    x = x + 0.01 * rng.normal(x.shape, dtype="float32")
    r = xp.matmul(x, params["w"]) + params["b"][0] - y
    new = {"mean": 0.9 * state["mean"] + 0.1 * xp.mean(r), "count": state["count"] + 1}
    return xp.mean(r * r) + 0.1 * new["mean"] * xp.sum(params["b"][0]), new


def init_state():
    return {"mean": np.zeros((), np.float32), "count": np.zeros((), np.int64)}


def test_state_is_carried_detached_and_unseen_by_optimizer_clip_and_ema():
    result = fit(stateful_loss, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 12,
                 state=init_state(), clip_norm=0.5, ema_decay=0.8, batch_size=16, progress=False)
    # the state moved once per step through the loss only, and came back as plain arrays (no autograd box)
    assert int(result.state["count"]) == 12
    assert all(isinstance(v, (np.ndarray, np.generic)) for v in result.state.values())
    assert result.state["mean"].dtype == np.float32 and float(result.state["mean"]) != 0.0
    assert set(result.params) == {"w", "b"} and set(result.ema_params) == {"w", "b"}
    assert "mean" not in str(result.opt_state)
    # no state given: unchanged behaviour and FitResult.state is None
    assert run(steps=3).state is None


def test_stateful_loss_must_return_a_pair():
    with pytest.raises(TypeError, match="new_state"):
        fit(lambda p, s, b, r: linear_loss(p, b, r), init_params(), make_data(), Rng(0, backend="numpy"),
            adam(0.1), 2, state=init_state(), progress=False)
    with pytest.raises(TypeError, match="state"):
        run(steps=2, state=np.zeros(3))


@pytest.mark.parametrize("stop_at", [4, 8])
def test_resume_with_state_is_bit_identical(tmp_path, stop_at):
    kw = dict(batch_size=16, clip_norm=0.5, ema_decay=0.8)
    straight = fit(stateful_loss, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 14,
                   state=init_state(), progress=False, **kw)
    path = tmp_path / "run.npz"
    calls = []

    def crashing(params, state, batch, rng):
        calls.append(1)
        if len(calls) > stop_at + 1:
            raise KeyboardInterrupt("power cut")
        return stateful_loss(params, state, batch, rng)

    with pytest.raises(KeyboardInterrupt):
        fit(crashing, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 14, state=init_state(),
            checkpoint_path=path, checkpoint_every=stop_at, progress=False, **kw)
    saved = checkpoint.load(path)
    assert saved["step"] == stop_at and int(saved["state"]["count"]) == stop_at
    resumed = fit(stateful_loss, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 14,
                  state=init_state(), checkpoint_path=path, checkpoint_every=stop_at, resume=True,
                  progress=False, **kw)
    assert_same_tree(resumed.params, straight.params)
    assert_same_tree(resumed.state, straight.state)
    assert resumed.history == straight.history
    # a run with a state does not resume from one without, nor with a differently shaped state
    with pytest.raises(ValueError, match="state"):
        run(steps=14, checkpoint_path=path, resume=True, **kw)
    bad = {"mean": np.zeros(2, np.float32), "count": np.zeros((), np.int64)}
    with pytest.raises(ValueError, match="state/mean"):
        fit(stateful_loss, init_params(), make_data(), Rng(0, backend="numpy"), adam(0.1), 14, state=bad,
            checkpoint_path=path, resume=True, progress=False, **kw)
