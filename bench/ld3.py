"""LD3: (1) memory of the rematerialised backward against plain autograd as NFE grows; (2) the teacher: which solver
at 20 model calls is closest to the exact ODE; (3) the mixture table: a smooth and a sharp 16-d Gaussian mixture
(exact denoiser, DDPM schedule), UniPC-3 at NFE 4-8, every heuristic, DM-NonUniform, LD3 and a reference-style
loop, 4 seeds each, error against the exact ODE solution on held-out noise; (4) the smooth mixture under the EDM
schedule (sigma 0.002..80), where an x-space x'_T step would be sigma_T^2 = 6400x too small; (5) the default digits
DiT, when its checkpoint exists: RMSE against the teacher and Frechet distance, with the L2 and the digits
perceptual loss; (6) wall and CPU time of every run.

Every LD3 setting is chosen on noise that is never reported: inside ld3_learn on its own training/validation noise,
and per mixture the data size (the paper's 50/50 samples with batch 2, or 200/200 with batch 8, or 400/400 with
batch 16: the same 25 iterations per epoch) and the space of xi (time or lambda) on a separate selection set at
NFE 5, seed 0. Every figure is measured on held-out noise.
"Reference-style" is the paper's 50/50, batch 2, with the reference's two choices where tdiff deviates: the x'_T step
on the batch-mean gradient (x_grad="batch_mean") and no final guard against a worse-than-start result.

Targets: LD3 >= 30% below the best heuristic's error at NFE 4-6 on both mixtures, and never worse than its own
starting heuristic; remat peak memory at NFE 20 <= 1.2x the peak at NFE 4.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import torch

from .common import plot_path, print_table, pyplot, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: (component variance, spread of the means) of the 8-component 16-d mixtures
MIXTURES = {"smooth": (1.0, 0.5), "sharp": (0.01, 1.0)}
REFERENCE_STYLE = dict(x_grad="batch_mean", keep_init_if_better=False)
#: settings LD3 chooses from per mixture (on selection noise, never on the reported noise): the training-data size
#: (the same 25 iterations per epoch) and the space xi lives in
DATA_CHOICES = {f"{n}/{n}, batch {b}, {space}": dict(n_train=n, n_val=n, batch_size=b, space=space)
                for n, b in ((50, 2), (200, 8), (400, 16)) for space in ("time", "lambda")}
PAPER = "50/50, batch 2, time"
SOLVER, ORDER = "unipc", 3


# ---------------------------------------------------------------------------------------------------------------
# (1) memory: each configuration in a fresh process, peak RSS above the RSS just before the solve
# ---------------------------------------------------------------------------------------------------------------
def _probe(mode: str, nfe: int) -> None:
    """Run one solve + backward and print {"peak_mb": ..., "saved_mb": ...} (called in a subprocess)."""
    import resource

    torch.set_num_threads(1)
    from tdiff.schedules import VPLinear
    from tdiff.solvers import sample
    from tdiff.timesteps import sample_remat
    import tdiff

    torch.manual_seed(0)
    from tdiff.models.dit import DiT, DiTConfig

    # the digits DiT's shape (6 blocks, width 128, 16 tokens), untrained but with non-zero adaLN gates so every
    # block does work: its activations per call are ~300x the state, as in any real diffusion network
    net = DiT(DiTConfig(input_size=16, patch_size=4, in_channels=1, hidden_size=128, depth=6, num_heads=4)).eval()
    with torch.no_grad():
        for blk in net.blocks:
            torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
            torch.nn.init.normal_(blk.adaLN_modulation[-1].bias, std=0.5)
    for p in net.parameters():
        p.requires_grad_(False)
    schedule = VPLinear()
    labels = torch.arange(64) % 10
    inner = tdiff.denoiser(net, schedule)

    def model(x, t):
        return inner(x, t, y=labels[: x.shape[0]])

    model.schedule = schedule
    x = torch.randn(64, 1, 16, 16, requires_grad=True)
    t = torch.linspace(1.0, 1e-3, nfe + 1, dtype=torch.float64, requires_grad=True)
    run = sample_remat if mode == "remat" else sample
    saved = [0]

    def pack(v):
        saved[0] += v.numel() * v.element_size()
        return v

    # warm the libraries up (BLAS work buffers, allocator pools) with a one-sample solve + backward, then measure
    # above the current RSS; the warm-up's own high-water mark is below any measured solve's peak
    warm = x[:1].detach().requires_grad_()
    sample(model, warm, t[:3].detach(), solver="unipc", order=2).sum().backward()
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        y = run(model, x, t, solver="unipc", order=2)
    y.square().sum().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": (peak - base) / 1024, "saved_mb": saved[0] / 2**20}))


def _memory(quick: bool) -> list:
    nfes = (4, 20) if quick else (4, 12, 20)
    out = []
    for mode in ("plain", "remat"):
        for nfe in nfes:
            code = f"from bench.ld3 import _probe; _probe({mode!r}, {nfe})"
            # glibc's dynamic mmap threshold would serve the large activations from the heap after the first
            # free, and heap fragmentation then shows up as RSS that no live tensor holds; a fixed threshold keeps
            # every large block mmapped, so peak RSS tracks live memory
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
            res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                                 env=env)
            out.append({"mode": mode, "nfe": nfe, **json.loads(res.stdout.strip().splitlines()[-1])})
    return out


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def mixture(name: str):
    """The 8-component 16-d Gaussian mixture `name` (fixed means and weights)."""
    from tdiff.data import GaussianMixture

    var, spread = MIXTURES[name]
    g = torch.Generator().manual_seed(0)
    means = torch.randn(8, 16, generator=g, dtype=torch.float64) * spread
    weights = torch.rand(8, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(means, torch.full((8,), var, dtype=torch.float64), weights)


def _mean_ci(values) -> tuple:
    """Mean and the half-width of its 95% t-interval."""
    from scipy import stats

    v = torch.tensor(values, dtype=torch.float64)
    if v.numel() < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, v.numel() - 1) * v.std() / math.sqrt(v.numel()))


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


class _Problem:
    """A mixture under a schedule: held-out noise, its exact ODE solution, and the student error of any steps."""

    def __init__(self, name: str, schedule, n_eval: int, noise_seed: int = 10_000):
        from tdiff.data import reference_ode_solution

        self.name, self.schedule = name, schedule
        self.den = mixture(name).denoiser(schedule)
        x = torch.randn(n_eval, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(noise_seed))
        self.x = x * schedule.sigma(schedule.t_max)  # held out: ld3_learn draws its noise from seeds 0..3
        self.exact = reference_ode_solution(self.den, schedule, self.x, schedule.t_max, schedule.t_min)

    def error(self, steps, solver=SOLVER, order=ORDER) -> float:
        from tdiff.solvers import sample

        with torch.no_grad():
            y = sample(self.den, self.x, steps, solver=solver, order=order, schedule=self.schedule)
        return float((y - self.exact).pow(2).mean().sqrt())


#: what the pool's forked workers read (set before the pool starts, so each worker inherits it)
_SHARED: dict = {}


def _pool():
    """Independent LD3 runs go to forked workers (one thread each; TDIFF_BENCH_WORKERS, default 2): the CPU time of
    each run is its own process's, so the figures do not change, only the wall time."""
    import multiprocessing as mp

    return mp.get_context("fork").Pool(int(os.environ.get("TDIFF_BENCH_WORKERS", "2")))


