"""Scale out on Dask: sharded sampling and log-densities over many workers (and GPUs), and parameter sweeps.

The only module that imports dask, and only inside its functions: ``import genblocks`` never does. Install
the extra with ``pip install "genblocks[distributed]"`` (``dask`` and ``distributed``).

- ``sample(model, params, n, chunk=..., seed=...)``: a Dask array of ``n`` samples whose chunk ``i`` is drawn
  on a worker from stream ``i`` of the seed (``Rng(seed).split(num_chunks)[i]``), so the same seed and chunk
  give the same array bit for bit whatever the number of workers, and whichever worker ran which chunk (a
  chunk recomputed after a worker died is the same chunk). ``sample_local`` is the plain in-process loop over
  the same streams, the reference it equals. ``out=`` writes the result (``save``) instead of returning it.
- ``log_prob(model, params, data)``: ``model.log_prob`` chunk by chunk over a Dask (or host) array of data.
- ``sweep(train_fn, configs)``: ``train_fn(config)`` for every config on the workers, results in config order.
- ``save(array, out)``: one ``.npy`` (written block by block, atomically), a ``.zarr`` store (when ``zarr`` is
  installed) or a folder of ``.npy`` shards with an ``index.json``.
- ``get_client(client=None, workers=None)``: ``client`` itself, else a scheduler at ``$GENBLOCKS_SCHEDULER``
  (``tcp://host:8786``), else a ``LocalCluster`` of ``workers`` processes (one thread each) started once per
  session, else the current Dask client, else a ``LocalCluster`` with one worker per core.

Model and parameters travel to every worker once (``client.scatter(..., broadcast=True)``), not with every
chunk, and move to the sampling backend once per worker process. Chunks come back to the client as host
(numpy) arrays. A script that starts a local cluster must guard its entry point with
``if __name__ == "__main__":`` (worker processes are spawned and import the script's module).
"""

import collections
import math
import os

from genblocks.backends import Rng, backend_of, to_device, to_numpy
from genblocks.blocks.validate import check_callable, check_choice, check_positive_int
from genblocks.train.tree import tree_leaves

__all__ = ["sample", "sample_local", "log_prob", "sweep", "save", "get_client", "local_cluster", "close",
           "require_dask", "SCHEDULER_ENV"]

SCHEDULER_ENV = "GENBLOCKS_SCHEDULER"
EXTRA = 'pip install "genblocks[distributed]"'
BACKENDS = ("numpy", "cupy", "strict")
_LOCAL = {}  # n_workers -> (cluster, client), the local clusters this process started
_ON_BACKEND = {}  # in a worker: (id(params), backend) -> (params, params on that backend)


def require_dask():
    """(dask, dask.array, distributed), or ImportError naming the extra to install."""
    try:
        import dask
        import dask.array as da
        import distributed
    except ImportError as err:
        raise ImportError(f"genblocks.distributed needs dask and distributed: {EXTRA} ({err})") from None
    return dask, da, distributed


def get_client(client=None, workers=None):
    """The Dask client to run on (see the module docstring for the order in which it is chosen).

    A client this function starts becomes Dask's default, so ``array.compute()`` runs on it; with a client of
    your own that is not the default, compute with ``client.compute(array).result()``.
    """
    _, _, distributed = require_dask()
    if client is not None:
        if not isinstance(client, distributed.Client):
            raise TypeError(f"client: expected a distributed.Client or None, got {type(client).__name__}")
        return client
    address = os.environ.get(SCHEDULER_ENV)
    if address:
        key = ("address", address)
        if key not in _LOCAL:
            _LOCAL[key] = (None, distributed.Client(address))
        return _LOCAL[key][1]
    if workers is None:
        try:
            return distributed.default_client()
        except ValueError:  # no current client
            workers = os.cpu_count() or 1
    workers = check_positive_int(workers, "workers")
    if workers not in _LOCAL:
        cluster = local_cluster(workers)
        _LOCAL[workers] = (cluster, distributed.Client(cluster))
    return _LOCAL[workers][1]


