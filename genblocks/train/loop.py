"""``fit``: minibatch training with autograd, a progress bar, history, evals, NaN guard and checkpoints.

One step ``s`` (0-based) of :func:`fit`::

    batch   = rows perm_e[k*B:(k+1)*B] of data      e = s // K, k = s % K, K = n // B batches per epoch
    L, g    = value_and_grad(loss)(params, batch, rng_s)
    g       = g * min(1, clip_norm / ||g||)          (if clip_norm)
    params, opt_state = update(g, opt_state, params)
    ema     = ema_decay * ema + (1 - ema_decay) * params    (if ema_decay)

The epoch permutations ``perm_e`` and the loss generators ``rng_s`` are derived from the run's root
generator and the numbers ``e`` and ``s`` alone (not from how many draws came before), so a run resumed
from a checkpoint at step ``s`` takes exactly the same steps as one that never stopped: the final params
are bit-identical.

With a model ``state`` (``fit(..., state=model.init_state())``) the loss is
``loss(params, state, batch, rng) -> (value, new_state)``: the state (running statistics, loss
histories: trees that are updated, not trained) is carried from step to step, differentiated through
never, seen by neither the optimizer, ``clip_norm`` nor the EMA, and checkpointed with the params, so
a resume restores it and stays bit-identical to a run that never stopped.

Several players (``fit(None, params, data, rng, None, steps, groups={...})``, e.g. a GAN's critic and
generator): ``params`` is a dict with one entry per group and ``groups[name] = Group(loss, optimizer, k)``.
One step ``s`` runs the groups in the dict's order, group ``g`` taking ``k_g`` updates::

    for g in groups, for j < k_g:    (sub-step u = s * K + offset, K = sum_g k_g)
        batch, rng_u = rows of the u-th batch, the u-th loss generator
        L, g_g  = value_and_grad w.r.t. params[g] of loss_g(params, batch, rng_u)   (the others held fixed)
        params[g], opt_state[g] = update_g(g_g, opt_state[g], params[g])

so each group has its own optimizer (two-time-scale learning rates) and step ratio (``n_critic``), sees
the other groups' latest params, and the model state is threaded through every sub-step. The EMA, the
NaN guard, checkpoints and the bit-exact resume work as for one loss; ``history["loss"]`` and
``history["grad_norm"]`` become dicts ``{name: [mean over the step's k_g updates, per step]}``.
"""

import math
import os
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

from tqdm.auto import tqdm

from genblocks.backends import Rng, backend_of, namespace, stop_gradient, value_and_grad
from genblocks.blocks.validate import check_int, check_real

from . import checkpoint
from .optim import _check_optimizer, _scale_to, ema
from .tree import global_norm, tree_all_finite, tree_leaves, tree_map

