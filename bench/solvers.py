"""Multistep solvers: per-step overhead against diffusers, fused-update bandwidth against the copy ceiling, and
solver error against the exact ODE solution on the analytic Gaussian mixture.

1. Overhead per step = everything but the model call. Both sides get a free model that returns a fixed x0
   prediction (diffusers with prediction_type="sample"), so what is timed is the solver alone: diffusers' loop of
   scheduler.step (set_timesteps included) against tdiff.sample (coefficient tables included, amortised over the
   steps) and a reused tdiff.solvers.Sampler (tables built once: the loop alone). All under no_grad.
2. Fused update: tdiff::multistep_update with K history buffers reads (1+K) tensors and writes one; effective
   bandwidth = those bytes / time, against dst.copy_(src) on the same bytes, eager PyTorch and torch.compile.
3. Error (median over a batch of mixture samples of the L2 error against scipy DOP853 at rtol 1e-10) for each solver at NFE
   4..20 under four time-step heuristics. A PNG plots error against NFE.
"""
from __future__ import annotations

import math
import os

import torch

from bench.common import best_seconds, copy_seconds, plot_path, print_table, pyplot, write_result
from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.multistep_update import multistep_update
from tdiff.solvers import from_diffusers_timesteps, sample




OVERHEAD_SHAPES = [(16, 4, 32, 32), (1, 4, 128, 128)]
STEPS = 20
BANDWIDTH_SHAPES = [(16, 4, 32, 32), (64, 4, 64, 64)]
NFES = [4, 5, 6, 8, 10, 12, 15, 20]
QUICK_NFES = [4, 6, 10]
SOLVERS = [("euler", 1), ("heun", 2), ("dpmpp", 2), ("dpmpp", 3), ("unipc", 2), ("unipc", 3), ("ipndm", 4)]


# ---------------------------------------------------------------------------------------------------------------
# 1. per-step overhead
# ---------------------------------------------------------------------------------------------------------------
def _diffusers_pair(kind: str):
    import diffusers

    # prediction_type="sample": the model returns x0, so neither side spends time on an eps -> x0 conversion and
    # the comparison is the solver alone
    common = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  prediction_type="sample")
    if kind == "dpmpp2":
        return diffusers.DPMSolverMultistepScheduler(**common, solver_order=2), ("dpmpp", 2)
    return diffusers.UniPCMultistepScheduler(**common, solver_order=2), ("unipc", 2)


class _ConstantX0:
    """A free model: returns a fixed x0 prediction, so the timings hold nothing but the solver."""

    def __init__(self, x0, schedule):
        self.x0, self.schedule = x0, schedule

    def __call__(self, x, t):
        return self.x0


def overhead(quick: bool) -> list:
    from tdiff.solvers import Sampler

    min_time = 0.2 if quick else 1.0
    records = []
    for shape in OVERHEAD_SHAPES[:1] if quick else OVERHEAD_SHAPES:
        x = torch.randn(shape)
        x0 = torch.randn(shape)
        for kind in ("dpmpp2", "unipc2"):
            sched, (solver, order) = _diffusers_pair(kind)
            schedule = S.DiscreteVP.from_diffusers(sched)

            def diffusers_loop():
                sched.set_timesteps(STEPS)
                y = x
                for t in sched.timesteps:
                    y = sched.step(x0, t, y).prev_sample
                return y

            den = _ConstantX0(x0, schedule)
            sched.set_timesteps(STEPS)
            grid = from_diffusers_timesteps(sched, schedule)
            sampler = Sampler(den, grid, solver=solver, order=order)
            with torch.no_grad():
                t_diff = best_seconds(diffusers_loop, min_time) / STEPS
                t_full = best_seconds(lambda: sample(den, x, grid, solver=solver, order=order), min_time) / STEPS
                t_loop = best_seconds(lambda: sampler(x), min_time) / STEPS
            records.append({"shape": list(shape), "solver": kind, "diffusers_us_per_step": t_diff * 1e6,
                            "tdiff_us_per_step": t_full * 1e6, "tdiff_loop_us_per_step": t_loop * 1e6,
                            "speedup": t_diff / t_full, "speedup_loop": t_diff / t_loop,
                            "backend": dispatch.backend_for(x, "multistep_update_cpu")})
    print_table(f"Per-step solver overhead ({STEPS} steps, float32, model call excluded, no_grad)",
                ["shape", "solver", "diffusers us/step", "tdiff us/step (with tables)", "tdiff loop us/step",
                 "speed-up", "speed-up (loop)", "backend"],
                [[str(tuple(r["shape"])), r["solver"], r["diffusers_us_per_step"], r["tdiff_us_per_step"],
                  r["tdiff_loop_us_per_step"], r["speedup"], r["speedup_loop"], r["backend"]] for r in records])
    return records


