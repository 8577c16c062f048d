"""Command line: ``genblocks demo`` (a small model per family: table and picture), ``train``, ``sample``, ``eval``.

``genblocks sample ... --workers W`` and ``genblocks sweep config.json`` run on Dask (``genblocks.distributed``).
"""

import argparse
import json
import os
import sys
import tempfile
import time

import genblocks
from genblocks.blocks.validate import check_positive_int
from genblocks.demo import DIGIT_FAMILIES  # (family, row) pairs on the 8x8 digits
from genblocks.demo import FAMILIES as DEMO_FAMILIES  # (family, row) pairs on 2-D toy data
from genblocks.io import write_atomic


def add_mmd(row):
    """The row with "mmd": the unbiased MMD^2 (median-heuristic bandwidths) of its samples against its held-out
    points, in float64 on the first min(1000, n) of each: the one figure every family has."""
    from genblocks.backends import namespace_of
    from genblocks.metrics import mmd

    xp = namespace_of("numpy")
    m = min(row["samples"].shape[0], row["test"].shape[0], 1000)
    a = xp.asarray(row["samples"][:m], dtype=xp.float64)
    b = xp.asarray(row["test"][:m], dtype=xp.float64)
    return {**row, "mmd": float(mmd(a, b))}


def add_frechet(rows, rng, steps=400):
    """The digits rows with "fd": the Frechet distance between samples and held-out images on the features of
    a small digits classifier (``metrics.DigitsFeatures``, trained once from ``rng`` for all rows)."""
    from genblocks.metrics import DigitsFeatures

    features = DigitsFeatures.train(rng, steps)
    return [{**r, "fd": float(features.frechet_distance(r["samples"], r["test"]))} for r in rows]


def format_table(rows):
    """A Markdown table of the demo rows: test NLL and how it was computed, MMD^2, size and times."""
    fd = any("fd" in r for r in rows)  # the digits table adds the classifier-feature Frechet distance
    lines = ["| family | model | data | test NLL (nats) | how | MMD^2 | " + ("FD (digits features) | " if fd else "")
             + "held-out points | params | train s | sample ms / 1000 |", "|---" * (11 if fd else 10) + "|"]
    for r in rows:
        value = "-" if r.get("value") is None else f"{r['value']:.4f}"
        how = r["metric"].split("(", 1)[-1].rstrip(")") if "(" in r["metric"] else r["metric"]
        how = how[len("nats, "):] if how.startswith("nats, ") else how
        extra = f"{r['fd']:.2f} | " if fd else ""
        lines.append(f"| {r['family']} | {r['model']} | {r.get('data', '-')} | {value} | {how} | {r['mmd']:.5f} "
                     f"| {extra}{r['test'].shape[0]} | {r['params']} | {r['seconds']:.1f} | {r['sample_ms']:.1f} |")
    return "\n".join(lines)


def _image_grid(x, rows, cols, side=8):
    """Images x (n, side*side) tiled into one (rows*(side+1), cols*(side+1)) array, NaN between tiles."""
    from genblocks.backends import namespace_of

    xp = namespace_of("numpy")
    grid = xp.full((rows * (side + 1), cols * (side + 1)), float("nan"))
    for k in range(min(rows * cols, x.shape[0])):
        i, j = divmod(k, cols)
        grid[i * (side + 1):i * (side + 1) + side, j * (side + 1):j * (side + 1) + side] = x[k].reshape(side, side)
    return grid


def _plot_points(ax, r, which, lo, hi):
    """One panel of 2-D points: the held-out data, the samples, or the path from noise to data."""
    if which == "data":
        t = r["test"]
        ax.scatter(t[:, 0], t[:, 1], s=2, alpha=0.5, color="gray")
    elif which == "samples":
        s = r["samples"]
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5)
    else:
        from genblocks.backends import namespace_of

        p = namespace_of("numpy").stack(r["path"])  # (stages, points, 2)
        ax.plot(p[:, :, 0], p[:, :, 1], lw=0.4, alpha=0.35, color="tab:blue")
        ax.scatter(p[0, :, 0], p[0, :, 1], s=2, color="gray", label="noise")
        ax.scatter(p[-1, :, 0], p[-1, :, 1], s=2, color="tab:red", label="data")
    pad = 0.1 * (hi - lo)
    ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
    ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
    ax.set_aspect("equal")


