"""Autoregressive models: p(x) = prod_i p(x_i | x_<i), every conditional from one masked network (MADE, PixelCNN).

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
optional inpainting. Part 2 (``PixelCNN``) does the same for images with masked convolutions: a type-A
input layer, gated vertical and horizontal stacks without a blind spot, colour-channel masks, and a cached
sampler. ``genblocks.checks.check_autoregressive`` tests either network's masks with autograd's Jacobian.

Masks as an ensemble (order- and connectivity-agnostic training, Germain et al. 2015 section 3.3):
``num_masks`` masks sharing the weights. Each mask has its hidden degrees (mask 0 plain MADE's,
``genblocks.blocks.nn.made_degrees``; masks 1.. drawn from a fixed seed) and its variable order: with
``order="random"`` every mask draws its own permutation (order-agnostic), with ``"natural"`` or one
permutation all masks share it (connectivity-agnostic only), and a list of M permutations sets each mask's
order. Masks and orders are constants of the model, not parameters. Training draws one mask per batch;
evaluation averages the *probabilities* of the masks, p(x) = (1/M) sum_k p_k(x), a mixture, which is
normalised because every p_k is, whatever its order. (Averaging their logits or their log-densities is a
different object: the geometric mean of the joints sums to less than 1.) Sampling picks a mask per row and
follows that mask's order.
"""

import math

from genblocks.backends import Rng, is_traced, namespace, to_numpy
from genblocks.blocks import ops
from genblocks.blocks.base import Block, check_array, check_dtype, unpack_batch
from genblocks.blocks.distributions import (
    Bernoulli,
    Categorical,
    DiscretizedLogisticMixture,
    Logistic,
    MixtureSameFamily,
    Normal,
)
from genblocks.blocks.nn import Conv2d, Dense, MaskedDense, made_degrees
from genblocks.blocks.validate import check_choice, check_nonnegative_int, check_positive_int

LOG_2PI = math.log(2.0 * math.pi)

__all__ = ["OUTPUTS", "MADEModel", "MADE", "resolve_order", "resolve_orders", "hidden_degrees", "masks_from_degrees",
           "PIXEL_OUTPUTS", "PixelCNN", "channel_groups", "channel_mask", "horizontal_mask"]


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


def resolve_orders(dim, order, order_seed, num_masks):
    """One order per mask: a tuple of ``num_masks`` rank tuples (``resolve_order``'s convention).

    ``"random"``: mask 0 takes ``resolve_order(dim, "random", order_seed)``, mask k >= 1 the permutation of
    ``Rng(order_seed)``'s k-th child (the order-agnostic ensemble). ``"natural"`` or one permutation: the
    same order for every mask. A list (or (M, D) array) of ``num_masks`` permutations: one per mask.
    """
    if isinstance(order, str):
        first = resolve_order(dim, order, order_seed)
        if order == "natural" or num_masks == 1:
            return (first,) * num_masks
        others = [tuple(int(v) for v in to_numpy(Rng(order_seed, "numpy").split(k)[k - 1].permutation(dim)))
                  for k in range(1, num_masks)]
        return (first, *others)
    host = to_numpy(order) if hasattr(order, "shape") else order
    nested = getattr(host, "ndim", None) == 2 or (
        isinstance(host, (list, tuple)) and len(host) > 0 and all(hasattr(v, "__len__") for v in host))
    if not nested:
        return (resolve_order(dim, order),) * num_masks
    if len(host) != num_masks:
        raise ValueError(f"order: expected one permutation per mask ({num_masks} with num_masks={num_masks}), "
                         f"got {len(host)}")
    return tuple(resolve_order(dim, row) for row in host)


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
    "discretized_logistic": "x_i in {0, ..., K-1}: P = 3C, DiscretizedLogisticMixture(logits, loc, log_scale) on "
                            "[-1, 1], K bins (neighbouring levels share mass)",
}


# ---------------------------------------------------------------------------------------------------
# The model


