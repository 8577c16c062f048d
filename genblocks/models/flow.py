"""Normalizing flows: exact log-likelihood by the change of variables.

A flow pushes base noise z ~ p_Z through an invertible map f (a bijector): x = f(z). Its density is

    log p(x) = log p_Z(f^-1(x)) + log|det d f^-1 / dx|,

which :class:`Flow` computes with ``bijector.inverse`` (data -> noise); sampling runs ``bijector.forward``
(noise -> data). Training minimises the mean negative log-likelihood of the data. The families differ only
in the bijector they stack (``genblocks.blocks.bijectors``):

- ``real_nvp``: affine couplings with alternating masks (Dinh et al. 2017);
- ``glow``: per step ActNorm + LU linear + affine coupling (Kingma & Dhariwal 2018), on vectors;
- ``maf`` / ``iaf``: masked autoregressive layers (Papamakarios et al. 2017; Kingma et al. 2016) - MAF
  evaluates densities in one pass and samples in D, IAF the other way round;
- ``neural_spline_flow``: rational-quadratic spline couplings or autoregressive layers (Durkan et al. 2019).

Integer data (images) is dequantized with ``genblocks.data.uniform_dequantize``: the recipes
``genblocks.train.recipes.dequantized_loss`` (fresh noise every step) and ``dequantized_nll`` (the bound on the
discrete NLL in nats per example and bits per dimension) join a flow to that data.
"""


from genblocks.backends import namespace, namespace_of
from genblocks.blocks import bijectors as bj
from genblocks.blocks.base import Block, Distribution, check_array, check_dtype, params_dtype, unpack_batch
from genblocks.blocks.distributions import Independent, Normal
from genblocks.blocks.validate import check_positive_int

__all__ = [
    "StandardNormal", "Flow", "real_nvp", "glow", "maf", "iaf", "neural_spline_flow",
]


# ---------------------------------------------------------------------------------------------------
# The base distribution


class StandardNormal(Block):
    """p_Z(z) = N(z; 0, I_dim): log p = -|z|^2 / 2 - dim log(2 pi) / 2.

    A parameter-free base block: ``log_prob(params, z)`` with z (..., dim) -> (...,);
    ``sample(params, rng, n, dtype=...)`` -> (n, dim) on ``rng``'s backend.
    """

    def __init__(self, dim):
        self.dim = check_positive_int(dim, "dim")

    def _dist(self, xp, like_dtype, device, shape):
        loc = xp.zeros(shape, dtype=like_dtype, device=device)
        return Independent(Normal(loc, loc + 1.0, validate=False), 1, validate=False)

    def log_prob(self, params, z, context=None):
        check_array(z, "z", min_ndim=1, last_dim=self.dim)
        xp = namespace(z)
        return self._dist(xp, z.dtype, xp.device_of(z), (self.dim,)).log_prob(z)

    def sample(self, params, rng, n, context=None, dtype="float32"):
        xp = namespace_of(rng.backend)
        dist = self._dist(xp, getattr(xp, check_dtype(dtype)), None, (self.dim,))
        return dist.sample(rng, (n,))


class _FixedBase(Block):
    """A fixed genblocks Distribution (event shape (dim,)) used as a flow's base."""

    def __init__(self, dist):
        if len(dist.event_shape) != 1:
            raise ValueError(f"base: expected a distribution over vectors (event_shape (dim,)), got event_shape "
                             f"{dist.event_shape}; wrap it with Independent(dist, 1)")
        self.dist = dist
        self.dim = dist.event_shape[0]

    def log_prob(self, params, z, context=None):
        return self.dist.log_prob(z)

    def sample(self, params, rng, n, context=None, dtype="float32"):
        return self.dist.sample(rng, (n,))


def _as_base(base):
    if isinstance(base, int) and not isinstance(base, bool):
        return StandardNormal(base)
    if isinstance(base, Distribution):
        return _FixedBase(base)
    if all(hasattr(base, name) for name in ("init", "log_prob", "sample")):
        return base
    raise TypeError(f"base: expected a dim (int), a genblocks Distribution or a base Block with init, log_prob "
                    f"and sample, got {type(base).__name__}")




# ---------------------------------------------------------------------------------------------------
# The model


