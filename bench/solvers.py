"""Multistep solvers: per-step cost against diffusers and against the data-movement floor, fused-update bandwidth
against the copy ceiling, and solver error against the exact ODE solution on the analytic Gaussian mixture.

1. Per-step cost of the public path, as a user runs it (issue 18): `tdiff.sample(tdiff.denoiser(model, schedule,
   prediction="eps"), x_T, ts, solver=..., order=...)` with a model that returns a precomputed eps, so what is
   timed is the sampler's own work *including* the eps -> x0 conversion and the coefficient tables (built inside
   the timed call), for every solver and order; beside it a reused `Sampler` (tables built once: the loop alone),
   a diffusers DPMSolverMultistepScheduler (eps prediction) step loop (set_timesteps included) on the same model,
   and the floor: 5 tensor passes of x per step (a fused 2M step reads x, the model output and one history entry
   and writes x_next and the new history entry), timed as a copy moving those bytes (2.5 copies of x; issue 18's
   table divided by 5 whole copies, 10 passes, a floor half as strict). Heun (two updates) and the higher orders
   (longer histories) move more than 5 passes per step by construction; Heun's step makes two model calls. Also the
   dpmpp2 loop unfused (`Sampler.fuse = False`: convert, then update), to show what the fusion saves, and for
   every solver the previous loop ("prev": UniPC's corrected sample and iPNDM's slopes as buffers of their own,
   two updates per evaluation, and fresh outputs for every update) beside the current one (one fused update per
   evaluation, x_next and D written in place over x and the retired history entry where the loop owns them, other
   outputs into recycled buffers from 1 MiB up). Interleaved in one run (bench/interleaved.py),
   one thread, 20 steps, medians with 95% intervals; the ratios are per-round (both sides saw the same machine
   state).
   The floor is per model evaluation: each evaluation needs one update, and one update reads at least x and the
   model output and writes x_next and the new history entry. Heun evaluates the model twice per step (each
   evaluation has its update), so its floor per step is twice the others': `floor_us` is per step of one
   evaluation, `nfe_per_step` the evaluations per step (Heun: 2, 1 on a step whose correction the stable rule
   drops), and `loop_over_floor` = loop / (nfe_per_step * floor). Higher orders read a longer history (UniPC-3
   folded: 4 outputs, iPNDM-4: 4 slopes), so they move more than 5 passes by construction; first-order updates
   read no history (x and m in, x_next and D out: 4 passes), so they can sit below the floor. The bound is in cache
   line transfers: the floor's copy pays three for every line it writes (the source read, a read for ownership of
   the destination line, its write-back), 7.5 per element of x for its 5 passes; the loop writes x_next over x (and
   D over a retired history entry), lines it has just read, so an update moves at least 3 (read x and m, write
   x_next back). Below 3/7.5 = 0.4 of the floor is impossible and flagged as a disturbed measurement.
   `kernel_loop_us` (dpmpp2's row): the converting C++ kernel called from a bare Python loop (no tables, no model
   call), the Python floor of the loop; `loop_over_kernel_loop` is the sampling loop's time over it.
   `interp_loop_over_floor`: the same Sampler with compiled_loop = False (every instruction interpreted, the
   loop before Execution.compile), to show what compiling the eager loop into closures saves.
   `python -m bench solvers_per_step` runs this part alone (into solvers.json's per_step).
2. Fused update, K = 1..4: tdiff::multistep_update reads (1+K) tensors and writes one; its converting form (the
   sampling loop's: D = p x + q m formed in the pass and written too) reads 1+K and writes two. Effective bandwidth
   = those bytes / time, against dst.copy_(src) on the same bytes, eager PyTorch and torch.compile: measured by
   bench/multistep_update's `bandwidth` (the same table as `python -m bench multistep_update`).
3. Stability: the error (mean over STABILITY_SAMPLES mixture samples of noise seed STABILITY_SEED of the L2 error
   against scipy DOP853 at rtol 1e-10) of each deterministic solver at NFE 4..40 on the four time-step heuristics,
   with the default order rule ("stable") and diffusers' count rule, and each curve's worst growth: max over NFE of
   err(n) / min_{m<n} err(m). PNG. Alone: `python -m bench.solvers --stability [--seed N]` (seed 2 also updates
   the "error" part of bench/results/solvers.json). 1024 samples: the mean over 64 is dominated by the few
   samples whose errors cancel (tests/test_solvers_stability.py's docstring).
4. Conformance with diffusers: the configs of tests/test_solvers_diffusers.py through the public path (float64,
   diffusers patched to compute in float64 as that test documents): the number of configs and the worst difference.
5. Convergence orders on the analytic mixture (tests/test_solvers_convergence.py's problem): local slope with exact
   history and global error against NFE up to 160, with a PNG of error against NFE per solver.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import time

import torch

from bench.common import copy_fn, plot_path, print_table, pyplot, write_result
from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.solvers import from_diffusers_timesteps, sample

OVERHEAD_SHAPES = [(1, 4, 32, 32), (16, 4, 32, 32), (16, 4, 128, 128)]
STEPS = 20
FLOOR_PASSES = 5
# what any update must move, in line transfers against the floor's: read x and the model output, write x_next back
# over x (in place: no read for ownership), against 5 passes copied (2.5 lines read, 2.5 read for ownership and
# written back)
MIN_FRACTION = 3 / 7.5
NFES = list(range(4, 41))
QUICK_NFES = [4, 6, 10]
SOLVERS = [("euler", 1), ("heun", 2), ("dpmpp", 2), ("dpmpp", 3), ("dpmpp_ab", 3), ("dpmsolver", 3), ("unipc", 2),
           ("unipc", 3), ("ipndm", 2), ("ipndm", 4)]
# the per-step cost: every solver and order of issue 18
TIMED = [("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3), ("unipc", 1), ("unipc", 2), ("unipc", 3), ("ipndm", 4),
         ("ddim", 1), ("euler", 1), ("heun", 2)]
RULES = ("stable", "diffusers")
# the per-step rounds are timed in this thread's CPU time: every variant runs on this one thread, and on a shared
# machine (load 6-7 on 2 cores, 2026-12-01) wall time counted up to 3x of other processes' slices into 20 us steps
# (a quick run: 7.7 s of CPU in 24.6 s). Idle, the two clocks agree. TDIFF_BENCH_CLOCK=wall restores wall time.
TIMER = time.perf_counter if os.environ.get("TDIFF_BENCH_CLOCK") == "wall" else time.thread_time
STABILITY_SAMPLES = 1024
STABILITY_SEED = 2  # the stable rule's thresholds were chosen on seed 0, the stability test uses seed 1


# ---------------------------------------------------------------------------------------------------------------
# 1. per-step cost
# ---------------------------------------------------------------------------------------------------------------
def _step_loop(sched, eps, x):
    """diffusers' loop: set_timesteps then one scheduler.step per model call (the model output given)."""
    def loop():
        sched.set_timesteps(STEPS)
        y = x
        for t in sched.timesteps:
            y = sched.step(eps, t, y).prev_sample
        return y

    return loop


