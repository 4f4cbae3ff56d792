"""Noisy-sample construction and the weighted per-sample MSE (the training hot path): tdiff's fused ops against
eager PyTorch, torch.compile and the copy ceiling, in and out of cache, in float32, and in float16 / bfloat16
against eager.

noisy_sample reads x0 and eps and writes x_t (plus the network input when asked): 3 (or 4) tensors' worth of bytes.
weighted_mse reads pred and target and writes (B,) values: 2 tensors. Effective bandwidth = those bytes / time; the
ceiling is dst.copy_(src) moving the same bytes, timed in the same interleaved rounds (a read-only reduction such
as weighted_mse may pass it: reading needs no write-allocate). "In cache" is 16x4x32x32 (256 KiB a tensor in
float32, inside the L2 cache), "out of cache" 128x4x64x64 (8 MiB a tensor). One thread, medians with 95%
intervals; ratios round by round. In cache a call lasts about 10 us, so a round is a block of calls of a few ms on
the same buffers, after untimed warm-up blocks, and there are many rounds: the in-cache ratio is otherwise at the
mercy of the other processes' cache traffic.

Two outputs (x_t and the input) are also held against two clones that return fresh tensors and move the same bytes
(bench.common.fresh_copy_fn). The in-cache gap of that row to copy is a fixed per-call cost, not the data pass
(issue 16 item 6, measured 2026-12-01): no page faults (minor faults 0.001 a call); two at::empty with their frees
cost 0.85 us in a C++ loop, and the op called there (tdiff::noisy_sample_cpu, fresh outputs) reaches 0.82-0.88 of
copy (bench/half_ceiling); from Python each returned tensor costs its wrap, free and deallocation (about 1 us,
idle), the wrapper about 1.5 us; and glibc's fresh outputs cycle over every free chunk of their size (it hands out
the one freed longest ago), into colder lines: 4-6 buffers for two outputs in this bench's process. tdiff's outputs
now come from a last-in first-out cache of their own freed blocks (csrc/outputs.h), the blocks written last; the
clones still cycle (bench.common's note on fresh outputs; the result's "fresh_outputs" record counts the buffers).
dst.copy_(src) pays none of that: it writes into a tensor it already has and returns it.

The C++ call's own fixed cost, piece by piece (16x4x32x32, a C++ loop per piece, load 2.2, 2026-12-01): input
checks 0.04 us; the coefficients of 16 distinct times 1.0 us (0.13 us for 16 equal times, computed once); each
output's at::empty and free 0.6 us (before the output cache); the dispatcher 2.4 us (the public path skips it: the pybind hop of the prepared
sampler is ~0.35 us); the span loop itself the rest. The coefficients are four libm calls a sample for a VP schedule
(expm1, log, exp, exp), kept because vectorised transcendentals would change the coefficients' last bits; they are
made stage by stage over blocks of 16 samples (independent calls overlap: 16 times 0.98 -> 0.73 us, 64 times
1.40-1.52x faster, the same bits). Times are read in place in their own dtype and a run of equal times is computed
once. The public wrapper adds ~1 us above the sampler (argument tests, the compile/grad/backend tests, the
per-schedule lookup). overhead() below times the 16-sample pieces from Python ("fixed_cost_pieces").

Overhead: the public function (eager, no grad, check=False) against the C++ function it calls (the prepared
sampler, tdiff._C.NoisySampler), the op's full-argument direct binding (tdiff._C, csrc/direct.h) and the op through
the dispatcher, at a size where the data pass is negligible (1x4x8x8).
"""
from __future__ import annotations

import torch

from bench.common import (FRESH_OUTPUT_NOTE, copy_fn, fresh_copy_fn, fresh_output_probe, interleaved, load_average,
                          median_ci, paired_ratio, plot_path, print_table, pyplot, write_result)
from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.noisy_sample import noisy_sample
from tdiff.ops.weighted_mse import weighted_mse

try:
    import tdiff._C as _C
except ImportError:  # the reference backend: no C++ function to compare the wrapper with
    _C = None

SIZES = {"in cache": (16, 4, 32, 32), "out of cache": (128, 4, 64, 64)}
QUICK_SIZES = {"in cache": (4, 4, 32, 32), "out of cache": (16, 4, 64, 64)}
TARGETS = {"frac_of_copy": 0.8, "half_speedup_vs_eager": 1.5, "half_speedup_goal": 2.0, "wrapper_overhead_us": 10.0}


