"""Autoregressive models: p(x) = prod_i p(x_i | x_<i), every conditional from one masked network (MADE).

The chain rule factorises any density over D variables, in any order of the variables:

    log p(x) = sum_i log p(x_i | x_<i),      x_<i = the variables generated before x_i.

An autoregressive model chooses the order and a family for each conditional (Bernoulli for binary
pixels, categorical for K levels, Gaussian or a mixture for real values) and lets a network compute the
conditional's parameters theta_i(x_<i). MADE (Germain et al. 2015) computes all D of them in one forward
pass of a single MLP whose weights are multiplied by constant 0/1 masks: hidden unit k of layer l gets a
degree m_l(k) in 1..D-1, input j the degree order(j) + 1, and a connection exists only from a lower or
equal degree (hidden layers) or a strictly lower one (outputs). Output theta_i therefore sees exactly the
inputs x_j with order(j) < order(i), so

- ``log_prob`` is one network pass (all conditionals at once, teacher forcing);
- ``sample`` takes D passes: generate the variable of step 1, feed it back, generate step 2, ...

Read top to bottom: the order, the degrees and masks, the output families (conditionals), the network,
the density (with the mixture over masks), the loss and its per-dimension decomposition, and sampling with
optional inpainting.

Masks as an ensemble (connectivity-agnostic training, Germain et al. 2015 section 3.3): ``num_masks`` sets
of hidden degrees, all sharing the variable order and the weights. Mask 0 is plain MADE's
(``genblocks.blocks.nn.made_degrees``); masks 1.. draw their hidden degrees from a fixed seed, so they are
constants of the model, not parameters. Training draws one mask per batch; evaluation averages the
*probabilities* of the masks, p(x) = (1/M) sum_k p_k(x), a mixture, which is normalised because every p_k
is. (Averaging their logits or their log-densities is a different object: the geometric mean of the joints
sums to less than 1.)
"""

import math

from genblocks.backends import Rng, is_traced, namespace, to_numpy
from genblocks.blocks import ops
from genblocks.blocks.base import Block, check_array, check_dtype, unpack_batch
from genblocks.blocks.distributions import Bernoulli, Categorical, Logistic, MixtureSameFamily, Normal
from genblocks.blocks.nn import MaskedDense, made_degrees
from genblocks.blocks.validate import check_choice, check_nonnegative_int, check_positive_int

LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["OUTPUTS", "MADEModel", "MADE", "resolve_order", "hidden_degrees", "masks_from_degrees"]


# ---------------------------------------------------------------------------------------------------
# The order: which variable is generated at which step


def resolve_order(dim, order="natural", order_seed=None):
    """The rank of every variable: ``order[j]`` = the step (0..D-1) at which x_j is generated.

    ``"natural"`` -> (0, 1, ..., D-1); ``"random"`` -> a permutation drawn from ``Rng(order_seed)``
    (``order_seed`` a non-negative int, required); or an explicit permutation of range(D) (a sequence or a
    1-d integer array). The same convention as ``genblocks.blocks.nn.MADE``'s ``order``. Returns a tuple.
    """
    check_positive_int(dim, "dim")
    if isinstance(order, str):
        if order == "natural":
            return tuple(range(dim))
        if order == "random":
            if isinstance(order_seed, bool) or not isinstance(order_seed, int) or order_seed < 0:
                raise ValueError(f"order_seed: expected a non-negative int with order='random', got {order_seed!r}")
            return tuple(int(v) for v in to_numpy(Rng(order_seed, "numpy").permutation(dim)))
        raise ValueError(f"order: expected 'natural', 'random' or a permutation of range({dim}), got {order!r}")
    try:
        host = to_numpy(order) if hasattr(order, "shape") else order
        ranks = [int(v) for v in host]
        if any(float(v) != r for v, r in zip(host, ranks)):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"order: expected 'natural', 'random' or a permutation of range({dim}), "
                         f"got {order!r}") from None
    if sorted(ranks) != list(range(dim)):
        raise ValueError(f"order: expected a permutation of range({dim}) (each of 0..{dim - 1} once), got {ranks}")
    return tuple(ranks)