def _plot_images(ax, r, which):
    """One panel of 8x8 images: held-out digits, samples, or 4 images at each stage from noise to data."""
    if which == "data":
        ax.imshow(_image_grid(r["test"], 6, 6), cmap="gray_r", vmin=0, vmax=16)
    elif which == "samples":
        ax.imshow(_image_grid(r["samples"], 6, 6), cmap="gray_r", vmin=0, vmax=16)
    else:
        from genblocks.backends import namespace_of

        last = len(r["path"]) - 1
        stages = [r["path"][k] for k in sorted({round(i * last / 5) for i in range(6)})]
        # each stage's images scaled to its own range: noise and data have different units
        scaled = [(s - s.min()) / max(float(s.max() - s.min()), 1e-12) * 16.0 for s in stages]
        cols = namespace_of("numpy").stack(scaled, axis=1).reshape(-1, 64)  # row i: image i through the stages
        ax.imshow(_image_grid(cols, stages[0].shape[0], len(stages)), cmap="gray_r", vmin=0, vmax=16)


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed: pip install "genblocks[plot]" for the picture'
    # top: each row's held-out data; middle: its model's samples, on the same axes; bottom (flow and
    # diffusion): the way from noise to data, through the flow's layers or the sampler's steps
    has_path = any("path" in r for r in rows)
    images = rows[0]["test"].shape[1] != 2
    fig, axes = plt.subplots(3 if has_path else 2, len(rows), figsize=(3.0 * len(rows), 9.6 if has_path else 6.4),
                             squeeze=False)
    for k, r in enumerate(rows):
        value = "" if r.get("value") is None else f"NLL {r['value']:.3f}, "
        titles = {"data": f"data: {r.get('data', '-')}\n({r['test'].shape[0]} held-out points)",
                  "samples": f"{r['family']}: {r['model']}\n{value}MMD^2 {r['mmd']:.4f}"
                             + (f", FD {r['fd']:.1f}" if "fd" in r else ""),
                  "path": f"{r['family']}: noise -> data\n({len(r.get('path', ())) - 1} "
                          f"{'layers' if r['family'] == 'flow' else 'steps'})"}
        lo, hi = r["test"].min(axis=0), r["test"].max(axis=0)
        for which, ax in zip(("data", "samples", "path"), [axes[i][k] for i in range(len(axes))]):
            ax.set_xticks([])
            ax.set_yticks([])
            if which == "path" and "path" not in r:
                ax.axis("off")
                continue
            if images:
                _plot_images(ax, r, which)
            else:
                _plot_points(ax, r, which, lo, hi)
            ax.set_title(titles[which], fontsize=7 if which != "data" else 8, wrap=True)
    fig.tight_layout(h_pad=2.0)
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return None