def local_cluster(workers, **kwargs):
    """A ``LocalCluster`` of ``workers`` single-threaded worker processes, set for numerical work.

    Dask's nanny sets ``MALLOC_TRIM_THRESHOLD_`` in its workers, which turns off glibc's adaptive mmap
    threshold: every large temporary array is then a fresh mapping that page-faults on first touch, and a
    worker sampled about half as fast as this process (``benchmarks/bench_distributed.py``). This cluster's
    workers keep glibc's default, like any other Python process. ``kwargs`` go to ``LocalCluster``.
    """
    dask, _, distributed = require_dask()
    options = {"n_workers": check_positive_int(workers, "workers"), "threads_per_worker": 1, "processes": True,
               "dashboard_address": None, **kwargs}
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        return distributed.LocalCluster(**options)


def close():
    """Shut down the clients and local clusters ``get_client`` started (they also close at exit)."""
    while _LOCAL:
        _, (cluster, client) = _LOCAL.popitem()
        client.close()
        if cluster is not None:
            cluster.close()


# ---------------------------------------------------------------------------------------------------
# what runs on the workers


def _on_backend(params, backend):
    """``params`` moved to ``backend``, once per worker process for the scattered tree (kept while it lives)."""
    key = (id(params), backend)
    hit = _ON_BACKEND.get(key)
    if hit is None or hit[0] is not params:
        if len(_ON_BACKEND) >= 8:
            _ON_BACKEND.clear()
        hit = _ON_BACKEND[key] = (params, to_device(params, backend))
    return hit[1]


def _draw(bundle, stream, size, backend, sampler_kw):
    """One chunk: ``size`` samples from stream ``stream`` (an ``Rng`` state), as a host array."""
    model, params = bundle
    rng = Rng.from_state(stream)
    return to_numpy(model.sample(_on_backend(params, backend), rng, size, **sampler_kw))


def _probe(bundle, backend, sampler_kw):
    """(the shape of one sample, its dtype name): one sample drawn on a worker."""
    x = _draw(bundle, {**Rng(0, "numpy").state(), "backend": backend}, 1, backend, sampler_kw)
    return tuple(int(s) for s in x.shape[1:]), str(x.dtype)


def _chunk_log_prob(bundle, x, backend, fn, dtype):
    """log p of one chunk of rows (a host array), as a host array of ``dtype``."""
    model, params = bundle
    on = _on_backend(params, backend)
    lp = model.log_prob(on, to_device(x, backend)) if fn is None else fn(model, on, to_device(x, backend))
    return to_numpy(lp).astype(dtype)


# ---------------------------------------------------------------------------------------------------
# sampling


def _sizes(n, chunk):
    n, chunk = check_positive_int(n, "n"), check_positive_int(chunk, "chunk")
    return [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])


def _streams(count, backend, seed, rng):
    """The ``Rng`` states of streams 0..count-1 on ``backend``: children of ``Rng(seed)`` or of ``rng``."""
    if rng is not None and seed is not None:
        raise ValueError(f"seed: pass seed or rng, not both (got seed={seed!r} and rng={rng!r})")
    if rng is None:
        parent = Rng(0 if seed is None else seed, "numpy")
    elif not isinstance(rng, Rng):
        raise TypeError(f"rng: expected a genblocks Rng, got {type(rng).__name__}")
    elif rng.backend == "cupy" and not rng.host_draws:
        raise ValueError("rng: a cupy Rng cannot be sent to workers; pass seed=, or an Rng(seed, 'numpy') "
                         "(the streams are then made on the backend given by backend=)")
    else:
        parent = rng
    return [{**child.state(), "backend": backend} for child in parent.split(count)]


def _host_params(params):
    return params if all(backend_of(p) in (None, "numpy") for p in tree_leaves(params)) else to_numpy(params)


def sample_local(model, params, n, *, chunk=100_000, backend="numpy", seed=None, rng=None, **sampler_kw):
    """The plain in-process loop over the streams ``sample`` uses: the same host array, no Dask.

    Chunk ``i`` (``chunk`` rows, the last one shorter) is ``model.sample(params, stream_i, rows, **sampler_kw)``
    with ``stream_i = Rng(seed, backend).split(num_chunks)[i]`` (or ``rng.split(...)``; ``seed`` defaults to 0).
    """
    from genblocks.backends import namespace_of

    check_choice(backend, "backend", BACKENDS)
    sizes = _sizes(n, chunk)
    on = to_device(_host_params(params), backend)
    blocks = [to_numpy(model.sample(on, Rng.from_state(s), size, **sampler_kw))
              for s, size in zip(_streams(len(sizes), backend, seed, rng), sizes)]
    return namespace_of("numpy").concat(blocks, axis=0)