def per_step(quick: bool) -> list:
    import diffusers

    from bench.interleaved import interleaved_seconds, median_ci, speedup
    from tdiff import denoiser
    from tdiff.solvers import Sampler

    records = []
    shapes = OVERHEAD_SHAPES[:2] if quick else OVERHEAD_SHAPES
    timed = TIMED[1:3] + TIMED[-1:] if quick else TIMED
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        x, eps = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                                      beta_schedule="linear", prediction_type="epsilon",
                                                      solver_order=2)
        schedule = S.DiscreteVP.from_diffusers(sched)
        den = denoiser(lambda x, t, y=None: eps, schedule, prediction="eps")
        sched.set_timesteps(STEPS)
        ts = from_diffusers_timesteps(sched, schedule).timesteps  # diffusers' grid, as plain schedule times
        # the floor: FLOOR_PASSES tensor passes of x per step, i.e. a copy moving that many bytes (half read, half
        # written), as bench.common.copy_fn times it
        copy = copy_fn(FLOOR_PASSES * x.numel() * x.element_size())

        def floor():
            for _ in range(STEPS):
                copy()

        variants = {"diffusers": _step_loop(sched, eps, x), "floor": floor}
        nfe = {}
        for solver, order in timed:
            name = f"{solver}{order}" if solver not in ("ddim", "euler", "heun") else solver
            sampler = Sampler(den, ts, solver=solver, order=order)
            nfe[name] = sampler.nfe / STEPS
            variants[f"sample:{name}"] = (lambda s=solver, o=order: sample(den, x, ts, solver=s, order=o))
            variants[f"loop:{name}"] = (lambda sm=sampler: sm(x))
            with _previous_programs():
                previous = Sampler(den, ts, solver=solver, order=order)
            previous.reuse_buffers = False
            variants[f"prev:{name}"] = (lambda sm=previous: sm(x))
            interpreted = Sampler(den, ts, solver=solver, order=order)
            interpreted.compiled_loop = False  # the same loop, each instruction interpreted
            variants[f"interp:{name}"] = (lambda sm=interpreted: sm(x))
            if (solver, order) == ("dpmpp", 2):  # what fusing the conversion saves: the same loop, unfused
                unfused = Sampler(den, ts, solver=solver, order=order)
                unfused.fuse = False
                variants["unfused:dpmpp2"] = (lambda sm=unfused: sm(x))
                variants["kernel:dpmpp2"] = _kernel_loop(x, eps)
        n = max(int(round(2e-2 / max(1e-9, _once(variants["diffusers"])))), 1)  # rounds of >= ~20 ms per variant
        rounds = (8 if quick else 25) if shape[0] * shape[-1] <= 512 else (5 if quick else 15)
        with torch.no_grad():
            times = interleaved_seconds({k: _repeat(f, n) for k, f in variants.items()}, rounds=rounds, warmup=1,
                                        timer=TIMER)
        times = {k: [t / (n * STEPS) for t in v] for k, v in times.items()}  # seconds per step
        floor_t = median_ci(times["floor"])
        for solver, order in timed:
            name = f"{solver}{order}" if solver not in ("ddim", "euler", "heun") else solver
            full, loop, prev = f"sample:{name}", f"loop:{name}", f"prev:{name}"
            per_eval = 1 / nfe[name]  # the floor of a step is nfe_per_step evaluations' floors
            records.append({
                "shape": list(shape), "solver": solver, "order": order, "nfe_per_step": nfe[name],
                "sample_us": _us(median_ci(times[full])), "loop_us": _us(median_ci(times[loop])),
                "prev_loop_us": _us(median_ci(times[prev])),
                "diffusers_us": _us(median_ci(times["diffusers"])), "floor_us": _us(floor_t),
                # per-round ratios: diffusers / tdiff (> 1: tdiff faster), tdiff / floor (>= 1 by construction)
                "vs_diffusers": _ratio(speedup(times, full, "diffusers", None)),
                "loop_vs_diffusers": _ratio(speedup(times, loop, "diffusers", None)),
                "over_floor": _ratio(speedup(times, "floor", full, None), per_eval),
                "loop_over_floor": _ratio(speedup(times, "floor", loop, None), per_eval),
                "prev_loop_over_floor": _ratio(speedup(times, "floor", prev, None), per_eval),
                "interp_loop_over_floor": _ratio(speedup(times, "floor", f"interp:{name}", None), per_eval),
                "prev_over_loop": _ratio(speedup(times, loop, prev, None)),
                "backend": dispatch.backend_for(x, "multistep_update_cpu")})
            # an update reads at least x and the model output and writes x_next back: below MIN_FRACTION of the
            # floor is impossible (the copy and the loop were disturbed unequally)
            records[-1]["below_floor"] = records[-1]["loop_over_floor"]["median"] < MIN_FRACTION
            if f"unfused:{name}" in times:
                records[-1]["loop_unfused_us"] = _us(median_ci(times[f"unfused:{name}"]))
                records[-1]["unfused_over_fused"] = _ratio(speedup(times, loop, f"unfused:{name}", None))
                records[-1]["kernel_loop_us"] = _us(median_ci(times[f"kernel:{name}"]))
                records[-1]["loop_over_kernel_loop"] = _ratio(speedup(times, f"kernel:{name}", loop, None))
    print_table(f"Per-step cost, eps model (conversion included), {STEPS} steps, float32, one thread "
                f"({TIMER.__name__}), interleaved: medians [95% CI]; floor = {FLOOR_PASSES} tensor passes of x per model evaluation (a copy moving "
                f"those bytes); x/floor = x / (NFE per step * floor); prev = the loop before folding and buffer reuse; "
                f"interp = today's loop interpreted instruction by instruction (not compiled into closures)",
                ["shape", "solver", "NFE/step", "sample us/step", "loop us/step", "prev loop us/step",
                 "diffusers us/step", "floor us/eval", "sample/floor", "loop/floor", "interp/floor", "prev/floor",
                 "diffusers/sample"],
                [[str(tuple(r["shape"])), f"{r['solver']}{r['order']}", f"{r['nfe_per_step']:.2f}",
                  _fmt(r["sample_us"]), _fmt(r["loop_us"]), _fmt(r["prev_loop_us"]), _fmt(r["diffusers_us"]),
                  _fmt(r["floor_us"]), _fmt(r["over_floor"]), _fmt(r["loop_over_floor"]),
                  _fmt(r["interp_loop_over_floor"]),
                  _fmt(r["prev_loop_over_floor"]), _fmt(r["vs_diffusers"])] for r in records])
    below = [f"{tuple(r['shape'])} {r['solver']}{r['order']}" for r in records if r["below_floor"]]
    if below:
        print(f"  loop/floor below {MIN_FRACTION:.2f} (impossible: a disturbed measurement, not a result): "
              f"{', '.join(below)}")
    for r in records:
        if "loop_unfused_us" in r:
            print(f"  {tuple(r['shape'])} {r['solver']}{r['order']}: the loop unfused (convert, then update) "
                  f"{_fmt(r['loop_unfused_us'])} us/step, {_fmt(r['unfused_over_fused'])}x the fused loop; the bare "
                  f"kernel loop {_fmt(r['kernel_loop_us'])} us/step (the loop is {_fmt(r['loop_over_kernel_loop'])}x "
                  f"that)")
    return records


