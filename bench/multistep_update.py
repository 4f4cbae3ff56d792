"""The fused multistep update (tdiff::multistep_update): effective bandwidth at every history length K, in and out of
cache, against eager PyTorch, torch.compile and the copy ceiling; the convert form (raw model output -> data
prediction folded in); half precision against eager; and the public wrapper's per-call overhead.

Bandwidth = the bytes the op must move / its time; the reference is dst.copy_(src) moving the same bytes, timed in
the same interleaved rounds. Out of cache it is no ceiling on this CPU: one thread copies a large buffer at 11-14
GB/s while this read-mostly kernel (K+1 reads, one write) moves 19-22 GB/s, as fast as a read-only sum over one
tensor of that size; chunked copies and the fastest of read-only / write-only / copy passes were tried as ceilings
and the op passes them too, so out of cache "of copy" above 1 only says the op is at least as fast as a copy (its
values are checked against the reference by opcheck and the fuzz tests). The update reads x and K history tensors
and writes x_next: (K + 2) tensors. The convert form (src = x) also writes h_0: (K + 3). "In cache" is a working
set that fits the L2 cache (16x4x32x32, 256 KiB a tensor); "out of cache" one well beyond it (64x4x64x64, 4 MiB a
tensor). One thread, interleaved rounds, medians with 95% intervals (bench.common.median_ci); ratios are taken round
by round. "tdiff" is the public function (fresh outputs every call); "tdiff out=" the convert form's out= binding
writing into the same two buffers every call, as the sampling loop does for large states (tdiff/solvers/buffers.py).
The convert form returns two fresh tensors, so it is also held against two clones that return fresh tensors and
move the same bytes (bench.common.fresh_copy_fn): its in-cache gap to "tdiff out=" is that per-call cost, not the
kernel (measured 2026-12-01: no page faults; in a C++ loop the functional form is only 0.7 us above out=, the two
at::empty with their frees 0.85 us; from Python each returned tensor costs about 1 us idle, the wrapper about 1.2 us,
and glibc's fresh outputs cycle over every free chunk of their size, into colder lines (output_ring below times that
cycle with the out= form; tdiff's outputs now come from a last-in first-out cache of their freed blocks,
csrc/outputs.h; bench.common's note on fresh outputs); a profile of the public call had 74% of its cycles in the span
loop against 83% for out=).

Overhead: the public wrapper (eager, no grad, check=False, as the sampling loop calls it) against the C++ function
it calls, bound directly (tdiff._C, csrc/direct.h; overhead_us) and through the dispatcher (vs_dispatcher_us), at a
size where the kernel itself is negligible. In cache a call lasts about 10 us, so every configuration gets untimed
warm-up rounds and many timed rounds of few-ms blocks on the same buffers. On a loaded machine the in-cache figures
at K >= 2 are still unreliable: there a dst.copy_(src) of the op's 1-1.5 MiB (K = 2..4) alone runs 3-4x slower in
some processes than in others (the working set no longer stays in this CPU's 2 MiB L2 when other processes share
the core), so the copy, and with it the ratio, is bimodal; time them on an idle machine.
"""
from __future__ import annotations

import torch

from bench.common import (FRESH_OUTPUT_NOTE, copy_fn, fresh_copy_fn, fresh_output_probe, interleaved, load_average,
                          median_ci, paired_ratio, plot_path, print_table, pyplot, write_result)
from tdiff.ops import dispatch
from tdiff.ops.multistep_update import multistep_update

try:
    import tdiff._C as _C
except ImportError:  # the reference backend: no C++ function to compare the wrapper with
    _C = None

IN_CACHE, OUT_OF_CACHE = (16, 4, 32, 32), (64, 4, 64, 64)
QUICK_IN, QUICK_OUT = (4, 4, 32, 32), (16, 4, 64, 64)
TARGET_FRAC_OF_COPY = 0.8
TARGET_HALF_SPEEDUP = 1.5  # and 2.0 as the goal (issue 16 item 4)
TARGET_OVERHEAD_US = 10.0


