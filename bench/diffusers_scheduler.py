"""TdiffScheduler in diffusers pipelines (issue 11, measured claim): the per-step overhead of the scheduler against
the pipeline's own (DPMSolverMultistepScheduler, UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler).
A last row per shape times the output conversion D = p x + q m alone, unfused (three elementwise passes): what the
step would cost more without the fusion (the step converts inside the fused multistep_update).

The model call is excluded: a pipeline's loop is replayed with one precomputed network output, so what is timed is
set_timesteps + N x (scale_model_input + step), divided by N. Latents at real shapes: DiT-XL/2 (4x32x32, batch 2:
DiTPipeline steps both classifier-free-guidance halves) and SD3 (16x128x128, 1024 px, batch 1). One thread,
interleaved rounds (bench/interleaved.py), medians with 95% bootstrap intervals, ratios per round. Per pipeline
scheduler, two TdiffSchedulers: timesteps="diffusers" (the same grid and solver, on tdiff's fused op: the like-for-
like overhead) and tdiff's default grid (logSNR-uniform) with the same solver family. Each row also gives the floor
one step cannot beat: a copy of the bytes a step must move (read x and the model output, write x), and the largest
difference from diffusers' result (the like-for-like schedulers compute the same thing).

Results: bench/results/diffusers.json under "scheduler" (read-modify-write: the "caching" key belongs to
bench/diffusers_cache.py; `python -m bench diffusers` runs both) and diffusers_scheduler.png.
"""
from __future__ import annotations

import datetime
import os
import sys
import time

import torch

from .common import copy_seconds, machine, plot_path, print_table, pyplot, write_result_part
from .interleaved import interleaved_seconds, median_ci

SHAPES = {"DiT-XL/2 latents (2, 4, 32, 32)": (2, 4, 32, 32), "SD3 latents (1, 16, 128, 128)": (1, 16, 128, 128)}


def _schedulers(shape_name: str):
    """(pipeline scheduler name, a factory of it, the tdiff solver of the same family, its order) for a shape: DiT pipelines use DDPM-family schedulers, SD3 flow
    matching."""
    import diffusers

    if shape_name.startswith("DiT"):
        return [("DPMSolverMultistep (2M)", lambda: diffusers.DPMSolverMultistepScheduler(), "dpmpp", 2),
                ("UniPCMultistep (bh2, 2)", lambda: diffusers.UniPCMultistepScheduler(), "unipc", 2)]
    return [("FlowMatchEulerDiscrete (shift 3)", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
             "euler", 1)]


def _loop(scheduler, x_T: torch.Tensor, out: torch.Tensor, steps: int):
    """A pipeline's loop without the network: set_timesteps, then scale_model_input + step per time step."""

    scale = getattr(scheduler, "scale_model_input", None)  # FlowMatch has none (SD3's pipeline calls none)

    def run():
        scheduler.set_timesteps(steps, device=x_T.device)
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(out, t, x if scale is None else scale(x, t)).prev_sample
        return x

    return run


def _measure(shape_name: str, shape, steps: int, rounds: int) -> dict:
    from tdiff.schedulers import TdiffScheduler
    from tdiff.solvers.sample import to_prediction

    gen = torch.Generator().manual_seed(0)
    x_T = torch.randn(shape, generator=gen)
    out = torch.randn(shape, generator=gen) * 0.5
    variants, meta = {}, {}
    for name, make, solver, order in _schedulers(shape_name):
        source = make()
        tdiff_same = TdiffScheduler.from_config(source.config, timesteps="diffusers")
        tdiff_grid = TdiffScheduler.from_config(source.config, solver=solver, order=order, final_sigmas_type="zero")
        for label, sched in ((f"{name}: diffusers", source), (f"{name}: TdiffScheduler('diffusers')", tdiff_same),
                             (f"{name}: TdiffScheduler(logsnr_uniform, {solver})", tdiff_grid)):
            variants[label] = _loop(sched, x_T, out, steps)
            meta[label] = {"scheduler": name, "kind": label.split(": ", 1)[1]}
        with torch.no_grad():
            ref = variants[f"{name}: diffusers"]()
            same = variants[f"{name}: TdiffScheduler('diffusers')"]()
        meta[f"{name}: TdiffScheduler('diffusers')"]["max_abs_diff_vs_diffusers"] = float((same - ref).abs().max())
        meta[f"{name}: TdiffScheduler('diffusers')"]["max_abs_result"] = float(ref.abs().max())
    # what the output conversion alone costs per step (unfused until SPEC_multistep's fused op lands)
    pq = torch.tensor([[1.0, -0.5]]).expand(shape[0], 2).contiguous()
    conversion = "the output conversion D = p x + q m alone (tdiff, unfused)"

    def convert_only():
        for _ in range(steps):
            to_prediction(x_T, out, pq)  # each result freed at once, as in a run

    variants[conversion] = convert_only
    meta[conversion] = {"scheduler": "-", "kind": "conversion"}
    with torch.no_grad():
        seconds = interleaved_seconds(variants, rounds=rounds, warmup=1)
    floor = copy_seconds(3 * x_T.numel() * x_T.element_size(), min_run_time=0.3)
    rows = {}
    for label, times in seconds.items():
        per_step = [s / steps for s in times]
        row = dict(meta[label], per_step_seconds=median_ci(per_step), copy_floor_seconds=floor)
        ref = f"{meta[label]['scheduler']}: diffusers"
        if label != ref and ref in seconds:
            row["ratio_to_diffusers"] = median_ci([a / b for a, b in zip(times, seconds[ref])])
        rows[label] = row
    return rows


