"""Shared benchmark helpers: timing, copy bandwidth, machine facts, tables, result files and plots."""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from typing import Callable, Dict, List, Sequence

import torch
import torch.utils.benchmark as tb

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_seconds(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    """Median wall time of fn() on CPU (torch.utils.benchmark handles warm-up and repeats)."""
    fn()  # warm-up (compilation, allocator)
    m = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median


def best_seconds(fn: Callable[[], object], min_run_time: float = 1.0) -> float:
    """Fastest ~1 ms block of repeats (torch.utils.benchmark Timer): on a shared machine the minimum over short
    blocks is the estimate least disturbed by other processes."""
    fn()  # warm-up
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    once = max(timer.timeit(1).mean, 1e-7)
    inner = max(1, int(1e-3 / once))
    blocks = int(min(200, max(5, min_run_time / (inner * once))))
    return min(timer.timeit(inner).mean for _ in range(blocks))


def copy_seconds(nbytes: int, dtype=torch.float32, min_run_time: float = 1.0, timer=median_seconds) -> float:
    """Time of dst.copy_(src) moving `nbytes` in total (half read, half written): the machine's copy ceiling
    for a memory-bound op that moves the same bytes. `timer` should be the one the op itself is timed with."""
    n = max(1, nbytes // (2 * torch.empty((), dtype=dtype).element_size()))
    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    return timer(lambda: dst.copy_(src), min_run_time)


def copy_fn(nbytes: int, dtype=torch.float32) -> Callable[[], object]:
    """dst.copy_(src) moving `nbytes` in total (half read, half written): the copy ceiling as a function, to time
    side by side with the op that moves the same bytes (`interleaved`)."""
    n = max(1, nbytes // (2 * torch.empty((), dtype=dtype).element_size()))
    src, dst = torch.randn(n).to(dtype), torch.empty(n, dtype=dtype)
    return lambda: dst.copy_(src)


def fresh_copy_fn(nbytes: int, outputs: int = 2, dtype=torch.float32) -> Callable[[], object]:
    """`outputs` clones, together moving `nbytes` (half read, half written) and each returning a fresh tensor: the
    copy reference for an op that returns several new outputs. dst.copy_(src) writes into a tensor it already has
    and returns it, so it pays no per-output cost: allocating the output, and creating and freeing its Python
    object, a fixed ~1 us each (idle) that is a tenth of an in-cache call. It costs one Python call per output
    where the op makes one call in all (~0.3-0.5 us each, idle): beside copy, it brackets the fair ceiling."""
    n = max(1, nbytes // (2 * outputs * torch.empty((), dtype=dtype).element_size()))
    srcs = [torch.randn(n).to(dtype) for _ in range(outputs)]
    return lambda: [s.clone() for s in srcs]


def machine() -> Dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(title: str, headers: Sequence[str], rows: List[Sequence[object]]) -> None:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def write_result(name: str, payload: dict, quick: bool) -> str:
    """bench/results/<name>.json (or <name>.quick.json) with the command, machine and date."""
    os.makedirs(RESULTS, exist_ok=True)
    doc = {"name": name, "command": "python -m bench " + ("--quick " if quick else "") + name,
           "argv": sys.argv, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "quick": quick, **payload}
    path = os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return path


def write_result_part(name: str, key: str, payload: dict, quick: bool) -> str:
    """Merge payload into bench/results/<name>.json (or .quick.json) under `key`, keeping the other parts' keys
    (benches that share one results file); written atomically."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.json")
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc.setdefault("name", name)
    doc[key] = payload
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def plot_path(name: str, quick: bool) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}{'.quick' if quick else ''}.png")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def interleaved(fns: Dict[str, Callable[[], object]], rounds: int = 30, block_seconds: float = 2e-3,
                warmup: int = 2) -> Dict[str, List[float]]:
    """Per-call seconds of every fn, measured side by side: `rounds` rounds, each timing one block of every fn in
    turn (a block repeats the fn enough times to last about `block_seconds`). Interleaving puts every candidate
    under the same machine load; ratios should be taken round by round (`paired_ratio`)."""
    import time

    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        # the block length from several calls, not one: a single slow call (a page fault, a descheduling) made
        # one candidate's blocks a few calls long for the whole run, where the first calls after a switch (cold
        # caches) dominate, and biased that candidate by up to 2x
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        once = max((time.perf_counter() - t0) / 5, 1e-7)
        inner[name] = max(1, int(block_seconds / once))
    out: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = inner[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t0) / n)
    return out


def median_ci(values: Sequence[float], confidence: float = 0.95) -> Dict[str, float]:
    """The median with a distribution-free confidence interval (binomial order statistics)."""
    import math

    v = sorted(values)
    n = len(v)
    z = 1.959963984540054 if confidence == 0.95 else __import__("statistics").NormalDist().inv_cdf(0.5 + confidence / 2)
    lo = max(0, int(math.floor(n / 2 - z * math.sqrt(n) / 2)) - 1)
    hi = min(n - 1, int(math.ceil(n / 2 + z * math.sqrt(n) / 2)))
    mid = v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])
    return {"median": mid, "lo": v[lo], "hi": v[hi], "n": n}


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> Dict[str, float]:
    """Median (and interval) of num[i] / den[i] over the rounds of one interleaved run."""
    return median_ci([a / b for a, b in zip(num, den)])


def load_average() -> List[float]:
    return list(os.getloadavg())


# What a fresh in-cache output costs, and why (issue 16 item 6; measured 2026-12-01, load 4-5, float32 16x4x32x32):
# - no page faults (0.00-0.01 minor faults a call);
# - fixed work per output: glibc's malloc and free of the chunk, ATen's TensorImpl and StorageImpl, the Python
#   object's wrap and deallocation: 0.6-0.9 us together (C++ at::empty and free alone 0.6 us at load 2);
# - colder lines: glibc serves a request from the free chunk of that size freed longest ago, so a loop that drops
#   its outputs cycles them over every free chunk of the size. Two outputs used 4-6 distinct buffers over 200 calls
#   in the bench's process (fresh_output_probe below; 2, i.e. the same two swapped, in a bare process). Writing
#   the converting update (K = 1) into a ring of k output pairs, in one process: k = 2 1.08x the time of k = 1,
#   k = 3 1.32x, k = 4 1.58x, k = 6 1.73x (load 4.4: other processes share the L2).
# The process-wide glibc settings (GLIBC_TUNABLES glibc.malloc.mmap_threshold=32 MiB, trim_threshold=256 MiB:
# mallopt's fixed thresholds) give no gain: same faults, no fewer buffers, times 2-9% slower in alternating processes
# (within the load's noise); glibc's tcache, which is last-in first-out, stops at 1032 bytes. tdiff sets none of
# them. An allocator by LD_PRELOAD (jemalloc, tcmalloc) is not installed here: not measured. tdiff's C++ ops take
# their in-cache outputs from a last-in first-out cache of their own freed output blocks (csrc/outputs.h: at most 8
# blocks, 4 MiB; no process-wide setting): dropped outputs come back in the blocks written last (1 buffer set over
# 200 calls). The clones of fresh_copy_fn still go through glibc. The out= form avoids the allocation as well.
FRESH_OUTPUT_NOTE = ("fresh outputs (measured 2026-12-01): no page faults; per output 0.6-0.9 us of malloc/free and "
                     "tensor/Python object creation, plus colder lines: glibc hands out the least recently freed "
                     "chunk of a size, so dropped outputs cycle over 4-6 buffers (ring of 3-4 output pairs: "
                     "1.3-1.6x the time of one); tdiff's ops take in-cache outputs from a last-in first-out cache of "
                     "their freed blocks (csrc/outputs.h); glibc's fixed thresholds give no gain and are left unset; "
                     "see bench/common.py")


def fresh_output_probe(fn: Callable[[], object], calls: int = 200) -> Dict[str, float]:
    """Minor page faults per call of `fn` (which returns a tensor or a tuple of them) and how many distinct output
    buffers it used over `calls` calls, dropping its outputs before the next call as a training or sampling loop
    does: 2 for two outputs means the same two buffers, reused."""
    import resource

    buffers = set()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        out = fn()
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                buffers.add(t.data_ptr())
        del out
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {"minor_faults_per_call": faults / calls, "distinct_output_buffers": len(buffers), "calls": calls}