class Flow(Block):
    """log p(x | c) = log p_Z(f^-1(x; c)) + log|det d f^-1(x; c) / dx|, samples x = f(z; c), z ~ p_Z.

    base: a dim (int) for N(0, I), a genblocks Distribution with event shape (dim,), or a base Block;
    bijector: the map f (noise -> data). x (..., dim), context (..., context_dim) or None.
    params {"base": ..., "bijector": ...}; state (``init_state``) {"bijector": ...} holds what is updated but
    not trained (BatchNormFlow's running statistics). Train a flow with state by
    ``fit(flow.loss_and_state, params, x, rng, opt, steps, state=flow.init_state(params))`` and evaluate or
    sample with ``state=result.state``.

    float32 error budget: on every backend, ``log_prob`` in float32 agrees per point with the float64
    ``log_prob`` of the same float32-rounded params and points to |lp32 - lp64| <= 2e-3 dim (1 + |lp64|)
    wherever |lp64| <= 1e3 (tested for neural_spline_flow and real_nvp with perturbed params, on points inside,
    at and just outside the spline bound and a few far ones; measured worst 8.1e-4 and 3.2e-4 of that scale).
    Beyond |lp64| ~ 1e3 a layer that amplifies by e^k cancels large shifts in float32 (x_b - t(x_a)), an
    error of the float32 inputs' conditioning that float32 cannot avoid; use float64 there.
    """

    def __init__(self, base, bijector):
        self.base = _as_base(base)
        if not (hasattr(bijector, "forward") and hasattr(bijector, "inverse")):
            raise TypeError(f"bijector: expected a Bijector, got {type(bijector).__name__}")
        self.bijector = bijector
        self.dim = getattr(self.base, "dim", None)

    def __repr__(self):
        return f"Flow(base={self.base!r}, bijector={self.bijector!r})"

    def init(self, rng, dtype="float32"):
        check_dtype(dtype)
        r1, r2 = rng.split(2)
        return {"base": self.base.init(r1, dtype), "bijector": self.bijector.init(r2, dtype)}

    def init_state(self, params=None, dtype="float32"):
        """{"bijector": the bijector's state} (running statistics of BatchNormFlow layers; ``{}`` leaves elsewhere).

        Kept beside ``init``'s params rather than returned by ``init`` so that ``init -> params`` stays the
        protocol of every block; ``params`` (optional) sets the backend and dtype.
        """
        check_dtype(dtype)
        return {"bijector": bj.init_state_of(self.bijector, None if params is None else params["bijector"], dtype)}

    def _bstate(self, state):
        if state is None:
            return None
        if not isinstance(state, dict) or "bijector" not in state:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state: expected {{'bijector': ...}} from Flow.init_state, got {got}")
        return state["bijector"]

    def _check_x(self, x):
        check_array(x, "x", min_ndim=1, last_dim=self.dim)
        return x

    # -- densities ---------------------------------------------------------------------------------
    def log_prob(self, params, x, context=None, *, training=False, state=None):
        """log p(x | context): x (..., dim) -> (...,). ``training=True`` lets BatchNormFlow use batch stats;
        otherwise BatchNormFlow layers use the running statistics in ``state`` (``init_state`` / fit's)."""
        self.check_params(params)
        self._check_x(x)
        z, log_det = bj.call_bijector(self.bijector, "inverse", params["bijector"], x, context, training,
                                      self._bstate(state))
        return self.base.log_prob(params["base"], z, context) + log_det

    def loss(self, params, batch, rng=None, *, training=True, state=None):
        """Mean negative log-likelihood in nats per example; batch = x (n, dim) or (x, context).

        ``training=True`` (the default) lets BatchNormFlow layers use the batch's statistics; pass
        ``training=False, state=...`` to evaluate held-out data with their running statistics. To train a
        flow with BatchNormFlow use ``loss_and_state``, which also moves the running statistics.
        """
        x, context = unpack_batch(batch)
        xp = namespace(x, params)
        return -xp.mean(self.log_prob(params, x, context, training=training, state=state))

    def loss_and_state(self, params, state, batch, rng=None):
        """(training loss, new_state): the mean NLL with batch statistics, and the state with every
        BatchNormFlow's running statistics moved towards this batch's (by its momentum). Pure."""
        x, context = unpack_batch(batch)
        self._check_x(x)
        xp = namespace(x, params)
        z, log_det, new = bj.inverse_and_update(self.bijector, params["bijector"], x, context, self._bstate(state))
        return -xp.mean(self.base.log_prob(params["base"], z, context) + log_det), {**state, "bijector": new}

    def loss_terms(self, params, batch, rng=None, *, training=True, state=None):
        """The decomposition a teacher shows: mean NLL = -(mean base log-prob + sum of layer log-dets).

        Returns {"loss", "base_log_prob", "log_det" (total), "layer_log_dets" (list, chain order)}, batch means.
        """
        x, context = unpack_batch(batch)
        self.check_params(params)
        self._check_x(x)
        xp = namespace(x, params)
        if isinstance(self.bijector, bj.Chain):
            z, terms = self.bijector.inverse_terms(params["bijector"], x, context, training=training,
                                                   state=self._bstate(state))
        else:
            z, ld = bj.call_bijector(self.bijector, "inverse", params["bijector"], x, context, training,
                                     self._bstate(state))
            terms = [ld]
        base = xp.mean(self.base.log_prob(params["base"], z, context))
        layer = [xp.mean(t) for t in terms]
        total = sum(layer[1:], layer[0]) if layer else base * 0.0
        return {"loss": -(base + total), "base_log_prob": base, "log_det": total, "layer_log_dets": layer}

    # -- sampling ----------------------------------------------------------------------------------
    def sample(self, params, rng, n, context=None, *, dtype=None, state=None):
        """x = f(z; context), z ~ p_Z: n samples (n, dim) on ``rng``'s backend (context broadcast to n).

        A flow with BatchNormFlow layers needs ``state`` (their running statistics)."""
        z = self._base_sample(params, rng, n, dtype)
        x, _ = bj.call_bijector(self.bijector, "forward", params["bijector"], z, _context_for(z, context),
                                False, self._bstate(state))
        return x

    def sample_and_log_prob(self, params, rng, n, context=None, *, dtype=None, state=None):
        """(x, log p(x)) from one forward pass: log p(x) = log p_Z(z) - log|det df/dz|."""
        z = self._base_sample(params, rng, n, dtype)
        context = _context_for(z, context)
        x, log_det = bj.call_bijector(self.bijector, "forward", params["bijector"], z, context, False,
                                      self._bstate(state))
        return x, self.base.log_prob(params["base"], z, context) - log_det

    def sample_path(self, params, rng, n, context=None, *, dtype=None, state=None):
        """[z, f_1(z), f_2(f_1(z)), ..., x]: n base draws and where each layer of the flow moves them.

        For a ``Chain`` bijector f = f_L o ... o f_1 the list has L + 1 arrays (n, dim), from noise to data;
        any other bijector gives [z, f(z)]. The last entry is what ``sample`` returns for the same ``rng``.
        The path a flow takes from noise to data, one layer at a time (the demo's picture draws it).
        """
        z = self._base_sample(params, rng, n, dtype)
        context = _context_for(z, context)
        bstate = self._bstate(state)
        if not isinstance(self.bijector, bj.Chain):
            x, _ = bj.call_bijector(self.bijector, "forward", params["bijector"], z, context, False, bstate)
            return [z, x]
        states = self.bijector._states(bstate)
        path = [z]
        for layer, p, s in zip(self.bijector.bijectors, params["bijector"], states):
            x, _ = bj.call_bijector(layer, "forward", p, path[-1], context, False, s)
            path.append(x)
        return path

    def _base_sample(self, params, rng, n, dtype):
        self.check_params(params)  # sample and sample_and_log_prob come through here
        check_positive_int(n, "n")
        dtype = params_dtype(params) if dtype is None else check_dtype(dtype)
        return self.base.sample(params["base"], rng, n, dtype=dtype)

    # -- data-dependent parameters -----------------------------------------------------------------
    def init_from_data(self, params, x, context=None):
        """New params with every ActNorm set from the batch x (..., dim) as it reaches that layer."""
        return self._data_pass(params, x, "init_from_data", context)

    def update_stats(self, params, state, x, context=None):
        """New state with every BatchNormFlow's running statistics moved towards those of batch x."""
        self._check_x(x)
        return self.loss_and_state(params, state, x if context is None else (x, context))[1]

    def _data_pass(self, params, x, method, context):
        self._check_x(x)
        b, p = self.bijector, params["bijector"]
        if isinstance(b, bj.Chain):
            p = b.data_pass(p, x, method, context)
        elif hasattr(b, method):
            p = getattr(b, method)(p, x)
        return {**params, "bijector": p}