def eager_noisy(sched):
    # What a user writes without tdiff: schedule coefficients, broadcast, multiply-add (and the c_in input).
    def fn(x0, eps, t):
        a = sched.alpha(t).to(x0.dtype).view(-1, 1, 1, 1)
        s = sched.sigma(t).to(x0.dtype).view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        return xt, xt / torch.sqrt(s * s + a * a)

    return fn


def eager_wmse(pred, target, weight):
    return weight * ((pred - target) ** 2).flatten(1).mean(1)


def _record(where, shape, dtype, impl, times, copy_times, nbytes, fresh_copy_times=None):
    t = median_ci(times)
    frac = paired_ratio(copy_times, times)
    rec = {"where": where, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": impl,
           "us": t["median"] * 1e6, "us_lo": t["lo"] * 1e6, "us_hi": t["hi"] * 1e6, "GBps": nbytes / t["median"] / 1e9,
           "frac_of_copy": frac["median"], "frac_lo": frac["lo"], "frac_hi": frac["hi"],
           "us_best": min(times) * 1e6, "frac_of_copy_best": min(copy_times) / min(times)}
    if fresh_copy_times is not None:  # against copies returning as many fresh outputs (bench.common.fresh_copy_fn)
        f = paired_ratio(fresh_copy_times, times)
        rec.update({"frac_of_fresh_copy": f["median"], "fresh_frac_lo": f["lo"], "fresh_frac_hi": f["hi"]})
    return rec


def measure(quick: bool) -> list:
    sched = S.VPLinear()
    rounds = 7 if quick else 61
    records = []
    for where, shape in (QUICK_SIZES if quick else SIZES).items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x0, eps = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
            t = torch.rand(shape[0], dtype=torch.float64) * 0.98 + 0.01
            w = torch.rand(shape[0])
            es = x0.element_size() * x0.numel()
            eager = eager_noisy(sched)
            fns = {
                "copy (x_t)": copy_fn(3 * es, dtype),
                "copy (x_t, input)": copy_fn(4 * es, dtype),
                "copy, 2 fresh outputs (x_t, input)": fresh_copy_fn(4 * es, 2, dtype),
                "copy (mse)": copy_fn(2 * es, dtype),
                "noisy_sample eager (x_t, input)": lambda: eager(x0, eps, t),
                "noisy_sample tdiff (x_t)": lambda: noisy_sample(x0, eps, t, sched, check=False),
                "noisy_sample tdiff (x_t, input)": lambda: noisy_sample(x0, eps, t, sched, write_input=True,
                                                                        precond_sigma_data=1.0, check=False),
                "weighted_mse eager": lambda: eager_wmse(x0, eps, w.to(dtype)),
                "weighted_mse tdiff": lambda: weighted_mse(x0, eps, w),
            }
            if dtype == torch.float32:
                compiled, compiled_wmse = torch.compile(eager, dynamic=False), torch.compile(eager_wmse,
                                                                                           dynamic=False)
                fns["noisy_sample torch.compile (x_t, input)"] = lambda: compiled(x0, eps, t)
                fns["weighted_mse torch.compile"] = lambda: compiled_wmse(x0, eps, w)
            with torch.no_grad():
                interleaved(fns, rounds=2)  # warm-up: caches, allocator, compiled graphs
                times = interleaved(fns, rounds=rounds)
                if where == "in cache" and dtype == torch.float32:  # page faults and buffer reuse of fresh outputs
                    records.append({"where": where, "shape": list(shape), "dtype": "float32",
                                    "fresh_outputs": {name: fresh_output_probe(fns[name]) for name in (
                                        "noisy_sample tdiff (x_t, input)", "copy, 2 fresh outputs (x_t, input)")}})
            for impl, ts in times.items():
                if impl.startswith("copy"):
                    continue
                nbytes, copy = (3 * es, "copy (x_t)") if impl.endswith("(x_t)") else (
                    (4 * es, "copy (x_t, input)") if impl.startswith("noisy") else (2 * es, "copy (mse)"))
                two_outputs = impl.endswith("(x_t, input)")  # eager's and compile's return two fresh tensors too
                records.append(_record(where, shape, dtype, impl, ts, times[copy], nbytes,
                                       times["copy, 2 fresh outputs (x_t, input)"] if two_outputs else None))
            for op, eager_name, ours in (("noisy_sample", "noisy_sample eager (x_t, input)",
                                          "noisy_sample tdiff (x_t, input)"),
                                         ("weighted_mse", "weighted_mse eager", "weighted_mse tdiff")):
                s = paired_ratio(times[eager_name], times[ours])
                records.append({"where": where, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                                "op": op, "speedup_vs_eager": s["median"], "speedup_lo": s["lo"],
                                "speedup_hi": s["hi"], "speedup_best": min(times[eager_name]) / min(times[ours])})
                comp = eager_name.replace("eager", "torch.compile")
                if comp in times:
                    c = paired_ratio(times[comp], times[ours])
                    records[-1].update({"speedup_vs_compile": c["median"], "speedup_vs_compile_lo": c["lo"],
                                        "speedup_vs_compile_hi": c["hi"]})
    return records


