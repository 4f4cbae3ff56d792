"""LD3: (1) memory of the rematerialised backward vs plain autograd as NFE grows; (2) exact error on the
analytic Gaussian mixture for the four heuristics, DM-NonUniform and LD3 (full, without xi_c, hard loss r = 0);
(3) the default digits DiT, when its checkpoint exists: Frechet distance and RMSE vs the teacher, and LD3's
training time.

Targets: peak memory at NFE 20 <= 1.2x the peak at NFE 4 with remat; LD3 >= 30% below the best heuristic's error
at NFE 4-6; <= 5 min on 2 cores for the DiT at NFE 5.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch

from .common import plot_path, print_table, pyplot, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    nfes = (4, 20) if quick else (4, 8, 12, 16, 20)
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
# (2) analytic mixture: exact error against the reference ODE solution
# ---------------------------------------------------------------------------------------------------------------
def _mixture(quick: bool) -> list:
    from tdiff.data import default_mixture_2d, reference_ode_solution
    from tdiff.models.defaults import default_schedule
    from tdiff.solvers import sample
    from tdiff.timesteps import HEURISTICS, dm_nonuniform, ld3_learn

    torch.set_num_threads(1)
    schedule = default_schedule()
    den = default_mixture_2d().denoiser(schedule)
    x = torch.randn(300 if quick else 1000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    x = x * schedule.sigma(schedule.t_max)
    ref = reference_ode_solution(den, schedule, x, schedule.t_max, schedule.t_min)
    nfes = (4,) if quick else tuple(int(v) for v in os.environ.get("TDIFF_BENCH_LD3_NFE", "4,5,6,7,8,9,10").split(","))
    solvers = ("unipc",) if quick else ("unipc", "dpmpp", "ipndm")
    train = dict(teacher_nfe=20, shape=(2,), dtype=torch.float64, progress=False,
                 **(dict(n_train=20, n_val=20, epochs=3, phase1_epochs=1) if quick else {}))
    variants = {"LD3": {}, "LD3 no xi_c": {"decoupled": False}, "LD3 hard (r=0)": {"r": 0.0}}

    def error(ts):
        with torch.no_grad():
            y = sample(den, x, ts, solver=solver, order=3)
        return float((y - ref).pow(2).sum(1).mean().sqrt())

    records = []
    for solver in solvers:
        for nfe in nfes:
            rec = {"solver": solver, "order": 3, "nfe": nfe}
            for name, fn in HEURISTICS.items():
                rec[name] = error(fn(schedule, nfe))
            if solver in ("dpmpp", "unipc"):  # DM-NonUniform's surrogate covers the exponential integrators
                rec["DM-NonUniform"] = error(dm_nonuniform(schedule, nfe, solver, 3))
            for name, kw in variants.items():
                t0 = time.perf_counter()
                learned = ld3_learn(den, schedule, solver=solver, order=3, nfe=nfe, **train, **kw)
                rec[name] = error(learned)
                rec[f"{name} seconds"] = round(time.perf_counter() - t0, 2)
            best = min(rec[n] for n in HEURISTICS)
            rec["best heuristic"] = best
            rec["LD3 reduction vs best heuristic"] = 1 - rec["LD3"] / best
            records.append(rec)
            print(f"  mixture {solver} NFE={nfe}: best heuristic {best:.4g}, LD3 {rec['LD3']:.4g} "
                  f"({100 * rec['LD3 reduction vs best heuristic']:.0f}% lower)", flush=True)
    return records


# ---------------------------------------------------------------------------------------------------------------
# (3) the default digits DiT (only when its checkpoint is already there: training it is another bench's job)
# ---------------------------------------------------------------------------------------------------------------
def _dit(quick: bool) -> dict:
    from tdiff.metrics import frechet_distance, rmse
    from tdiff.models.defaults import load_default
    from tdiff.solvers import sample
    from tdiff.timesteps import HEURISTICS, dm_nonuniform, ld3_learn

    try:
        model, schedule, den = load_default("dit", train_if_missing=False)
    except (FileNotFoundError, ValueError) as e:
        return {"skipped": f"no default DiT checkpoint ({e})"}
    torch.set_num_threads(2)
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    n = 64 if quick else 500
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(3))
    teacher_ts = HEURISTICS["logsnr_uniform"](schedule, 20)
    with torch.no_grad():
        teacher = sample(den, x, teacher_ts, solver="unipc", order=3)

    def scores(ts):
        with torch.no_grad():
            y = sample(den, x, ts, solver="unipc", order=3)
        return {"fd": float(frechet_distance(y, size=cfg.input_size)), "rmse": float(rmse(y, teacher))}

    nfes = (5,) if quick else (4, 5, 6, 7, 8)
    # the ablation variants cost a full LD3 run each (minutes on 2 cores), so they run at the lowest NFEs only
    ablate = (5,) if quick else tuple(int(v) for v in os.environ.get("TDIFF_BENCH_LD3_DIT_ABLATE", "4,5").split(","))
    variants = {"LD3": {}, "LD3 no xi_c": {"decoupled": False}, "LD3 hard (r=0)": {"r": 0.0}}
    train = dict(n_train=10, n_val=10, epochs=2, phase1_epochs=1) if quick else {}
    rows, seconds = {}, {}
    for nfe in nfes:
        for name, fn in HEURISTICS.items():
            rows[f"{name} NFE={nfe}"] = scores(fn(schedule, nfe))
        rows[f"DM-NonUniform NFE={nfe}"] = scores(dm_nonuniform(schedule, nfe, "unipc", 3))
        for name, kw in variants.items():
            if name != "LD3" and nfe not in ablate:
                continue
            t0 = time.perf_counter()
            learned = ld3_learn(den, schedule, solver="unipc", order=3, nfe=nfe, teacher_nfe=20, shape=shape,
                                progress=False, **train, **kw)
            seconds[f"{name} NFE={nfe}"] = time.perf_counter() - t0
            rows[f"{name} NFE={nfe}"] = dict(scores(learned), train_seconds=seconds[f"{name} NFE={nfe}"])
            print(f"  DiT {name} NFE={nfe}: {rows[f'{name} NFE={nfe}']}", flush=True)
    rows["teacher NFE=20"] = {"fd": float(frechet_distance(teacher, size=cfg.input_size)), "rmse": 0.0}
    return {"ld3_train_seconds": seconds[f"LD3 NFE={5}"], "train_seconds": seconds, "results": rows, "n_samples": n,
            "torch_threads": torch.get_num_threads()}


def run(quick: bool) -> dict:
    mem = _memory(quick)
    print_table("Rematerialised backward: peak RSS above the pre-solve RSS (fresh process each), and bytes of "
                "tensors saved for backward (weights counted once per use)", ["mode", "NFE", "peak MB", "saved MB"], [[m["mode"], m["nfe"], m["peak_mb"], m["saved_mb"]]
                                                                  for m in mem])
    peak = {(m["mode"], m["nfe"]): m["peak_mb"] for m in mem}
    ratio = peak[("remat", 20)] / peak[("remat", 4)]
    print(f"remat peak NFE 20 / NFE 4 = {ratio:.2f} (target <= 1.2); plain: "
          f"{peak[('plain', 20)] / peak[('plain', 4)]:.2f}")
    mix = _mixture(quick)
    cols = ["uniform_t", "quadratic_t", "edm_rho", "logsnr_uniform", "DM-NonUniform", "LD3", "LD3 no xi_c",
            "LD3 hard (r=0)"]
    print_table("Analytic mixture: RMSE vs the reference ODE solution (order 3)", ["solver", "NFE", *cols,
                "LD3 s"], [[r["solver"], r["nfe"], *[r.get(c, float("nan")) for c in cols], r["LD3 seconds"]]
                           for r in mix])
    dit = _dit(quick)
    if "skipped" in dit:
        print(f"DiT: skipped: {dit['skipped']}")
    else:
        print_table(f"Digits DiT (UniPC-3, {dit['n_samples']} samples; LD3 at NFE 5 trained in "
                    f"{dit['ld3_train_seconds']:.0f} s on {dit['torch_threads']} threads)",
                    ["method", "FD", "RMSE vs teacher", "train s"],
                    [[k, v["fd"], v["rmse"], v.get("train_seconds", "-")] for k, v in dit["results"].items()])
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for mode in ("plain", "remat"):
        ms = [m for m in mem if m["mode"] == mode]
        ax[0].plot([m["nfe"] for m in ms], [m["peak_mb"] for m in ms], "o-", label=f"{mode} peak RSS")
        ax[0].plot([m["nfe"] for m in ms], [m["saved_mb"] for m in ms], "x--", label=f"{mode} saved-tensor bytes (weights counted per use)")
    ax[0].set(xlabel="NFE", ylabel="MB", title="backward memory (digits-shaped DiT, batch 64)")
    for solver in sorted({r["solver"] for r in mix}):
        rs = [r for r in mix if r["solver"] == solver]
        ax[1].plot([r["nfe"] for r in rs], [r["best heuristic"] for r in rs], "x--", label=f"{solver} best heuristic")
        ax[1].plot([r["nfe"] for r in rs], [r["LD3"] for r in rs], "o-", label=f"{solver} LD3")
    ax[1].set(xlabel="NFE", ylabel="RMSE vs reference ODE", yscale="log", title="analytic mixture")
    for a in ax:
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_path("ld3", quick))
    payload = {"memory": mem, "remat_peak_ratio_20_over_4": ratio, "mixture": mix, "dit": dit}
    write_result("ld3", payload, quick)
    return payload