def eager_update(x, hist, coeffs):
    view = (-1,) + (1,) * (x.dim() - 1)
    out = coeffs[:, 0].view(view) * x
    for j, h in enumerate(hist):
        out = out + coeffs[:, j + 1].view(view) * h
    return out


def _eager_convert(x, hist, coeffs, pq):
    # what a loop does without the fused conversion: D = p x + q m, then the update with D as h_0
    view = (-1,) + (1,) * (x.dim() - 1)
    d = pq[:, 0].view(view) * x + pq[:, 1].view(view) * hist[0]
    return eager_update(x, [d, *hist[1:]], coeffs), d


def _stats(times, copy_times, nbytes):
    t = median_ci(times)
    frac = paired_ratio(copy_times, times)
    # the best round of each (least disturbed by other processes) as a second view on a loaded machine
    return {"us": t["median"] * 1e6, "us_lo": t["lo"] * 1e6, "us_hi": t["hi"] * 1e6,
            "GBps": nbytes / t["median"] / 1e9, "frac_of_copy": frac["median"], "frac_lo": frac["lo"],
            "frac_hi": frac["hi"], "us_best": min(times) * 1e6, "frac_of_copy_best": min(copy_times) / min(times)}


def bandwidth(quick: bool) -> list:
    records = []
    for where, shape in (("in cache", QUICK_IN if quick else IN_CACHE),
                         ("out of cache", QUICK_OUT if quick else OUT_OF_CACHE)):
        # in cache a call lasts 10-40 us: many short blocks (0.3 ms), so that few blocks straddle a switch to
        # another process (which evicts the L2 working set); 2 ms blocks gave 95% intervals 5-10x wider under load
        rounds, block = (7, 2e-3) if quick else ((201, 3e-4) if where == "in cache" else (61, 2e-3))
        for k in (1, 2, 3, 4):
            for form in ("update", "convert"):
                x = torch.randn(shape)
                hist = [torch.randn(shape) for _ in range(k)]
                coeffs, pq = torch.randn(shape[0], 1 + k), torch.randn(shape[0], 2)
                tensors = k + 2 if form == "update" else k + 3
                nbytes = tensors * x.numel() * x.element_size()
                if form == "update":
                    eager = lambda x=x, hist=hist, coeffs=coeffs: eager_update(x, hist, coeffs)  # noqa: E731
                    ours = lambda x=x, hist=hist, coeffs=coeffs: multistep_update(x, hist, coeffs,  # noqa: E731
                                                                                   check=False)
                else:
                    eager = lambda x=x, hist=hist, coeffs=coeffs, pq=pq: _eager_convert(x, hist, coeffs, pq)  # noqa
                    ours = lambda x=x, hist=hist, coeffs=coeffs, pq=pq: multistep_update(  # noqa: E731
                        x, hist, coeffs, convert=pq, check=False)
                compiled = torch.compile(eager, dynamic=False)
                fns = {"copy": copy_fn(nbytes), "eager": eager, "torch.compile": compiled, "tdiff": ours}
                if form == "convert":  # x_next and h_0: two fresh outputs (eager's and compile's too)
                    fns["copy, 2 fresh outputs"] = fresh_copy_fn(nbytes, 2)
                if form == "convert" and _C is not None and hasattr(_C, "multistep_update_out_cpu"):
                    # the out= binding into the same two buffers every call (the sampling loop's buffer reuse for
                    # large states): the kernel without the two fresh outputs and the wrapper
                    out, h0 = torch.empty_like(x), torch.empty_like(x)
                    fns["tdiff out="] = lambda x=x, hist=hist, coeffs=coeffs, pq=pq, out=out, h0=h0: (
                        _C.multistep_update_out_cpu(x, hist, coeffs, None, None, None, pq, out, h0))
                with torch.no_grad():
                    interleaved(fns, rounds=2)  # warm-up: caches, allocator, compiled graphs
                    times = interleaved(fns, rounds=rounds, block_seconds=block)
                for name in [n for n in fns if not n.startswith("copy")]:
                    records.append({"where": where, "shape": list(shape), "K": k, "form": form, "impl": name,
                                    "bytes": nbytes, **_stats(times[name], times["copy"], nbytes)})
                    # in cache, copy moving the same bytes bounds the pass; above it is a disturbed measurement
                    # (interleaved with eager and compile, which evict the cache between blocks), not a speed
                    records[-1]["above_ceiling"] = where == "in cache" and records[-1]["frac_of_copy"] > 1
                    if form == "convert" and name == "tdiff" and where == "in cache":  # faults, buffer reuse
                        records[-1]["fresh_outputs"] = fresh_output_probe(fns[name])
                    if form == "convert" and name != "tdiff out=":
                        f = paired_ratio(times["copy, 2 fresh outputs"], times[name])
                        records[-1].update({"frac_of_fresh_copy": f["median"], "fresh_frac_lo": f["lo"],
                                            "fresh_frac_hi": f["hi"]})
                records.append({"where": where, "shape": list(shape), "K": k, "form": form, "impl": "copy",
                                "bytes": nbytes, **_stats(times["copy"], times["copy"], nbytes)})
    print_table("Fused update, float32, one thread: effective bandwidth / copy bandwidth (median [95% interval]; "
                "best rounds; convert form: also against two clones returning fresh outputs)",
                ["where", "shape", "K", "form", "impl", "us", "GB/s", "of copy", "best of copy", "of fresh copy"],
                [[r["where"], "x".join(map(str, r["shape"])), r["K"], r["form"], r["impl"], r["us"], r["GBps"],
                  f"{r['frac_of_copy']:.2f} [{r['frac_lo']:.2f}, {r['frac_hi']:.2f}]"
                  + (" (above copy: no result)" if r["where"] == "in cache" and r["frac_of_copy"] > 1 else ""),
                  r["frac_of_copy_best"],
                  f"{r['frac_of_fresh_copy']:.2f} [{r['fresh_frac_lo']:.2f}, {r['fresh_frac_hi']:.2f}]"
                  if "frac_of_fresh_copy" in r else ""]
                 for r in records])
    return records