def overhead(quick: bool) -> dict:
    """Per-call cost of the public function above the C++ function it calls (1x4x8x8: the pass itself is
    negligible). overhead_us = public - the prepared sampler it calls (tdiff._C.NoisySampler), round by round;
    vs_direct_us = public - the op's full-argument direct binding; vs_dispatcher_us = public - the registered C++ op
    called through torch.ops."""
    x0, eps = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([0.5], dtype=torch.float64)
    sched = S.VPLinear()
    spec = sched.kernel_spec()
    args = (x0, eps, t, spec.kind, [float(p) for p in spec.params], None, -1.0, [], 0, False)
    fns = {"public (check=False)": lambda: noisy_sample(x0, eps, t, sched, check=False),
           "public (check=True)": lambda: noisy_sample(x0, eps, t, sched)}
    if dispatch.cpp_has("noisy_sample_cpu"):
        fns["C++ function via dispatcher"] = lambda: torch.ops.tdiff.noisy_sample_cpu(*args)
    if _C is not None and hasattr(_C, "noisy_sample_cpu"):
        fns["C++ function, direct binding"] = lambda: _C.noisy_sample_cpu(*args)
    if _C is not None and hasattr(_C, "NoisySampler"):
        # what the public function calls: the op with the schedule arguments resolved once (per schedule)
        sampler = _C.NoisySampler(*args[3:9])
        fns["C++ sampler (the public path's call)"] = lambda: sampler(x0, eps, t, False, False)
        # the fixed cost of a 16-sample call, piece by piece (16x1x1x1: no data pass to speak of): 16 distinct
        # times against 16 equal ones (computed once) is the coefficients' share; a second output (the network
        # input, preconditioned) is one more allocation, wrap and free
        x16, e16 = torch.randn(16, 1, 1, 1), torch.randn(16, 1, 1, 1)
        t16, t16_equal = torch.rand(16, dtype=torch.float64) * 0.98 + 0.01, torch.full((16,), 0.5, dtype=torch.float64)
        preconditioned = _C.NoisySampler(*args[3:6], 1.0, *args[7:9])
        fns["C++ sampler, 16 samples, distinct times"] = lambda: sampler(x16, e16, t16, False, False)
        fns["C++ sampler, 16 samples, equal times"] = lambda: sampler(x16, e16, t16_equal, False, False)
        fns["C++ sampler, 16 samples, distinct times, x_t + input"] = lambda: preconditioned(x16, e16, t16, True,
                                                                                             False)
        fns["public (check=False), 16 samples"] = lambda: noisy_sample(x16, e16, t16, sched, check=False)
    with torch.no_grad():
        interleaved(fns, rounds=2)
        times = interleaved(fns, rounds=7 if quick else 41, block_seconds=5e-3)
    pieces = {}
    for key, (a, b) in {"coefficients_16_distinct_times_us": ("C++ sampler, 16 samples, distinct times",
                                                              "C++ sampler, 16 samples, equal times"),
                        "second_output_us": ("C++ sampler, 16 samples, distinct times, x_t + input",
                                             "C++ sampler, 16 samples, distinct times"),
                        "wrapper_16_samples_us": ("public (check=False), 16 samples",
                                                  "C++ sampler, 16 samples, distinct times")}.items():
        if a in times and b in times:  # round by round, like every difference here
            d = median_ci([x - y for x, y in zip(times[a], times[b])])
            pieces[key] = {"us": d["median"] * 1e6, "us_lo": d["lo"] * 1e6, "us_hi": d["hi"] * 1e6}
    result = {}
    for name, ts in times.items():
        s = median_ci(ts)
        result[name] = {"us": s["median"] * 1e6, "us_lo": s["lo"] * 1e6, "us_hi": s["hi"] * 1e6,
                        "us_best": min(ts) * 1e6}
    for name in ("public (check=False)", "public (check=True)"):
        for key, ref in (("overhead", "C++ sampler (the public path's call)"), ("vs_direct", "C++ function, direct binding"),
                         ("vs_dispatcher", "C++ function via dispatcher")):
            if ref in times:
                d = median_ci([a - b for a, b in zip(times[name], times[ref])])
                result[name].update({f"{key}_us": d["median"] * 1e6, f"{key}_lo": d["lo"] * 1e6,
                                     f"{key}_hi": d["hi"] * 1e6})
    print_table("noisy_sample per-call cost at 1x4x8x8 (eager, no grad, one thread), median [95% interval]",
                ["call", "us", "best us", "above the sampler us", "above direct binding us", "above dispatcher us"],
                [[n, f"{r['us']:.2f} [{r['us_lo']:.2f}, {r['us_hi']:.2f}]", r["us_best"],
                  f"{r['overhead_us']:.2f} [{r['overhead_lo']:.2f}, {r['overhead_hi']:.2f}]" if "overhead_us" in r
                  else "",
                  f"{r['vs_direct_us']:.2f} [{r['vs_direct_lo']:.2f}, {r['vs_direct_hi']:.2f}]" if "vs_direct_us" in r
                  else "",
                  f"{r['vs_dispatcher_us']:.2f} [{r['vs_dispatcher_lo']:.2f}, {r['vs_dispatcher_hi']:.2f}]"
                  if "vs_dispatcher_us" in r else ""] for n, r in result.items()])
    if pieces:
        print_table("noisy_sample fixed cost of a 16-sample call, piece by piece (differences round by round)",
                    ["piece", "us [95%]"], [[k, f"{v['us']:.2f} [{v['us_lo']:.2f}, {v['us_hi']:.2f}]"]
                                            for k, v in pieces.items()])
        result["fixed_cost_pieces"] = pieces
    return result


