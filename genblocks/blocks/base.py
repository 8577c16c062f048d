"""Base classes and array checks shared by every block (scalar argument checks: ``blocks.validate``).

- ``Block``: ``__init__`` stores hyperparameters only; ``init(rng, dtype="float32") -> params`` returns a
  plain dict/list pytree of arrays; methods are pure and take ``params`` first.
- ``Distribution``: a value object built from (possibly traced) arrays.
- ``Bijector(Block)``: ``forward(params, x, context=None) -> (y, log_det)`` and ``inverse`` likewise.
"""

import inspect
import warnings

from genblocks.backends import Rng, float_dtype_name, is_traced, namespace, resolve_dtype, stop_gradient, to_numpy

FLOAT_DTYPES = ("float32", "float64")


dtype_name = float_dtype_name  # "float32"/"float64" for a string or any backend's dtype object


def check_dtype(dtype):
    """Validate a parameter dtype argument and return its name."""
    return dtype_name(dtype)


_DTYPE_NAMES = {}  # (type(dtype), dtype) -> str(dtype), for check_array


def check_array(x, name, *, ndim=None, min_ndim=None, last_dim=None, floating=True):
    """Raise a clear error when ``x`` is not an array of the expected rank, trailing size or kind."""
    shape = getattr(x, "shape", None)
    if shape is None:
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(shape)}")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(shape)}")
    if last_dim is not None and (len(shape) == 0 or shape[-1] != last_dim):
        raise ValueError(f"{name}: expected a last axis of size {last_dim}, got shape {tuple(shape)}")
    if floating:
        dtype = getattr(x, "dtype", "")
        key = (type(dtype), dtype)  # the type first: strict dtypes warn when compared with numpy ones
        kind = _DTYPE_NAMES.get(key)
        if kind is None:  # str(numpy dtype) runs Python code (~3 us): worth caching on hot paths
            kind = _DTYPE_NAMES[key] = str(dtype)
        if "float" not in kind:
            raise TypeError(f"{name}: expected a floating array (float32 or float64), got dtype {kind}")
    return x


def param_specs(tree, name="params"):
    """{path: shape} of every array leaf of a params tree (dicts, lists, tuples; None is an empty subtree)."""
    out, stack = {}, [(name, tree)]
    while stack:
        path, node = stack.pop()
        if is_traced(node):  # autograd may box a whole container (a DictBox when differentiating w.r.t. a dict)
            node = stop_gradient(node)
        if isinstance(node, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(node))
        elif node is not None:
            out[path] = tuple(node.shape) if hasattr(node, "shape") else f"a {type(node).__name__}, not an array"
    return out


def _param_signature(tree):
    """A tuple describing a params tree's layout (dict keys, list lengths, leaf shapes) without building
    ``param_specs``' path strings, or None for trees it does not handle (boxed containers, subclasses, leaves
    without a shape). Equal signatures mean equal ``param_specs``; ``Block.check_params`` compares it first."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        cls = type(node)
        if cls is dict:
            keys = tuple(node)
            out.append(("d", tuple(map(type, keys)), keys))
            stack.extend(node[k] for k in keys)
        elif cls is list or cls is tuple:
            out.append(("l", len(node)))
            stack.extend(node)
        elif node is None:
            out.append(None)
        elif isinstance(node, (dict, list, tuple)):
            return None
        else:
            shape = getattr(node, "shape", None)
            if shape is None:
                return None
            out.append(("s", tuple(shape)))
    return tuple(out)


def spec_differences(want, have, what="given", max_lines=20):
    """The sorted lines saying how ``have`` differs from ``want`` (``param_specs`` of each), at most ``max_lines``."""
    problems = [f"missing {k} (the model has shape {want[k]})" for k in want.keys() - have.keys()]
    problems += [f"unexpected {k} (shape {have[k]}) not in the model" for k in have.keys() - want.keys()]
    problems += [f"shape of {k}: {have[k]} {what}, {want[k]} in the model" for k in want.keys() & have.keys()
                 if want[k] != have[k]]
    problems.sort()
    if len(problems) > max_lines:
        problems = problems[:max_lines] + [f"... and {len(problems) - max_lines} more"]
    return problems


class Block:
    """A small part with hyperparameters, ``init(rng, dtype)`` and pure methods over ``params``."""

    def check_params(self, params, name="params"):
        """Raise ValueError unless ``params`` has the leaf names and shapes that ``init`` gives this block.

        Models call it at their entry points, so params of another model (or of another size) fail with a
        list of every difference instead of a bare KeyError or a silently wrong result. The expected layout
        is computed once (one float64 ``init`` on numpy) and kept on the block as a cache.
        """
        signature = _param_signature(params)
        if signature is not None and signature == self.__dict__.get("_param_signature_cache"):
            return  # the layout of the last params that passed (this runs at every training step)
        want = self.__dict__.get("_param_specs_cache")
        if want is None:
            want = param_specs(self.init(Rng(0, backend="numpy"), dtype="float64"), name)
            self.__dict__["_param_specs_cache"] = want
        have = param_specs(params, name)
        if have == want:
            self.__dict__["_param_signature_cache"] = signature
        else:
            problems = spec_differences(want, have)
            raise ValueError(f"{name}: do not match {type(self).__name__}'s parameters "
                             f"({len(problems)} differences):\n  " + "\n  ".join(problems))

    def init(self, rng, dtype="float32"):
        """Parameters as a pytree of arrays on ``rng``'s backend, in ``dtype`` (default float32)."""
        check_dtype(dtype)
        return {}

    def init_state(self, params=None, dtype="float32"):
        """The block's non-trained state tree (running statistics, histories): ``{}`` for most blocks.

        State is what a block updates but the optimizer must not train (BatchNormFlow's running
        statistics, Diffusion's importance-sampling loss history). It comes from ``init_state`` beside
        ``init``'s params, rather than being returned by ``init``, so that ``init -> params`` stays the
        protocol of every block; models update it functionally (``loss_and_state(params, state, batch,
        rng) -> (loss, new_state)``) and ``genblocks.train.fit(..., state=...)`` carries and checkpoints it.
        ``params`` (optional) picks the backend and dtype.
        """
        check_dtype(dtype)
        return {}

    def _repr_args(self):
        """Hyperparameters shown by repr: the constructor's arguments stored under the same name."""
        out = []
        for name in inspect.signature(type(self).__init__).parameters:
            if name != "self" and hasattr(self, name):
                out.append(f"{name}={getattr(self, name)!r}")
        return out

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self._repr_args())})"


