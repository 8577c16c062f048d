"""``Rng``: an explicit, splittable random generator for every backend.

There is no global random state anywhere in genblocks: every function that draws takes an ``Rng``.
Draws are made by numpy's PCG64 on the host for the numpy and strict backends (so the two give the
same numbers for the same seed) and by cupy's generator on the GPU for the cupy backend.
Same seed, same backend, same sequence of calls: same numbers.
"""

import numpy as onp

from .registry import backend_of, get_backend, namespace_of, record


def _check_shape(shape, name="shape"):
    if isinstance(shape, int):
        shape = (shape,)
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{name}: expected an int or a tuple of ints, got {shape!r}") from None
    if any(s < 0 for s in shape):
        raise ValueError(f"{name}: expected non-negative sizes, got {shape}")
    return shape


def float_dtype_name(dtype):
    """"float32" or "float64" for a dtype given as a string or any backend's dtype object; ValueError otherwise."""
    name = getattr(dtype, "name", None) or str(dtype).rsplit(".", 1)[-1]
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {dtype!r}")
    return name


class Rng:
    """A random generator bound to a backend: ``Rng(seed, backend=None)``.

    ``seed`` is a non-negative int (or a numpy ``SeedSequence``); ``backend`` defaults to the current
    default backend. ``split(n)`` returns ``n`` independent children, so code can hand one to each
    consumer without sharing a stream.

    On cupy the numbers come from cupy's own generator on the GPU, so they differ from numpy's for the
    same seed. ``host_draws=True`` draws them on the host with numpy's PCG64 instead and copies each
    draw to the GPU: the same numbers as ``Rng(seed, "numpy")`` (to reproduce a CPU run on the GPU, or to
    test that GPU code computes what CPU code computes), at the price of a host-to-device copy per draw.
    On numpy and strict the host generator is the only one, and ``host_draws`` changes nothing.
    """

    def __init__(self, seed, backend=None, *, host_draws=False):
        if isinstance(seed, onp.random.SeedSequence):
            self._seq = seed
        else:
            if isinstance(seed, bool) or not isinstance(seed, (int, onp.integer)) or seed < 0:
                raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
            self._seq = onp.random.SeedSequence(int(seed))
        self.backend = record(get_backend() if backend is None else backend).name
        if not isinstance(host_draws, bool):
            raise TypeError(f"host_draws: expected True or False, got {host_draws!r}")
        self.host_draws = host_draws
        self._host = onp.random.Generator(onp.random.PCG64(self._seq))
        self._device = None
        if self.backend == "cupy" and not host_draws:
            from .cupy_backend import load_cupy

            cupy = load_cupy()
            self._device = cupy.random.default_rng(int(self._seq.generate_state(1, onp.uint64)[0]))

    def __repr__(self):
        extra = ", host_draws=True" if self.host_draws else ""
        return f"Rng(entropy={self._seq.entropy}, spawn_key={self._seq.spawn_key}, backend={self.backend!r}{extra})"

    @property
    def xp(self):
        """The array namespace of this generator's backend (for creating parameters in ``init``)."""
        return namespace_of(self.backend)

    # -- plumbing ------------------------------------------------------------------------------
    def _out(self, a):
        name = backend_of(a)
        if name == self.backend:
            return a
        return record(self.backend).from_host(onp.asarray(a) if name is None else record(name).to_host(a))

    def _gen(self):
        return self._device if self._device is not None else self._host

    def split(self, n=2):
        """``n`` independent child generators on the same backend."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        return [Rng(s, self.backend, host_draws=self.host_draws) for s in self._seq.spawn(n)]

    def state(self):
        """A JSON-serialisable snapshot of the host generator (numpy, strict, and cupy with host_draws)."""
        if self._device is not None:
            raise NotImplementedError("state: cupy generators cannot be snapshotted; keep the seed instead, "
                                      "or use Rng(seed, 'cupy', host_draws=True)")
        st = self._host.bit_generator.state
        return {
            "backend": self.backend,
            "host_draws": self.host_draws,
            "entropy": str(self._seq.entropy),
            "spawn_key": list(self._seq.spawn_key),
            "n_children_spawned": self._seq.n_children_spawned,
            "state": str(st["state"]["state"]),
            "inc": str(st["state"]["inc"]),
            "has_uint32": st["has_uint32"],
            "uinteger": st["uinteger"],
        }

    @classmethod
    def from_state(cls, state):
        """Rebuild an ``Rng`` from :meth:`state`; it continues exactly where the snapshot was taken."""
        try:
            seq = onp.random.SeedSequence(
                int(state["entropy"]), spawn_key=tuple(state["spawn_key"]),
                n_children_spawned=int(state["n_children_spawned"]),
            )
            rng = cls(seq, state["backend"], host_draws=bool(state.get("host_draws", False)))
            rng._host.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": int(state["state"]), "inc": int(state["inc"])},
                "has_uint32": int(state["has_uint32"]), "uinteger": int(state["uinteger"]),
            }
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"state: not a genblocks Rng state ({err!r})") from err
        return rng

    # -- draws ---------------------------------------------------------------------------------
    def normal(self, shape=(), dtype="float32", loc=0.0, scale=1.0):
        """Standard normal draws times ``scale`` plus ``loc``: array of ``shape``."""
        shape, dtype = _check_shape(shape), float_dtype_name(dtype)
        if self._device is not None:
            z = self._device.standard_normal(shape, dtype=dtype)
            return z * scale + loc if (loc, scale) != (0.0, 1.0) else z
        z = self._host.standard_normal(shape, dtype=dtype)
        if (loc, scale) != (0.0, 1.0):
            z = (z * scale + loc).astype(dtype)
        return self._out(z)

    def uniform(self, shape=(), dtype="float32", low=0.0, high=1.0):
        """Uniform draws on [low, high): array of ``shape``."""
        shape, dtype = _check_shape(shape), float_dtype_name(dtype)
        if not high > low:
            raise ValueError(f"high: expected high > low, got low={low!r}, high={high!r}")
        u = self._gen().random(shape, dtype=dtype)
        if (low, high) != (0.0, 1.0):
            u = u * (high - low) + low
        return u if self._device is not None else self._out(onp.asarray(u, dtype=dtype))

    def integers(self, low, high=None, shape=()):
        """Integers in [low, high) (or [0, low) when high is None): int64 array of ``shape``."""
        shape = _check_shape(shape)
        if high is None:
            low, high = 0, low
        if not high > low:
            raise ValueError(f"high: expected high > low, got low={low!r}, high={high!r}")
        if self._device is not None:
            return self._device.integers(low, high, size=shape, dtype="int64")
        return self._out(self._host.integers(low, high, size=shape, dtype=onp.int64))

    def bernoulli(self, p, shape=None, dtype="float32"):
        """1.0 with probability ``p`` else 0.0; ``p`` a float, a host array or (on cupy) a device array,
        broadcast to ``shape``."""
        on_device = self._device is not None and backend_of(p) == "cupy"
        if not on_device:  # host probabilities are checked (a device array would need a sync)
            p = onp.asarray(p, dtype=onp.float64)
            if onp.any(p < 0) or onp.any(p > 1):
                raise ValueError(f"p: expected probabilities in [0, 1], got values in [{p.min()}, {p.max()}]")
        shape = onp.shape(p) if shape is None else _check_shape(shape)
        u = self._gen().random(shape)
        if self._device is None:
            return self._out((u < p).astype(dtype))
        if not on_device:
            p = float(p) if p.ndim == 0 else self._out(p)
        return (u < p).astype(dtype)

    def categorical(self, logits, shape=None):
        """Class indices drawn with probabilities softmax(logits) over the last axis (Gumbel-max).

        ``logits`` (..., K) -> int64 indices of shape ``shape`` (default ``logits.shape[:-1]``).
        """
        if self._device is None:
            lg = onp.asarray(_to_host(logits), dtype=onp.float64)
        else:
            lg = self._out(logits if backend_of(logits) is not None else onp.asarray(logits, dtype=onp.float64))
        if lg.ndim == 0:
            raise ValueError("logits: expected at least one axis of classes, got a scalar")
        batch = lg.shape[:-1] if shape is None else _check_shape(shape)
        u = self._gen().random(tuple(batch) + lg.shape[-1:])
        tiny = 1e-300
        gumbel = -self._log(-self._log(u + tiny) + tiny)
        idx = (gumbel + lg).argmax(axis=-1)
        return idx if self._device is not None else self._out(idx.astype(onp.int64))

    def _log(self, a):
        return self._device_log(a) if self._device is not None else onp.log(a)

    def _device_log(self, a):
        from .cupy_backend import load_cupy

        return load_cupy().log(a)

    def permutation(self, n):
        """A random permutation of range(n): int64 array of shape (n,)."""
        if isinstance(n, bool) or not isinstance(n, (int, onp.integer)) or n < 0:
            raise ValueError(f"n: expected a non-negative int, got {n!r}")
        if self._device is not None:  # cupy's Generator has no permutation: sort n uniform keys
            return self._device.random((int(n),)).argsort().astype("int64")
        return self._out(self._host.permutation(int(n)).astype(onp.int64))


def _to_host(x):
    name = backend_of(x)
    return x if name is None else record(name).to_host(x)