def _plot(records, path):
    plt = pyplot()
    recs = [r for r in records if "impl" in r and r["dtype"] == "float32"]
    groups = sorted({r["where"] for r in recs})
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        vals = [next((r["frac_of_copy"] for r in recs if r["impl"] == impl and r["where"] == g), 0) for g in groups]
        ax.bar([k + i * width for k in range(len(groups))], vals, width, label=impl)
    ax.axhline(0.8, color="k", ls="--", lw=1, label="target 0.8 of copy")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(groups))], groups)
    ax.set_ylabel("effective bandwidth / copy bandwidth")
    ax.set_title("noisy_sample and weighted_mse, CPU float32, one thread")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool = False) -> dict:
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    load_before = load_average()
    try:
        records = measure(quick)
        calls = overhead(quick)
    finally:
        torch.set_num_threads(threads_before)
    print_table("noisy_sample / weighted_mse (CPU, one thread): time and bandwidth against copy (and, for two "
                "outputs, against two clones returning fresh outputs)",
                ["where", "dtype", "impl", "us", "GB/s", "of copy [95%]", "best rounds", "of fresh copy [95%]"],
                [[r["where"], r["dtype"], r["impl"], r["us"], r["GBps"],
                  f"{r['frac_of_copy']:.2f} [{r['frac_lo']:.2f}, {r['frac_hi']:.2f}]", r["frac_of_copy_best"],
                  f"{r['frac_of_fresh_copy']:.2f} [{r['fresh_frac_lo']:.2f}, {r['fresh_frac_hi']:.2f}]"
                  if "frac_of_fresh_copy" in r else ""]
                 for r in records if "impl" in r])
    print_table("speed-up of the fused op", ["where", "dtype", "op", "vs eager [95%]", "best rounds",
                                             "vs torch.compile"],
                [[r["where"], r["dtype"], r["op"],
                  f"{r['speedup_vs_eager']:.2f} [{r['speedup_lo']:.2f}, {r['speedup_hi']:.2f}]", r["speedup_best"],
                  f"{r['speedup_vs_compile']:.2f}" if "speedup_vs_compile" in r else ""]
                 for r in records if "op" in r])
    backend = dispatch.backend_for(torch.empty(1), "noisy_sample_cpu")
    isa = torch.ops.tdiff.cpu_capability() if dispatch.cpp_has("cpu_capability") else None
    payload = {"threads": 1, "backend": backend, "cpu_capability": isa, "targets": TARGETS, "records": records,
               "overhead": calls, "fresh_outputs_note": FRESH_OUTPUT_NOTE,
               "loadavg_before": load_before, "loadavg_after": load_average()}
    _plot(records, plot_path("noisy_sample", quick))
    path = write_result("noisy_sample", payload, quick)
    print(f"backend {backend} ({isa}); load average {load_before} -> {payload['loadavg_after']}; wrote {path}")
    return payload


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