class Distribution:
    """A probability distribution as a value object (see ``genblocks.blocks.distributions``)."""

    has_rsample = False

    def log_prob(self, x):
        raise NotImplementedError(f"{type(self).__name__}.log_prob")

    def sample(self, rng, sample_shape=()):
        raise NotImplementedError(f"{type(self).__name__}.sample")

    def rsample(self, rng, sample_shape=()):
        raise NotImplementedError(
            f"{type(self).__name__} is not reparameterizable: use sample() with a score-function estimator"
        )


class Bijector(Block):
    """An invertible map with a tractable log-determinant. Events are the trailing axis.

    forward(params, x, context=None) -> (y, log|det dy/dx|); inverse(params, y, context=None) ->
    (x, log|det dx/dy|). Both log-dets have the batch shape.
    """

    event_ndims = 1

    def forward(self, params, x, context=None):
        raise NotImplementedError(f"{type(self).__name__}.forward")

    def inverse(self, params, y, context=None):
        raise NotImplementedError(f"{type(self).__name__}.inverse")


__all__ = [
    "Block", "Distribution", "Bijector", "check_array", "check_dtype", "dtype_name",
    "namespace", "param_specs", "resolve_dtype", "spec_differences",
]


def warn_if_far_from_unit_scale(x, who, *, mean_limit=5.0, std_limit=20.0):
    """Warn when data x (n, ...) is far from unit scale: some feature's |mean| > ``mean_limit`` or std >
    ``std_limit``. For models whose defaults assume standardised data (a diffusion schedule's x_T ~ N(0, I)).
    Small or zero stds pass (an image's constant border pixels). The warning names the fix; Python shows it
    once per call site. Traced x is skipped.
    """
    if is_traced(x) or x.shape[0] < 2:
        return
    xp = namespace(x)
    flat = xp.reshape(x, (x.shape[0], -1))
    mean = to_numpy(xp.mean(flat, axis=0))
    std = to_numpy(xp.std(flat, axis=0))
    m, lo, hi = float(abs(mean).max()), float(std.min()), float(std.max())
    if m > mean_limit or hi > std_limit:
        warnings.warn(
            f"x: {who} assumes data of about unit scale, got feature means up to |{m:.3g}| and stds from "
            f"{lo:.3g} to {hi:.3g}; standardise it first (z = (x - mean) / std, then samples * std + mean), "
            f"e.g. with genblocks.data.standardize",
            UserWarning, stacklevel=3)


def unpack_batch(batch):
    """(x, context) from a batch given as x or as the pair (x, context) (context None for a bare x)."""
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"batch: expected x or (x, context), got a sequence of {len(batch)} items")
        return batch[0], batch[1]
    return batch, None


def params_dtype(params, default="float32"):
    """The dtype name of the first floating leaf of a params tree (``default`` when there is none)."""
    stack = [params]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
        elif "float" in str(getattr(node, "dtype", "")):
            return dtype_name(node.dtype)
    return default
