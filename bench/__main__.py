"""python -m bench [--quick] [name ...]: run the comparison scripts, each printing a table and writing
bench/results/<name>.json (and a PNG where a curve helps). --quick is a CI-sized smoke run."""
import argparse
import importlib
import os
import sys
import time

# In order; a script that is not present yet is skipped with a note.
SCRIPTS = ["noisy_sample", "multistep_update", "training_loss", "solvers", "dmn", "ld3", "caching", "diffusers",
           "training_speedup", "gpu"]
# Parts that a script above also runs (`diffusers` runs both), runnable alone by name.
PARTS = ["diffusers_scheduler", "diffusers_cache", "solvers_per_step", "sample_build"]
# Run by name only: half_ceiling builds a C++ harness first (a compiler and ninja, about two minutes).
BY_NAME = ["half_ceiling"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes and short timings (CI smoke run)")
    p.add_argument("names", nargs="*", help=f"scripts to run (default: all of {SCRIPTS})")
    args = p.parse_args(argv)
    names = args.names or SCRIPTS
    unknown = [n for n in names if n not in SCRIPTS + PARTS + BY_NAME]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS + PARTS + BY_NAME}")
    here = os.path.dirname(os.path.abspath(__file__))
    failed = []
    for name in names:
        if not os.path.exists(os.path.join(here, f"{name}.py")):
            print(f"[bench] {name}: not present, skipped")
            continue
        t0 = time.perf_counter()
        print(f"[bench] {name} {'(quick)' if args.quick else ''}", flush=True)
        try:
            importlib.import_module(f"bench.{name}").run(quick=args.quick)
        except Exception as e:  # report and go on with the others
            failed.append(name)
            print(f"[bench] {name} FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"[bench] {name} took {time.perf_counter() - t0:.1f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