__all__ = ["fit", "FitResult", "Group", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """Training hit a NaN or inf loss or gradient.

    Attributes: ``step`` (0-based index of the failing step); ``params``, the last params whose loss and
    gradient were finite, i.e. those the last completed step started from (the failing step's own params
    already came out of a diverging update); ``params_step``, the step those params were evaluated at, and
    ``params_loss``, their loss (both None when no step of this run completed: then ``params`` are the
    params the run started from, or None if those were not finite); ``history``. With ``groups``:
    ``group``, the group whose loss or gradient was not finite, and ``params_group``, the group whose
    update was the last to complete (``params`` are all groups' params just before that update);
    both None for a single loss.
    """

    def __init__(self, message, params, step, history, params_step=None, params_loss=None, group=None,
                 params_group=None):
        super().__init__(message)
        self.params = params
        self.step = step
        self.history = history
        self.params_step = params_step
        self.params_loss = params_loss
        self.group = group
        self.params_group = params_group


class Group(NamedTuple):
    """One player of a multi-group :func:`fit`: its loss, its ``(init, update)`` optimizer, updates per step.

    ``loss(params, batch, rng) -> scalar`` (or ``loss(params, state, batch, rng) -> (scalar, new_state)``
    when fit has a ``state``) sees every group's params; its gradient is taken w.r.t. ``params[name]``
    only. ``steps``: int >= 1, how many updates (each on a fresh batch) the group takes per fit step.
    """

    loss: Callable
    optimizer: object
    steps: int = 1


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``params``, ``opt_state`` and ``state`` (the model state; None when fit ran without one) after the
    last step; ``history`` = ``{"loss": [float per step],
    "grad_norm": [float per step, before clipping], "eval": [(steps_done, eval_fn result), ...]}``;
    ``ema_params`` (the parameter average when ``ema_decay`` is set, else None); ``step`` = steps done.
    """

    params: object
    opt_state: object
    history: dict = field(default_factory=dict)
    ema_params: object = None
    step: int = 0
    state: object = None


# ---------------------------------------------------------------------------------------------------
# argument checks




def _check_numpy(tree, name):
    for leaf in tree_leaves(tree):
        found = backend_of(leaf)
        if found != "numpy":
            what = f"{found} arrays" if found else f"a {type(leaf).__name__} leaf"
            raise TypeError(
                f"{name}: training runs on the numpy backend (autograd gradients), got {what}; "
                f"move them first with genblocks.backends.to_device({name}, 'numpy'){_env_hint()}"
            )


def _env_hint():
    """Why arrays may be on another backend than the user meant: a GENBLOCKS_BACKEND default."""
    name = os.environ.get("GENBLOCKS_BACKEND", "")
    if name in ("", "numpy"):
        return ""
    return (f" (GENBLOCKS_BACKEND={name} makes Rng() and new arrays {name} by default: unset it to train, or "
            f"pass Rng(seed, 'numpy'))")


def _check_data(data):
    arrays = tuple(data) if isinstance(data, (tuple, list)) else (data,)
    if not arrays:
        raise ValueError("data: expected an array (n, ...) or a tuple of arrays, got an empty tuple")
    _check_numpy(arrays, "data")
    n = None
    for i, a in enumerate(arrays):
        name = "data" if len(arrays) == 1 else f"data[{i}]"
        if a.ndim == 0:
            raise ValueError(f"{name}: expected an array with a leading axis of examples (n, ...), got a scalar")
        if n is None:
            n = a.shape[0]
        elif a.shape[0] != n:
            raise ValueError(f"{name}: expected {n} rows like data[0], got shape {tuple(a.shape)}")
        if a.dtype.kind in "fc":
            xp = namespace(a)
            if not bool(xp.all(xp.isfinite(a))):
                raise ValueError(f"{name}: expected finite values, found NaN or inf")
    if n == 0:
        raise ValueError("data: expected at least one example, got 0 rows")
    return arrays, n


def _child(rng, i):
    """The ``i``-th child of ``rng``'s seed sequence, whatever ``rng`` has spawned before."""
    state = rng.state()
    state["n_children_spawned"] = i
    return Rng.from_state(state).split(1)[0]


def _jsonable(value):
    """``value`` with 0-d arrays and numpy scalars turned into Python numbers; None if not JSON-able."""
    if isinstance(value, dict):
        out = {k: _jsonable(v) for k, v in value.items()}
        ok = all(isinstance(k, str) for k in value) and None not in out.values()
        return out if ok else None
    if isinstance(value, (list, tuple)):
        out = [_jsonable(v) for v in value]
        return out if None not in out else None
    if isinstance(value, (bool, int, str)):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------------
# the loop


def fit(loss, params, data, rng, optimizer, steps, *, state=None, batch_size=128, progress=True, eval_fn=None,
        eval_every=None, checkpoint_path=None, checkpoint_every=None, config=None, resume=False,
        clip_norm=None, ema_decay=None, log_every=1, groups=None):
    """Minimise ``E_batch[loss(params, batch, rng)]`` for ``steps`` optimizer steps; returns :class:`FitResult`.

    - ``loss(params, batch, rng) -> scalar``: ``batch`` has the type of ``data`` with ``batch_size``
      rows; ``rng`` is a fresh :class:`Rng` for this step.
    - ``state``: the model's non-trained tree (``model.init_state()``) or None. When given, the loss is
      ``loss(params, state, batch, rng) -> (scalar, new_state)`` (e.g. ``model.loss_and_state``);
      gradients are taken w.r.t. ``params`` only, ``new_state`` is detached from the gradient tape and
      fed to the next step, and the optimizer, ``clip_norm`` and the EMA never see it. It is saved in
      checkpoints and restored on resume; ``FitResult.state`` is the final one.
    - ``params``: dict/list/tuple tree of float numpy arrays. ``data``: a host array (n, ...) or a tuple
      of such arrays with the same n (e.g. ``(x, labels)``); float arrays must be finite.
    - ``rng``: a numpy-backend :class:`Rng`; one child is split off it as the run's root generator.
    - ``optimizer``: an ``(init, update)`` pair (:mod:`genblocks.train.optim`); ``steps``: int >= 0,
      the total number of steps (a resumed run continues up to it).
    - ``batch_size``: rows per step, clipped to n. Each epoch is a fresh permutation of the rows cut into
      ``n // batch_size`` full batches; the ``n % batch_size`` leftover rows sit that epoch out.
    - ``progress``: a tqdm bar showing the loss (refreshed every ``log_every`` steps); a string turns it on and
      labels it (``progress="flow"``), True labels it "fit".
    - ``eval_fn(params) -> result`` runs after every ``eval_every``-th step and after the last step;
      results go to ``history["eval"]`` as ``(steps_done, result)``.
    - ``checkpoint_path``: saved every ``checkpoint_every`` steps and at the end with
      :func:`genblocks.train.checkpoint.save` (params, step, root rng, ``config``); its ``opt_state``
      is ``{"optimizer": state, "ema": ema params or None, "history": {"loss", "grad_norm"}}``.
    - ``resume=True``: if ``checkpoint_path`` exists, continue from it (its params, optimizer state and
      rng; ``params`` only serves to check the model matches). Needs the same data size and batch size.
      Eval results are kept across a resume when they are numbers, lists or str-keyed dicts of those
      (they travel as JSON, so arrays come back as floats); others are dropped from the checkpoint.
    - ``clip_norm``: clip the gradient's global norm; ``ema_decay``: also keep a parameter EMA.

    - ``groups``: ``{name: Group(loss, optimizer, steps_per_step)}`` for several players (the module
      docstring); then ``loss`` and ``optimizer`` are None, ``params`` is a dict with exactly the group
      names as keys, ``opt_state`` is ``{name: state}`` and the history holds one list per group.
      ``clip_norm`` applies to each group's gradient; ``ema_decay`` averages all groups' params.

    A NaN/inf loss or gradient raises :class:`NonFiniteLossError` carrying the last finite params.
    Training is numpy-only: other backends raise TypeError.
    """
    plan = _plan(loss, optimizer, groups, params)
    steps = check_int(steps, "steps", low=0)
    batch_size = check_int(batch_size, "batch_size", low=1)
    log_every = check_int(log_every, "log_every", low=1)
    eval_every = check_int(eval_every, "eval_every", low=1, optional=True)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", low=1, optional=True)
    if eval_every is not None and eval_fn is None:
        raise ValueError("eval_every: given without an eval_fn to call")
    if eval_fn is not None and not callable(eval_fn):
        raise TypeError(f"eval_fn: expected a function eval_fn(params), got {eval_fn!r}")
    if checkpoint_path is None and (checkpoint_every is not None or resume):
        what = "checkpoint_every" if checkpoint_every is not None else "resume"
        raise ValueError(f"{what}: needs a checkpoint_path")
    if clip_norm is not None:
        clip_norm = check_real(clip_norm, "clip_norm", low=0.0, low_open=True)
    averager = None if ema_decay is None else ema(ema_decay)
    checkpoint._check_json(config, "config")
    if not isinstance(rng, Rng):
        raise TypeError(f"rng: expected a genblocks Rng, got {type(rng).__name__}")
    if rng.backend != "numpy":
        raise TypeError(
            f"rng: training runs on the numpy backend (autograd gradients), got an Rng on {rng.backend!r}; "
            f"use Rng(seed, backend='numpy'){_env_hint()}"
        )
    _check_numpy(params, "params")
    if state is not None:
        if not isinstance(state, (dict, list, tuple)):
            raise TypeError(f"state: expected a dict/list/tuple tree of arrays (model.init_state()) or None, "
                            f"got {type(state).__name__}")
        _check_numpy(state, "state")
    arrays, n = _check_data(data)
    batch_size = min(batch_size, n)
    per_epoch = n // batch_size

    root = rng.split(1)[0]
    start, opt_state, ema_state = 0, None, None
    history = {"loss": [], "grad_norm": [], "eval": []}
    if resume and os.path.exists(checkpoint_path):
        resumed = _resume(checkpoint_path, params, plan, averager, n, batch_size, steps, state)
        start, params, opt_state, ema_state, root, history, state = resumed
    else:
        opt_state = _init_opt(plan, params)
        ema_state = None if averager is None else averager.init(params)
    if plan[0].name is not None and not history["loss"]:
        history["loss"] = {g.name: [] for g in plan}
        history["grad_norm"] = {g.name: [] for g in plan}

    data_root, loss_root = _child(root, 0), _child(root, 1)
    perms = {}

    def batch_at(step):
        epoch, k = divmod(step, per_epoch)
        if epoch not in perms:
            perms.clear()
            perms[epoch] = _child(data_root, epoch).permutation(n)
        rows = perms[epoch][k * batch_size:(k + 1) * batch_size]
        picked = [a[rows] for a in arrays]
        return type(data)(picked) if isinstance(data, (tuple, list)) else picked[0]

    def save(done):
        evals = [[s, _jsonable(r)] for s, r in history["eval"]]
        extra = {"fit": {"n": n, "batch_size": batch_size, "eval": [e for e in evals if e[1] is not None]}}
        if plan[0].name is not None:
            extra["fit"]["groups"] = [[g.name, g.steps] for g in plan]
        xp = namespace(params)

        def as_array(values):
            if isinstance(values, dict):
                return {name: xp.asarray(v, dtype=xp.float64) for name, v in values.items()}
            return xp.asarray(values, dtype=xp.float64)

        fit_state = {
            "optimizer": opt_state,
            "ema": ema_state,
            "history": {k: as_array(history[k]) for k in ("loss", "grad_norm")},
        }
        checkpoint.save(checkpoint_path, params, fit_state, step=done, rng=root, config=config, extra=extra,
                        state=state)

    def check_scalar(value):
        if getattr(value, "shape", ()) != ():
            raise ValueError(f"loss: expected a scalar, got shape {tuple(value.shape)}")
        return value

    step_fns = [_step_fn(g, state is not None, check_scalar) for g in plan]
    per_step = sum(g.steps for g in plan)

    label = progress if isinstance(progress, str) else "fit"
    bar = tqdm(total=steps, initial=start, disable=not progress, desc=label, dynamic_ncols=True)
    good = (params, None, None, None)  # (params, step, loss, group) before the last completed update
    try:
        for step in range(start, steps):
            offset = step * per_step
            means = []
            for g, step_fn in zip(plan, step_fns):
                values, norms = [], []
                for _ in range(g.steps):
                    value, grads, new_state = step_fn(params, batch_at(offset), _child(loss_root, offset), state)
                    offset += 1
                    loss_value = float(value)
                    norm = global_norm(grads)
                    if not (math.isfinite(loss_value) and math.isfinite(norm)):
                        raise _non_finite(loss_value, norm, step, good, history, g.name)
                    if clip_norm is not None:
                        grads = _scale_to(grads, norm, clip_norm)
                    good = (params, step, loss_value, g.name)
                    if g.name is None:
                        params, opt_state = g.update(grads, opt_state, params)
                    else:
                        new_params, new_opt = g.update(grads, opt_state[g.name], params[g.name])
                        params = {**params, g.name: new_params}
                        opt_state = {**opt_state, g.name: new_opt}
                    state = new_state
                    values.append(loss_value)
                    norms.append(norm)
                means.append((g.name, math.fsum(values) / g.steps, math.fsum(norms) / g.steps))
            if averager is not None:
                ema_state = averager.update(params, ema_state)
            for name, loss_value, norm in means:
                if name is None:
                    history["loss"].append(loss_value)
                    history["grad_norm"].append(norm)
                else:
                    history["loss"][name].append(loss_value)
                    history["grad_norm"][name].append(norm)
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == steps:
                bar.set_postfix({"loss" if name is None else f"loss_{name}": f"{value:.4g}"
                                 for name, value, _ in means}, refresh=False)
            if eval_fn is not None and ((eval_every and done % eval_every == 0) or done == steps):
                history["eval"].append((done, eval_fn(params)))
            if checkpoint_path is not None and ((checkpoint_every and done % checkpoint_every == 0)
                                                or done == steps):
                save(done)
    finally:
        bar.close()
    return FitResult(params=params, opt_state=opt_state, history=history, ema_params=ema_state, step=steps,
                     state=state)


class _Planned(NamedTuple):
    name: object  # the group's name; None for fit's single loss (its gradient is w.r.t. all params)
    loss: Callable
    init: Callable
    update: Callable
    steps: int


def _plan(loss, optimizer, groups, params):
    """The updates of one fit step: [_Planned] (one entry for a single loss)."""
    if groups is None:
        if not callable(loss):
            raise TypeError(f"loss: expected a function loss(params, batch, rng) -> scalar, got {loss!r}")
        init, update = _check_optimizer(optimizer)
        return [_Planned(None, loss, init, update, 1)]
    if loss is not None or optimizer is not None:
        what = "loss" if loss is not None else "optimizer"
        raise ValueError(f"{what}: with groups given, each Group carries its own loss and optimizer; pass "
                         f"{what}=None")
    if not isinstance(groups, dict) or not groups:
        raise TypeError(f"groups: expected a non-empty dict name -> Group(loss, optimizer, steps), got {groups!r}")
    if not isinstance(params, dict) or set(params) != set(groups):
        keys = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"params: with groups, expected a dict with one entry per group {sorted(groups)}, "
                         f"got {keys}")
    plan = []
    for name, g in groups.items():
        if not isinstance(name, str):
            raise TypeError(f"groups: expected str names, got {name!r}")
        if not isinstance(g, Group):
            if isinstance(g, tuple) and len(g) in (2, 3):
                g = Group(*g)
            else:
                raise TypeError(f"groups[{name!r}]: expected Group(loss, optimizer, steps), got {g!r}")
        if not callable(g.loss):
            raise TypeError(f"groups[{name!r}].loss: expected a function loss(params, batch, rng), got {g.loss!r}")
        init, update = _check_optimizer(g.optimizer)
        k = check_int(g.steps, f"groups[{name!r}].steps", low=1)
        plan.append(_Planned(name, g.loss, init, update, k))
    return plan


