"""Side-by-side timing: every variant once per round, rounds repeated, on one thread; medians with 95% intervals,
and speed-ups as per-round ratios against a reference variant (so that both sides of a ratio saw the same machine
state), each checked against its ceiling."""
from __future__ import annotations

import random
import time
from typing import Callable, Dict, List, Optional

import torch

from bench.common import median_ci as common_median_ci


def interleaved_seconds(variants: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        seed: int = 0, timer: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """{name: [seconds per round]}: each round runs every variant once, in a fresh random order (so no variant
    always follows another), on one thread, after `warmup` untimed rounds. timer: wall time by default;
    time.thread_time counts only this thread's CPU time (no time descheduled behind other processes), for one-thread
    variants on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    order = list(variants)
    rng = random.Random(seed)
    out: Dict[str, List[float]] = {k: [] for k in order}
    try:
        for r in range(warmup + rounds):
            rng.shuffle(order)
            for name in order:
                t0 = timer()
                variants[name]()
                if r >= warmup:
                    out[name].append(timer() - t0)
    finally:
        torch.set_num_threads(threads)
    return out


def median_ci(values: List[float]) -> Dict[str, float]:
    """Median and its 95% interval in this module's layout ({"median", "ci95": [lo, hi], "n"}): bench.common's
    distribution-free interval (binomial order statistics; results written before 2026-12-02 used a percentile
    bootstrap here)."""
    ci = common_median_ci(values)
    return {"median": float(ci["median"]), "ci95": [float(ci["lo"]), float(ci["hi"])], "n": int(ci["n"])}


def speedup(times: Dict[str, List[float]], name: str, reference: str, mac_fraction: Optional[float]) -> dict:
    """Per-round ratios reference / variant: median with 95% interval, the ceiling 1 / mac_fraction, and whether the
    median exceeds it (a measurement error: such a figure must be re-measured, never reported)."""
    ratios = [a / b for a, b in zip(times[reference], times[name])]
    out = median_ci(ratios)
    out["seconds"] = median_ci(times[name])
    if mac_fraction is not None:
        out["ceiling"] = 1.0 / mac_fraction
        out["of_ceiling"] = out["median"] / out["ceiling"]
        out["above_ceiling"] = out["median"] > out["ceiling"]
    return out


def format_speedup(t: dict) -> str:
    """'1.62x [1.58, 1.66] (ceiling 1.78)', or why there is no figure."""
    if t.get("median") is None:
        return t.get("note", "invalid")
    lo, hi = t["ci95"]
    ceiling = f" (ceiling {t['ceiling']:.2f})" if "ceiling" in t else ""
    return f"{t['median']:.2f}x [{lo:.2f}, {hi:.2f}]{ceiling}"