def run(quick: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    load = os.getloadavg()
    started = time.perf_counter()
    steps, rounds = (8, 3) if quick else (20, 60)
    out = {}
    try:
        for shape_name, shape in SHAPES.items():
            out[shape_name] = _measure(shape_name, shape, steps, rounds)
            print_table(f"scheduler overhead per step, {shape_name}, {steps} steps, model call excluded (1 thread)",
                        ["scheduler", "per step [95% CI]", "vs diffusers [95% CI]", "copy floor", "max |diff|"],
                        [[k, _fmt_us(v["per_step_seconds"]), _fmt_ratio(v.get("ratio_to_diffusers")),
                          f"{v['copy_floor_seconds'] * 1e6:.0f} us",
                          f"{v['max_abs_diff_vs_diffusers']:.1e}" if "max_abs_diff_vs_diffusers" in v else ""]
                         for k, v in out[shape_name].items()])
    finally:
        torch.set_num_threads(threads)
    note = ("TdiffScheduler's step = one fused multistep_update that converts the raw model output at the sample's "
            "grid point (D = p x + q m) and updates in the same pass, + Python bookkeeping; the 'conversion alone' row "
            "is what an unfused conversion would add")
    payload = dict(note=note, command="python -m bench " + ("--quick " if quick else "") + "diffusers_scheduler", argv=sys.argv,
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   machine=machine(), quick=quick, steps=steps, rounds=rounds, loadavg_start=load,
                   loadavg_end=os.getloadavg(), seconds=time.perf_counter() - started, shapes=out)
    write_result_part("diffusers", "scheduler", payload, quick)
    _plot(out, quick)
    return payload


def _fmt_us(m: dict) -> str:
    return f"{m['median'] * 1e6:.0f} us [{m['ci95'][0] * 1e6:.0f}, {m['ci95'][1] * 1e6:.0f}]"


def _fmt_ratio(m) -> str:
    return "" if m is None else f"{m['median']:.2f}x [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]"


def _plot(out: dict, quick: bool) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(out), figsize=(6 * len(out), 4.5))
    for ax, (shape_name, rows) in zip(axes, out.items()):
        labels = list(rows)
        med = [rows[k]["per_step_seconds"]["median"] * 1e6 for k in labels]
        lo = [m - rows[k]["per_step_seconds"]["ci95"][0] * 1e6 for m, k in zip(med, labels)]
        hi = [rows[k]["per_step_seconds"]["ci95"][1] * 1e6 - m for m, k in zip(med, labels)]
        ax.barh(range(len(labels)), med, xerr=[lo, hi], color=["#888" if "diffusers" == rows[k]["kind"] else "#3a7"
                                                             for k in labels])
        ax.axvline(rows[labels[0]]["copy_floor_seconds"] * 1e6, color="k", ls="--", lw=1, label="copy floor")
        ax.set_yticks(range(len(labels)), [k.replace(": ", ":\n") for k in labels], fontsize=7)
        ax.set_xlabel("scheduler time per step (us, model call excluded, 1 thread)")
        ax.set_title(shape_name, fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_path("diffusers_scheduler", quick), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    run(quick="--quick" in sys.argv)