def check_out_folder(out, what="demo.md, demo.json and demo.png"):
    """``out`` as a writable folder (created if missing), checked before any work starts; ValueError otherwise."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {out!r} is a file; expected a folder for {what}")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".genblocks-write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"--out: cannot write into {out!r} ({err.strerror or err})") from None
    return out


def run_demo(out, *, seed=0, smoke=False, families=None, stream=None, data="2d", progress=False):
    """Run every family's demo, print the table, write ``demo.md``, ``demo.json`` and ``demo.png``.

    ``data``: "2d" (toy 2-D densities, the default) or "digits" (8x8 digits at 17 levels); ``progress``: show
    ``fit``'s bar for each model, labelled with its family.
    """
    stream = sys.stdout if stream is None else stream
    datasets = {"2d": DEMO_FAMILIES, "digits": DIGIT_FAMILIES}
    if data not in datasets:
        raise ValueError(f"--data: expected one of {', '.join(datasets)}, got {data!r}")
    table_rows = datasets[data]
    if data == "digits":
        import importlib.util

        from genblocks.data import DATA_INSTALL_HINT

        if importlib.util.find_spec("sklearn") is None:
            raise ValueError(f"--data digits: needs scikit-learn, which ships the 8x8 digits: {DATA_INSTALL_HINT}")
    names = [f for f, _ in table_rows]
    chosen = names if families is None else families
    unknown = [f for f in chosen if f not in names]
    if unknown or not chosen:
        raise ValueError(f"--families: expected a comma-separated subset of {','.join(names)}, got "
                         f"{unknown if unknown else 'none'}")
    check_out_folder(out)  # before any training: a bad --out costs nothing
    rng = genblocks.Rng(seed, "numpy")
    rows = []
    for (family, row), child in zip(table_rows, rng.split(len(table_rows))):
        if family not in chosen:
            continue
        print(f"[demo] {family} ...", file=stream, flush=True)
        rows.append(add_mmd(row(child, smoke=smoke, progress=family if progress else False)))
    if data == "digits":
        rows = add_frechet(rows, genblocks.Rng(seed, "numpy"), steps=50 if smoke else 400)
    table = format_table(rows)
    print(table, file=stream)
    write_atomic(os.path.join(out, "demo.md"), lambda f: f.write((table + "\n").encode()))
    summary = [{k: v for k, v in r.items() if k not in ("samples", "test", "path")} for r in rows]
    write_atomic(os.path.join(out, "demo.json"), lambda f: f.write(json.dumps(summary, indent=2).encode()))
    note = _plot(rows, os.path.join(out, "demo.png"))
    print(note or f"wrote {os.path.join(out, 'demo.md')}, demo.json and demo.png", file=stream)
    return rows


# ---------------------------------------------------------------------------------------------------
# train / sample / eval: a checkpoint carries the model's config, so sample and eval need no code


def _check_out_file(out, suffixes, what):
    """``out`` as a file path with one of ``suffixes`` in a writable folder, checked before any work."""
    if not str(out).endswith(suffixes):
        raise ValueError(f"--out: expected a path ending in {' or '.join(suffixes)}, got {out!r}")
    if os.path.isdir(out):
        raise ValueError(f"--out: {out!r} is a folder; expected a file path for {what}")
    check_out_folder(os.path.dirname(os.path.abspath(out)), what)
    return out


def _load_data(spec, n, seed):
    """(x (n, d) float32 host array, description): a toy density's name, or a .npy file of floats."""
    from genblocks.backends import Rng, to_numpy
    from genblocks.data import TOY_DENSITIES, toy
    from genblocks.io import load_npy

    if spec.endswith(".npy"):
        try:
            x = load_npy(spec)
        except (FileNotFoundError, ValueError) as err:
            raise ValueError(f"--data: {err}") from None
        if x.ndim != 2 or x.shape[0] < 2 or x.dtype.kind not in "fiu":
            raise ValueError(f"--data: expected a numeric array (n, d) with n >= 2, got {x.dtype} {x.shape}")
        x = x.astype("float32")
        if not bool((x == x).all()) or not bool((abs(x) < float("inf")).all()):
            raise ValueError(f"--data: {spec!r} holds NaN or inf values")
        return x, f"{spec} ({x.shape[0]} x {x.shape[1]})"
    if spec not in TOY_DENSITIES:
        raise ValueError(f"--data: expected a .npy file or one of {sorted(TOY_DENSITIES)}, got {spec!r}")
    return to_numpy(toy(spec, Rng(seed, "numpy"), n)), f"{spec} ({n} points, seed {seed})"


def _load_checkpoint(path):
    """(family, model, params, state, config) rebuilt from a ``genblocks train`` checkpoint alone."""
    from genblocks.families import FAMILIES, build_model
    from genblocks.train.checkpoint import load

    try:
        ckpt = load(path)
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(f"checkpoint: {err}") from None
    config = ckpt["config"] or {}
    family = config.get("family")
    if family not in FAMILIES or "model" not in config:
        raise ValueError(f"checkpoint: {path!r} was not written by 'genblocks train' (its config has no known "
                         f"family: {family!r}; expected one of {sorted(FAMILIES)})")
    params = ckpt["params"]
    average = (ckpt["opt_state"] or {}).get("ema") if FAMILIES[family].ema_decay else None
    if average is not None:  # a family trained with a parameter EMA samples and is scored with it
        params = average
    return family, build_model(family, config["model"]), params, ckpt["state"], config


def _scaling(config):
    scaling = config.get("scaling")
    if scaling is None:
        return None
    from genblocks.backends import namespace_of

    xp = namespace_of("numpy")
    return {k: xp.asarray(scaling[k], dtype=xp.float32) for k in ("mean", "std")}