def _kernel_loop(x, eps):
    """The Python floor of a 2M loop: the converting C++ kernel (tdiff._C) called from a bare loop with the same
    tensors' sizes and history as dpmpp2's (made-up rows; no tables, no model call, fresh outputs). The sampling
    loop's time above this is its own Python (the model call through the denoiser included)."""
    from tdiff.ops import dispatch as d

    fused = d.eager_kernel(x, "multistep_update_convert_cpu")
    row = torch.tensor([[0.9, 0.3, -0.2]]).expand(x.shape[0], 3).contiguous()
    pq = torch.tensor([[1.1, -0.4]]).expand(x.shape[0], 2).contiguous()

    def loop():
        y, d0 = x, x
        for _ in range(STEPS):
            y, d0 = fused(y, [eps, d0], row, None, None, y, pq)
        return y

    return loop


def _once(fn) -> float:
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _repeat(fn, n: int):
    def run():
        for _ in range(n):
            fn()

    return run


def _us(m: dict) -> dict:
    return {"median": m["median"] * 1e6, "ci95": [v * 1e6 for v in m["ci95"]], "n": m["n"]}


def _ratio(r: dict, scale: float = 1.0) -> dict:
    return {"median": r["median"] * scale, "ci95": [v * scale for v in r["ci95"]]}


