"""Command line: `python -m tdiff demo` (the main job), `python -m tdiff train-defaults`, `python -m tdiff bench`."""
from __future__ import annotations

import argparse
import os
import sys


def _checkout_root():
    """The source checkout this tdiff runs from (an editable install), or None for an installed wheel."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.exists(os.path.join(root, "bench", "__main__.py")) and os.path.exists(
            os.path.join(root, "pyproject.toml")):
        return root
    return None


def _bench(argv) -> int:
    root = _checkout_root()
    if root is None:
        print("tdiff: the benchmarks are not part of the installed package; they live in bench/ of the source "
              "checkout. Run `python -m bench [--quick] [name ...]` from a clone of the repository (with tdiff "
              "installed from it: `pip install --no-build-isolation -e .`).", file=sys.stderr)
        return 2
    if root not in sys.path:
        sys.path.insert(0, root)
    from bench.__main__ import main as bench_main

    return bench_main(argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tdiff", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="sample the shipped default models with every method, print a table of time "
                                    "and quality, and write PNG figures (about 2 minutes on 2 cores)")
    d.add_argument("--out", default="tdiff_demo", help="folder for the figures (default: ./tdiff_demo)")
    d.add_argument("--quick", action="store_true", help="fewer samples and steps")
    t = sub.add_parser(
        "train-defaults",
        help="retrain the shipped weights (default DiT and UNet: 3000 iterations each, seed 0, one thread, about 20 "
             "minutes per model on an idle core; the metric classifier: seconds) and report whether the retrain "
             "reproduces the shipped files")
    models = ("classifier", "dit", "unet")
    # checked below, not with choices=: argparse (3.11) checks a '*' positional's default list against choices as
    # one value and refuses the bare `train-defaults`
    t.add_argument("which", nargs="*", default=list(models), metavar="{classifier,dit,unet}",
                   help="the models to retrain (default: all three)")
    t.add_argument("--out", default="tdiff_defaults",
                   help="folder for the new files (default ./tdiff_defaults; tdiff/weights in a checkout replaces "
                        "the shipped ones)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    b = sub.add_parser("bench", help="run the benchmarks (same as python -m bench; needs the source checkout)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("names", nargs="*")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo

        return run_demo(out=args.out, quick=args.quick)
    if args.cmd == "train-defaults":
        bad = [w for w in args.which if w not in models]
        if bad:
            t.error(f"argument which: invalid choice: {bad[0]!r} (choose from {', '.join(models)})")
        from .models.defaults import train_defaults

        train_defaults(list(dict.fromkeys(args.which)), out=args.out, progress=not args.no_progress)
        return 0
    return _bench((["--quick"] if args.quick else []) + args.names)


if __name__ == "__main__":
    sys.exit(main())