# ---------------------------------------------------------------------------------------------------------------
# 2. fused update bandwidth
# ---------------------------------------------------------------------------------------------------------------
def bandwidth(quick: bool) -> list:
    min_time = 0.2 if quick else 1.0
    records = []
    backends = (["cpp"] if dispatch.cpp_has("multistep_update_cpu") else []) + ["torch"]
    for shape in BANDWIDTH_SHAPES[:1] if quick else BANDWIDTH_SHAPES:
        for k in (2, 4):
            x = torch.randn(shape)
            hist = [torch.randn(shape) for _ in range(k)]
            coeffs = torch.randn(shape[0], 1 + k)
            nbytes = (k + 2) * x.numel() * x.element_size()
            t_copy = copy_seconds(nbytes, min_run_time=min_time, timer=best_seconds)

            def eager():
                out = coeffs[:, 0].view(-1, 1, 1, 1) * x
                for j, h in enumerate(hist):
                    out = out + coeffs[:, j + 1].view(-1, 1, 1, 1) * h
                return out

            compiled = torch.compile(eager, dynamic=False)
            timings = {"eager": best_seconds(eager, min_time), "torch.compile": best_seconds(compiled, min_time)}
            for b in backends:
                os.environ["TDIFF_BACKEND"] = b
                timings[f"tdiff[{b}]"] = best_seconds(lambda: multistep_update(x, hist, coeffs, check=False),
                                                        min_time)
            os.environ.pop("TDIFF_BACKEND", None)
            for name, t in timings.items():
                records.append({"shape": list(shape), "K": k, "impl": name, "us": t * 1e6, "GBps": nbytes / t / 1e9,
                                "copy_GBps": nbytes / t_copy / 1e9, "fraction_of_copy": t_copy / t})
    print_table("Fused update x_next = c_x x + sum_k c_k h_k (float32): effective bandwidth vs copy",
                ["shape", "K", "impl", "us", "GB/s", "copy GB/s", "of copy"],
                [[str(tuple(r["shape"])), r["K"], r["impl"], r["us"], r["GBps"], r["copy_GBps"],
                  f"{100 * r['fraction_of_copy']:.0f}%"] for r in records])
    return records


# ---------------------------------------------------------------------------------------------------------------
# 3. error against the exact ODE solution
# ---------------------------------------------------------------------------------------------------------------
def error_table(quick: bool) -> dict:
    from tdiff.data.gaussian_mixture import default_mixture_2d
    from tdiff.data.reference import reference_ode_solution
    from tdiff.timesteps import heuristics as H

    schedule = S.VPLinear()
    mix = default_mixture_2d()

    class Den:
        def __init__(self):
            self.schedule = schedule

        def __call__(self, x, t):
            return mix.posterior_mean(x, t, schedule)

    den = Den()
    t_max, t_min = 1.0, 1e-3
    x_T = torch.randn(16 if quick else 64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = reference_ode_solution(den, schedule, x_T, t_max, t_min, rtol=1e-10, atol=1e-10)
    heuristics = {"uniform_t": H.uniform_t, "quadratic_t": H.quadratic_t, "edm_rho7": H.edm_rho,
                  "logsnr_uniform": H.logsnr_uniform}
    nfes = QUICK_NFES if quick else NFES
    results = {}
    for hname, fn in heuristics.items():
        for solver, order in SOLVERS:
            key = f"{solver}{order}" if solver not in ("euler", "heun") else solver
            errs = []
            for nfe in nfes:
                # Heun spends two evaluations per step
                steps = max(1, nfe // 2) if solver == "heun" else nfe
                ts = fn(schedule, steps, t_max=t_max, t_min=t_min)
                out = sample(den, x_T, ts, solver=solver, order=order)
                # median over samples of the per-sample L2 error: a max is dominated by the few trajectories
                # that start on a boundary between modes and switch mode under any discretisation
                err = float((out - ref).norm(dim=1).median())
                errs.append(err if math.isfinite(err) else float("nan"))
            results.setdefault(hname, {})[key] = errs
    headers = ["heuristic", "solver"] + [f"NFE {n}" for n in nfes]
    rows = [[h, s] + [f"{e:.2e}" for e in errs] for h, d in results.items() for s, errs in d.items()]
    print_table("Median per-sample L2 error vs the exact ODE solution (2-D Gaussian mixture, VP linear, t 1 -> 1e-3)",
                headers, rows)
    return {"nfe": nfes, "errors": results, "heun_nfe_note": "heun runs nfe//2 steps (2 evaluations each)"}


def _plot(errors: dict, quick: bool) -> str:
    plt = pyplot()
    hs = list(errors["errors"])
    fig, axes = plt.subplots(1, len(hs), figsize=(4 * len(hs), 3.6), sharey=True)
    for ax, h in zip(axes, hs):
        for solver, errs in errors["errors"][h].items():
            ax.loglog(errors["nfe"], errs, marker="o", label=solver)
        ax.set_title(h)
        ax.set_xlabel("NFE")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("median L2 error")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = plot_path("solvers", quick)
    fig.savefig(path, dpi=110)
    return path


def run(quick: bool = False) -> dict:
    # One thread by default: on a shared machine an OpenMP barrier waiting for a descheduled thread turns a 50 us
    # update into milliseconds, on both sides. TDIFF_BENCH_THREADS=n measures with n threads instead.
    threads_before = torch.get_num_threads()
    threads = int(os.environ.get("TDIFF_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    try:
        payload = {"threads": threads, "overhead": overhead(quick), "bandwidth": bandwidth(quick),
                   "error": error_table(quick)}
    finally:
        torch.set_num_threads(threads_before)
    try:
        payload["plot"] = _plot(payload["error"], quick)
    except ImportError as e:  # matplotlib missing: the table and JSON still stand
        print(f"no plot: {e}")
    path = write_result("solvers", payload, quick)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
