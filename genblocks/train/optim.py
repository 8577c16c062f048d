"""Optimizers as ``(init, update)`` pairs over pytrees, schedules, clipping and parameter EMA.

An optimizer is a pair of pure functions, as in JAX's example optimizers::

    init, update = adam(1e-3)
    state = init(params)                                   # pytree of arrays, step count included
    params, state = update(grads, state, params)           # one step

``params`` and ``grads`` are dict/list/tuple trees of floating arrays of the same structure. The state
holds the step count ``t`` (updates done so far) as a 0-d int64 array, so it checkpoints like any other
array. Moments are kept in each parameter's dtype: float32 params give float32 state and float32 updates
(Python float hyperparameters never upcast an array; gradients are cast to the parameter's dtype).

``lr`` is a positive float or a schedule ``step -> float`` evaluated at ``t`` (0 for the first update).
"""

import math
from collections import namedtuple

from genblocks.backends import namespace
from genblocks.blocks.validate import check_int, check_real

from .tree import global_norm, tree_leaves, tree_map, tree_unflatten

__all__ = [
    "Optimizer", "sgd", "adam", "adamw", "constant", "cosine_decay", "linear_warmup",
    "clip_by_global_norm", "clipped", "ema",
]

Optimizer = namedtuple("Optimizer", ["init", "update"])
Optimizer.__doc__ = "An optimizer: ``init(params) -> state`` and ``update(grads, state, params) -> (params, state)``."


# ---------------------------------------------------------------------------------------------------
# argument checks




def _as_schedule(lr, name="lr"):
    """A float learning rate becomes ``constant(lr)``; a callable is used as is."""
    if callable(lr):
        return lr
    return constant(check_real(lr, name, low=0.0, low_open=True))


def _lr_at(schedule, t):
    value = schedule(t)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"lr: the schedule returned {value!r} at step {t}, expected a float") from None
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"lr: the schedule returned {value!r} at step {t}, expected a finite value >= 0")
    return value


def _check_params(params, name="params"):
    leaves = tree_leaves(params)
    for leaf in leaves:
        kind = getattr(getattr(leaf, "dtype", None), "kind", None) or str(getattr(leaf, "dtype", ""))
        if kind != "f" and "float" not in kind:
            raise TypeError(
                f"{name}: expected a tree of floating arrays, got a leaf of type {type(leaf).__name__} "
                f"with dtype {getattr(leaf, 'dtype', None)}"
            )
    return namespace(params)


def _step_array(xp, t):
    return xp.asarray(t, dtype=xp.int64)


def _cast_like(xp, g, p):
    return g if g.dtype == p.dtype else xp.astype(g, p.dtype)


# ---------------------------------------------------------------------------------------------------
# schedules (step -> float; ``step`` is the number of updates already done)


def constant(lr):
    """``lr_t = lr`` for every step ``t``."""
    lr = check_real(lr, "lr", low=0.0, low_open=True)

    def schedule(step):
        return lr

    return schedule


def cosine_decay(lr, total_steps, final_lr=0.0):
    """``lr_t = final + (lr - final) * (1 + cos(pi * min(t, T) / T)) / 2`` with ``T = total_steps``.

    Starts at ``lr`` (t = 0), reaches ``final_lr`` at ``t = T`` and stays there.
    """
    lr = check_real(lr, "lr", low=0.0, low_open=True)
    total_steps = check_int(total_steps, "total_steps", low=1)
    final_lr = check_real(final_lr, "final_lr", low=0.0, high=lr)

    def schedule(step):
        frac = min(int(step), total_steps) / total_steps
        return final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return schedule


def linear_warmup(lr, warmup_steps):
    """``lr_t = base(0) * (t + 1) / W`` for ``t < W``, then ``base(t - W)`` (``base`` = ``lr`` as a schedule).

    The first update already uses ``base(0) / W`` (never 0); the wrapped schedule starts after the
    warmup, so ``linear_warmup(cosine_decay(lr, T), W)`` warms up for ``W`` steps then decays over ``T``.
    """
    base = _as_schedule(lr)
    warmup_steps = check_int(warmup_steps, "warmup_steps", low=0)

    def schedule(step):
        step = int(step)
        if step < warmup_steps:
            return float(base(0)) * (step + 1) / warmup_steps
        return float(base(step - warmup_steps))

    return schedule