def sample(model, params, n, *, client=None, workers=None, chunk=100_000, backend="numpy", seed=None, rng=None,
           out=None, **sampler_kw):
    """``n`` samples of ``model`` drawn on Dask workers: a Dask array of host chunks along axis 0.

    - ``chunk``: rows per chunk (the last is shorter); chunk ``i`` comes from stream ``i`` of ``seed`` (default
      0) or of ``rng`` (an ``Rng``; its ``split`` is used), so the result depends on ``seed`` and ``chunk``
      only, never on the workers. It equals ``sample_local`` with the same arguments.
    - ``backend``: where each worker samples ("numpy", "cupy" on a GPU worker, "strict"); ``params`` (host
      arrays, e.g. a checkpoint's) are scattered once to every worker and moved to ``backend`` there once.
    - ``client`` / ``workers``: see ``get_client``. ``sampler_kw`` go to ``model.sample`` (``sampler=``,
      ``num_inference_steps=``, ...).
    - ``out``: a path; the samples are written there (``save``) and the path is returned instead of the array.

    Nothing is drawn until the array is computed, except one sample on a worker that gives the shape and dtype.
    """
    _, da, _ = require_dask()
    check_choice(backend, "backend", BACKENDS)
    sizes = _sizes(n, chunk)
    streams = _streams(len(sizes), backend, seed, rng)
    c = get_client(client, workers)
    [bundle] = c.scatter([(model, _host_params(params))], broadcast=True, hash=False)
    event, dtype = c.submit(_probe, bundle, backend, sampler_kw, pure=False).result()
    array = _from_chunks(da, _draw, bundle, [(stream, size, backend, sampler_kw) for stream, size in
                                             zip(streams, sizes)], [(size, *event) for size in sizes], dtype)
    return array if out is None else save(array, out, client=c)


def _from_chunks(da, fn, bundle, args, shapes, dtype):
    """A Dask array concatenating ``fn(bundle, *args[i])`` (of ``shapes[i]``) along axis 0, one task each.

    The bundle is a scattered future: every task names its key, so it is never copied into the graph.
    """
    import dask

    call = dask.delayed(fn, pure=True)
    blocks = [da.from_delayed(call(bundle, *a), shape=shape, dtype=dtype) for a, shape in zip(args, shapes)]
    return da.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


# ---------------------------------------------------------------------------------------------------
# log-densities


def _result_dtype(data_dtype, params):
    names = {str(data_dtype)} | {str(getattr(p, "dtype", "")) for p in tree_leaves(params)}
    return "float64" if "float64" in names else "float32"


def log_prob(model, params, data, *, client=None, workers=None, backend="numpy", chunk=100_000, fn=None):
    """``model.log_prob(params, x)`` over the rows of ``data``, chunk by chunk on the workers: a Dask array (n,).

    ``data`` is a Dask array (its chunks along axis 0 are kept; other axes are joined) or a host array (cut
    into ``chunk`` rows). ``fn(model, params, x) -> (rows,)`` replaces ``model.log_prob`` (e.g. an estimator).
    The result is float64 when the data or the params are, else float32; for a deterministic log-density it
    equals the in-memory ``model.log_prob(params, data)``.
    """
    _, da, _ = require_dask()
    check_choice(backend, "backend", BACKENDS)
    if fn is not None:
        check_callable(fn, "fn", "a callable fn(model, params, x) -> log p (rows,)")
    if not isinstance(data, da.Array):
        if backend_of(data) is None:
            raise TypeError(f"data: expected a Dask array or a host array, got {type(data).__name__}")
        data = da.from_array(to_numpy(data), chunks=(check_positive_int(chunk, "chunk"),) + data.shape[1:])
    if data.ndim < 1:
        raise ValueError(f"data: expected an array of rows (n, ...), got shape {data.shape}")
    if data.ndim > 1:
        data = data.rechunk({axis: -1 for axis in range(1, data.ndim)})
    if any(math.isnan(c) for c in data.chunks[0]):
        data = data.compute_chunk_sizes()
    params = _host_params(params)
    dtype = _result_dtype(data.dtype, params)
    c = get_client(client, workers)
    [bundle] = c.scatter([(model, params)], broadcast=True, hash=False)
    blocks = data.to_delayed().ravel()
    return _from_chunks(da, _chunk_log_prob, bundle, [(b, backend, fn, dtype) for b in blocks],
                        [(rows,) for rows in data.chunks[0]], dtype)


