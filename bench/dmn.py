"""DM-NonUniform against the reference optimiser at NFE 5, 6, 8, 10, 12, 15, 20 (DDPM linear schedule, DPM-Solver++
order 3): the objective reached under both objectives, the wall time (one thread, interleaved repetitions), the
exact sampling error on the analytic mixture, and RMSE / Frechet distance on the default digits DiT. Every J is at
p = 2 (the reference's); the extra row "tdiff [lagrange, p=1]" (the reference's advice for pixel-space models, like
the DiT) is there for the sampling errors only.

Optimisers (each run from scratch, timed end to end):
  tdiff            dm_nonuniform(): slack SQP with exact Jacobians and Hessian (QPs by DAQP), four starts screened
                   (above NFE 10 a 3-iteration burst each, up to it their own J; the leader continues), Newton polish.
  trust-constr FD  the reference's optimiser on tdiff's implementation of the same objective: scipy trust-constr,
                   finite-difference gradients, from uniform logSNR, margin 0, the reference's iteration limit (scipy's
                   default, 1000). Run for both objectives.
  reference        scxue/DM-NonUniform's own step_optim.py (not part of tdiff, never committed), when the environment
                   variable TDIFF_DMN_REFERENCE points at a checkout of it (or at the file). Its file calls an
                   `interpolate_fn` it never defines (DPM-Solver's piecewise-linear interpolation with linear
                   extrapolation): the bench supplies it, as tdiff's DiscreteVP interpolation, which is that function.
                   Its NoiseScheduleVP('discrete') is built from the same betas in float64 (its default is float32).
                   It runs get_ts_lambdas(N, 1e-3, "unif") unchanged, so its cap is its own: trust-constr's 1000
                   iterations. It optimises the paper's objective only ("lagrange").

The objectives (tdiff.timesteps.dmn_objective): "lagrange" is the paper's Eq. 35 with the Eq. 18 weights, as the
reference computes it (p = 2); "solver" uses DPM-Solver++ 3's own coefficient rows. Every optimiser's steps are scored
under both. Sampling: the public tdiff.sample with solver="dpmpp", order=3 (as the paper). Paper (Table 2, CPU):
1.9 s at NFE 5, 8.8 s at NFE 10, 14.1 s at NFE 15. Targets: tdiff <= 0.5 s at NFE 10 on one core, >= 20x faster than
finite-difference trust-constr on the same objective, and an objective at or below the reference's at every NFE.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import statistics
import time
import warnings

import numpy as np
import torch

from .common import paired_ratio, plot_path, print_table, pyplot, write_result

NFES = (5, 6, 8, 10, 12, 15, 20)
OBJECTIVES = ("lagrange", "solver")
REFERENCE_ENV = "TDIFF_DMN_REFERENCE"
PIXEL = "tdiff [lagrange, p=1]"


def _reference_module():
    """scxue/DM-NonUniform's step_optim.py as a module, or None when TDIFF_DMN_REFERENCE is unset."""
    path = os.environ.get(REFERENCE_ENV)
    if not path:
        return None, None
    if os.path.isdir(path):
        path = os.path.join(path, "step_optim.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{REFERENCE_ENV}={path!r} is not the reference's step_optim.py")
    from tdiff.schedules import DiscreteVP

    spec = importlib.util.spec_from_file_location("dm_nonuniform_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def interpolate_fn(x, xp, yp):  # the function the reference calls but does not define, (N, 1) in and out
        return DiscreteVP._interp(x.reshape(-1), xp.reshape(-1), yp.reshape(-1)).reshape(-1, 1)

    module.interpolate_fn = interpolate_fn
    return module, path


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _interval(values) -> dict:
    """Median and [min, max] of n repetitions: an interval for the median with coverage 1 - 2^(1-n)."""
    v = sorted(values)
    return {"median": statistics.median(v), "low": v[0], "high": v[-1], "n": len(v),
            "coverage": 1 - 2.0 ** (1 - len(v)) if len(v) > 1 else 0.0}


def _optimisers(schedule, reference):
    """name -> fn(nfe) -> interior lambdas (numpy)."""
    from tdiff.timesteps import dm_nonuniform

    def tdiff_fn(objective):
        return lambda nfe: dm_nonuniform(schedule, nfe, objective=objective, return_result=True)[1].x

    def fd_fn(objective):
        return lambda nfe: dm_nonuniform(schedule, nfe, objective=objective, method="trust-constr",
                                         gradient="finite-difference", margin=0.0, return_result=True)[1].x

    fns = {}
    for objective in OBJECTIVES:
        fns[f"tdiff [{objective}]"] = tdiff_fn(objective)
        fns[f"trust-constr FD [{objective}]"] = fd_fn(objective)
    if reference is not None:
        betas = 1 - schedule.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64),
                                                          schedule.alphas_cumprod[:-1]])
        ns = reference.NoiseScheduleVP("discrete", betas=betas, dtype=torch.float64)

        def reference_fn(nfe):
            with contextlib.redirect_stdout(io.StringIO()):  # its trust-constr runs with verbose=1
                _, lam = reference.StepOptim(ns).get_ts_lambdas(nfe, schedule.t_min, "unif")
            return np.asarray(lam, dtype=np.float64)[1:-1]

        fns["reference [lagrange]"] = reference_fn
    return fns