class MADEModel(Block):
    """p(x | c) = prod_i p(x_i | x_<i, c), theta_i = MADE(x_<i, c): x (..., D) -> log p (...,).

    dim: D; hidden: hidden widths; output: one of ``OUTPUTS`` (``num_classes`` = K levels for
    "categorical", ``num_components`` = C for the mixtures); order: "natural", "random" (with
    ``order_seed``; each mask its own random order), a permutation shared by all masks, or a list of M
    permutations, one per mask (``resolve_orders``); num_masks: M masks (1 = plain MADE; ``mask_seed``
    fixes the hidden degrees of masks 1..M-1); ``orders[k]`` / ``visits[k]`` are mask k's ranks and
    generation order, ``order`` / ``visit`` mask 0's; context: ``context_dim`` (a float vector c (..., context_dim)) or
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
        if output in ("categorical", "discretized_logistic"):
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
                raise ValueError(f"num_classes: expected an int >= 2 with output={output!r}, got {num_classes!r}")
        elif num_classes is not None:
            raise ValueError(f"num_classes: only for output='categorical' or 'discretized_logistic', got "
                             f"{num_classes!r} with output={output!r}")
        self.num_classes = num_classes
        self.num_components = check_positive_int(num_components, "num_components")
        self.num_masks = check_positive_int(num_masks, "num_masks")
        self.orders = resolve_orders(dim, order, order_seed, self.num_masks)
        self.order = self.orders[0]
        self.shared_order = all(o == self.order for o in self.orders)
        self.order_seed = order_seed
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
        self.visits = tuple(tuple(sorted(range(dim), key=lambda j: o[j])) for o in self.orders)
        self.visit = self.visits[0]
        width = self.context_dim or self.context_classes
        self.nets = []  # nets[k]: the MaskedDense layers of mask k (same shapes, so they share params)
        for k in range(self.num_masks):
            masks = masks_from_degrees([r + 1 for r in self.orders[k]],
                                       hidden_degrees(dim, self.hidden, k, self.mask_seed), self.params_per_dim)
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
        if self.output.startswith("mixture") or self.output == "discretized_logistic":
            extra.append(f"num_components={self.num_components}")
        if not self.shared_order:
            extra.append("order: one per mask")
        elif self.order != tuple(range(self.dim)):
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

        theta[..., i, :] depends on x_j only where orders[k][j] < orders[k][i] (and on the context everywhere).
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
        if out == "discretized_logistic":
            C = self.num_components
            return DiscretizedLogisticMixture(theta[..., :C], theta[..., C:2 * C], self._log_scale(theta[..., 2 * C:]),
                                              num_bins=self.num_classes, validate=False)
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
        ``conditional(theta).log_prob(x)`` (log_sigmoid, log_softmax, the bins' log-masses).
        """
        out = self.output
        if out in ("bernoulli", "categorical", "discretized_logistic"):
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
        normalised marginal, so the mixture of prefixes is the mixture's marginal (only when the masks share
        the order: a prefix in one order is not a prefix in another, and its marginal needs a sum).
        """
        steps = xp.take(xp.stack(per_mask, axis=0), self._index(xp, self.visit, device), axis=-1)
        return ops.logsumexp(xp.cumulative_sum(steps, axis=-1), axis=0) - math.log(self.num_masks)

    def conditional_log_probs(self, params, x, context=None):
        """log p(x_i | x_<i, c) for every variable i: x (..., D) -> (..., D); they sum to ``log_prob``.

        With M > 1 masks these are the mixture's conditionals, log p(x_<=i) - log p(x_<i), which needs a
        shared order; masks with their own orders raise (``loss_terms`` decomposes their NLL instead).
        """
        if not self.shared_order:
            raise ValueError("order: the masks have different orders (order-agnostic), so the mixture has no "
                             "chain of conditionals in one order; use log_prob, or loss_terms for a per-dimension "
                             "decomposition")
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

        The per-dimension NLL shows which variables are hard to predict from the ones before them. With
        masks of different orders each example's NLL splits as -log p(x) = sum_i sum_k w_k (-log p_k(x_i |
        x before i in order k)) + KL(w || uniform), w_k = p_k(x) / sum_l p_l(x) the posterior over masks;
        "nll_per_dim" holds the first sum per variable and "mask_kl" (>= 0, <= log M) the second.
        """
        x, context = unpack_batch(batch)
        if self.shared_order:
            cond = self.conditional_log_probs(params, x, context)
            xp = namespace(cond)
            per_dim = -xp.mean(xp.reshape(cond, (-1, self.dim)), axis=0)
            return {"nll": xp.sum(per_dim), "nll_per_dim": per_dim}
        xp, per_mask = self._per_mask(params, x, context)
        stacked = xp.stack([xp.reshape(lp, (-1, self.dim)) for lp in per_mask], axis=0)  # (M, n, D)
        log_w = ops.log_softmax(xp.sum(stacked, axis=-1), axis=0)  # (M, n)
        w = xp.exp(log_w)
        per_dim = -xp.mean(xp.sum(xp.expand_dims(w, axis=-1) * stacked, axis=0), axis=0)
        kl = xp.mean(xp.sum(w * log_w, axis=0)) + math.log(self.num_masks)
        return {"nll": xp.sum(per_dim) + kl, "nll_per_dim": per_dim, "mask_kl": kl}

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, params, rng, n, context=None, x_init=None, mask=None):
        """x ~ p(x | c) by D sequential steps in the model's order: x_visit[t] ~ p(x_visit[t] | x_<t, c).

        Returns (n, D) in the params' dtype on their backend; every draw comes from ``rng``. With M > 1
        masks each row first picks a mask k, then takes all D steps with it, in mask k's order (``visits[k]``):
        an exact draw from the mixture. Inpainting: with ``x_init`` ((n, D) or (D,)) and a boolean ``mask``
        of the same shape (True = given), the given entries are kept exactly and the others are sampled; the
        mask k of a row is picked with probability proportional to p_k(its given prefix in order k). That is
        an exact draw from p(x_missing | x_given) when, in each row, every given entry comes before every
        missing one in every mask's order (completing a prefix); given entries later in an order are kept
        but do not inform the missing ones before them.
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
        if not self.shared_order:
            return self._sample_own_orders(xp, params, x, given, ctx, rows, r_steps, device)
        for t, j in enumerate(self.visit):
            theta = self._theta(xp, params, x, ctx, 0) if rows is None else self._theta_rows(xp, params, x, ctx, rows)
            draw = self.conditional(theta[:, j, :]).sample(r_steps[t])
            draw = draw if draw.dtype == dt else xp.astype(draw, dt)
            x[:, j] = draw if given is None else xp.where(given[:, j], x[:, j], draw)
        return x

    def _sample_own_orders(self, xp, params, x, given, ctx, rows, steps, device):
        """The D steps when row r follows its mask's order: at step t it draws variable visits[rows[r]][t]."""
        n, P = x.shape[0], self.params_per_dim
        table = xp.asarray([list(v) for v in self.visits], dtype=xp.int64, device=device)  # (M, D)
        row_visit = xp.take(table, rows, axis=0)  # (n, D): row r's generation order
        columns = xp.arange(self.dim, dtype=xp.int64, device=device)
        for t in range(self.dim):
            j = row_visit[:, t:t + 1]  # (n, 1): the variable each row draws now
            theta = self._theta_rows(xp, params, x, ctx, rows)  # (n, D, P)
            theta_j = xp.take_along_axis(theta, xp.broadcast_to(xp.expand_dims(j, axis=-1), (n, 1, P)), axis=1)
            draw = self.conditional(theta_j[:, 0, :]).sample(steps[t])
            draw = draw if draw.dtype == x.dtype else xp.astype(draw, x.dtype)
            write = columns == j  # (n, D): one True per row
            if given is not None:
                write = xp.logical_and(write, xp.logical_not(given))
            x[:, :] = xp.where(write, xp.expand_dims(draw, axis=-1), x)
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
            # per mask, the given prefix of each row in that mask's step order: given at step t and before it
            scores = []
            for k in range(self.num_masks):
                visit = self._index(xp, self.visits[k], device)
                order_given = xp.take(xp.astype(given, x.dtype), visit, axis=-1)
                prefix = xp.cumulative_sum(1.0 - order_given, axis=-1) == 0.0
                steps = xp.take(self._mask_log_probs(xp, params, x, ctx, k), visit, axis=-1)  # (n, D)
                scores.append(xp.sum(xp.where(prefix, steps, 0.0), axis=-1))
            logits = xp.stack(scores, axis=-1)
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