def _parse_options(pairs):
    """--option KEY=VALUE pairs as a dict, VALUE read as JSON (8, [64, 64], "linear") or else as a string."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--option: expected KEY=VALUE (e.g. hidden=[32,32]), got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def run_train(family, data, steps, out, *, resume=False, seed=0, n=4096, batch_size=256, lr=None,
              standardize=True, options=None, stream=None):
    """Train ``family`` on ``data`` for ``steps`` Adam steps, checkpointing to ``out`` (resumable)."""
    from genblocks.backends import Rng
    from genblocks.data import standardize as standardize_data
    from genblocks.families import FAMILIES, build_model, model_config
    from genblocks.train.loop import fit
    from genblocks.train.optim import adam

    stream = sys.stdout if stream is None else stream
    if family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    if steps < 1:
        raise ValueError(f"--steps: expected a positive int, got {steps}")
    _check_out_file(out, (".npz",), "the checkpoint")
    if os.path.exists(out) and not resume:
        raise ValueError(f"--out: {out!r} exists; pass --resume to continue it, or choose another --out")
    x, described = _load_data(data, n, seed)
    scaling = None
    if standardize:
        x, scale = standardize_data(x)
        scaling = {k: [float(v) for v in scale[k]] for k in ("mean", "std")}
    config = {"family": family, "model": model_config(family, x.shape[1], **(options or {})), "scaling": scaling,
              "data": data, "n": int(x.shape[0]), "seed": seed, "batch_size": batch_size}
    if resume and os.path.exists(out):
        _, _, _, _, old = _load_checkpoint(out)
        if {k: old.get(k) for k in config} != config:
            raise ValueError(f"--resume: {out!r} was trained with another configuration "
                             f"({ {k: old.get(k) for k in config if old.get(k) != config[k]} }); "
                             "use the same family, --data, --n, --seed and --batch-size")
    entry = FAMILIES[family]
    model = build_model(family, config["model"])
    r_init, r_fit = Rng(seed, "numpy").split(2)
    params = entry.prepare(model, model.init(r_init), x)
    print(f"[train] {family} on {described}{', standardised' if standardize else ''}: {steps} steps -> {out}",
          file=stream, flush=True)
    lr = entry.defaults["lr"] if lr is None else lr
    every = max(1, min(100, steps // 10))
    if entry.players is not None:  # several players (a GAN): one optimizer and loss each, through fit's groups
        result = fit(None, params, x, r_fit, None, steps, groups=entry.players(model, lr, config["model"]),
                     state=model.init_state(params), batch_size=batch_size, checkpoint_path=out,
                     checkpoint_every=every, config=config, resume=resume, ema_decay=entry.ema_decay)
    else:
        result = fit(model.loss, params, x, r_fit, adam(lr), steps, batch_size=batch_size, checkpoint_path=out,
                     checkpoint_every=every, config=config, resume=resume, ema_decay=entry.ema_decay)
    losses = result.history["loss"]
    if isinstance(losses, dict):
        final = ", ".join(f"{k} {v[-1]:.4f}" if v else f"{k} nan" for k, v in losses.items())
    else:
        final = f"{losses[-1]:.4f}" if losses else "nan"
    print(f"[train] done: final loss {final}; checkpoint {out}", file=stream)
    return result


def run_sample(checkpoint, n, out, *, backend="numpy", seed=0, options=None, stream=None):
    """n samples from the model in ``checkpoint``, in the data's units, written to ``out`` (.npy/.npz/.png)."""
    from genblocks.backends import Rng, to_device, to_numpy
    from genblocks.data import unstandardize

    stream = sys.stdout if stream is None else stream
    _check_out_file(out, (".npy", ".npz", ".png"), "the samples")
    if out.endswith(".png"):
        _matplotlib()  # before sampling: a missing extra costs nothing
    family, model, params, state, config = _load_checkpoint(checkpoint)
    options = _sample_options(family, options)
    x = to_numpy(model.sample(to_device(params, backend), Rng(seed, backend), n, **options))
    scaling = _scaling(config)
    if scaling is not None:
        x = unstandardize(x, scaling)
    _write_samples(out, x)
    print(f"[sample] {n} samples of the {family} model -> {out}", file=stream)
    return x


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError('--out: a .png needs matplotlib: pip install "genblocks[plot]"') from None
    return plt


