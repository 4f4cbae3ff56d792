"""Training speed-up on digits: iterations to reach the uniform baseline's final Fréchet distance.

Same small DiT, same seeds, four trainings:
  baseline   DDPM linear schedule, uniform time sampling, unweighted eps loss
  speed      DDPM linear schedule, SpeeD sampling (k=2, tau=700, dual reflection) + SpeeD weights (lambda=0.6)
  edm        EDM schedule, log-normal sigma (-1.2, 1.2), EDM preconditioning and weight
  edm_fdm    as edm, with FDM's momentum on the network input (m=2) and the loss-weight warm-up
For each seed the FD curve of every method is interpolated linearly between evaluations; "iters to baseline FD"
is the first crossing of that seed's baseline final FD. Ratio = baseline iterations / method iterations (> 1 is
faster). Mean and spread over seeds. CPU is scarce: the model is a small DiT (patch 4) at 16x16.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from bench.common import plot_path, print_table, write_result
from tdiff.training.train import TrainConfig, train

SMALL_DIT = dict(hidden_size=64, depth=3, num_heads=4, patch_size=4)
METHODS = {
    "baseline": dict(schedule="ddpm", sampler="uniform", weighting=None),
    "speed": dict(schedule="ddpm", sampler="speed", weighting="speed"),
    "edm": dict(schedule="edm", sampler="lognormal", weighting="edm", target="edm"),
    "edm_fdm": dict(schedule="edm", sampler="lognormal", process="fdm", warmup=150),
}


def crossing(iters, fds, level):
    """First (linearly interpolated) iteration at which the FD curve reaches `level`; None if never."""
    prev_i, prev_f = 0, math.inf
    for i, f in zip(iters, fds):
        if f <= level:
            if math.isinf(prev_f):
                return float(i)
            return prev_i + (i - prev_i) * (prev_f - level) / (prev_f - f)
        prev_i, prev_f = i, f
    return None


def summarise(runs, iters):
    """Per method: the first crossing of each seed's baseline final FD, and two ratios: against the full budget
    (`iters`), and against the baseline's own first crossing of that level (fairer when the baseline's FD curve
    is not monotonic and reaches its final value before the end)."""
    rows, summary = [], {}
    for name in runs:
        reach, final, own = [], [], []
        for h, base in zip(runs[name], runs["baseline"]):
            level = base["fd"][-1]
            reach.append(crossing(h["eval_iter"], h["fd"], level))
            own.append(crossing(base["eval_iter"], base["fd"], level))
            final.append(h["fd"][-1])
        ok = [(r, o) for r, o in zip(reach, own) if r is not None]
        ratios = [iters / r for r, _ in ok]
        ratios_own = [o / r for r, o in ok]
        summary[name] = {"iters_to_baseline_fd": reach, "baseline_first_crossing": own, "final_fd": final,
                         "ratio_mean": statistics.mean(ratios) if ratios else None,
                         "ratio_std": statistics.pstdev(ratios) if len(ratios) > 1 else 0.0,
                         "ratio_vs_baseline_crossing_mean": statistics.mean(ratios_own) if ratios_own else None,
                         "ratio_vs_baseline_crossing_std": statistics.pstdev(ratios_own) if len(ratios_own) > 1
                         else 0.0,
                         "reached": f"{len(ok)}/{len(reach)}"}
        sm = summary[name]
        rows.append([name, statistics.mean(final), statistics.pstdev(final) if len(final) > 1 else 0.0,
                     (statistics.mean(r for r, _ in ok) if ok else "never"), sm["reached"],
                     (f"{sm['ratio_mean']:.2f} ± {sm['ratio_std']:.2f}" if ratios else "-"),
                     (f"{sm['ratio_vs_baseline_crossing_mean']:.2f} ± {sm['ratio_vs_baseline_crossing_std']:.2f}"
                      if ratios else "-")])
    return rows, summary


def run(quick: bool = False) -> dict:
    seeds = [0] if quick else [0, 1, 2]
    iters, every = (10, 5) if quick else (400, 50)
    samples, steps = (100, 4) if quick else (300, 15)
    runs = {m: [] for m in METHODS}
    t0 = time.perf_counter()
    for seed in seeds:
        for name, kw in METHODS.items():
            cfg = TrainConfig(model="dit", iters=iters, batch_size=64, lr=2e-3, ema=0.98, seed=seed,
                              eval_every=every, eval_samples=samples, eval_steps=steps, model_overrides=SMALL_DIT,
                              threads=1, **kw)  # 1 thread: the cores are oversubscribed
            res = train(cfg, log=lambda s, n=name, sd=seed: print(f"  [{n} seed {sd}] {s}", flush=True))
            runs[name].append(res["history"] | {"seed": seed, "train_seconds": res["train_seconds"]})
    rows, summary = summarise(runs, iters)
    print_table(f"iterations to the baseline's final FD ({iters} iters, seeds {seeds}, DiT {SMALL_DIT})",
                ["method", "final FD mean", "FD std (seeds)", "iters to baseline final FD", "reached",
                 "ratio vs budget", "ratio vs baseline's own crossing"], rows)
    _plot(runs, plot_path("training_speedup", quick))
    payload = {"iters": iters, "eval_every": every, "eval_samples": samples, "eval_steps": steps, "seeds": seeds,
               "model": SMALL_DIT, "methods": METHODS, "summary": summary, "runs": runs,
               "wall_seconds": time.perf_counter() - t0,
               "note": "2 CPU cores shared with other jobs; FD from tdiff.metrics.frechet on digits"}
    path = write_result("training_speedup", payload, quick)
    print(f"wrote {path} ({time.perf_counter() - t0:.0f}s)")
    return {"summary": summary}


def _plot(runs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, hs in runs.items():
        its = hs[0]["eval_iter"]
        fds = torch.tensor([h["fd"] for h in hs], dtype=torch.float64)
        mean, lo, hi = fds.mean(0), fds.min(0).values, fds.max(0).values
        ax.plot(its, mean, marker="o", label=name)
        ax.fill_between(its, lo, hi, alpha=0.2)
    level = statistics.mean(h["fd"][-1] for h in runs["baseline"])
    ax.axhline(level, color="gray", linestyle="--", linewidth=1, label="baseline final FD")
    ax.set(xlabel="iteration", ylabel="Fréchet distance (digits, lower is better)", yscale="log",
           title="mean over seeds, band = min..max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def resummarise(path: str) -> None:
    """Recompute the table, summary and plot of a saved result file (no retraining)."""
    import json

    with open(path) as f:
        doc = json.load(f)
    rows, doc["summary"] = summarise(doc["runs"], doc["iters"])
    print_table(f"iterations to the baseline's final FD ({doc['iters']} iters, seeds {doc['seeds']})",
                ["method", "final FD mean", "FD std (seeds)", "iters to baseline final FD", "reached",
                 "ratio vs budget", "ratio vs baseline's own crossing"], rows)
    _plot(doc["runs"], path[: -len(".json")] + ".png")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


if __name__ == "__main__":
    import sys

    if "--resummarise" in sys.argv:
        resummarise(sys.argv[-1])
    else:
        run(quick="--quick" in sys.argv)