def _context_for(z, context):
    """The context broadcast to the n samples: (context_dim,) or (n, context_dim) -> (n, context_dim)."""
    if context is None:
        return None
    xp = namespace(context)
    check_array(context, "context", min_ndim=1)
    return xp.broadcast_to(context, (z.shape[0], context.shape[-1]))


# ---------------------------------------------------------------------------------------------------
# Factories



def real_nvp(dim, *, layers=6, hidden=(64, 64), context_dim=0, activation="relu", log_scale_bound=3.0,
             batch_norm=False, actnorm=True):
    """RealNVP: affine couplings with alternating masks, x = f_L o ... o f_1(z), z ~ N(0, I_dim).

    ``actnorm`` puts an ActNorm on the data side (call ``flow.init_from_data`` before training);
    ``batch_norm`` puts a BatchNormFlow between couplings. Returns a :class:`Flow` over (..., dim).
    """
    layers = check_positive_int(layers, "layers")
    parts = []
    for i in range(layers):
        if batch_norm and i:
            parts.append(bj.BatchNormFlow(dim))
        parts.append(bj.AffineCoupling(bj.coupling_mask(dim, flip=i % 2 == 1), hidden=hidden,
                                       context_dim=context_dim, activation=activation,
                                       log_scale_bound=log_scale_bound))
    if actnorm:
        parts.append(bj.ActNorm(dim))
    return Flow(dim, bj.Chain(parts))