def _write_samples(out, x):
    from genblocks.io import save_npy_atomic, save_npz_atomic

    if out.endswith(".npy"):
        save_npy_atomic(out, x)
    elif out.endswith(".npz"):
        save_npz_atomic(out, {"samples": x})
    else:
        plt = _matplotlib()
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.scatter(x[:, 0], x[:, 1] if x.shape[1] > 1 else 0 * x[:, 0], s=2, alpha=0.5)
        ax.set_title(f"{x.shape[0]} samples" + ("" if x.shape[1] <= 2 else f" (first 2 of {x.shape[1]} dims)"))
        fig.tight_layout()
        write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)


def run_eval(checkpoint, data, *, n=2000, seed=1, stream=None):
    """Test NLL (nats and bits per dim, in the data's units) and MMD to ``data`` of the model in ``checkpoint``."""
    import math

    from genblocks.backends import Rng, namespace_of, to_numpy
    from genblocks.families import FAMILIES
    from genblocks.metrics import mmd

    stream = sys.stdout if stream is None else stream
    family, model, params, state, config = _load_checkpoint(checkpoint)
    x, described = _load_data(data, n, seed)
    if x.shape[1] != config["model"]["dim"]:
        raise ValueError(f"--data: {described} has {x.shape[1]} features; the model was trained on "
                         f"{config['model']['dim']}")
    xp = namespace_of("numpy")
    scaling = _scaling(config)
    z, log_jac = x, 0.0
    if scaling is not None:  # log p(x) = log p(z) - sum log std, z = (x - mean) / std
        z = (x - scaling["mean"]) / scaling["std"]
        log_jac = float(xp.sum(xp.log(scaling["std"])))
    nll = None
    if FAMILIES[family].log_prob is not None:
        nll = float(-(to_numpy(FAMILIES[family].log_prob(model, params, z)) - log_jac).mean())
    samples = to_numpy(model.sample(params, Rng(seed + 1, "numpy"), x.shape[0]))
    distance = float(to_numpy(mmd(xp.asarray(samples, dtype=xp.float64), xp.asarray(z, dtype=xp.float64))))
    d = x.shape[1]
    report = {"family": family, "data": described, "nll_nats": nll,
              "bits_per_dim": None if nll is None else nll / (d * math.log(2.0)),
              "likelihood": FAMILIES[family].likelihood, "mmd_standardised": distance, "points": int(x.shape[0])}
    scored = (f"no test NLL ({report['likelihood']})" if nll is None else
              f"test NLL {nll:.4f} nats ({report['bits_per_dim']:.4f} bits/dim, {report['likelihood']})")
    print(f"[eval] {family} on {described}: {scored}, MMD^2 {distance:.5f} (standardised units, {x.shape[0]} "
          "samples)", file=stream)
    return report


# ---------------------------------------------------------------------------------------------------
# on Dask: sample --workers, sweep (genblocks.distributed; the dask import happens there, on first use)


def _distributed():
    try:
        from genblocks import distributed

        distributed.require_dask()
    except ImportError as err:
        raise ValueError(f"--workers: {err}") from None
    return distributed


def _check_out_shards(out):
    """``out`` for sharded samples: a .npy file, a .zarr store or a folder of .npy shards (absent or empty)."""
    if out.endswith((".npz", ".png")):
        raise ValueError(f"--out: with --workers, expected samples.npy, a .zarr store or a folder for .npy shards, "
                         f"got {out!r}")
    if out.endswith(".npy"):
        return _check_out_file(out, (".npy",), "the samples")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out: {out!r} exists; expected a new (or empty) folder for the shards")
    check_out_folder(os.path.dirname(os.path.abspath(out)) or ".", "the shards")
    return out


def run_sample_distributed(checkpoint, n, out, *, workers, chunk=100_000, backend="numpy", seed=0, options=None,
                           stream=None):
    """``n`` samples from ``checkpoint`` drawn on Dask workers in chunks of ``chunk``, written to ``out``.

    ``workers`` local worker processes, or the cluster at ``$GENBLOCKS_SCHEDULER``. Chunk i comes from stream
    i of ``seed`` (``genblocks.distributed.sample``): the same file for any number of workers.
    """
    from genblocks.data import unstandardize

    stream = sys.stdout if stream is None else stream
    for value, name in ((n, "--n"), (workers, "--workers"), (chunk, "--chunk")):
        check_positive_int(value, name)
    _check_out_shards(out)
    gd = _distributed()
    family, model, params, state, config = _load_checkpoint(checkpoint)
    options = _sample_options(family, options)
    try:
        client = gd.get_client(workers=workers)
        start = time.perf_counter()
        x = gd.sample(model, params, n, client=client, chunk=chunk, backend=backend, seed=seed, **options)
        scaling = _scaling(config)
        if scaling is not None:
            x = x.map_blocks(unstandardize, scaling, dtype=x.dtype)
        gd.save(x, out, client=client, info={"checkpoint": os.path.basename(checkpoint), "family": family, "n": n,
                                              "chunk": chunk, "seed": seed, "backend": backend, **options})
        seconds, used = time.perf_counter() - start, len(client.nthreads())
    finally:
        gd.close()
    print(f"[sample] {n} samples of the {family} model on {used} Dask workers "
          f"({n / max(seconds, 1e-9):,.0f} samples/s) -> {out}", file=stream)
    return out