def half_precision(quick: bool) -> list:
    rounds = 7 if quick else 21
    records = []
    for where, shape in (("in cache", QUICK_IN if quick else IN_CACHE),
                         ("out of cache", QUICK_OUT if quick else OUT_OF_CACHE)):
        for dtype in (torch.float16, torch.bfloat16):
            for k in (2, 4):
                x = torch.randn(shape).to(dtype)
                hist = [torch.randn(shape).to(dtype) for _ in range(k)]
                coeffs = torch.randn(shape[0], 1 + k)
                # eager in the data's dtype, as a user writes it (a float32 upcast would be slower still)
                ch = coeffs.to(dtype)
                fns = {"eager": lambda: eager_update(x, hist, ch),
                       "tdiff": lambda: multistep_update(x, hist, coeffs, check=False)}
                with torch.no_grad():
                    times = interleaved(fns, rounds=rounds)
                speed = paired_ratio(times["eager"], times["tdiff"])
                records.append({"where": where, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                                "K": k, "eager_us": median_ci(times["eager"])["median"] * 1e6,
                                "tdiff_us": median_ci(times["tdiff"])["median"] * 1e6,
                                "speedup_vs_eager": speed["median"], "speedup_lo": speed["lo"],
                                "speedup_hi": speed["hi"],
                                "speedup_best": min(times["eager"]) / min(times["tdiff"])})
    print_table("Half precision: fused update vs eager PyTorch (same dtype), one thread",
                ["where", "shape", "dtype", "K", "eager us", "tdiff us", "speed-up [95%]", "best rounds"],
                [[r["where"], "x".join(map(str, r["shape"])), r["dtype"], r["K"], r["eager_us"], r["tdiff_us"],
                  f"{r['speedup_vs_eager']:.2f} [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]", r["speedup_best"]]
                 for r in records])
    return records