def _timed_runs(fns: dict, nfe: int, quick: bool) -> tuple:
    """Interleaved: round 1 runs every optimiser once; later rounds repeat those that took < 10 s (21 rounds for
    those under 0.2 s, whose medians a shared machine's swings move most; 5 for those under 2 s; 3 otherwise; 2 in
    --quick), in the same order. Wall time, and the process's CPU time beside it (on a shared machine the wall time
    also counts the other processes' turns)."""
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    result = {}
    rounds = 2 if quick else 21
    for r in range(rounds):
        for name, fn in fns.items():
            if r:
                first = wall[name][0]
                if first >= 10.0 or (r >= 3 and first >= 2.0) or (r >= 5 and first >= 0.2):
                    continue
            t0, c0 = time.perf_counter(), time.process_time()
            z = fn(nfe)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            result[name] = z
    return result, {name: {**_interval(wall[name]), "cpu": _interval(cpu[name]), "rounds": wall[name]}
                    for name in fns}


def _mixture(schedule, quick: bool):
    from tdiff.data import default_mixture_2d, reference_ode_solution

    den = default_mixture_2d().denoiser(schedule)
    x = torch.randn(200 if quick else 1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return den, x, reference_ode_solution(den, schedule, x, schedule.t_max, schedule.t_min)


def _dit(quick: bool):
    from tdiff.metrics import frechet_distance
    from tdiff.models.defaults import load_default
    from tdiff.solvers import sample
    from tdiff.timesteps import logsnr_uniform

    try:
        model, schedule, den = load_default("dit", train_if_missing=False)
    except (FileNotFoundError, ValueError) as e:
        return None, f"no default DiT checkpoint ({e})"
    cfg = model.config
    n = 32 if quick else 256
    teacher_nfe = 40 if quick else 100
    # held-out noise: a seed no other bench uses, and DM-NonUniform chooses nothing on samples (its steps depend on
    # the schedule alone), so nothing reported here was selected on it
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(20261))
    with torch.no_grad():
        teacher = sample(den, x, logsnr_uniform(schedule, teacher_nfe), solver="dpmpp", order=3)
    return {"den": den, "x": x, "teacher": teacher, "size": cfg.input_size, "n": n, "teacher_nfe": teacher_nfe,
            "teacher_solver": "dpmpp order 3, uniform logSNR, unconditional (null class)",
            "teacher_fd": float(frechet_distance(teacher, size=cfg.input_size))}, None


