"""Training: optimizers and schedules (``optim``), the ``fit`` loop (``loop``), checkpoints (``checkpoint``)."""

from . import checkpoint
from .loop import FitResult, Group, NonFiniteLossError, fit
from .optim import (
    Optimizer,
    adam,
    adamw,
    clip_by_global_norm,
    clipped,
    constant,
    cosine_decay,
    ema,
    linear_warmup,
    sgd,
)
from .tree import global_norm, tree_leaves, tree_map

__all__ = [
    "checkpoint", "fit", "FitResult", "Group", "NonFiniteLossError", "Optimizer", "sgd", "adam", "adamw", "constant",
    "cosine_decay", "linear_warmup", "clip_by_global_norm", "clipped", "ema", "tree_map", "tree_leaves",
    "global_norm",
]