def output_ring(quick: bool) -> list:
    """The cost of colder output lines: the converting update (K = 1, in cache) written by the out= binding into a
    ring of k (x_next, h_0) pairs, k = 1..6, against k = 1, round by round. glibc hands a request the free chunk of
    its size freed longest ago, so fresh outputs cycle over every free chunk of the size: k is that cycle's length
    (bench.common's note on fresh outputs)."""
    import itertools

    shape = QUICK_IN if quick else IN_CACHE
    x, hist = torch.randn(shape), [torch.randn(shape)]
    coeffs, pq = torch.randn(shape[0], 2), torch.randn(shape[0], 2)
    fns = {}
    if _C is None or not hasattr(_C, "multistep_update_out_cpu"):
        return []
    for k in (1, 2, 3, 4, 6):
        ring = itertools.cycle([(torch.empty(shape), torch.empty(shape)) for _ in range(k)])

        def write(ring=ring):
            out, h0 = next(ring)
            _C.multistep_update_out_cpu(x, hist, coeffs, None, None, None, pq, out, h0)

        fns[k] = write
    with torch.no_grad():
        interleaved(fns, rounds=2)
        times = interleaved(fns, rounds=7 if quick else 201, block_seconds=3e-4)
    records = []
    for k, ts in times.items():
        r = paired_ratio(ts, times[1])
        records.append({"ring": k, "shape": list(shape), "us": median_ci(ts)["median"] * 1e6,
                        "time_vs_ring_of_1": r["median"], "lo": r["lo"], "hi": r["hi"]})
    print_table("Colder output lines: out= into a ring of k output pairs (convert, K = 1, in cache), time / k = 1",
                ["k", "us", "vs k = 1 [95%]"],
                [[r["ring"], r["us"], f"{r['time_vs_ring_of_1']:.2f} [{r['lo']:.2f}, {r['hi']:.2f}]"]
                 for r in records])
    return records


def overhead(quick: bool) -> dict:
    """Per-call cost of the public wrapper above the C++ function it calls (tiny tensors): overhead_us against the
    direct binding, vs_dispatcher_us against the registered op called through torch.ops."""
    x = torch.randn(1, 4, 8, 8)
    hist = [torch.randn(1, 4, 8, 8) for _ in range(2)]
    coeffs, row, pq = torch.randn(1, 3), torch.randn(3), torch.randn(2)
    kernel = torch.ops.tdiff.multistep_update_cpu.default
    convert_kernel = torch.ops.tdiff.multistep_update_convert_cpu.default
    fns = {
        "C++ kernel via dispatcher": lambda: kernel(x, hist, coeffs),
        "public wrapper": lambda: multistep_update(x, hist, coeffs, check=False),
        "public wrapper, shared row": lambda: multistep_update(x, hist, row, check=False),
        "C++ convert kernel via dispatcher": lambda: convert_kernel(x, hist, row, None, None, None, pq),
        "public wrapper, convert": lambda: multistep_update(x, hist, row, convert=pq, check=False),
        "registered custom op": lambda: torch.ops.tdiff.multistep_update(x, hist, coeffs),
        "eager (2 muls, 2 adds)": lambda: eager_update(x, hist, coeffs),
    }
    if _C is not None and hasattr(_C, "multistep_update_cpu"):
        fns["C++ kernel, direct binding"] = lambda: _C.multistep_update_cpu(x, hist, coeffs)
        fns["C++ convert kernel, direct binding"] = lambda: _C.multistep_update_convert_cpu(x, hist, row, None, None,
                                                                                             None, pq)
    with torch.no_grad():
        interleaved(fns, rounds=2)
        times = interleaved(fns, rounds=7 if quick else 41, block_seconds=5e-3)
    stats = {name: dict(median_ci(t), best=min(t)) for name, t in times.items()}
    result = {name: {"us": s["median"] * 1e6, "us_lo": s["lo"] * 1e6, "us_hi": s["hi"] * 1e6,
                     "us_best": s["best"] * 1e6} for name, s in stats.items()}
    for name, convert in (("public wrapper", False), ("public wrapper, shared row", False),
                          ("public wrapper, convert", True)):
        prefix = "C++ convert kernel" if convert else "C++ kernel"
        for key, ref in (("overhead", f"{prefix}, direct binding"), ("vs_dispatcher", f"{prefix} via dispatcher")):
            if ref not in times:
                continue
            d = median_ci([a - b for a, b in zip(times[name], times[ref])])
            result[name].update({f"{key}_us": d["median"] * 1e6, f"{key}_lo": d["lo"] * 1e6,
                                 f"{key}_hi": d["hi"] * 1e6,
                                 f"{key}_best_us": (min(times[name]) - min(times[ref])) * 1e6})
    print_table("Per-call cost at 1x4x8x8 (eager, no grad, one thread), median [95% interval]",
                ["call", "us", "best us", "above direct binding us", "above dispatcher us"],
                [[n, f"{r['us']:.2f} [{r['us_lo']:.2f}, {r['us_hi']:.2f}]", r["us_best"],
                  f"{r['overhead_us']:.2f} [{r['overhead_lo']:.2f}, {r['overhead_hi']:.2f}]"
                  if "overhead_us" in r else "",
                  f"{r['vs_dispatcher_us']:.2f} [{r['vs_dispatcher_lo']:.2f}, {r['vs_dispatcher_hi']:.2f}]"
                  if "vs_dispatcher_us" in r else ""] for n, r in result.items()])
    return result