@contextlib.contextmanager
def _previous_programs():
    """Samplers built inside get the programs of the loop before issue 18's fold: UniPC's corrected sample and
    iPNDM's slopes as buffers of their own (two updates per evaluation)."""
    specs = importlib.import_module("tdiff.solvers.sample").SPECS
    saved = dict(specs)
    for name, fixed in (("unipc", {"fold": False}), ("ipndm", {"slopes": "x0"})):
        build = saved[name].build
        def fixed_build(g, c, o, s, _build=build, _fixed=fixed, **kw):
            return _build(g, c, o, s, **{**kw, **_fixed})

        specs[name] = dataclasses.replace(saved[name], build=fixed_build)
    try:
        yield
    finally:
        specs.update(saved)


def _fmt(m: dict) -> str:
    lo, hi = m["ci95"]
    digits = 2 if m["median"] < 10 else 1 if m["median"] < 1000 else 0
    return f"{m['median']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


# ---------------------------------------------------------------------------------------------------------------
# 2. fused update bandwidth
# ---------------------------------------------------------------------------------------------------------------
def bandwidth(quick: bool) -> list:
    """K = 1..4, in and out of cache: bench/multistep_update's measurement (interleaved short blocks against copy,
    eager and torch.compile, medians with 95% intervals), run here so that this bench shows it. One measurement in
    one place: this bench used to time its own fastest-1-ms-block table, whose in-cache figures (0.65-0.90 of copy)
    disagreed with the interleaved ones."""
    from bench.multistep_update import bandwidth as update_bandwidth

    return update_bandwidth(quick)