# ---------------------------------------------------------------------------------------------------
# optimizers


def sgd(lr, momentum=0.0, nesterov=False):
    """SGD with heavy-ball momentum (PyTorch's convention): ``v <- mu v + g``, ``p <- p - lr_t v``.

    With ``nesterov=True``: ``p <- p - lr_t (g + mu v)`` (with the updated ``v``). ``momentum=0`` is plain
    ``p <- p - lr_t g`` and keeps no velocity (state ``{"step", "velocity": None}``).
    """
    schedule = _as_schedule(lr)
    momentum = check_real(momentum, "momentum", low=0.0, high=1.0, high_open=True)
    if nesterov and momentum == 0.0:
        raise ValueError("nesterov: Nesterov momentum needs momentum > 0, got momentum=0.0")

    def init(params):
        xp = _check_params(params)
        velocity = tree_map(xp.zeros_like, params) if momentum > 0.0 else None
        return {"step": _step_array(xp, 0), "velocity": velocity}

    def update(grads, state, params):
        xp = namespace(params)
        t = int(state["step"])
        lr_t = _lr_at(schedule, t)
        grads = tree_map(lambda g, p: _cast_like(xp, g, p), grads, params)
        if momentum == 0.0:
            new_params = tree_map(lambda p, g: p - lr_t * g, params, grads)
            return new_params, {"step": _step_array(xp, t + 1), "velocity": None}
        velocity = tree_map(lambda v, g: momentum * v + g, state["velocity"], grads)
        if nesterov:
            new_params = tree_map(lambda p, g, v: p - lr_t * (g + momentum * v), params, grads, velocity)
        else:
            new_params = tree_map(lambda p, v: p - lr_t * v, params, velocity)
        return new_params, {"step": _step_array(xp, t + 1), "velocity": velocity}

    return Optimizer(init, update)


def _adam(lr, b1, b2, eps, weight_decay):
    schedule = _as_schedule(lr)
    b1 = check_real(b1, "b1", low=0.0, high=1.0, high_open=True)
    b2 = check_real(b2, "b2", low=0.0, high=1.0, high_open=True)
    eps = check_real(eps, "eps", low=0.0, low_open=True)
    weight_decay = check_real(weight_decay, "weight_decay", low=0.0)

    def init(params):
        xp = _check_params(params)
        return {"step": _step_array(xp, 0), "m": tree_map(xp.zeros_like, params), "v": tree_map(xp.zeros_like, params)}

    def update(grads, state, params):
        t = int(state["step"]) + 1
        lr_t = _lr_at(schedule, t - 1)
        c1, c2 = 1.0 - b1**t, 1.0 - b2**t  # bias corrections, Python floats (no upcast)
        root_c2 = math.sqrt(c2)
        # m_hat / (sqrt(v_hat) + eps) = (sqrt(c2) / c1) m / (sqrt(v) + eps sqrt(c2)): the scalars, once per step
        shift, scale = eps * root_c2, -lr_t * root_c2 / c1
        decay = 1.0 - lr_t * weight_decay if weight_decay else None
        xp = namespace(params)
        leaf_update = xp.adam_leaf  # (p, g, m, v) -> fresh (p, m, v): genblocks/backends/fused.py
        new_m, new_v = [], []

        def step(p, g, m, v):
            p, m, v = leaf_update(p, g, m, v, b1, b2, shift, scale, decay)
            new_m.append(m)
            new_v.append(v)
            return p

        new_params = tree_map(step, params, grads, state["m"], state["v"])  # one walk over the leaves
        return new_params, {"step": _step_array(xp, t), "m": tree_unflatten(new_params, new_m),
                            "v": tree_unflatten(new_params, new_v)}

    return Optimizer(init, update)