# ---------------------------------------------------------------------------------------------------
# writing


def _blocks_in_order(client, array, window):
    """The chunks of ``array`` (along axis 0) as host arrays, in order, ``window`` of them in flight."""
    pending = collections.deque()
    for block in array.to_delayed().ravel():
        pending.append(client.compute(block))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def save(array, out, *, client=None, workers=None, window=None, info=None):
    """Write a Dask array (chunked along axis 0) to ``out``; returns ``out``.

    - ``*.npy``: one file, written block by block in order while later blocks are computed (``window`` in
      flight, default twice the workers' threads), then renamed into place (``io.save_npy_blocks_atomic``).
    - ``*.zarr``: ``dask.array.to_zarr``, written by the workers (so ``out`` must be visible to them); needs
      ``zarr`` (not a genblocks dependency).
    - anything else: a folder of ``shard-00000.npy``, ... (one per chunk) and ``index.json`` (with ``info``),
      renamed into place when complete (``io.save_npy_folder_atomic``).

    For ``.npy`` and folders the blocks are gathered to this process and written here, so ``out`` need not
    be visible to the workers.
    """
    from genblocks.io import save_npy_blocks_atomic, save_npy_folder_atomic

    _, da, _ = require_dask()
    if not isinstance(array, da.Array):
        raise TypeError(f"array: expected a Dask array, got {type(array).__name__}")
    out = os.fspath(out)
    if out.endswith(".zarr"):
        try:
            import zarr  # noqa: F401
        except ImportError:
            raise ImportError(f"out: writing {out!r} needs zarr (pip install zarr), or write a .npy file or a "
                              "folder of .npy shards") from None
        c = get_client(client, workers)
        c.compute(da.to_zarr(array, out, compute=False)).result()
        return out
    if array.ndim > 1:
        array = array.rechunk({axis: -1 for axis in range(1, array.ndim)})
    c = get_client(client, workers)
    if window is None:
        window = 2 * max(1, sum(c.nthreads().values()))
    blocks = _blocks_in_order(c, array, check_positive_int(window, "window"))
    if out.endswith(".npy"):
        return save_npy_blocks_atomic(out, array.shape, array.dtype, blocks)
    return save_npy_folder_atomic(out, blocks, info=info)


# ---------------------------------------------------------------------------------------------------
# sweeps


def sweep(train_fn, configs, *, client=None, workers=None, out=None):
    """``train_fn(config)`` for every config, each a task on the workers; the results in config order.

    ``train_fn`` must be picklable (a module-level function, or anything cloudpickle takes) and return a
    dict, which comes back as ``{"config": config, **result}``. Where a result holds ``"checkpoint"`` as bytes
    (an ``.npz`` file's content, as ``genblocks sweep`` returns) and ``out`` names a folder, the bytes are
    written to ``out/run-000.npz``, ... (atomically) and ``"checkpoint"`` becomes that path. A failed run
    raises ``RuntimeError`` naming its index and config.
    """
    from genblocks.io import write_atomic

    check_callable(train_fn, "train_fn", "a callable train_fn(config) -> dict")
    if not isinstance(configs, (list, tuple)) or not configs:
        raise ValueError(f"configs: expected a non-empty list of configs, got {configs!r}")
    c = get_client(client, workers)
    futures = [c.submit(train_fn, config, pure=False, key=f"genblocks-sweep-{i}-{os.urandom(4).hex()}")
               for i, config in enumerate(configs)]
    results = []
    for i, (config, future) in enumerate(zip(configs, futures)):
        try:
            result = future.result()
        except Exception as err:
            raise RuntimeError(f"configs[{i}]: training {config!r} failed: {type(err).__name__}: {err}") from err
        if not isinstance(result, dict):
            raise TypeError(f"train_fn: expected a dict from configs[{i}], got {type(result).__name__}")
        result = {"config": config, **result}
        if out is not None and isinstance(result.get("checkpoint"), bytes):
            data = result["checkpoint"]
            result["checkpoint"] = write_atomic(os.path.join(os.fspath(out), f"run-{i:03d}.npz"),
                                                lambda f, data=data: f.write(data))
        results.append(result)
    return results