def _init_opt(plan, params):
    if plan[0].name is None:
        return plan[0].init(params)
    return {g.name: g.init(params[g.name]) for g in plan}


def _step_fn(g, with_state, check_scalar):
    """``step(params, batch, rng, state) -> (loss, grads w.r.t. the group's params, new_state)``."""
    name = g.name
    what = "loss" if name is None else f"groups[{name!r}].loss"

    def full(own, params):
        if name is None:
            return own
        return {**params, name: own}

    if not with_state:
        def scalar_loss(own, params, batch, step_rng):
            return check_scalar(g.loss(full(own, params), batch, step_rng))

        plain = value_and_grad(scalar_loss)

        def step_fn(params, batch, step_rng, state):
            own = params if name is None else params[name]
            value, grads = plain(own, params, batch, step_rng)
            return value, grads, None

        return step_fn
    # new_state leaves the traced call through this box, detached leaf by leaf: the state is an
    # output of the step, never something gradients flow into or through.
    carried = {}

    def scalar_loss(own, params, batch, step_rng, state):
        out = g.loss(full(own, params), state, batch, step_rng)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{what}: with state given, expected loss(params, state, batch, rng) -> "
                            f"(scalar, new_state), got {type(out).__name__}")
        carried["state"] = tree_map(stop_gradient, out[1])
        return check_scalar(out[0])

    traced = value_and_grad(scalar_loss)

    def step_fn(params, batch, step_rng, state):
        own = params if name is None else params[name]
        value, grads = traced(own, params, batch, step_rng, state)
        return value, grads, carried.pop("state")

    return step_fn