def _plot(records, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, where in zip(axes, ("in cache", "out of cache")):
        for impl, marker in (("tdiff", "o"), ("tdiff out=", "D"), ("torch.compile", "s"), ("eager", "^")):
            for form, ls in (("update", "-"), ("convert", "--")):
                rs = [r for r in records if r["where"] == where and r["impl"] == impl and r["form"] == form]
                if not rs:
                    continue
                ax.plot([r["K"] for r in rs], [r["frac_of_copy"] for r in rs], marker=marker, ls=ls,
                        label=f"{impl} ({form})")
        ax.axhline(TARGET_FRAC_OF_COPY, color="k", lw=1, ls=":", label="target 0.8 of copy")
        ax.set_title(f"{where} ({'x'.join(map(str, rs[0]['shape'])) if rs else ''}, float32)")
        ax.set_xlabel("history length K")
        ax.set_xticks([1, 2, 3, 4])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("effective bandwidth / copy bandwidth")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(quick: bool = False) -> dict:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = dispatch.backend_for(torch.empty(1), "multistep_update_cpu")
    isa = torch.ops.tdiff.cpu_capability() if dispatch.cpp_has("cpu_capability") else None
    load_before = load_average()
    try:
        payload = {"threads": 1, "backend": backend, "cpu_capability": isa,
                   "targets": {"frac_of_copy": TARGET_FRAC_OF_COPY, "half_speedup_vs_eager": TARGET_HALF_SPEEDUP,
                               "half_speedup_goal": 2.0, "wrapper_overhead_us": TARGET_OVERHEAD_US},
                   "bandwidth": bandwidth(quick), "half_precision": half_precision(quick),
                   "overhead": overhead(quick), "fresh_outputs_note": FRESH_OUTPUT_NOTE,
                   "output_ring": output_ring(quick)}
    finally:
        torch.set_num_threads(threads_before)
    payload["loadavg_before"], payload["loadavg_after"] = load_before, load_average()
    _plot(payload["bandwidth"], plot_path("multistep_update", quick))
    path = write_result("multistep_update", payload, quick)
    print(f"backend {backend} ({isa}); load average {payload['loadavg_before']} -> {payload['loadavg_after']}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