SWEEP_KEYS = {  # key -> (check, what it expects, default); "family", "data" and "steps" have no default
    "family": (lambda v: isinstance(v, str), "a family name", None),
    "data": (lambda v: isinstance(v, str), "a toy density name or a .npy path", None),
    "steps": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int", None),
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "a non-negative int", 0),
    "n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an int >= 2", 4096),
    "batch_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive int", 256),
    "lr": (lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0),
           "a positive number or null", None),
    "standardize": (lambda v: isinstance(v, bool), "true or false", True),
    "option": (lambda v: isinstance(v, dict), "a dict of model options", {}),
    "eval_data": (lambda v: v is None or isinstance(v, str), "a toy density name or a .npy path", None),
    "eval_n": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2, "an int >= 2", 2000),
}


def read_sweep_config(path):
    """The runs of a ``genblocks sweep`` JSON file and its ``out``: ``(runs, out)``; errors name the key.

    The file is ``{"family": ..., "data": ..., "steps": ..., "out": "folder", "runs": [{...}, ...]}``: the top
    level sets every run's defaults, each entry of ``runs`` overrides them (keys: ``SWEEP_KEYS``).
    """
    from genblocks.families import FAMILIES

    try:
        with open(path) as f:
            spec = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"config: no file at {path!r}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"config: {path!r} is not readable JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"config: {path}: expected a JSON object, got {type(spec).__name__}")

    def checked(entry, where, allowed):
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"config: {path}: {where}{unknown[0]}: unknown key; expected one of {sorted(allowed)}")
        for key, value in entry.items():
            if key in SWEEP_KEYS and not SWEEP_KEYS[key][0](value):
                raise ValueError(f"config: {path}: {where}{key}: expected {SWEEP_KEYS[key][1]}, got {value!r}")
        return entry

    base = checked(spec, "", set(SWEEP_KEYS) | {"out", "runs"})
    out, entries = base.pop("out", None), base.pop("runs", None)
    if out is not None and not isinstance(out, str):
        raise ValueError(f"config: {path}: out: expected a folder path, got {out!r}")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ValueError(f"config: {path}: runs: expected a non-empty list of objects, got {entries!r}")
    runs = []
    for i, entry in enumerate(entries):
        run = {k: d for k, (_, _, d) in SWEEP_KEYS.items() if d is not None or k in ("lr", "eval_data")}
        run.update(base)
        run.update(checked(entry, f"runs[{i}].", set(SWEEP_KEYS)))
        missing = [k for k in ("family", "data", "steps") if k not in run]
        if missing:
            raise ValueError(f"config: {path}: runs[{i}].{missing[0]}: missing (set it at the top level or in the run)")
        if run["family"] not in FAMILIES:
            raise ValueError(f"config: {path}: runs[{i}].family: expected one of {sorted(FAMILIES)}, "
                             f"got {run['family']!r}")
        runs.append(run)
    return runs, out