def adam(lr, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (Kingma & Ba 2015, Algorithm 1), at update ``t = 1, 2, ...``::

        m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)          v_hat = v / (1 - b2^t)
        p <- p - lr_{t-1} m_hat / (sqrt(v_hat) + eps)

    State: ``{"step": t, "m": tree, "v": tree}``. Each leaf is computed by ``xp.adam_leaf``
    (``genblocks/backends/fused.py``) in the arrangement m' = (g - m)(1 - b1) + m, v' = (g g - v)(1 - b2) + v,
    p' = p - (lr_{t-1} sqrt(c2) / c1) m' / (sqrt(v') + eps sqrt(c2)) with c1 = 1 - b1^t, c2 = 1 - b2^t: the same
    values (to rounding) as the lines above, and bit for bit the same on every backend (``tests/test_optim.py``).

    ``update`` is pure: it never modifies ``grads``, ``state`` or ``params``, and every array it returns (the new
    parameters, m and v) is freshly allocated, so a caller may keep any earlier parameters or state.
    """
    return _adam(lr, b1, b2, eps, 0.0)


def adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay ``wd``::

        p <- p - lr_{t-1} (m_hat / (sqrt(v_hat) + eps) + wd p)

    (``m_hat``, ``v_hat`` as in :func:`adam`; the decay is scaled by the scheduled ``lr`` as in PyTorch.)
    """
    return _adam(lr, b1, b2, eps, weight_decay)


# ---------------------------------------------------------------------------------------------------
# clipping and averaging


def clip_by_global_norm(grads, max_norm):
    """``g <- g * min(1, max_norm / ||g||)`` with ``||g||`` the norm over all leaves; returns ``(g, ||g||)``.

    ``||g||`` is a Python float. A non-finite norm leaves the gradients unchanged (so the caller can see
    and report the NaN/inf rather than get silently zeroed gradients).
    """
    max_norm = check_real(max_norm, "max_norm", low=0.0, low_open=True)
    norm = global_norm(grads)
    return _scale_to(grads, norm, max_norm), norm


def _scale_to(grads, norm, max_norm):
    if not math.isfinite(norm) or norm <= max_norm:
        return grads
    scale = max_norm / norm
    return tree_map(lambda g: g * scale, grads)


def clipped(optimizer, max_norm):
    """``optimizer`` applied to ``clip_by_global_norm(grads, max_norm)``; same state as ``optimizer``."""
    init, inner_update = _check_optimizer(optimizer)
    max_norm = check_real(max_norm, "max_norm", low=0.0, low_open=True)

    def update(grads, state, params):
        grads, _ = clip_by_global_norm(grads, max_norm)
        return inner_update(grads, state, params)

    return Optimizer(init, update)


def _check_optimizer(optimizer, name="optimizer"):
    try:
        init, update = optimizer
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected an (init, update) pair such as adam(1e-3), got {optimizer!r}") from None
    if not callable(init) or not callable(update):
        raise TypeError(f"{name}: expected an (init, update) pair of callables, got {optimizer!r}")
    return init, update


def ema(decay):
    """Exponential moving average of parameters: ``avg <- decay * avg + (1 - decay) * params``.

    (Computed as ``avg + (1 - decay) (params - avg)``, the same average with one fresh array per leaf.)

    ``init(params)`` starts the average AT the parameters (a copy), so it needs no bias correction
    (an average started at zero would, like Adam's moments); the state is the averaged tree itself.
    ``update(params, avg) -> avg``; dtypes follow the params.
    """
    decay = check_real(decay, "decay", low=0.0, high=1.0, high_open=True)

    def init(params):
        xp = _check_params(params)
        return tree_map(lambda p: xp.asarray(p, copy=True), params)

    def update(params, avg):
        xp = namespace(params)

        def step(a, p):  # avg + (1 - decay) (params - avg): one fresh array, three passes
            new = _cast_like(xp, p, a) - a
            new *= 1.0 - decay
            new += a
            return new

        return tree_map(step, avg, params)

    return Optimizer(init, update)