# ---------------------------------------------------------------------------------------------------------------
# 3. error against the exact ODE solution
# ---------------------------------------------------------------------------------------------------------------
def error_table(quick: bool, seed: int = STABILITY_SEED) -> dict:
    from tdiff.data.gaussian_mixture import default_mixture_2d
    from tdiff.data.reference import reference_ode_solution
    from tdiff.solvers import Sampler
    from tdiff.solvers.sample import SPECS
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
    x_T = torch.randn(16 if quick else STABILITY_SAMPLES, 2, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(seed))
    ref = reference_ode_solution(den, schedule, x_T, t_max, t_min, rtol=1e-10, atol=1e-10)
    nfes = QUICK_NFES if quick else NFES
    results, growth = {}, {}
    for rule in RULES:
        for hname, fn in H.HEURISTICS.items():
            for solver, order in SOLVERS:
                key = f"{solver}{order}" if solver not in ("euler", "heun") else solver
                errs, used = [], []
                for nfe in nfes:
                    # Heun spends up to two evaluations per step: the step count whose NFE is closest from below
                    steps = max(1, nfe // 2) if solver == "heun" else nfe
                    rule_opt = {"order_rule": rule} if "order_rule" in SPECS[solver].options else {}
                    sampler = Sampler(den, fn(schedule, steps, t_max=t_max, t_min=t_min), solver=solver, order=order,
                                      **rule_opt)
                    err = float((sampler(x_T) - ref).norm(dim=1).mean())
                    errs.append(err if math.isfinite(err) else float("nan"))
                    used.append(sampler.nfe)
                results.setdefault(rule, {}).setdefault(hname, {})[key] = {"nfe": used, "error": errs}
                # over NFE >= 4 (Heun without its corrections can take fewer)
                kept = [e for e, n in zip(errs, used) if n >= 4]
                run_min = [min(kept[:k]) for k in range(1, len(kept))]
                growth.setdefault(rule, {}).setdefault(hname, {})[key] = max(
                    [e / m for e, m in zip(kept[1:], run_min)], default=1.0)
    headers = ["rule", "heuristic"] + [f"{s}{o}" for s, o in SOLVERS]
    rows = [[rule, h] + [f"{g:.2f}" for g in d.values()] for rule, per in growth.items() for h, d in per.items()]
    print_table(f"Worst error growth with NFE, max_n err(n)/min_(m<n) err(m), NFE {nfes[0]}-{nfes[-1]} (2-D Gaussian "
                f"mixture, VP linear, t 1 -> 1e-3, mean L2 over {x_T.shape[0]} samples)", headers, rows)
    for rule in RULES:
        cells = [g for per in growth[rule].values() for g in per.values()]
        print(f"  {rule}: worst growth {max(cells):.2f}; curves within 1.1: {sum(g <= 1.1 for g in cells)}/{len(cells)}")
    at = [n for n in (6, 10, 15, 20) if n in nfes]
    rows = [[rule, h, k] + [f"{v['error'][nfes.index(n)]:.3f}" for n in at]
            for rule, per in results.items() for h, d in per.items() for k, v in d.items()]
    print_table("Mean L2 error at selected NFE (Heun: the step count with NFE <= n)", ["rule", "heuristic", "solver"]
                + [f"NFE {n}" for n in at], rows)
    return {"nfe": nfes, "errors": results, "worst_growth": growth, "seed": seed, "samples": x_T.shape[0],
            "note": f"thresholds of the stable rule were chosen on seed 0; this table uses seed {seed}"}


def _test_module(name: str):
    """One list of configs and one measurement: the test's own (tests/ is not a package)."""
    import importlib
    import sys

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(here, "tests"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def conformance(quick: bool) -> dict:
    """The conformance test's configs, run through the public path (see tests/test_solvers_diffusers.py)."""
    import tdiff

    t = _test_module("test_solvers_diffusers")

    configs = t.CONFIGS[::5] if quick else t.CONFIGS
    rows = []
    for name, cls_name, config, steps, step_kw in configs:
        scheduler = t._make(cls_name, config, steps)
        net = t.MixtureNet(scheduler)
        x_T = t._x_T(scheduler)
        den = tdiff.denoisers.from_diffusers(net, scheduler)
        grid = from_diffusers_timesteps(scheduler)
        stochastic = t._stochastic(cls_name, config, step_kw)
        gen = torch.Generator().manual_seed(11) if stochastic else None
        ours = tdiff.solvers.Sampler(den, grid, **step_kw)(x_T, gen)
        ref = t.diffusers_loop(scheduler, net, x_T, torch.Generator().manual_seed(11) if stochastic else None,
                               **step_kw)
        if cls_name == "DDPMScheduler" and int(scheduler.timesteps[-1]) > 0:  # see the test
            ours = ours + 1e-10 * torch.randn(x_T.shape, dtype=x_T.dtype, generator=gen)
        rows.append([name, steps, float((ours - ref).abs().max())])
    print_table("Conformance with diffusers (float64, public path): max |tdiff - diffusers| per config",
                ["config", "steps", "max abs diff"], rows)
    worst = max(r[2] for r in rows)
    classes = sorted({c[1] for c in configs})
    print(f"  {len(rows)} configs over {len(classes)} scheduler classes, worst difference {worst:.2e}")
    return {"configs": len(rows), "classes": classes, "worst_abs_diff": worst,
            "rows": [{"config": r[0], "steps": r[1], "max_abs_diff": r[2]} for r in rows]}


def convergence(quick: bool) -> dict:
    """Local (exact history) and global slopes of every deterministic solver on the analytic mixture."""
    import numpy as np

    t = _test_module("test_solvers_convergence")
    exact = t.exact_trajectory()
    nfes = (20, 40, 80) if quick else (10, 20, 40, 80, 160)
    cases = t.CASES[::4] if quick else t.CASES
    records = []
    for solver, order, opts, local, glob in cases:
        (hs, local_err), (_, global_err) = t.measure_orders(exact, solver, order, opts, nfes=nfes)
        records.append({"solver": solver, "order": order, "options": opts, "expected_local": local,
                        "expected_global": glob, "local_slope": float(np.polyfit(np.log(hs), np.log(local_err), 1)[0]),
                        "global_slope": -float(np.polyfit(np.log(nfes[-3:]), np.log(global_err[-3:]), 1)[0]),
                        "nfe": list(nfes), "global_error": global_err, "h": hs, "local_error": local_err})
    print_table("Convergence on the analytic mixture (local: one step with exact history, h 0.1..0.025; global: "
                f"slope over NFE {nfes[-3]}-{nfes[-1]})",
                ["solver", "order", "options", "local slope", "expected", "global slope", "expected"],
                [[r["solver"], r["order"], str(r["options"] or ""), r["local_slope"], r["expected_local"],
                  r["global_slope"], r["expected_global"]] for r in records])
    return {"nfe": list(nfes), "records": records,
            "note": "dpmpp order 3 is diffusers' 3M (second order); dpmpp_ab order 3 is the true third order"}


def _plot(errors: dict, quick: bool) -> str:
    plt = pyplot()
    hs = list(errors["errors"]["stable"])
    fig, axes = plt.subplots(1, len(hs), figsize=(4 * len(hs), 3.6), sharey=True)
    colors = {}
    for ax, h in zip(axes, hs):
        for rule, style in (("stable", "-"), ("diffusers", ":")):
            for solver, curve in errors["errors"][rule][h].items():
                line = ax.loglog(curve["nfe"], curve["error"], style, marker="o" if rule == "stable" else None,
                                 markersize=2, color=colors.get(solver),
                                 label=solver if rule == "stable" else None)[0]
                colors.setdefault(solver, line.get_color())
        ax.set_title(f"{h} (solid: stable rule, dotted: diffusers')", fontsize=8)
        ax.set_xlabel("NFE")
        ax.set_xticks([n for n in (2, 4, 6, 10, 20, 40) if n <= max(errors["nfe"])])
        ax.xaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean L2 error vs exact ODE")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    path = plot_path("solvers", quick)
    fig.savefig(path, dpi=110)
    return path


def _plot_convergence(conv: dict, quick: bool) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in conv["records"]:
        label = f"{r['solver']}{r['order']}{''.join('-' + str(v) for v in r['options'].values())} " \
                f"(slope {r['global_slope']:.2f})"
        ax.loglog(r["nfe"], r["global_error"], marker="o", markersize=3, label=label)
    ax.set_xlabel("NFE")
    ax.set_ylabel("max abs error vs solve_ivp (rtol 1e-12)")
    ax.set_title("Global convergence on the analytic mixture\n(grid uniform in lambda, t 0.9 -> 0.1)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    path = plot_path("solvers_convergence", quick)
    fig.savefig(path, dpi=110)
    return path


def run_per_step(quick: bool = False) -> dict:
    """The per-step part alone, merged into solvers.json (python -m bench solvers_per_step)."""
    from bench.common import write_result_part

    threads_before = torch.get_num_threads()
    threads = int(os.environ.get("TDIFF_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    try:
        load = list(os.getloadavg())
        records = per_step(quick)
    finally:
        torch.set_num_threads(threads_before)
    path = write_result_part("solvers", "per_step", records, quick)
    import datetime

    from bench.common import machine

    write_result_part("solvers", "per_step_run", {
        "command": "python -m bench " + ("--quick " if quick else "") + "solvers_per_step", "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": load, "loadavg": list(os.getloadavg()), "threads": threads,
        "clock": TIMER.__name__}, quick)
    print(f"wrote {path}")
    return {"per_step": records}


def run(quick: bool = False) -> dict:
    # One thread by default: on a shared machine an OpenMP barrier waiting for a descheduled thread turns a 50 us
    # update into milliseconds, on both sides. TDIFF_BENCH_THREADS=n measures with n threads instead.
    threads_before = torch.get_num_threads()
    threads = int(os.environ.get("TDIFF_BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    try:
        payload = {"threads": threads, "loadavg_start": list(os.getloadavg()), "clock": TIMER.__name__,
                   "per_step": per_step(quick),
                   "bandwidth": bandwidth(quick),
                   "error": error_table(quick), "conformance": conformance(quick),
                   "convergence": convergence(quick), "loadavg": list(os.getloadavg())}
    finally:
        torch.set_num_threads(threads_before)
    try:
        payload["plot"] = _plot(payload["error"], quick)
        payload["plot_convergence"] = _plot_convergence(payload["convergence"], quick)
    except ImportError as e:  # matplotlib missing: the table and JSON still stand
        print(f"no plot: {e}")
    path = write_result("solvers", payload, quick)
    print(f"wrote {path}")
    return payload


def stability(quick: bool, seed: int) -> dict:
    """Section 3 alone, one thread; seed STABILITY_SEED also updates the bench's "error" part (and its PNG)."""
    from bench.common import write_result_part

    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = error_table(quick, seed)
    finally:
        torch.set_num_threads(threads_before)
    table["loadavg"] = list(os.getloadavg())
    if seed == STABILITY_SEED:
        print(f"wrote {write_result_part('solvers', 'error', table, quick)}")
        try:
            print(f"wrote {_plot(table, quick)}")
        except ImportError as e:
            print(f"no plot: {e}")
    return table


if __name__ == "__main__":
    import sys

    if "--stability" in sys.argv:
        seed = int(sys.argv[sys.argv.index("--seed") + 1]) if "--seed" in sys.argv else STABILITY_SEED
        stability("--quick" in sys.argv, seed)
    else:
        run(quick="--quick" in sys.argv)
