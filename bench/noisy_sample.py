"""Noisy-sample construction: tdiff's fused op against eager PyTorch, torch.compile and the copy ceiling.

The op reads x0 and eps and writes x_t (plus the network input when asked): 3 (or 4) tensors' worth of bytes.
Effective bandwidth = those bytes / time; the ceiling is dst.copy_(src) moving the same bytes, in the same run.
"""
from __future__ import annotations

import os

import torch

from bench.common import copy_seconds, median_seconds, plot_path, print_table, pyplot, write_result
from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.noisy_sample import noisy_sample

SIZES = [(64, 4, 32, 32), (256, 4, 64, 64)]
QUICK_SIZES = [(16, 4, 32, 32)]


def eager(sched):
    # What a user writes without tdiff: schedule coefficients, broadcast, multiply-add (and the c_in input).
    def fn(x0, eps, t):
        a = sched.alpha(t).to(x0.dtype).view(-1, 1, 1, 1)
        s = sched.sigma(t).to(x0.dtype).view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        return xt, xt / torch.sqrt(s * s + a * a)

    return fn


def run(quick: bool = False) -> dict:
    rows, records = [], []
    threads_before = torch.get_num_threads()
    # 1 thread is robust on a shared machine; all cores is the real configuration (OpenMP barriers stall when
    # another process holds a core, so trust those figures only on an idle machine).
    for threads in sorted({1, threads_before}):
        torch.set_num_threads(threads)
        _measure(quick, threads, rows, records)
    torch.set_num_threads(threads_before)
    print_table("noisy-sample construction (fp32, CPU)", ["threads", "shape", "impl", "us", "GB/s", "of copy bw"],
                rows)
    path = write_result("noisy_sample", {
        "targets": {"frac_of_copy": 0.8, "speedup_vs_eager": 2.5, "speedup_vs_compile": 1.2},
        "records": records}, quick)
    _plot(records, plot_path("noisy_sample", quick))
    print(f"wrote {path}")
    return {"records": records}


def _measure(quick, threads, rows, records):
    sched = S.VPLinear()
    min_time = 0.2 if quick else 1.0
    backends = ["cpp"] if dispatch.cpp_has("noisy_sample_cpu") else []
    backends.append("torch")
    for shape in QUICK_SIZES if quick else SIZES:
        x0, eps = torch.randn(shape), torch.randn(shape)
        t = torch.rand(shape[0]) * 0.98 + 0.01
        nbytes_xt = 3 * x0.numel() * x0.element_size()
        nbytes_in = 4 * x0.numel() * x0.element_size()
        t_copy = copy_seconds(nbytes_xt, min_run_time=min_time)
        t_copy_in = copy_seconds(nbytes_in, min_run_time=min_time)
        eager_fn = eager(sched)
        compiled = torch.compile(eager_fn, dynamic=False)

        timings = {
            "eager (x_t, input)": (median_seconds(lambda: eager_fn(x0, eps, t), min_time), nbytes_in, t_copy_in),
            "torch.compile (x_t, input)": (median_seconds(lambda: compiled(x0, eps, t), min_time), nbytes_in,
                                           t_copy_in),
        }
        for b in backends:
            os.environ["TDIFF_BACKEND"] = b
            timings[f"tdiff[{b}] (x_t)"] = (median_seconds(
                lambda: noisy_sample(x0, eps, t, sched, check=False), min_time), nbytes_xt, t_copy)
            timings[f"tdiff[{b}] (x_t, input)"] = (median_seconds(
                lambda: noisy_sample(x0, eps, t, sched, write_input=True, precond_sigma_data=1.0, check=False),
                min_time), nbytes_in, t_copy_in)
        os.environ.pop("TDIFF_BACKEND", None)

        ours = timings.get("tdiff[cpp] (x_t, input)", timings["tdiff[torch] (x_t, input)"])[0]
        for name, (sec, nbytes, tc) in timings.items():
            rec = {"threads": threads, "shape": list(shape), "impl": name, "us": sec * 1e6, "GBps": nbytes / sec / 1e9,
                   "copy_GBps": nbytes / tc / 1e9, "frac_of_copy": tc / sec}
            records.append(rec)
            rows.append([threads, "x".join(map(str, shape)), name, sec * 1e6, rec["GBps"], rec["frac_of_copy"]])
        eager_s = timings["eager (x_t, input)"][0]
        comp_s = timings["torch.compile (x_t, input)"][0]
        records.append({"threads": threads, "shape": list(shape), "speedup_vs_eager": eager_s / ours,
                        "speedup_vs_compile": comp_s / ours})
        rows.append([threads, "x".join(map(str, shape)), "=> tdiff speed-up vs eager / vs compile",
                     f"{eager_s / ours:.2f}x", f"{comp_s / ours:.2f}x", ""])


def _plot(records, path):
    plt = pyplot()
    recs = [r for r in records if "impl" in r]
    shapes = sorted({(r["threads"],) + tuple(r["shape"]) for r in recs})
    impls = list(dict.fromkeys(r["impl"] for r in recs))
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        vals = [next((r["frac_of_copy"] for r in recs if r["impl"] == impl and (r["threads"],) + tuple(r["shape"]) == s), 0)
                for s in shapes]
        ax.bar([k + i * width for k in range(len(shapes))], vals, width, label=impl)
    ax.axhline(0.8, color="k", ls="--", lw=1, label="target 80% of copy")
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(shapes))], [f"{s[0]} thr, " + "x".join(map(str, s[1:])) for s in shapes])
    ax.set_ylabel("effective bandwidth / copy bandwidth")
    ax.set_title("noisy-sample construction, CPU fp32")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