def run(quick: bool) -> dict:
    from threadpoolctl import threadpool_limits

    from tdiff.metrics import frechet_distance, rmse
    from tdiff.models.defaults import default_schedule
    from tdiff.solvers import sample
    from tdiff.timesteps import dm_nonuniform
    from tdiff.timesteps.dmn_objective import SurrogateObjective

    torch.set_num_threads(1)  # "on one core"; scipy's BLAS too, below
    load_start = os.getloadavg()
    schedule = default_schedule()
    reference, reference_path = _reference_module()
    fns = _optimisers(schedule, reference)
    nfes = (5, 6) if quick else NFES
    mix_den, mix_x, mix_ref = _mixture(schedule, quick)
    dit, dit_skipped = _dit(quick)
    if dit_skipped:
        print(f"[dmn] DiT part skipped: {dit_skipped}")

    def mixture_error(ts):
        with torch.no_grad():
            y = sample(mix_den, mix_x, ts, solver="dpmpp", order=3)
        return float((y - mix_ref).pow(2).sum(1).mean().sqrt())

    def dit_scores(ts):
        with torch.no_grad():
            y = sample(dit["den"], dit["x"], ts, solver="dpmpp", order=3)
        return {"rmse": float(rmse(y, dit["teacher"])), "fd": float(frechet_distance(y, size=dit["size"]))}

    records = []
    with threadpool_limits(1), warnings.catch_warnings():
        # scipy's trust-constr warns "delta_grad == 0.0" on the kinks; the reference's torch.tensor(tensor) copy
        warnings.simplefilter("ignore", UserWarning)
        for fn in fns.values():  # warm-up, untimed: imports, torch.func's first transform, allocator
            fn(3)
    for nfe in nfes:
        with threadpool_limits(1), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lams, seconds = _timed_runs(fns, nfe, quick)
        scorers = {o: SurrogateObjective(schedule, nfe, objective=o) for o in OBJECTIVES}
        start = scorers["lagrange"].initial("logsnr_uniform")
        # the reference's recommendation for pixel-space models such as the digits DiT (untimed, no peer)
        pixel = dm_nonuniform(schedule, nfe, p=1.0, return_result=True)[1].x
        rec = {"nfe": nfe, "methods": {}}
        for name, z in {"uniform logSNR (start)": start, **lams, PIXEL: pixel}.items():
            obj_value = {o: scorers[o].fun(z) for o in OBJECTIVES}
            ts = scorers["lagrange"].timesteps(z)
            m = {"objective": obj_value, "lambdas": z.tolist(), "timesteps": ts.tolist(),
                 "mixture_rmse": mixture_error(ts)}
            if name in seconds:
                m["seconds"] = seconds[name]
            if dit is not None and (name.startswith("tdiff") or name.startswith("uniform") or name == PIXEL
                                    or name == ("reference [lagrange]" if reference else "trust-constr FD [lagrange]")):
                m["dit"] = dit_scores(ts)
            rec["methods"][name] = m
        records.append(rec)
        _print_nfe(rec)

    summary = _summary(records, reference is not None)
    plot = _plot(records, quick, None if dit is None else dit["teacher_fd"])
    payload = {
        "summary": summary,
        "records": records,
        "reference": {"path": reference_path, "file_sha256": _sha256(reference_path), "interpolate_fn": "supplied by the bench (tdiff DiscreteVP._interp: "
                      "piecewise linear, linear extrapolation)", "call": "StepOptim(ns).get_ts_lambdas(N, 1e-3, 'unif')",
                      "iteration_cap": "trust-constr maxiter 1000 (scipy's default; the reference sets none)"}
        if reference else {"path": None, "note": f"set {REFERENCE_ENV} to run scxue/DM-NonUniform beside tdiff"},
        "settings": {"schedule": "DDPM linear betas 1e-4..0.02, 1000 steps (tdiff default_schedule)", "p": 2.0,
                     "order": 3, "sampler": "tdiff.sample(solver='dpmpp', order=3)",
                     "mixture": f"default_mixture_2d, {mix_x.shape[0]} points, vs reference_ode_solution",
                     "dit": None if dit is None else {k: dit[k] for k in ("n", "teacher_nfe", "teacher_solver",
                                                                          "teacher_fd")},
                     "dit_skipped": dit_skipped, "threads": 1,
                     "timing": "perf_counter, one torch thread and one BLAS thread (threadpoolctl), interleaved"},
        "paper_seconds": {"5": 1.9, "6": 2.3, "8": 5.9, "10": 8.8, "12": 11.0, "15": 14.1},
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "plot": plot,
    }
    write_result("dmn", payload, quick)
    return payload


def _print_nfe(rec: dict) -> None:
    rows = []
    for name, m in rec["methods"].items():
        s = m.get("seconds")
        rows.append([name, m["objective"]["lagrange"], m["objective"]["solver"],
                     f"{s['median']:.3g} [{s['low']:.3g}, {s['high']:.3g}] n={s['n']}" if s else "-",
                     f"{s['cpu']['median']:.3g}" if s else "-",
                     m["mixture_rmse"], m["dit"]["rmse"] if "dit" in m else "-", m["dit"]["fd"] if "dit" in m else "-"])
    print_table(f"DM-NonUniform, NFE {rec['nfe']} (DPM-Solver++ 3, DDPM linear, 1 thread)",
                ["steps", "J lagrange", "J solver", "wall s median [min, max]", "CPU s", "mixture RMSE", "DiT RMSE",
                 "DiT FD"],
                rows)