# ===================================================================================================
# Part 2. PixelCNN: the same chain rule over the pixels of an image, with convolutions
#
# An image x (H, W, C) with integer levels is D = H W C variables in raster order: row by row, left to
# right, and within a pixel the channels in order R -> G -> B. A masked convolution lets each output
# position see only earlier positions, so one forward pass gives all H W C conditionals, exactly as MADE
# does for a vector. Stacking 3x3 masked convolutions (van den Oord et al. 2016a) leaves a *blind spot*:
# the pixels up and to the right of (i, j) that a raster order has already generated but that no chain
# of masked kernels reaches. The gated PixelCNN (van den Oord et al. 2016b) removes it with two stacks:
#
# - the vertical stack V sees every pixel in the rows above (a (r+1) x k kernel over rows i-r..i, whose
#   output at row i-1 is handed down to row i: V(i-1, .) depends on rows <= i-1 only);
# - the horizontal stack Hh sees the current row to the left (a 1 x (r+1) kernel over columns j-r..j)
#   plus V of the row above at its own column, through a 1x1 link;
#
# each block gating both, y = tanh(a) * sigmoid(b), with a residual connection on Hh. Channels are split
# into C groups of features; at the current pixel a group-c feature may see input channels < c (mask
# "A", the first layer) and feature groups <= c (mask "B", every later layer), and the output logits of
# channel c read group c and earlier. Class conditioning adds a learned bias per class to every gate.
#
# Sampling is H W C sequential steps. The naive loop runs the whole network each step; the cached loop
# (``sample(..., cached=True)``, the "fast PixelCNN" idea) keeps every layer's activations and computes
# only what the new sub-pixel changes: one row of the vertical stack when a row is finished, and one
# column of each horizontal layer per step. Both draw the same numbers from the same generator, so they
# give the same images.


