"""Command line: ``genblocks demo`` trains one small model per family and writes a table and a picture."""

import argparse
import json
import os
import sys
import tempfile
import time

import genblocks
from genblocks.demo import FAMILIES as DEMO_FAMILIES  # (family, row) pairs
from genblocks.io import write_atomic


def format_table(rows):
    """A Markdown table of the demo rows."""
    lines = ["| family | model | data | metric | value | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['model']} | {r.get('data', '-')} | {r['metric']} | {r['value']:.4f} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 'matplotlib is not installed: pip install "genblocks[plot]" for the picture'
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), squeeze=False)
    for ax, r in zip(axes[0], rows):
        s = r["samples"]
        ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.5)
        ax.set_title(f"{r['family']}: {r['model']}\n{r['metric']} {r['value']:.3f}", fontsize=8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
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
        rows.append(row(child, smoke=smoke))
    table = format_table(rows)
    print(table, file=stream)
    write_atomic(os.path.join(out, "demo.md"), lambda f: f.write((table + "\n").encode()))
    summary = [{k: v for k, v in r.items() if k != "samples"} for r in rows]
    write_atomic(os.path.join(out, "demo.json"), lambda f: f.write(json.dumps(summary, indent=2).encode()))
    note = _plot(rows, os.path.join(out, "demo.png"))
    print(note or f"wrote {os.path.join(out, 'demo.md')}, demo.json and demo.png", file=stream)
    return rows


def build_parser():
    parser = argparse.ArgumentParser(
        prog="genblocks", description="Deep generative models from small composable blocks."
    )
    parser.add_argument("--version", action="version", version=f"genblocks {genblocks.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train one small model per family on 2-D data; write a table and a PNG")
    demo.add_argument("--out", default="genblocks-demo", help="output folder (default: ./genblocks-demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    demo.add_argument("--smoke", action="store_true", help="tiny sizes: a few seconds, for tests")
    demo.add_argument("--families", default=None,
                      help=f"comma-separated subset of {','.join(f for f, _ in DEMO_FAMILIES)}")
    return parser


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
            run_demo(args.out, seed=args.seed, smoke=args.smoke, families=families)
        except ValueError as err:
            print(f"genblocks demo: {err}", file=sys.stderr)
            return 2
        print(f"[demo] done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
