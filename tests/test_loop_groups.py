"""fit with several parameter groups (two players): own optimizers and step ratios, NaN guard, exact resume."""

import numpy as np
import pytest
from conftest import assert_same_tree

from genblocks.backends import Rng, namespace
from genblocks.train import Group, NonFiniteLossError, adam, fit, sgd

DATA = np.random.default_rng(0).normal(size=(40, 2)).astype(np.float64)


def loss_a(params, batch, rng):
    """Player a pulls its vector towards player b's plus the batch mean."""
    xp = namespace(batch, params["a"])
    d = params["a"] - params["b"] - xp.mean(batch, axis=0)
    return xp.sum(d * d)


def loss_b(params, batch, rng):
    """Player b pulls towards -a / 2 (noisy through rng)."""
    xp = namespace(batch, params["b"])
    d = params["b"] + 0.5 * params["a"] + 0.01 * rng.normal((2,), dtype="float64")
    return xp.sum(d * d)


def start():
    return {"a": np.array([1.0, -1.0]), "b": np.array([0.5, 2.0])}


def run(steps, groups=None, **kw):
    groups = groups or {"a": Group(loss_a, adam(0.05), 3), "b": Group(loss_b, adam(0.01), 1)}
    kw.setdefault("batch_size", 8)
    return fit(None, start(), DATA, Rng(0, backend="numpy"), None, steps, groups=groups, progress=False, **kw)


def test_each_group_takes_its_own_sgd_steps_with_the_others_held_fixed():
    """Against a hand-written loop: a takes k_a sgd steps at lr_a, then b k_b steps at lr_b (two time scales)."""
    batch_free_a = lambda p, batch, rng: np.sum((p["a"] - 2.0 * p["b"]) ** 2)  # noqa: E731
    batch_free_b = lambda p, batch, rng: np.sum((p["b"] + p["a"]) ** 2) + np.sum(p["b"] ** 2)  # noqa: E731
    groups = {"a": Group(batch_free_a, sgd(0.1), 3), "b": Group(batch_free_b, sgd(0.02), 2)}
    result = run(4, groups)
    a, b = start()["a"], start()["b"]
    for _ in range(4):
        for _ in range(3):
            a = a - 0.1 * 2.0 * (a - 2.0 * b)
        for _ in range(2):
            b = b - 0.02 * (2.0 * (b + a) + 2.0 * b)
    np.testing.assert_allclose(result.params["a"], a, rtol=1e-12)
    np.testing.assert_allclose(result.params["b"], b, rtol=1e-12)
    # the step ratio is counted in each optimizer's own step counter
    assert int(result.opt_state["a"]["step"]) == 12 and int(result.opt_state["b"]["step"]) == 8
    assert set(result.history["loss"]) == {"a", "b"} and len(result.history["loss"]["a"]) == 4
    assert len(result.history["grad_norm"]["b"]) == 4


def test_n_critic_ratio_consumes_one_batch_per_update():
    seen = []

    def critic(params, batch, rng):
        seen.append(("d", float(batch[0, 0])))
        return np.sum(params["d"] ** 2)

    def gen(params, batch, rng):
        seen.append(("g", float(batch[0, 0])))
        return np.sum(params["g"] ** 2)

    groups = {"d": Group(critic, adam(0.1), 5), "g": Group(gen, adam(0.1), 1)}
    result = fit(None, {"d": np.ones(2), "g": np.ones(2)}, DATA, Rng(1), None, 3, groups=groups, batch_size=4,
                 progress=False)
    assert [who for who, _ in seen] == (["d"] * 5 + ["g"]) * 3
    assert int(result.opt_state["d"]["step"]) == 15 and int(result.opt_state["g"]["step"]) == 3
    # 18 updates, 10 batches per epoch: the first 10 draws are one permutation, so all distinct rows
    assert len({v for _, v in seen[:10]}) == 10


def test_ema_averages_the_groups_for_sampling():
    result = run(20, ema_decay=0.9)
    assert set(result.ema_params) == {"a", "b"}
    assert not np.array_equal(result.ema_params["a"], result.params["a"])
    # the ema is updated once per fit step, after every group has moved
    again = run(1, ema_decay=0.9)
    np.testing.assert_allclose(again.ema_params["a"], 0.9 * start()["a"] + 0.1 * again.params["a"])