def sweep_run(run):
    """Train and evaluate one run of ``genblocks sweep`` (on a worker): ``{"checkpoint": bytes, "metrics": dict}``.

    The checkpoint is written to a temporary folder on the worker and returned as bytes, so the workers need no
    file system in common with the client; the metrics are ``run_eval``'s report, the final loss and seconds.
    """
    import contextlib
    import io
    import pathlib

    quiet = io.StringIO()
    with tempfile.TemporaryDirectory(prefix="genblocks-sweep-") as tmp, contextlib.redirect_stderr(quiet):
        path = os.path.join(tmp, "run.npz")
        start = time.perf_counter()
        result = run_train(run["family"], run["data"], run["steps"], path, seed=run["seed"], n=run["n"],
                           batch_size=run["batch_size"], lr=run["lr"], standardize=run["standardize"],
                           options=run["option"], stream=quiet)
        seconds = time.perf_counter() - start
        report = run_eval(path, run["eval_data"] or run["data"], n=run["eval_n"], stream=quiet)
        data = pathlib.Path(path).read_bytes()
    loss = result.history["loss"][-1] if result.history["loss"] else float("nan")
    return {"checkpoint": data, "metrics": {**report, "final_loss": float(loss), "train_seconds": seconds}}


def run_sweep(config, *, workers=None, out=None, stream=None):
    """Train every run of the JSON sweep file ``config`` on Dask workers; write ``out/run-000.npz``, ... and
    ``out/sweep.json`` (each run's settings, metrics and checkpoint). Returns the runs' results."""
    stream = sys.stdout if stream is None else stream
    runs, config_out = read_sweep_config(config)
    out = out or config_out
    if out is None:
        raise ValueError("--out: expected a folder for the checkpoints (or \"out\" in the config file)")
    if workers is not None:
        check_positive_int(workers, "--workers")
    check_out_folder(out, "the sweep's checkpoints and sweep.json")
    gd = _distributed()
    try:
        client = gd.get_client(workers=workers)
        print(f"[sweep] {len(runs)} runs on {len(client.nthreads())} Dask workers -> {out}", file=stream, flush=True)
        results = gd.sweep(sweep_run, runs, client=client, out=out)
    finally:
        gd.close()
    summary = [{"run": i, "checkpoint": os.path.basename(r["checkpoint"]), "config": r["config"],
                "metrics": r["metrics"]} for i, r in enumerate(results)]
    write_atomic(os.path.join(out, "sweep.json"), lambda f: f.write(json.dumps(summary, indent=1).encode()))
    for s in summary:
        m = s["metrics"]
        print(f"[sweep] run {s['run']}: {s['config']['family']} seed {s['config']['seed']}: final loss "
              f"{m['final_loss']:.4f}, test NLL {m['nll_nats']:.4f} nats, MMD^2 {m['mmd_standardised']:.5f} "
              f"-> {os.path.join(out, s['checkpoint'])}", file=stream)
    return results


def build_parser():
    parser = argparse.ArgumentParser(
        prog="genblocks", description="Deep generative models from small composable blocks."
    )
    parser.add_argument("--version", action="version", version=f"genblocks {genblocks.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train one small model per family on 2-D data; write a table and a PNG")
    demo.add_argument("--out", default="genblocks-demo", help="output folder (default: ./genblocks-demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--quick", action="store_true", help="small sizes: a few seconds (the tests run it so)")
    demo.add_argument("--families", default=None,
                      help=f"comma-separated subset of {','.join(f for f, _ in DEMO_FAMILIES)}")
    demo.add_argument("--data", default="2d", choices=["2d", "digits"],
                      help="2d: toy 2-D densities (default); digits: 8x8 digits at 17 grey levels (needs "
                           "scikit-learn, minutes)")
    demo.add_argument("--no-progress", action="store_true",
                      help="no progress bars (they are shown when stderr is a terminal)")
    train = sub.add_parser("train", help="train one family on a toy density or a .npy file; write a checkpoint")
    train.add_argument("family", help=f"one of {', '.join(sorted(_family_names()))}")
    train.add_argument("--data", required=True, help="a toy density name (e.g. moons) or a .npy file (n, d)")
    train.add_argument("--steps", type=int, required=True, help="Adam steps (a resumed run continues up to it)")
    train.add_argument("--out", required=True, help="the checkpoint (.npz), written every few steps")
    train.add_argument("--resume", action="store_true", help="continue the checkpoint at --out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--n", type=int, default=4096, help="points drawn from a toy density (default 4096)")
    train.add_argument("--batch-size", type=int, default=256)
    train.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: the family's)")
    train.add_argument("--option", action="append", metavar="KEY=VALUE",
                       help="a model option, VALUE as JSON: hidden=[32,32], layers=2, num_components=4, ...")
    train.add_argument("--no-standardize", action="store_true",
                       help="train on the raw data (by default it is standardised and the scaling saved)")
    samp = sub.add_parser("sample", help="draw samples from a checkpoint written by 'genblocks train'")
    samp.add_argument("checkpoint")
    samp.add_argument("--n", type=int, default=1000)
    samp.add_argument("--out", required=True, help="samples.npy, samples.npz or a scatter plot .png; with "
                      "--workers: samples.npy, a .zarr store (zarr installed) or a folder of .npy shards")
    samp.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "strict"])
    samp.add_argument("--seed", type=int, default=0)
    samp.add_argument("--sampler", default=None, help="diffusion: ddpm, ddim, dpm_solver_pp, heun, ...")
    samp.add_argument("--num-inference-steps", type=int, default=None, help="diffusion: sampling steps")
    samp.add_argument("--workers", type=int, default=None,
                      help="draw on Dask: W local worker processes, or the cluster at $GENBLOCKS_SCHEDULER")
    samp.add_argument("--chunk", type=int, default=100_000, help="with --workers: samples per chunk (per stream)")
    sweep = sub.add_parser("sweep", help="train one model per run of a JSON config on Dask workers")
    sweep.add_argument("config", help='{"family", "data", "steps", "out", "runs": [{...}, ...]} (see docs)')
    sweep.add_argument("--workers", type=int, default=None, help="local worker processes (default: one per core)")
    sweep.add_argument("--out", default=None, help="folder for the checkpoints and sweep.json (else the config's)")
    ev = sub.add_parser("eval", help="test NLL (nats, bits/dim) and MMD of a checkpoint on held-out data")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", required=True, help="a toy density name (fresh points) or a .npy file (n, d)")
    ev.add_argument("--n", type=int, default=2000, help="points drawn from a toy density (default 2000)")
    ev.add_argument("--seed", type=int, default=1, help="seed of the held-out toy points (training used 0)")
    return parser