# ---------------------------------------------------------------------------------------------------
# Degrees and masks: which input each output may see


def hidden_degrees(dim, hidden, mask_index, mask_seed=0):
    """Degrees of the hidden units for mask ``mask_index``: a list of tuples, one per hidden layer.

    Mask 0: MADE's deterministic degrees m(k) = (k mod (D - 1)) + 1. Mask k >= 1: each layer's degrees
    drawn uniformly from {min of the previous layer's degrees, ..., D - 1} (Germain et al. 2015) by
    ``Rng(mask_seed)``'s k-th child, so mask k is the same constant every time the model is built.
    """
    if mask_index == 0:
        return list(made_degrees(dim, hidden)[1:])
    top = max(dim - 1, 1)
    rng = Rng(mask_seed, "numpy").split(mask_index)[mask_index - 1]
    out, low = [], 1
    for width, r in zip(hidden, rng.split(max(len(hidden), 1))):
        degrees = tuple(int(v) for v in to_numpy(r.integers(low, top + 1, shape=(width,))))
        out.append(degrees)
        low = min(degrees)
    return out


def masks_from_degrees(input_degrees, hidden, params_per_dim):
    """MADE masks from degrees: M_l[j, k] = [m_l(k) >= m_{l-1}(j)] (hidden), M_out[j, i P + p] = [d_i > m_L(j)].

    input_degrees: (D,) ints (order + 1); hidden: list of per-layer degree tuples. Returns nested lists
    (0/1 floats): [(D, h_1), ..., (h_L, D * params_per_dim)]; output unit i P + p belongs to variable i.
    """
    layers = [tuple(input_degrees)] + [tuple(h) for h in hidden]
    masks = [[[1.0 if cur >= prev else 0.0 for cur in nxt] for prev in last] for last, nxt in zip(layers, layers[1:])]
    out_degrees = [d for d in input_degrees for _ in range(params_per_dim)]
    masks.append([[1.0 if d > prev else 0.0 for d in out_degrees] for prev in layers[-1]])
    return masks


# ---------------------------------------------------------------------------------------------------
# The output families: theta_i (P numbers per variable) -> the conditional p(x_i | x_<i)

# output -> what x_i is, and the P network outputs per variable that parameterise its conditional
OUTPUTS = {
    "bernoulli": "x_i in {0, 1}: P = 1 logit, p(x_i = 1) = sigmoid(logit)",
    "categorical": "x_i in {0, ..., K-1}: P = K logits, log p = log_softmax(logits)[x_i]",
    "gaussian": "x_i real: P = 2, N(x_i; mu, sigma), log sigma = s_min + softplus(raw - s_min)",
    "mixture_gaussian": "x_i real: P = 3C, sum_c pi_c N(x_i; mu_c, sigma_c), pi = softmax(logits)",
    "mixture_logistic": "x_i real: P = 3C, sum_c pi_c Logistic(x_i; mu_c, s_c), pi = softmax(logits)",
}


# ---------------------------------------------------------------------------------------------------
# The model