def test_nan_guard_names_the_group_and_keeps_the_params_before_the_last_update():
    calls = {"n": 0}

    def bad_b(params, batch, rng):
        calls["n"] += 1
        value = loss_b(params, batch, rng)
        return value * np.nan if calls["n"] == 3 else value

    groups = {"a": Group(loss_a, adam(0.05), 2), "b": Group(bad_b, adam(0.01), 1)}
    full = run(2, groups)
    with pytest.raises(NonFiniteLossError, match=r"at step 2 the loss is nan \(group 'b'\)") as info:
        calls["n"] = 0
        run(5, groups)
    err = info.value
    assert err.step == 2 and err.group == "b" and err.params_group == "a" and err.params_step == 2
    # the kept params are those a's second update of step 2 started from: after step 1 plus a's first update
    first = run(2, {"a": Group(loss_a, adam(0.05), 2), "b": Group(loss_b, adam(0.01), 1)})
    assert_same_tree(full.params, first.params)
    assert not np.array_equal(err.params["a"], first.params["a"])
    np.testing.assert_array_equal(err.params["b"], first.params["b"])
    assert len(err.history["loss"]["a"]) == 2 and len(err.history["loss"]["b"]) == 2


@pytest.mark.parametrize("stop_at", [1, 4])
def test_resume_of_two_player_training_is_bit_identical(tmp_path, stop_at):
    path = str(tmp_path / "ck.npz")
    never = run(7, ema_decay=0.95, checkpoint_path=str(tmp_path / "full.npz"), eval_fn=lambda p: float(p["a"][0]),
                eval_every=2)
    run(stop_at, ema_decay=0.95, checkpoint_path=path, eval_fn=lambda p: float(p["a"][0]), eval_every=2)
    resumed = run(7, ema_decay=0.95, checkpoint_path=path, resume=True, eval_fn=lambda p: float(p["a"][0]),
                  eval_every=2)
    assert_same_tree(resumed.params, never.params)
    assert_same_tree(resumed.opt_state, never.opt_state)
    assert_same_tree(resumed.ema_params, never.ema_params)
    assert resumed.history["loss"] == never.history["loss"]
    assert resumed.history["grad_norm"] == never.history["grad_norm"]
    # the stopped run's own final eval (at stop_at, off the every-2 schedule) stays in its history
    assert [e for e in resumed.history["eval"] if e[0] != stop_at or stop_at % 2 == 0] == never.history["eval"]


def test_resume_with_other_step_ratios_is_refused(tmp_path):
    path = str(tmp_path / "ck.npz")
    run(2, checkpoint_path=path)
    other = {"a": Group(loss_a, adam(0.05), 2), "b": Group(loss_b, adam(0.01), 1)}
    with pytest.raises(ValueError, match=r"groups: .* trained with groups \(name, steps\) \[\['a', 3\], \['b', 1\]\]"):
        run(4, other, checkpoint_path=path, resume=True)


def test_resume_of_a_single_loss_checkpoint_with_groups_is_refused(tmp_path):
    path = str(tmp_path / "ck.npz")
    fit(lambda p, b, r: np.sum(p["a"] ** 2) + np.sum(p["b"] ** 2), start(), DATA, Rng(0), adam(0.1), 2,
        progress=False, checkpoint_path=path, batch_size=8)
    with pytest.raises(ValueError, match="groups: .* trained with groups"):
        run(4, checkpoint_path=path, resume=True)


@pytest.mark.parametrize("call, error, message", [
    (dict(loss=loss_a), ValueError, "loss: with groups given, each Group carries its own loss"),
    (dict(optimizer=adam(0.1)), ValueError, "optimizer: with groups given"),
    (dict(params={"a": np.ones(2)}), ValueError,
     r"params: with groups, expected a dict with one entry per group \['a', 'b'\]"),
    (dict(groups={"a": Group(loss_a, adam(0.1), 0), "b": Group(loss_b, adam(0.1))}), ValueError,
     r"groups\['a'\].steps"),
    (dict(groups={"a": Group(loss_a, "adam", 1), "b": Group(loss_b, adam(0.1))}), TypeError, "optimizer"),
    (dict(groups={"a": Group(None, adam(0.1)), "b": Group(loss_b, adam(0.1))}), TypeError, r"groups\['a'\].loss"),
    (dict(groups={}), TypeError, "groups: expected a non-empty dict"),
])
def test_bad_group_configuration(call, error, message):
    args = dict(loss=None, params=start(), optimizer=None,
                groups={"a": Group(loss_a, adam(0.05)), "b": Group(loss_b, adam(0.01))})
    args.update(call)
    with pytest.raises(error, match=message):
        fit(args["loss"], args["params"], DATA, Rng(0), args["optimizer"], 2, groups=args["groups"], progress=False)


def test_state_is_threaded_through_every_group():
    def counted(name):
        def loss(params, state, batch, rng):
            xp = namespace(batch, params[name])
            new = {"calls": state["calls"] + 1.0, "last": state["last"] * 0.0 + (name == "b")}
            return xp.sum(params[name] ** 2), new
        return loss

    groups = {"a": Group(counted("a"), adam(0.1), 3), "b": Group(counted("b"), adam(0.1), 1)}
    result = fit(None, start(), DATA, Rng(0), None, 4, groups=groups, progress=False,
                 state={"calls": np.zeros(()), "last": np.zeros(())})
    assert float(result.state["calls"]) == 16.0 and float(result.state["last"]) == 1.0