PIXEL_OUTPUTS = {
    "categorical": "x in {0, ..., L-1}: P = L logits per sub-pixel, log p = log_softmax(logits)[x]",
    "logistic_mixture": "x in {0, ..., L-1}: P = 3K, DiscretizedLogisticMixture(logits, loc, log_scale) on [-1, 1]",
}


def channel_groups(features, channels):
    """The colour group (0..C-1) of each of ``features`` feature maps: contiguous blocks of F / C."""
    size = features // channels
    return tuple(f // size for f in range(features))


def channel_mask(groups_in, groups_out, mask_type):
    """M[a, b] = [g_out(b) > g_in(a)] ("A": strictly earlier channels) or [g_out(b) >= g_in(a)] ("B").

    The mask at the current pixel: an "A" unit of channel c never sees channel c of its own pixel.
    Returns nested lists (len(groups_in), len(groups_out)).
    """
    if mask_type == "A":
        return [[1.0 if go > gi else 0.0 for go in groups_out] for gi in groups_in]
    return [[1.0 if go >= gi else 0.0 for go in groups_out] for gi in groups_in]


def horizontal_mask(radius, groups_in, groups_out, mask_type):
    """Kernel mask (1, r+1, c_in, c_out) of a 1 x (r+1) conv over columns j-r..j: the r taps to the left
    are open, the centre tap (the current pixel) gets the channel mask of ``mask_type``."""
    ones = [[1.0] * len(groups_out) for _ in groups_in]
    return [[ones] * radius + [channel_mask(groups_in, groups_out, mask_type)]]


class PixelCNN(Block):
    """p(x | y) = prod_{i, j, c} p(x[i, j, c] | x before (i, j, c) in raster order, y): x (n, H, W, C) -> (n,).

    height, width, channels (H, W, C); levels: L, x holds integers in {0, ..., L-1} (float or int arrays);
    features: F feature maps per stack (a multiple of C); num_blocks: gated residual blocks after the
    type-A input layer; kernel_size: k (odd), r = k // 2; output: one of ``PIXEL_OUTPUTS`` (``num_components``
    K for "logistic_mixture", with ``min_log_scale`` a smooth floor on its log-scales); context_classes: N
    > 0 for class conditioning (a label y in 0..N-1 per image); activation: of the output head.

    params {"input": {"v", "h", "link"}, "blocks": [{"v", "h", "link", "res"[, "cond"]}, ...], "head": [2]}.
    Pixels enter the network as 2 x / (L - 1) - 1 in [-1, 1].
    """

    def __init__(self, height, width, channels, levels, *, features=32, num_blocks=4, kernel_size=3,
                 output="categorical", num_components=5, context_classes=0, activation="relu", min_log_scale=-7.0):
        self.height = check_positive_int(height, "height")
        self.width = check_positive_int(width, "width")
        self.channels = check_positive_int(channels, "channels")
        self.levels = check_positive_int(levels, "levels")
        if levels < 2:
            raise ValueError(f"levels: expected an int >= 2, got {levels!r}")
        self.features = check_positive_int(features, "features")
        if features % channels:
            raise ValueError(f"features: expected a multiple of channels={channels} (one group of feature maps "
                             f"per colour channel), got {features}")
        self.num_blocks = check_nonnegative_int(num_blocks, "num_blocks")
        self.kernel_size = check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"kernel_size: expected an odd int >= 3, got {kernel_size!r}")
        self.output = check_choice(output, "output", tuple(PIXEL_OUTPUTS))
        self.num_components = check_positive_int(num_components, "num_components")
        self.context_classes = check_nonnegative_int(context_classes, "context_classes")
        if not (isinstance(min_log_scale, (int, float)) and math.isfinite(min_log_scale)):
            raise ValueError(f"min_log_scale: expected a finite float, got {min_log_scale!r}")
        self.min_log_scale = float(min_log_scale)
        self.activation = activation
        self.dim = height * width * channels
        self.params_per_dim = levels if output == "categorical" else 3 * self.num_components
        r, k, F, C, P = kernel_size // 2, kernel_size, features, channels, self.params_per_dim
        self.radius = r
        g_in, g_feat = tuple(range(C)), channel_groups(F, C)
        g_gate = g_feat + g_feat  # the 2F pre-activations: the tanh half and the sigmoid half
        g_out = tuple(c for c in range(C) for _ in range(P))  # output unit c P + p belongs to channel c
        v_pads, h_pads = ((r, 0), (r, r)), ((0, 0), (r, 0))  # causal: rows above, columns to the left
        self.in_v = Conv2d(C, F, (r + 1, k), padding=v_pads)
        self.in_h = Conv2d(C, F, (1, r + 1), padding=h_pads, mask=horizontal_mask(r, g_in, g_feat, "A"))
        self.in_link = Dense(F, F)
        self.v_convs = [Conv2d(F, 2 * F, (r + 1, k), padding=v_pads) for _ in range(num_blocks)]
        self.h_convs = [Conv2d(F, 2 * F, (1, r + 1), padding=h_pads, mask=horizontal_mask(r, g_feat, g_gate, "B"))
                        for _ in range(num_blocks)]
        self.links = [Dense(2 * F, 2 * F) for _ in range(num_blocks)]
        self.residuals = [MaskedDense(channel_mask(g_feat, g_feat, "B")) for _ in range(num_blocks)]
        self.conds = [Dense(self.context_classes, 4 * F, bias=False) for _ in range(num_blocks)] \
            if self.context_classes else []
        self.head = [MaskedDense(channel_mask(g_feat, g_feat, "B"), activation=activation),
                     MaskedDense(channel_mask(g_feat, g_out, "B"))]

    def __repr__(self):
        extra = "" if self.output == "categorical" else f", num_components={self.num_components}"
        extra += f", context_classes={self.context_classes}" if self.context_classes else ""
        return (f"PixelCNN(height={self.height}, width={self.width}, channels={self.channels}, levels={self.levels}, "
                f"features={self.features}, num_blocks={self.num_blocks}, kernel_size={self.kernel_size}, "
                f"output={self.output!r}{extra})")

    def init(self, rng, dtype="float32"):
        dtype = check_dtype(dtype)
        r_in, r_blocks, r_head = rng.split(3)
        a, b, c = r_in.split(3)
        params = {"input": {"v": self.in_v.init(a, dtype), "h": self.in_h.init(b, dtype),
                            "link": self.in_link.init(c, dtype)}, "blocks": []}
        for i, rb in enumerate(r_blocks.split(max(self.num_blocks, 1))[:self.num_blocks]):
            a, b, c, d, e = rb.split(5)
            block = {"v": self.v_convs[i].init(a, dtype), "h": self.h_convs[i].init(b, dtype),
                     "link": self.links[i].init(c, dtype), "res": self.residuals[i].init(d, dtype)}
            if self.context_classes:
                block["cond"] = self.conds[i].init(e, dtype)
            params["blocks"].append(block)
        params["head"] = [layer.init(rh, dtype) for layer, rh in zip(self.head, r_head.split(2))]
        return params

    # -- inputs ------------------------------------------------------------------------------------
    def _images(self, xp, x, dt, name="x", check_levels=True):
        """x (n, H, W, C) in dtype dt, checked: the shape, and (when concrete) integer levels in [0, L)."""
        check_array(x, name, ndim=4, floating=False)
        want = (self.height, self.width, self.channels)
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"{name}: expected images of shape (n, {want[0]}, {want[1]}, {want[2]}), "
                             f"got shape {tuple(x.shape)}")
        x = x if x.dtype == dt else xp.astype(x, dt)
        if check_levels and not is_traced(x):
            ok = xp.logical_and(xp.logical_and(x >= 0.0, x <= self.levels - 1.0), xp.floor(x) == x)
            if not bool(to_numpy(xp.all(ok))):
                host = to_numpy(x)[~to_numpy(ok)]
                raise ValueError(f"{name}: expected integer levels in [0, {self.levels}), got values "
                                 f"{sorted({float(v) for v in host})[:5]}")
        return x

    def _onehot(self, xp, context, n, dt, device):
        """The class labels as one-hot rows (n, N), or None without class conditioning."""
        if not self.context_classes:
            if context is not None:
                raise ValueError("context: this PixelCNN was built without classes (context_classes=0), "
                                 "but a context was given")
            return None
        if context is None:
            raise ValueError(f"context: this PixelCNN expects an integer class label in 0..{self.context_classes - 1} "
                             f"per image, got None")
        if not hasattr(context, "shape"):
            context = xp.asarray(context, device=device)
        labels = xp.astype(context, dt)
        if labels.ndim == 0:
            labels = xp.broadcast_to(labels, (n,))
        if tuple(labels.shape) != (n,):
            raise ValueError(f"context: expected one label per image, shape ({n},), got shape {tuple(labels.shape)}")
        ok = xp.logical_and(xp.logical_and(labels >= 0, labels <= self.context_classes - 1),
                            xp.floor(labels) == labels)
        if not bool(to_numpy(xp.all(ok))):
            raise ValueError(f"context: expected integer class labels in 0..{self.context_classes - 1}, got values "
                             f"{sorted({float(v) for v in to_numpy(labels)[~to_numpy(ok)]})[:5]}")
        classes = xp.arange(self.context_classes, dtype=dt, device=device)
        return xp.astype(xp.expand_dims(labels, axis=-1) == classes, dt)

    def _scale(self, x):
        """Levels {0..L-1} -> [-1, 1]: 2 x / (L - 1) - 1."""
        return x * (2.0 / (self.levels - 1)) - 1.0

    # -- the network ------------------------------------------------------------------------------
    def _gate(self, a):
        """tanh(a[..., :F]) * sigmoid(a[..., F:]): (..., 2F) -> (..., F); one fused primitive on numpy."""
        return namespace(a).gated_tanh(a)

    def _conds(self, xp, params, onehot):
        """Per block, the class biases (b_v, b_h), each (n, 1, 1, 2F), or None."""
        if onehot is None:
            return [(None, None)] * self.num_blocks
        out, F = [], self.features
        for layer, p in zip(self.conds, params["blocks"]):
            e = layer.apply(p["cond"], onehot)
            e = xp.reshape(e, (e.shape[0], 1, 1, 4 * F))
            out.append((e[..., :2 * F], e[..., 2 * F:]))
        return out

    def _head(self, params, h):
        """theta (n, H', W', C, P) from the last horizontal features h (n, H', W', F)."""
        xp = namespace(h)
        a = self.head[1].apply(params["head"][1], self.head[0].apply(params["head"][0], ops.get_activation(
            self.activation)(h)))
        return xp.reshape(a, tuple(a.shape[:-1]) + (self.channels, self.params_per_dim))

    def network_outputs(self, params, x, context=None):
        """theta (n, H, W, C, P): the parameters of every conditional, in one pass (teacher forcing).

        theta[:, i, j, c] depends on x only at sub-pixels before (i, j, c) in raster-then-channel order.
        x (n, H, W, C): levels as floats (not checked for integrality, so autograd can differentiate).
        """
        self.check_params(params)
        xp = namespace(params, x)
        dt = params["head"][0]["W"].dtype
        x = self._images(xp, x, dt, check_levels=False)
        onehot = self._onehot(xp, context, x.shape[0], dt, xp.device_of(params["head"][0]["W"]))
        return self._forward(xp, params, x, onehot)

    def _forward(self, xp, params, x, onehot):
        u = self._scale(x)
        pin = params["input"]
        v = self.in_v.apply(pin["v"], u)  # V(i, .) sees rows <= i (the conv pads r rows above, r columns each side)
        h = self.in_h.apply(pin["h"], u) + self.in_link.apply(pin["link"], _down(xp, v))  # pads r columns left
        for i, (p, (cond_v, cond_h)) in enumerate(zip(params["blocks"], self._conds(xp, params, onehot))):
            a_v = self.v_convs[i].apply(p["v"], v)
            if cond_v is not None:
                a_v = a_v + cond_v
            a_h = self.h_convs[i].apply(p["h"], h) + self.links[i].apply(p["link"], _down(xp, a_v))
            if cond_h is not None:
                a_h = a_h + cond_h
            v = self._gate(a_v)
            h = h + self.residuals[i].apply(p["res"], self._gate(a_h))
        return self._head(params, h)

    # -- the conditionals ---------------------------------------------------------------------------
    def _log_scale(self, raw):
        return self.min_log_scale + ops.softplus(raw - self.min_log_scale)

    def conditional(self, theta):
        """The conditionals as one Distribution with batch shape theta.shape[:-1], from theta (..., P)."""
        if self.output == "categorical":
            return Categorical(logits=theta, validate=False)
        K = self.num_components
        return DiscretizedLogisticMixture(theta[..., :K], theta[..., K:2 * K], self._log_scale(theta[..., 2 * K:]),
                                          num_bins=self.levels, validate=False)

    def _log_probs(self, params, x, context):
        """log p(x[i, j, c] | earlier sub-pixels, y) for every sub-pixel: (n, H, W, C)."""
        self.check_params(params)
        xp = namespace(params, x, context)
        W = params["head"][0]["W"]
        x = self._images(xp, x, W.dtype)
        onehot = self._onehot(xp, context, x.shape[0], W.dtype, xp.device_of(W))
        theta = self._forward(xp, params, x, onehot)
        if self.output == "categorical":  # logits[x] - logsumexp(logits), one fused pass (x checked above)
            return xp.log_softmax_take(theta, xp.astype(x, xp.int64))
        return self.conditional(theta).log_prob(x)

    def log_prob(self, params, x, context=None):
        """log p(x | y) = sum_{i, j, c} log p(x[i, j, c] | x_<(i, j, c), y): x (n, H, W, C) -> (n,), one pass."""
        lp = self._log_probs(params, x, context)
        return namespace(lp).sum(lp, axis=(1, 2, 3))

    def loss(self, params, batch, rng=None):
        """Mean NLL in nats per image; batch = x (n, H, W, C) or (x, labels)."""
        x, context = unpack_batch(batch)
        xp = namespace(params, x)
        return -xp.mean(self.log_prob(params, x, context))

    def loss_terms(self, params, batch, rng=None):
        """{"nll": mean NLL per image, "nll_per_dim": (H, W, C) mean -log p per sub-pixel}; they add up.

        The map of nll_per_dim shows where the model is unsure: the first pixel, the stroke edges.
        """
        x, context = unpack_batch(batch)
        lp = self._log_probs(params, x, context)
        xp = namespace(lp)
        per_dim = -xp.mean(lp, axis=0)
        return {"nll": xp.sum(per_dim), "nll_per_dim": per_dim}

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, params, rng, n, context=None, x_init=None, mask=None, cached=False):
        """x ~ p(x | y) by H W C sequential steps in raster-then-channel order: (n, H, W, C) levels as floats.

        Step t = (i W + j) C + c draws x[:, i, j, c] from its conditional with ``rng``'s t-th child, into one
        buffer reused by every step. ``cached=False`` runs the whole network each step; ``cached=True``
        keeps every layer's activations and recomputes only what the new sub-pixel changes (one row of the
        vertical stack per image row, one column of each horizontal layer per step): the same draws, the
        same images. Inpainting: ``x_init`` ((n, H, W, C) or (H, W, C) levels) and a boolean ``mask`` of the
        same shape (True = given) keep the given sub-pixels and sample the others; an exact draw from
        p(missing | given) when the given ones come first in raster order (e.g. the top half of an image).
        ``context``: n class labels (or one) for a class-conditional model.
        """
        self.check_params(params)
        check_positive_int(n, "n")
        xp = namespace(params, context, x_init, mask)
        W = params["head"][0]["W"]
        dt, device = W.dtype, xp.device_of(W)
        onehot = self._onehot(xp, context, n, dt, device)
        given, x = self._given(xp, n, x_init, mask, dt, device)
        steps = rng.split(self.dim)
        if cached:
            return self._sample_cached(xp, params, x, given, onehot, steps)
        H, Wd, C = self.height, self.width, self.channels
        for i in range(H):
            for j in range(Wd):
                for c in range(C):
                    theta = self._forward(xp, params, x, onehot)[:, i, j, c, :]
                    self._draw(xp, x, given, theta, steps[(i * Wd + j) * C + c], i, j, c)
        return x

    def _draw(self, xp, x, given, theta, rng, i, j, c):
        """x[:, i, j, c] <- a draw from the conditional theta (n, P), kept where given; returns the new column."""
        draw = self.conditional(theta).sample(rng)
        draw = draw if draw.dtype == x.dtype else xp.astype(draw, x.dtype)
        if given is not None:
            draw = xp.where(given[:, i, j, c], x[:, i, j, c], draw)
        x[:, i, j, c] = draw
        return draw

    def _given(self, xp, n, x_init, mask, dt, device):
        """(given (n, H, W, C) bool or None, the buffer: x_init where given, 0 elsewhere)."""
        shape = (n, self.height, self.width, self.channels)
        if x_init is None and mask is None:
            return None, xp.zeros(shape, dtype=dt, device=device)
        if x_init is None or mask is None:
            raise ValueError(f"x_init, mask: expected both (inpainting) or neither, got "
                             f"x_init={'None' if x_init is None else 'an array'}, "
                             f"mask={'None' if mask is None else 'an array'}")
        for name, v in (("x_init", x_init), ("mask", mask)):
            check_array(v, name, min_ndim=3, floating=False)
            if tuple(v.shape[-3:]) != shape[1:] or v.ndim > 4 or (v.ndim == 4 and v.shape[0] not in (1, n)):
                raise ValueError(f"{name}: expected shape {shape} or {shape[1:]}, got {tuple(v.shape)}")
        if mask.dtype != xp.bool:
            raise TypeError(f"mask: expected a boolean array (True = given), got dtype {mask.dtype}")
        given = xp.broadcast_to(mask if mask.ndim == 4 else xp.expand_dims(mask, axis=0), shape)
        x_init = x_init if x_init.ndim == 4 else xp.expand_dims(x_init, axis=0)
        x_init = xp.broadcast_to(x_init if x_init.dtype == dt else xp.astype(x_init, dt), shape)
        buffer = xp.where(given, x_init, xp.zeros(shape, dtype=dt, device=device))
        self._images(xp, buffer, dt, "x_init")  # given levels must be valid (the rest is 0)
        return given, buffer

    def _sample_cached(self, xp, params, x, given, onehot, steps):
        """The cached loop: every layer's activations kept in padded buffers, updated where they change.

        Before row i: the vertical stack's row i-1 (its inputs, rows <= i-1, are final), and from it the
        links into row i. At step (i, j, c): column j of the input layer and of every horizontal layer,
        from the cached columns j-r..j-1 and the link at column j; then the head at (i, j) only.
        """
        H, Wd, C, F, r = self.height, self.width, self.channels, self.features, self.radius
        n, dt, device = x.shape[0], x.dtype, xp.device_of(x)
        pin, blocks = params["input"], params["blocks"]
        conds = self._conds(xp, params, onehot)
        u = _pad(xp, self._scale(x), r, r, r)  # the scaled image, padded like the full pass pads it
        vstack = [xp.zeros((n, H + r, Wd + 2 * r, F), dtype=dt, device=device) for _ in range(self.num_blocks)]
        zero_f = xp.zeros((n, 1, Wd, F), dtype=dt, device=device)
        zero_2f = xp.zeros((n, 1, Wd, 2 * F), dtype=dt, device=device)
        for i in range(H):
            # the vertical stack at row i-1 and the links it sends down to row i
            if i == 0:
                link_in = self.in_link.apply(pin["link"], zero_f)
                links = [self.links[b].apply(p["link"], zero_2f) for b, p in enumerate(blocks)]
            else:
                v = self.in_v.apply(pin["v"], u[:, i - 1:i + r, :, :], padding="valid")
                link_in = self.in_link.apply(pin["link"], v)
                links = []
                for b, p in enumerate(blocks):
                    vstack[b][:, i - 1 + r, r:r + Wd, :] = v[:, 0, :, :]
                    a_v = self.v_convs[b].apply(p["v"], vstack[b][:, i - 1:i + r, :, :], padding="valid")
                    if conds[b][0] is not None:
                        a_v = a_v + conds[b][0]
                    links.append(self.links[b].apply(p["link"], a_v))
                    v = self._gate(a_v)
            # the horizontal stack along row i: one column per step
            hrow = [xp.zeros((n, 1, Wd + r, F), dtype=dt, device=device) for _ in range(self.num_blocks)]
            for j in range(Wd):
                for c in range(C):
                    h = self.in_h.apply(pin["h"], u[:, i + r:i + r + 1, j:j + r + 1, :], padding="valid") \
                        + link_in[:, :, j:j + 1, :]
                    for b, p in enumerate(blocks):
                        hrow[b][:, :, j + r, :] = h[:, :, 0, :]
                        a_h = self.h_convs[b].apply(p["h"], hrow[b][:, :, j:j + r + 1, :], padding="valid") \
                            + links[b][:, :, j:j + 1, :]
                        if conds[b][1] is not None:
                            a_h = a_h + conds[b][1]
                        h = h + self.residuals[b].apply(p["res"], self._gate(a_h))
                    theta = self._head(params, h)[:, 0, 0, c, :]
                    draw = self._draw(xp, x, given, theta, steps[(i * Wd + j) * C + c], i, j, c)
                    u[:, i + r, j + r, c] = self._scale(draw)
        return x


def _pad(xp, a, top, left, right):
    """Zero-pad NHWC feature maps: ``top`` rows above, ``left`` / ``right`` columns at the sides."""
    n, H, W, F = a.shape
    if left or right:
        parts = [xp.zeros((n, H, left, F), dtype=a.dtype, device=xp.device_of(a))] if left else []
        parts.append(a)
        if right:
            parts.append(xp.zeros((n, H, right, F), dtype=a.dtype, device=xp.device_of(a)))
        a = xp.concat(parts, axis=2)
    if top:
        a = xp.concat([xp.zeros((n, top, W + left + right, F), dtype=a.dtype, device=xp.device_of(a)), a], axis=1)
    return a


def _down(xp, a):
    """Row i gets row i-1 (row 0 gets zeros): what the vertical stack hands to the horizontal one."""
    n, _, W, F = a.shape
    return xp.concat([xp.zeros((n, 1, W, F), dtype=a.dtype, device=xp.device_of(a)), a[:, :-1, :, :]], axis=1)
