"""Command line: ``genblocks demo`` (a small model per family: table and picture), ``train``, ``sample``, ``eval``."""

import argparse
import json
import os
import sys
import tempfile
import time

import genblocks
from genblocks.demo import FAMILIES as DEMO_FAMILIES  # (family, row) pairs
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


def format_table(rows):
    """A Markdown table of the demo rows: test NLL and how it was computed, MMD^2, size and times."""
    lines = ["| family | model | data | test NLL (nats) | how | MMD^2 | held-out points | params | train s "
             "| sample ms / 1000 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        value = "-" if r.get("value") is None else f"{r['value']:.4f}"
        how = r["metric"].split("(", 1)[-1].rstrip(")") if "(" in r["metric"] else r["metric"]
        how = how[len("nats, "):] if how.startswith("nats, ") else how
        lines.append(f"| {r['family']} | {r['model']} | {r.get('data', '-')} | {value} | {how} | {r['mmd']:.5f} "
                     f"| {r['test'].shape[0]} | {r['params']} | {r['seconds']:.1f} | {r['sample_ms']:.1f} |")
    return "\n".join(lines)


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed: pip install "genblocks[plot]" for the picture'
    # top row: each row's held-out data; bottom row: its model's samples, on the same axes
    fig, axes = plt.subplots(2, len(rows), figsize=(3.0 * len(rows), 6.4), squeeze=False)
    for k, r in enumerate(rows):
        top, bottom = axes[0][k], axes[1][k]
        t, s = r["test"], r["samples"]
        top.scatter(t[:, 0], t[:, 1], s=2, alpha=0.5, color="gray")
        top.set_title(f"data: {r.get('data', '-')}\n({t.shape[0]} held-out points)", fontsize=8)
        bottom.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5)
        value = "" if r.get("value") is None else f"NLL {r['value']:.3f}, "
        bottom.set_title(f"{r['family']}: {r['model']}\n{value}MMD^2 {r['mmd']:.4f}", fontsize=7, wrap=True)
        lo, hi = t.min(axis=0), t.max(axis=0)
        pad = 0.1 * (hi - lo)
        for ax in (top, bottom):
            ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
            ax.set_ylim(lo[1] - pad[1], hi[1] + pad[1])
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
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


def run_demo(out, *, seed=0, smoke=False, families=None, stream=None):
    """Run every family's demo, print the table, write ``demo.md``, ``demo.json`` and ``demo.png``."""
    stream = sys.stdout if stream is None else stream
    names = [f for f, _ in DEMO_FAMILIES]
    chosen = names if families is None else families
    unknown = [f for f in chosen if f not in names]
    if unknown or not chosen:
        raise ValueError(f"--families: expected a comma-separated subset of {','.join(names)}, got "
                         f"{unknown if unknown else 'none'}")
    check_out_folder(out)  # before any training: a bad --out costs nothing
    rng = genblocks.Rng(seed, "numpy")
    rows = []
    for (family, row), child in zip(DEMO_FAMILIES, rng.split(len(DEMO_FAMILIES))):
        if family not in chosen:
            continue
        print(f"[demo] {family} ...", file=stream, flush=True)
        rows.append(add_mmd(row(child, smoke=smoke)))
    table = format_table(rows)
    print(table, file=stream)
    write_atomic(os.path.join(out, "demo.md"), lambda f: f.write((table + "\n").encode()))
    summary = [{k: v for k, v in r.items() if k not in ("samples", "test")} for r in rows]
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
    from genblocks.families import FAMILIES

    stream = sys.stdout if stream is None else stream
    _check_out_file(out, (".npy", ".npz", ".png"), "the samples")
    if out.endswith(".png"):
        _matplotlib()  # before sampling: a missing extra costs nothing
    family, model, params, state, config = _load_checkpoint(checkpoint)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    allowed = FAMILIES[family].sample_options
    extra = sorted(set(options) - set(allowed))
    if extra:
        raise ValueError(f"--{extra[0].replace('_', '-')}: the {family} family takes "
                         f"{['--' + a.replace('_', '-') for a in allowed] or 'no sampling options'}")
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
    samp.add_argument("--out", required=True, help="samples.npy, samples.npz or a scatter plot .png")
    samp.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "strict"])
    samp.add_argument("--seed", type=int, default=0)
    samp.add_argument("--sampler", default=None, help="diffusion: ddpm, ddim, dpm_solver_pp, heun, ...")
    samp.add_argument("--num-inference-steps", type=int, default=None, help="diffusion: sampling steps")
    ev = sub.add_parser("eval", help="test NLL (nats, bits/dim) and MMD of a checkpoint on held-out data")
    ev.add_argument("checkpoint")
    ev.add_argument("--data", required=True, help="a toy density name (fresh points) or a .npy file (n, d)")
    ev.add_argument("--n", type=int, default=2000, help="points drawn from a toy density (default 2000)")
    ev.add_argument("--seed", type=int, default=1, help="seed of the held-out toy points (training used 0)")
    return parser


def _family_names():
    from genblocks.families import FAMILIES

    return FAMILIES


def _run_command(args):
    if args.command == "train":
        run_train(args.family, args.data, args.steps, args.out, resume=args.resume, seed=args.seed, n=args.n,
                  batch_size=args.batch_size, lr=args.lr, standardize=not args.no_standardize,
                  options=_parse_options(args.option))
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
            run_demo(args.out, seed=args.seed, smoke=args.quick, families=families)
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