def _non_finite(loss_value, norm, step, good, history, group=None):
    params, good_step, good_loss, good_group = good
    if good_step is not None:
        whose = "" if good_group is None else f" before group {good_group!r}'s update"
        kept = (f"the params of step {good_step}{whose} (loss {good_loss:.6g}), the last whose loss and gradient "
                "were finite")
    elif tree_all_finite(params):
        kept = "the params this run started from (no step of it completed)"
    else:
        params, kept = None, "None (the params this run started from were not finite)"
    what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {norm}"
    if group is not None:
        what = f"{what} (group {group!r})"
    return NonFiniteLossError(
        f"non-finite training: at step {step} the {what}; stopped, .params holds {kept}. "
        "Try a smaller learning rate or clip_norm, or look for log(0) or 0/0 in the loss.",
        params=params, step=step, history=history, params_step=good_step, params_loss=good_loss,
        group=group, params_group=good_group,
    )


def _resume(path, params, plan, averager, n, batch_size, steps, model_state):
    saved = checkpoint.load(path, like=params)
    fit_info = (saved["extra"] or {}).get("fit")
    state = saved["opt_state"]
    if not isinstance(fit_info, dict) or not isinstance(state, dict) or set(state) != {"optimizer", "ema", "history"}:
        raise ValueError(f"checkpoint_path: {path!r} was not written by fit (no fit state to resume)")
    if (fit_info.get("n"), fit_info.get("batch_size")) != (n, batch_size):
        raise ValueError(
            f"resume: {path!r} was trained with n={fit_info.get('n')} rows and batch_size="
            f"{fit_info.get('batch_size')}, this call has n={n} and batch_size={batch_size}; an exact "
            "resume needs the same data and batch size"
        )
    want = None if plan[0].name is None else [[g.name, g.steps] for g in plan]
    if fit_info.get("groups") != want:
        raise ValueError(f"groups: {path!r} was trained with groups (name, steps) {fit_info.get('groups')}, "
                         f"this call has {want}")
    checkpoint.check_compatible(_init_opt(plan, params), state["optimizer"], name="opt_state", source=path)
    if (state["ema"] is None) != (averager is None):
        raise ValueError(
            f"ema_decay: {path!r} was written {'with' if state['ema'] is not None else 'without'} an EMA, "
            f"this call has ema_decay={'None' if averager is None else 'set'}"
        )
    if state["ema"] is not None:
        checkpoint.check_compatible(params, state["ema"], name="ema", source=path)
    start = saved["step"]
    if start is None or start > steps:
        raise ValueError(f"steps: {path!r} is at step {start}, beyond the requested steps={steps}")
    if saved["rng"] is None:
        raise ValueError(f"checkpoint_path: {path!r} holds no rng state to resume from")
    if want is None:
        history = {k: [float(v) for v in state["history"][k]] for k in ("loss", "grad_norm")}
        counts = [len(history["loss"])]
    else:
        history = {k: {name: [float(v) for v in values] for name, values in state["history"][k].items()}
                   for k in ("loss", "grad_norm")}
        counts = [len(v) for v in history["loss"].values()]
    history["eval"] = [(int(s), r) for s, r in fit_info.get("eval", [])]
    if any(c != start for c in counts):
        raise ValueError(f"checkpoint_path: {path!r} holds {counts[0] if len(set(counts)) == 1 else counts} "
                         f"losses for {start} steps")
    if (saved["state"] is None) != (model_state is None):
        raise ValueError(
            f"state: {path!r} was written {'with' if saved['state'] is not None else 'without'} a model state, "
            f"this call has state={'None' if model_state is None else 'given'}"
        )
    if model_state is not None:
        checkpoint.check_compatible(model_state, saved["state"], name="state", source=path)
    return start, saved["params"], state["optimizer"], state["ema"], saved["rng"], history, saved["state"]