def _summary(records: list, have_reference: bool) -> list:
    """Per NFE: the objective reached by tdiff and by the reference optimiser(s) under each objective, whether tdiff's
    is at or below (to 1e-9 relative), and the times with tdiff's speed-up over each."""
    out, rows = [], []
    for rec in records:
        m = rec["methods"]
        row = {"nfe": rec["nfe"]}
        for o in OBJECTIVES:
            mine = m[f"tdiff [{o}]"]
            peers = {f"trust-constr FD [{o}]": m[f"trust-constr FD [{o}]"]}
            if have_reference and o == "lagrange":
                peers["reference [lagrange]"] = m["reference [lagrange]"]
            row[o] = {"tdiff": mine["objective"][o], "tdiff_seconds": mine["seconds"]["median"],
                      "tdiff_cpu_seconds": mine["seconds"]["cpu"]["median"]}
            for name, peer in peers.items():
                row[o][name] = {"objective": peer["objective"][o],
                                "tdiff_at_or_below": mine["objective"][o] <= peer["objective"][o] * (1 + 1e-9),
                                "seconds": peer["seconds"]["median"], "cpu_seconds": peer["seconds"]["cpu"]["median"],
                                "speedup_wall": peer["seconds"]["median"] / mine["seconds"]["median"],
                                "speedup_cpu": peer["seconds"]["cpu"]["median"] / mine["seconds"]["cpu"]["median"]}
                # where both ran in every round: the ratio round by round (both saw the same machine state), its
                # median with a 95% interval
                if len(peer["seconds"]["rounds"]) == len(mine["seconds"]["rounds"]) >= 5:
                    row[o][name]["speedup_paired"] = paired_ratio(peer["seconds"]["rounds"],
                                                                  mine["seconds"]["rounds"])
                rows.append([rec["nfe"], o, name, mine["objective"][o], peer["objective"][o],
                             "yes" if row[o][name]["tdiff_at_or_below"] else "NO", mine["seconds"]["median"],
                             peer["seconds"]["median"], row[o][name]["speedup_wall"], row[o][name]["speedup_cpu"],
                             _paired_text(row[o][name].get("speedup_paired"))])
        out.append(row)
    print_table("DM-NonUniform summary: tdiff against the reference optimiser(s), same objective (wall s: medians)",
                ["NFE", "objective", "peer", "J tdiff", "J peer", "tdiff <=", "s tdiff", "s peer", "x wall",
                 "x CPU", "x per round [95%]"], rows)
    return out


def _paired_text(ratio) -> str:
    return "-" if ratio is None else f"{ratio['median']:.1f} [{ratio['lo']:.1f}, {ratio['hi']:.1f}]"


def _plot(records: list, quick: bool, teacher_fd=None) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    nfes = [r["nfe"] for r in records]
    names = list(records[0]["methods"])
    styles = {"uniform logSNR (start)": ("k", ":"), "tdiff [lagrange]": ("C0", "o-"), "tdiff [solver]": ("C2", "s-"),
              "trust-constr FD [lagrange]": ("C1", "x--"), "trust-constr FD [solver]": ("C3", "+--"),
              "reference [lagrange]": ("C4", "d-."), PIXEL: ("C5", "v-")}  # one colour per optimiser in every panel

    def curve(a, key, names_, ylabel, title):
        for name in names_:
            ys = [key(r["methods"][name]) for r in records]
            if all(y is None for y in ys):
                continue
            color, style = styles.get(name, (None, "-"))
            a.plot(nfes, [np.nan if y is None else y for y in ys], style, color=color, label=name)
        a.set(xlabel="NFE", ylabel=ylabel, title=title, yscale="log")
        a.legend(fontsize=7)

    curve(ax[0, 0], lambda m: m["objective"]["lagrange"], names, "J (paper's Eq. 35, p = 2)",
          "objective reached: lagrange")
    curve(ax[0, 1], lambda m: m["objective"]["solver"], names, "J (DPM-Solver++ 3 rows, p = 2)",
          "objective reached: solver rows")
    curve(ax[0, 2], lambda m: m["seconds"]["median"] if "seconds" in m else None, names, "seconds (median)",
          "optimisation wall time, 1 thread")
    ax[0, 2].plot([5, 6, 8, 10, 12, 15], [1.9, 2.3, 5.9, 8.8, 11.0, 14.1], "k--", lw=0.8, label="paper, Table 2")
    ax[0, 2].legend(fontsize=7)
    curve(ax[1, 0], lambda m: m["mixture_rmse"], names, "RMSE vs exact ODE", "analytic mixture (2-D)")
    curve(ax[1, 1], lambda m: m["dit"]["rmse"] if "dit" in m else None, names, "RMSE vs teacher",
          "digits DiT: RMSE vs high-NFE teacher")
    curve(ax[1, 2], lambda m: m["dit"]["fd"] if "dit" in m else None, names, "Frechet distance",
          "digits DiT: Frechet distance")
    if teacher_fd is not None:
        ax[1, 2].axhline(teacher_fd, color="grey", lw=0.8, label="teacher")
        ax[1, 2].legend(fontsize=7)
    fig.tight_layout()
    path = plot_path("dmn", quick)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.path.basename(path)
