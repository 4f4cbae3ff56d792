"""Command line: `python -m tdiff demo` (the main job), `python -m tdiff train-defaults`, `python -m tdiff bench`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tdiff", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="load or train the embedded defaults, sample them with every method, print "
                                    "a table of time and quality, and write PNG figures")
    d.add_argument("--out", default="tdiff_demo", help="folder for the figures (default: ./tdiff_demo)")
    d.add_argument("--quick", action="store_true", help="fewer samples and steps")
    t = sub.add_parser("train-defaults", help="(re)train the default DiT and UNet checkpoints and cache them")
    t.add_argument("which", nargs="*", default=["dit", "unet"], choices=["dit", "unet"])
    t.add_argument("--iters", type=int, default=None, help="iteration cap (default 4000)")
    t.add_argument("--time-budget", type=float, default=None, help="wall-time cap in seconds (default 480)")
    b = sub.add_parser("bench", help="run the benchmarks (same as python -m bench)")
    b.add_argument("--quick", action="store_true")
    b.add_argument("names", nargs="*")
    args = p.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo

        return run_demo(out=args.out, quick=args.quick)
    if args.cmd == "train-defaults":
        from .models.defaults import train_defaults

        for which in args.which:
            train_defaults(which, iters=args.iters, time_budget_s=args.time_budget)
        return 0
    from bench.__main__ import main as bench_main

    return bench_main((["--quick"] if args.quick else []) + args.names)


if __name__ == "__main__":
    sys.exit(main())