def glow(dim, *, steps=4, hidden=(64, 64), context_dim=0, activation="relu", log_scale_bound=3.0):
    """Glow on vectors: each step (data -> noise) is ActNorm, LU linear ("1x1 conv"), affine coupling.

    Call ``flow.init_from_data`` on a batch before training. Returns a :class:`Flow` over (..., dim).
    """
    steps = check_positive_int(steps, "steps")
    parts = []
    for i in range(steps):
        # chain order is noise -> data, so the data-side ActNorm of a step comes last
        parts += [
            bj.AffineCoupling(bj.coupling_mask(dim, kind="half", flip=i % 2 == 1), hidden=hidden,
                              context_dim=context_dim, activation=activation, log_scale_bound=log_scale_bound),
            bj.LULinear(dim),
            bj.ActNorm(dim),
        ]
    return Flow(dim, bj.Chain(parts))


def _orders(dim, layers):
    forward, backward = tuple(range(dim)), tuple(reversed(range(dim)))
    return [forward if i % 2 == 0 else backward for i in range(layers)]


def maf(dim, *, layers=5, hidden=(64, 64), context_dim=0, activation="relu", log_scale_bound=3.0,
        batch_norm=False, actnorm=True):
    """MAF: masked autoregressive layers with alternating variable orders (one-pass density, D-pass sampling).

    Returns a :class:`Flow` over (..., dim).
    """
    layers = check_positive_int(layers, "layers")
    parts = []
    for i, order in enumerate(_orders(dim, layers)):
        if batch_norm and i:
            parts.append(bj.BatchNormFlow(dim))
        parts.append(bj.MaskedAutoregressive(dim, hidden=hidden, context_dim=context_dim, activation=activation,
                                             order=order, log_scale_bound=log_scale_bound))
    if actnorm:
        parts.append(bj.ActNorm(dim))
    return Flow(dim, bj.Chain(parts))


def iaf(dim, *, layers=5, hidden=(64, 64), context_dim=0, activation="relu", log_scale_bound=3.0):
    """IAF: inverse autoregressive layers (one-pass sampling and sample log-density, D-pass density of data).

    Suited to variational posteriors. Returns a :class:`Flow` over (..., dim).
    """
    layers = check_positive_int(layers, "layers")
    parts = [bj.InverseAutoregressive(dim, hidden=hidden, context_dim=context_dim, activation=activation,
                                      order=order, log_scale_bound=log_scale_bound)
             for order in _orders(dim, layers)]
    return Flow(dim, bj.Chain(parts))


def neural_spline_flow(dim, *, layers=4, bins=8, bound=3.0, hidden=(64, 64), kind="coupling", context_dim=0,
                       activation="relu", linear=True, actnorm=True):
    """Neural spline flow: rational-quadratic spline couplings (kind="coupling") or autoregressive layers
    (kind="autoregressive"), K = ``bins`` bins on [-bound, bound], identity tails.

    ``linear`` adds an LU linear layer before each spline layer (as in the paper); ``actnorm`` an ActNorm on
    the data side (call ``flow.init_from_data`` before training). Returns a :class:`Flow` over (..., dim).
    """
    layers = check_positive_int(layers, "layers")
    if kind not in ("coupling", "autoregressive"):
        raise ValueError(f"kind: expected 'coupling' or 'autoregressive', got {kind!r}")
    if kind == "coupling" and dim < 2:
        raise ValueError(f"dim: a coupling flow needs dim >= 2, got {dim}; use kind='autoregressive'")
    parts = []
    for i, order in enumerate(_orders(dim, layers)):
        if kind == "coupling":
            parts.append(bj.SplineCoupling(bj.coupling_mask(dim, flip=i % 2 == 1), bins=bins, bound=bound,
                                           hidden=hidden, context_dim=context_dim, activation=activation))
        else:
            parts.append(bj.SplineAutoregressive(dim, bins=bins, bound=bound, hidden=hidden,
                                                 context_dim=context_dim, activation=activation, order=order))
        if linear and dim > 1:
            parts.append(bj.LULinear(dim))
    if actnorm:
        parts.append(bj.ActNorm(dim))
    return Flow(dim, bj.Chain(parts))