def _one_run(job: tuple) -> dict:
    from tdiff.timesteps import HEURISTICS, ld3_learn

    key, nfe, seed, train, kw = job
    prob = _SHARED[key]
    torch.set_num_threads(1)
    learned, wall, cpu = _timed(lambda: ld3_learn(prob.den, prob.schedule, solver=SOLVER, order=ORDER, nfe=nfe,
                                                  shape=(16,), dtype=torch.float64, seed=seed, progress=False,
                                                  **train, **kw))
    m = learned.metadata
    start = HEURISTICS[m["init"]](prob.schedule, nfe)
    return {"seed": seed, "rmse": prob.error(learned), "start": m["init"], "start_rmse": prob.error(start),
            "returned": m["returned"], "best_val_loss": m["best_val_loss"], "start_val_loss": m["val_history"][0],
            "iterations": m["iterations"], "stopped_early": m["stopped_early"],
            "x_step_over_radius": m["x_step_over_radius_median"], "wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}


def _summary(runs: list) -> dict:
    mean, ci = _mean_ci([r["rmse"] for r in runs])
    return {"mean": mean, "ci95": ci, "worst": max(r["rmse"] for r in runs),
            "worse_than_start": sum(r["rmse"] > r["start_rmse"] for r in runs), "runs": runs}


# ---------------------------------------------------------------------------------------------------------------
# (2) the teacher
# ---------------------------------------------------------------------------------------------------------------
def _teacher(prob: _Problem) -> list:
    """Every solver at 20 model calls on its best-suited heuristic, against the exact ODE."""
    from tdiff.timesteps import HEURISTICS, steps_for_nfe

    rows = []
    for solver, order in [("unipc", 3), ("unipc", 2), ("dpmpp", 3), ("dpmpp", 2), ("ipndm", 4), ("heun", 2),
                          ("euler", 1)]:
        steps = steps_for_nfe(prob.schedule, solver, order, 20)
        for name in ("logsnr_uniform", "edm_rho"):
            rows.append({"solver": solver, "order": order, "timesteps": name,
                         "rmse": prob.error(HEURISTICS[name](prob.schedule, steps), solver, order)})
    return sorted(rows, key=lambda r: r["rmse"])


def _choose_data(problems: dict) -> dict:
    """LD3's settings per mixture (DATA_CHOICES), chosen by the error on a selection set (noise seed 20_000, not
    the reported 10_000) at NFE 5, seed 0."""
    for name, prob in problems.items():
        _SHARED[f"select {name}"] = _Problem(name, prob.schedule, 500, noise_seed=20_000)
    jobs = [(f"select {name}", 5, 0, train, {}) for name in problems for train in DATA_CHOICES.values()]
    with _pool() as pool:
        runs = iter(pool.map(_one_run, jobs))
    chosen = {}
    for name in problems:
        errors = {choice: next(runs)["rmse"] for choice in DATA_CHOICES}
        chosen[name] = (min(errors, key=errors.get), errors)
        print(f"  {name}: settings chosen on selection noise: {chosen[name][0]} (selection RMSE {errors})",
              flush=True)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# (3) + (4) the mixture tables
# ---------------------------------------------------------------------------------------------------------------
def _table(key: str, nfes, seeds, train: dict, reference=None) -> list:
    """The heuristics, DM-NonUniform and LD3 (and the reference-style loop when reference = (seeds, settings)) for
    the problem _SHARED[key] at each NFE."""
    from tdiff.timesteps import HEURISTICS, dm_nonuniform

    prob = _SHARED[key]
    jobs = [(key, nfe, seed, train, {}) for nfe in nfes for seed in seeds]
    if reference:
        jobs += [(key, nfe, seed, reference[1], REFERENCE_STYLE) for nfe in nfes for seed in reference[0]]
    with _pool() as pool:
        runs = pool.map(_one_run, jobs)
    records = []
    for nfe in nfes:
        rec = {"mixture": prob.name, "schedule": type(prob.schedule).__name__, "nfe": nfe}
        for name, fn in HEURISTICS.items():
            rec[name] = prob.error(fn(prob.schedule, nfe))
        steps, wall, _ = _timed(lambda: dm_nonuniform(prob.schedule, nfe, solver=SOLVER, order=ORDER))
        rec["DM-NonUniform"], rec["DM-NonUniform wall_s"] = prob.error(steps), round(wall, 2)
        rec["best heuristic"] = min(rec[n] for n in HEURISTICS)
        rec["best heuristic name"] = min(HEURISTICS, key=lambda n: rec[n])
        rec["LD3"] = _summary([r for j, r in zip(jobs, runs) if j[1] == nfe and not j[4]])
        if reference:
            rec["LD3 reference-style"] = _summary([r for j, r in zip(jobs, runs) if j[1] == nfe and j[4]])
        rec["LD3 reduction vs best heuristic"] = 1 - rec["LD3"]["mean"] / rec["best heuristic"]
        records.append(rec)
        ref = rec.get("LD3 reference-style", {}).get("mean", float("nan"))
        print(f"  {prob.name} ({rec['schedule']}) NFE={nfe}: best heuristic {rec['best heuristic']:.4g} "
              f"({rec['best heuristic name']}), DMN {rec['DM-NonUniform']:.4g}, LD3 {rec['LD3']['mean']:.4g} "
              f"+- {rec['LD3']['ci95']:.2g} ({100 * rec['LD3 reduction vs best heuristic']:.0f}% lower), "
              f"reference-style {ref:.4g}", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------------------
# (5) the default digits DiT (only when its checkpoint is already there: training it is another bench's job)
# ---------------------------------------------------------------------------------------------------------------
def _dit_scores(ts) -> dict:
    from tdiff.metrics import frechet_distance, rmse
    from tdiff.solvers import sample

    d = _SHARED["dit"]
    with torch.no_grad():
        y = sample(d["den"], d["x"], ts, solver=SOLVER, order=ORDER)
    return {"fd": float(frechet_distance(y.clamp(-1, 1), size=d["size"])), "rmse": float(rmse(y, d["teacher"]))}


def _dit_run(job: tuple) -> dict:
    from tdiff.timesteps import ld3_learn

    nfe, loss = job
    d = _SHARED["dit"]
    torch.set_num_threads(1)
    learned, wall, cpu = _timed(lambda: ld3_learn(d["den"], d["schedule"], solver=SOLVER, order=ORDER, nfe=nfe,
                                                  shape=d["shape"], loss=loss, progress=False, **d["train"]))
    m = learned.metadata
    return dict(_dit_scores(learned), start=m["init"], returned=m["returned"], iterations=m["iterations"],
                wall_s=round(wall, 1), cpu_s=round(cpu, 1))


def _dit(quick: bool) -> dict:
    from tdiff.models.defaults import load_default
    from tdiff.solvers import sample
    from tdiff.timesteps import HEURISTICS, dm_nonuniform

    try:
        model, schedule, den = load_default("dit", train_if_missing=False)
    except (FileNotFoundError, ValueError) as e:
        return {"skipped": f"no default DiT checkpoint ({e})"}
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    n = 64 if quick else 500
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(10_000))  # held out
    with torch.no_grad():
        teacher = sample(den, x, HEURISTICS["logsnr_uniform"](schedule, 20), solver=SOLVER, order=ORDER)
    train = dict(n_train=10, n_val=10, epochs=2, phase1_epochs=1) if quick else {}
    _SHARED["dit"] = dict(den=den, schedule=schedule, shape=shape, x=x, teacher=teacher, size=cfg.input_size,
                          train=train)
    nfes = (5,) if quick else (4, 5, 6)
    # the perceptual loss costs a full run: at NFE 5 only
    jobs = [(nfe, "l2") for nfe in nfes] + ([] if quick else [(5, "digits_perceptual")])
    with _pool() as pool:
        runs = pool.map(_dit_run, jobs)
    rows = {}
    for nfe in nfes:
        for name, fn in HEURISTICS.items():
            rows[f"{name} NFE={nfe}"] = _dit_scores(fn(schedule, nfe))
        rows[f"DM-NonUniform NFE={nfe}"] = _dit_scores(dm_nonuniform(schedule, nfe, solver=SOLVER, order=ORDER))
        for (job_nfe, loss), r in zip(jobs, runs):
            if job_nfe == nfe:
                rows[f"LD3 ({loss}) NFE={nfe}"] = r
                print(f"  DiT LD3 ({loss}) NFE={nfe}: {r}", flush=True)
    rows["teacher NFE=20"] = _dit_scores(HEURISTICS["logsnr_uniform"](schedule, 20))
    return {"results": rows, "n_samples": n, "torch_threads": 1, "settings": train or "paper defaults"}


def run(quick: bool) -> dict:
    from tdiff.models.defaults import default_schedule
    from tdiff.schedules import EDM

    torch.set_num_threads(1)
    started = time.process_time()
    mem = _memory(quick)
    print_table("Rematerialised backward: peak RSS above the pre-solve RSS (fresh process each), and bytes of "
                "tensors saved for backward (weights counted once per use)", ["mode", "NFE", "peak MB", "saved MB"],
                [[m["mode"], m["nfe"], m["peak_mb"], m["saved_mb"]] for m in mem])
    peak = {(m["mode"], m["nfe"]): m["peak_mb"] for m in mem}
    ratio = peak[("remat", 20)] / peak[("remat", 4)]
    print(f"remat peak NFE 20 / NFE 4 = {ratio:.2f} (target <= 1.2); plain: "
          f"{peak[('plain', 20)] / peak[('plain', 4)]:.2f}")

    n_eval = 200 if quick else 1000
    seeds = (0,) if quick else (0, 1, 2, 3)
    ref_seeds = (0,) if quick else (0, 1)
    problems = {name: _Problem(name, default_schedule(), n_eval) for name in MIXTURES}
    _SHARED.update(problems)
    teacher = _teacher(problems["smooth"])
    print_table("Teacher candidates at 20 model calls, smooth mixture: RMSE vs the exact ODE", ["solver", "order",
                "timesteps", "RMSE"], [[r["solver"], r["order"], r["timesteps"], r["rmse"]] for r in teacher])
    quick_train = dict(n_train=20, n_val=20, epochs=3, phase1_epochs=1)
    data_choice = {name: ("quick", {}) for name in MIXTURES} if quick else _choose_data(problems)
    mix = []
    for name in problems:
        train = quick_train if quick else DATA_CHOICES[data_choice[name][0]]
        mix += _table(name, (4,) if quick else (4, 5, 6, 7, 8), seeds, train,
                      reference=(ref_seeds, quick_train if quick else DATA_CHOICES[PAPER]))
    _SHARED["smooth EDM"] = _Problem("smooth", EDM(), n_eval)
    edm = _table("smooth EDM", (4,) if quick else (4, 5, 6), seeds[:2],
                 quick_train if quick else DATA_CHOICES[data_choice["smooth"][0]])
    heur = ["uniform_t", "quadratic_t", "edm_rho", "logsnr_uniform"]
    print_table(f"Mixtures, {SOLVER}-{ORDER}: RMSE vs the exact ODE on {n_eval} held-out samples (LD3: mean +- 95% CI "
                f"over {len(seeds)} seeds)", ["mixture", "schedule", "NFE", *heur, "DMN", "LD3", "+-", "ref-style",
                                              "reduction", "worse than start", "LD3 cpu s"],
                [[r["mixture"], r["schedule"], r["nfe"], *[r[h] for h in heur], r["DM-NonUniform"], r["LD3"]["mean"],
                  r["LD3"]["ci95"], r.get("LD3 reference-style", {}).get("mean", float("nan")),
                  f"{100 * r['LD3 reduction vs best heuristic']:.0f}%", r["LD3"]["worse_than_start"],
                  _mean_ci([x["cpu_s"] for x in r["LD3"]["runs"]])[0]] for r in mix + edm])
    dit = _dit(quick)
    if "skipped" in dit:
        print(f"DiT: skipped: {dit['skipped']}")
    else:
        print_table(f"Digits DiT ({SOLVER}-{ORDER}, {dit['n_samples']} held-out samples)",
                    ["method", "FD", "RMSE vs teacher", "wall s", "cpu s"],
                    [[k, v["fd"], v["rmse"], v.get("wall_s", "-"), v.get("cpu_s", "-")]
                     for k, v in dit["results"].items()])
    _plot(mem, mix, edm, quick)
    payload = {"memory": mem, "remat_peak_ratio_20_over_4": ratio, "teacher": teacher, "mixture_settings":
               {k: {"variance": v, "mean_spread": s, "components": 8, "dim": 16} for k, (v, s) in MIXTURES.items()},
               "data_choice": data_choice, "data_choices": DATA_CHOICES, "mixture": mix, "edm_mixture": edm,
               "dit": dit, "seeds": list(seeds), "reference_style_seeds": list(ref_seeds), "n_eval": n_eval,
               "reference_style": REFERENCE_STYLE, "cpu_seconds": round(time.process_time() - started, 1),
               "loadavg": os.getloadavg()}
    write_result("ld3", payload, quick)
    return payload


def _plot(mem, mix, edm, quick: bool) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 4, figsize=(20, 4))
    for mode in ("plain", "remat"):
        ms = [m for m in mem if m["mode"] == mode]
        ax[0].plot([m["nfe"] for m in ms], [m["peak_mb"] for m in ms], "o-", label=f"{mode} peak RSS")
    ax[0].set(xlabel="NFE (model calls)", ylabel="MB", title="backward memory (digits-shaped DiT, batch 64)")
    for a, rows, title in ((ax[1], [r for r in mix if r["mixture"] == "smooth"], "smooth mixture (DDPM)"),
                           (ax[2], [r for r in mix if r["mixture"] == "sharp"], "sharp mixture (DDPM)"),
                           (ax[3], edm, "smooth mixture (EDM schedule)")):
        nfe = [r["nfe"] for r in rows]
        a.plot(nfe, [r["best heuristic"] for r in rows], "x--", label="best heuristic")
        a.plot(nfe, [r["DM-NonUniform"] for r in rows], "s:", label="DM-NonUniform")
        a.errorbar(nfe, [r["LD3"]["mean"] for r in rows], yerr=[r["LD3"]["ci95"] for r in rows], fmt="o-",
                   capsize=3, label="LD3 (mean, 95% CI)")
        if rows and "LD3 reference-style" in rows[0]:
            a.plot(nfe, [r["LD3 reference-style"]["mean"] for r in rows], "^-", label="LD3 reference-style")
        a.set(xlabel="NFE (model calls)", ylabel="RMSE vs exact ODE", yscale="log", title=title)
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_path("ld3", quick))