class MADEModel(Block):
    """p(x | c) = prod_i p(x_i | x_<i, c), theta_i = MADE(x_<i, c): x (..., D) -> log p (...,).

    dim: D; hidden: hidden widths; output: one of ``OUTPUTS`` (``num_classes`` = K levels for
    "categorical", ``num_components`` = C for the mixtures); order: "natural", "random" (with
    ``order_seed``) or a permutation (``resolve_order``); num_masks: M connectivity masks (1 = plain MADE;
    ``mask_seed`` fixes masks 1..M-1); context: ``context_dim`` (a float vector c (..., context_dim)) or
    ``context_classes`` (an integer label c (...,) in 0..N-1, one-hot encoded), which enters the first and
    the last layer with all-ones masks, so it reaches every conditional, even the first variable's.
    ``min_log_scale`` (real outputs) is a smooth floor on log sigma: log sigma = s + softplus(raw - s).

    params {"layers": [{"W", "b"}, ...]} (input layer first); x enters the network as its float value.
    """

    def __init__(self, dim, hidden=(64, 64), *, output="bernoulli", num_classes=None, num_components=5,
                 order="natural", order_seed=None, num_masks=1, mask_seed=0, context_dim=0, context_classes=0,
                 activation="relu", min_log_scale=-7.0):
        self.dim = check_positive_int(dim, "dim")
        self.hidden = tuple(hidden)
        for i, width in enumerate(self.hidden):
            check_positive_int(width, f"hidden[{i}]")
        self.output = check_choice(output, "output", tuple(OUTPUTS))
        if output == "categorical":
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"num_classes: expected an int >= 2 with output='categorical', got {num_classes!r}")
        elif num_classes is not None:
            raise ValueError(f"num_classes: only for output='categorical', got {num_classes!r} with output={output!r}")
        self.num_classes = num_classes
        self.num_components = check_positive_int(num_components, "num_components")
        self.order = resolve_order(dim, order, order_seed)
        self.order_seed = order_seed
        self.num_masks = check_positive_int(num_masks, "num_masks")
        self.mask_seed = check_nonnegative_int(mask_seed, "mask_seed")
        self.context_dim = check_nonnegative_int(context_dim, "context_dim")
        self.context_classes = check_nonnegative_int(context_classes, "context_classes")
        if self.context_dim and self.context_classes:
            raise ValueError(f"context_dim, context_classes: expected at most one of them, got "
                             f"context_dim={context_dim}, context_classes={context_classes}")
        if not (isinstance(min_log_scale, (int, float)) and math.isfinite(min_log_scale)):
            raise ValueError(f"min_log_scale: expected a finite float, got {min_log_scale!r}")
        self.min_log_scale = float(min_log_scale)
        self.activation = activation
        self.params_per_dim = {"bernoulli": 1, "categorical": num_classes, "gaussian": 2}.get(
            output, 3 * self.num_components)
        # generation order: step t generates variable visit[t] (the inverse permutation of order)
        self.visit = tuple(sorted(range(dim), key=lambda j: self.order[j]))
        width = self.context_dim or self.context_classes
        input_degrees = [r + 1 for r in self.order]
        self.nets = []  # nets[k]: the MaskedDense layers of mask k (same shapes, so they share params)
        for k in range(self.num_masks):
            masks = masks_from_degrees(input_degrees, hidden_degrees(dim, self.hidden, k, self.mask_seed),
                                       self.params_per_dim)
            if width:  # all-ones rows: the context reaches the first hidden layer and every output
                masks[0] = masks[0] + [[1.0] * len(masks[0][0])] * width
                if len(masks) > 1:
                    masks[-1] = masks[-1] + [[1.0] * len(masks[-1][0])] * width
            last = len(masks) - 1
            self.nets.append([MaskedDense(m, activation=activation if i < last else None)
                              for i, m in enumerate(masks)])

    def __repr__(self):
        extra = [f"output={self.output!r}"]
        if self.num_classes:
            extra.append(f"num_classes={self.num_classes}")
        if self.output.startswith("mixture"):
            extra.append(f"num_components={self.num_components}")
        if self.order != tuple(range(self.dim)):
            extra.append(f"order={self.order}")
        for name in ("num_masks", "context_dim", "context_classes"):
            if getattr(self, name) not in (0, 1):
                extra.append(f"{name}={getattr(self, name)}")
        return f"MADEModel(dim={self.dim}, hidden={self.hidden}, {', '.join(extra)})"

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        layers = self.nets[0]
        return {"layers": [layer.init(r, dtype) for layer, r in zip(layers, rng.split(len(layers)))]}

    # -- inputs ------------------------------------------------------------------------------------
    def _x(self, xp, x, dt, name="x"):
        check_array(x, name, min_ndim=1, last_dim=self.dim, floating=False)
        return x if x.dtype == dt else xp.astype(x, dt)

    def _context(self, xp, context, batch_shape, dt, device):
        """The context as network input columns (batch_shape + (width,)), or None without context."""
        width = self.context_dim or self.context_classes
        if not width:
            if context is not None:
                raise ValueError("context: this model was built without context (context_dim=0, context_classes=0), "
                                 "but a context was given")
            return None
        if context is None:
            what = (f"a vector of size {self.context_dim}" if self.context_dim
                    else f"an integer label in 0..{self.context_classes - 1}")
            raise ValueError(f"context: this model expects {what} per example, got None")
        if self.context_classes:
            if not hasattr(context, "shape"):
                context = xp.asarray(context, device=device)
            labels = xp.astype(context, dt)
            if not is_traced(labels):  # a label outside 0..N-1 would be an all-zero one-hot, silently
                ok = xp.logical_and(xp.logical_and(labels >= 0, labels <= self.context_classes - 1),
                                    xp.floor(labels) == labels)
                if not bool(to_numpy(xp.all(ok))):
                    bad = sorted({float(v) for v in to_numpy(labels)[~to_numpy(ok)]})[:5]
                    raise ValueError(f"context: expected integer class labels in 0..{self.context_classes - 1}, "
                                     f"got values {bad}")
            classes = xp.arange(self.context_classes, dtype=dt, device=device)
            context = xp.astype(xp.expand_dims(labels, axis=-1) == classes, dt)  # one-hot (..., N)
        else:
            check_array(context, "context", min_ndim=1, last_dim=self.context_dim)
            context = context if context.dtype == dt else xp.astype(context, dt)
        shape = tuple(batch_shape) + (width,)
        try:
            if context.ndim < len(shape):
                context = xp.reshape(context, (1,) * (len(shape) - context.ndim) + tuple(context.shape))
            return context if tuple(context.shape) == shape else xp.broadcast_to(context, shape)
        except (ValueError, TypeError):
            raise ValueError(f"context: shape {tuple(context.shape)} does not broadcast with x's batch shape "
                             f"{tuple(batch_shape)}") from None

    def _index(self, xp, values, device):
        return xp.asarray(list(values), dtype=xp.int64, device=device)

    # -- the network and the conditionals -----------------------------------------------------------
    def network_outputs(self, params, x, context=None, mask_index=0):
        """theta = MADE_k(x, c): x (..., D) -> (..., D, P), mask k = ``mask_index``.

        theta[..., i, :] depends on x_j only where order(j) < order(i) (and on the context everywhere).
        """
        xp, x, ctx = self._inputs(params, x, context)
        if not (isinstance(mask_index, int) and 0 <= mask_index < self.num_masks):
            raise ValueError(f"mask_index: expected an int in 0..{self.num_masks - 1}, got {mask_index!r}")
        return self._theta(xp, params, x, ctx, mask_index)

    def _theta(self, xp, params, x, ctx, k):
        h = x
        layers = self.nets[k]
        last = len(layers) - 1
        if ctx is not None and tuple(ctx.shape[:-1]) != tuple(x.shape[:-1]):
            h = xp.broadcast_to(x, tuple(ctx.shape[:-1]) + (self.dim,))
        for i, (layer, p) in enumerate(zip(layers, params["layers"])):
            if ctx is not None and (i == 0 or i == last):
                h = xp.concat([h, ctx], axis=-1)
            h = layer.apply(p, h)
        return xp.reshape(h, tuple(h.shape[:-1]) + (self.dim, self.params_per_dim))

    def _log_scale(self, raw):
        """log sigma = s_min + softplus(raw - s_min): smooth, > s_min, ~ raw for raw >> s_min."""
        return self.min_log_scale + ops.softplus(raw - self.min_log_scale)

    def conditional(self, theta):
        """The D conditionals as one genblocks Distribution with batch shape (..., D), from theta (..., D, P)."""
        xp = namespace(theta)
        out = self.output
        if out == "bernoulli":
            return Bernoulli(logits=theta[..., 0], validate=False)
        if out == "categorical":
            return Categorical(logits=theta, validate=False)
        if out == "gaussian":
            return Normal(theta[..., 0], xp.exp(self._log_scale(theta[..., 1])), validate=False)
        C = self.num_components
        family = Normal if out == "mixture_gaussian" else Logistic
        component = family(theta[..., C:2 * C], xp.exp(self._log_scale(theta[..., 2 * C:])), validate=False)
        return MixtureSameFamily(theta[..., :C], component, validate=False)

    def conditional_log_prob(self, theta, x):
        """log p(x_i | theta_i) for every i: theta (..., D, P), x (..., D) -> (..., D), in log-space.

        Real outputs use the log-scale s directly, so a huge s never overflows exp(s):
        log N(x; mu, e^s) = -z^2 / 2 - s - log(2 pi) / 2 and log Logistic = -|z| - 2 log(1 + e^-|z|) - s,
        z = (x - mu) e^-s; a mixture is logsumexp_c(log_softmax(logits)_c + log p_c). Discrete outputs use
        ``conditional(theta).log_prob(x)`` (log_sigmoid, log_softmax).
        """
        out = self.output
        if out in ("bernoulli", "categorical"):
            return self.conditional(theta).log_prob(x)
        xp = namespace(theta, x)
        if out == "gaussian":
            return _log_scaled(xp, "gaussian", x, theta[..., 0], self._log_scale(theta[..., 1]))
        C = self.num_components
        family = "gaussian" if out == "mixture_gaussian" else "logistic"
        comp = _log_scaled(xp, family, xp.expand_dims(x, axis=-1), theta[..., C:2 * C],
                           self._log_scale(theta[..., 2 * C:]))
        return ops.logsumexp(ops.log_softmax(theta[..., :C], axis=-1) + comp, axis=-1)

    # -- densities ---------------------------------------------------------------------------------
    def _inputs(self, params, x, context):
        """(xp, x in the params' dtype, context columns or None), x broadcast to the context's batch shape."""
        self.check_params(params)
        xp = namespace(params, x, context)
        W = params["layers"][0]["W"]
        x = self._x(xp, x, W.dtype)
        ctx = self._context(xp, context, x.shape[:-1], W.dtype, xp.device_of(W))
        if ctx is not None and tuple(ctx.shape[:-1]) != tuple(x.shape[:-1]):
            x = xp.broadcast_to(x, tuple(ctx.shape[:-1]) + (self.dim,))
        return xp, x, ctx

    def _mask_log_probs(self, xp, params, x, ctx, k):
        """log p_k(x_i | x_<i) under mask k: (..., D), one network pass."""
        return self.conditional_log_prob(self._theta(xp, params, x, ctx, k), x)

    def _per_mask(self, params, x, context):
        """(xp, [log p_k(x_i | x_<i) (..., D) for each mask k])."""
        xp, x, ctx = self._inputs(params, x, context)
        return xp, [self._mask_log_probs(xp, params, x, ctx, k) for k in range(self.num_masks)]

    def _prefix_log_probs(self, xp, per_mask, device):
        """log p(x_visit[0], ..., x_visit[t]) for t = 0..D-1 under the mask mixture: (..., D), in step order.

        log p(x_<=t) = logsumexp_k sum_{s<=t} log p_k(x_visit[s] | ...) - log M: each mask's prefix is a
        normalised marginal, so the mixture of prefixes is the mixture's marginal (masks share the order).
        """
        steps = xp.take(xp.stack(per_mask, axis=0), self._index(xp, self.visit, device), axis=-1)
        return ops.logsumexp(xp.cumulative_sum(steps, axis=-1), axis=0) - math.log(self.num_masks)

    def conditional_log_probs(self, params, x, context=None):
        """log p(x_i | x_<i, c) for every variable i: x (..., D) -> (..., D); they sum to ``log_prob``.

        With M > 1 masks these are the mixture's conditionals, log p(x_<=i) - log p(x_<i).
        """
        xp, per_mask = self._per_mask(params, x, context)
        if self.num_masks == 1:
            return per_mask[0]
        device = xp.device_of(params["layers"][0]["W"])
        prefix = self._prefix_log_probs(xp, per_mask, device)
        steps = xp.concat([prefix[..., :1], prefix[..., 1:] - prefix[..., :-1]], axis=-1)
        return xp.take(steps, self._index(xp, self.order, device), axis=-1)  # back to variable order

    def log_prob(self, params, x, context=None):
        """log p(x | c) = logsumexp_k sum_i log p_k(x_i | x_<i, c) - log M: x (..., D) -> (...,).

        One network pass per mask. Values outside the support (non-binary x for "bernoulli", x not in
        0..K-1 for "categorical") give -inf.
        """
        xp, per_mask = self._per_mask(params, x, context)
        if self.num_masks == 1:
            return xp.sum(per_mask[0], axis=-1)
        joint = xp.stack([xp.sum(lp, axis=-1) for lp in per_mask], axis=0)
        return ops.logsumexp(joint, axis=0) - math.log(self.num_masks)

    # -- training ----------------------------------------------------------------------------------
    def loss(self, params, batch, rng=None):
        """Mean NLL in nats per example; batch = x (n, D) or (x, context).

        With M > 1 masks and an ``rng``, one mask k ~ U{0..M-1} per batch (connectivity-agnostic training):
        -mean log p_k(x). Without an rng, the NLL of the mask mixture.
        """
        x, context = unpack_batch(batch)
        if self.num_masks > 1 and rng is not None:
            xp, x, ctx = self._inputs(params, x, context)
            k = int(to_numpy(rng.integers(self.num_masks)))
            return -xp.mean(xp.sum(self._mask_log_probs(xp, params, x, ctx, k), axis=-1))
        xp = namespace(params, x)
        return -xp.mean(self.log_prob(params, x, context))

    def loss_terms(self, params, batch, rng=None):
        """{"nll": mean NLL (scalar), "nll_per_dim": (D,) mean -log p(x_i | x_<i) per variable}; they add up.

        The per-dimension NLL shows which variables are hard to predict from the ones before them.
        """
        x, context = unpack_batch(batch)
        cond = self.conditional_log_probs(params, x, context)
        xp = namespace(cond)
        per_dim = -xp.mean(xp.reshape(cond, (-1, self.dim)), axis=0)
        return {"nll": xp.sum(per_dim), "nll_per_dim": per_dim}

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, params, rng, n, context=None, x_init=None, mask=None):
        """x ~ p(x | c) by D sequential steps in the model's order: x_visit[t] ~ p(x_visit[t] | x_<t, c).

        Returns (n, D) in the params' dtype on their backend; every draw comes from ``rng``. Inpainting:
        with ``x_init`` ((n, D) or (D,)) and a boolean ``mask`` of the same shape (True = given), the given
        entries are kept exactly and the others are sampled. That is an exact draw from p(x_missing |
        x_given) when, in each row, every given entry comes before every missing one in the order (completing
        a prefix); given entries later in the order are kept but do not inform earlier missing ones. With
        M > 1 masks each row first picks mask k with probability proportional to p_k(given prefix), then
        samples all its steps with that mask: an exact draw from the mixture's conditional.
        """
        self.check_params(params)
        check_positive_int(n, "n")
        xp = namespace(params, context, x_init, mask)
        W = params["layers"][0]["W"]
        dt, device = W.dtype, xp.device_of(W)
        ctx = self._context(xp, context, (n,), dt, device)
        given, x = self._given(xp, n, x_init, mask, dt, device)  # x: the one buffer the D steps write into
        r_mask, *r_steps = rng.split(self.dim + 1)
        rows = self._choose_masks(xp, params, x, given, ctx, r_mask, device)
        for t, j in enumerate(self.visit):
            theta = self._theta(xp, params, x, ctx, 0) if rows is None else self._theta_rows(xp, params, x, ctx, rows)
            draw = self.conditional(theta[:, j, :]).sample(r_steps[t])
            draw = draw if draw.dtype == dt else xp.astype(draw, dt)
            x[:, j] = draw if given is None else xp.where(given[:, j], x[:, j], draw)
        return x

    def _given(self, xp, n, x_init, mask, dt, device):
        """(given (n, D) bool or None, the buffer (n, D): x_init where given, 0 elsewhere)."""
        if x_init is None and mask is None:
            return None, xp.zeros((n, self.dim), dtype=dt, device=device)
        if x_init is None or mask is None:
            raise ValueError(f"x_init, mask: expected both (inpainting) or neither, got "
                             f"x_init={'None' if x_init is None else 'an array'}, "
                             f"mask={'None' if mask is None else 'an array'}")
        x_init = self._x(xp, x_init, dt, "x_init")
        check_array(mask, "mask", min_ndim=1, last_dim=self.dim, floating=False)
        if mask.dtype != xp.bool:
            raise TypeError(f"mask: expected a boolean array (True = given), got dtype {mask.dtype}")
        for name, v in (("x_init", x_init), ("mask", mask)):
            if v.ndim > 2 or (v.ndim == 2 and v.shape[0] not in (1, n)):
                raise ValueError(f"{name}: expected shape ({n}, {self.dim}) or ({self.dim},), got {tuple(v.shape)}")
        given = xp.broadcast_to(mask, (n, self.dim))
        buffer = xp.where(given, xp.broadcast_to(x_init, (n, self.dim)), xp.zeros((n, self.dim), dtype=dt,
                                                                                  device=device))
        return given, buffer

    def _choose_masks(self, xp, params, x, given, ctx, rng, device):
        """Per-row mask k (n,) int64, or None with one mask: uniform, or by p_k(given prefix) when inpainting."""
        if self.num_masks == 1:
            return None
        n = x.shape[0]
        logits = xp.zeros((n, self.num_masks), dtype=x.dtype, device=device)
        if given is not None:
            # the given prefix of each row in step order: given at step t and at every step before it
            order_given = xp.take(xp.astype(given, x.dtype), self._index(xp, self.visit, device), axis=-1)
            prefix = xp.cumulative_sum(1.0 - order_given, axis=-1) == 0.0
            per_mask = [self._mask_log_probs(xp, params, x, ctx, k) for k in range(self.num_masks)]
            steps = xp.take(xp.stack(per_mask, axis=-1), self._index(xp, self.visit, device), axis=-2)  # (n, D, M)
            logits = xp.sum(xp.where(xp.expand_dims(prefix, axis=-1), steps, 0.0), axis=-2)
        return Categorical(logits=logits, validate=False).sample(rng)

    def _theta_rows(self, xp, params, x, ctx, rows):
        """theta (n, D, P) with row r from mask rows[r]: every mask's pass, kept where chosen."""
        theta = None
        for k in range(self.num_masks):
            chosen = xp.reshape(rows == k, (-1, 1, 1))
            out = self._theta(xp, params, x, ctx, k)
            theta = out if theta is None else xp.where(chosen, out, theta)
        return theta


def _log_scaled(xp, family, x, loc, log_scale):
    """log density of a location-scale family at x from (loc, log scale s), z = (x - loc) e^-s."""
    z = (x - loc) * xp.exp(-log_scale)
    if family == "gaussian":
        return -0.5 * (z * z) - log_scale - 0.5 * LOG_2PI
    a = xp.abs(z)
    return -a - 2.0 * xp.log1p(xp.exp(-a)) - log_scale


MADE = MADEModel  # the family's public name (genblocks.blocks.nn.MADE is the masked layer it is built from)