def _sample_options(family, options):
    """The sampling options that were given (None dropped), refused with the family's choices if it takes none
    of that name."""
    from genblocks.families import FAMILIES

    options = {k: v for k, v in (options or {}).items() if v is not None}
    allowed = FAMILIES[family].sample_options
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')}: the {family} family takes "
                         f"{['--' + a.replace('_', '-') for a in allowed] or 'no sampling options'}")
    return options


def _is_terminal(stream):
    """True when ``stream`` is an interactive terminal (progress bars are drawn only there by default)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def _family_names():
    from genblocks.families import FAMILIES

    return FAMILIES


def _run_command(args):
    if args.command == "train":
        run_train(args.family, args.data, args.steps, args.out, resume=args.resume, seed=args.seed, n=args.n,
                  batch_size=args.batch_size, lr=args.lr, standardize=not args.no_standardize,
                  options=_parse_options(args.option))
    elif args.command == "sample" and args.workers is not None:
        run_sample_distributed(args.checkpoint, args.n, args.out, workers=args.workers, chunk=args.chunk,
                               backend=args.backend, seed=args.seed,
                               options={"sampler": args.sampler, "num_inference_steps": args.num_inference_steps})
    elif args.command == "sweep":
        run_sweep(args.config, workers=args.workers, out=args.out)
    elif args.command == "sample":
        run_sample(args.checkpoint, args.n, args.out, backend=args.backend, seed=args.seed,
                   options={"sampler": args.sampler, "num_inference_steps": args.num_inference_steps})
    elif args.command == "eval":
        run_eval(args.checkpoint, args.data, n=args.n, seed=args.seed)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "demo":
        if args.seed < 0:
            parser.error(f"--seed: expected a non-negative int, got {args.seed}")
        families = None if args.families is None else [f.strip() for f in args.families.split(",") if f.strip()]
        start = time.perf_counter()
        try:
            run_demo(args.out, seed=args.seed, smoke=args.quick, families=families, data=args.data,
                     progress=not args.no_progress and _is_terminal(sys.stderr))
        except ValueError as err:
            print(f"genblocks demo: {err}", file=sys.stderr)
            return 2
        print(f"[demo] done in {time.perf_counter() - start:.1f} s")
        return 0
    try:
        _run_command(args)
    except ValueError as err:
        print(f"genblocks {args.command}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        where = getattr(args, "out", None) if args.command == "train" else None
        print(f"genblocks {args.command}: interrupted" + (f"; the last checkpoint in {where} is intact "
              "(continue with --resume)" if where else ""), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
