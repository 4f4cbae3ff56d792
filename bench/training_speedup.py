"""Training speed-up of SpeeD and FDM against their baselines, with a metric whose truth is known, seeds and 95%
confidence intervals.

The protocol was fixed before any method's outcome was looked at (the settings below). The learning rate (2e-3
over 1e-3) and the budgets were chosen on the *baselines only* (uniform, edm, vp; digits uniform, edm), on seed
1000, which is not reported: at 2000 (mixture) and 1000 (digits) iterations the baselines are still improving, so
their best value is near their last; the budgets are the largest that keep the full run near 60 CPU-minutes.

Primary: an analytic Gaussian mixture in 64 dimensions (`tdiff.data.image_mixture`: 10 smooth 8x8 class patterns,
each a rank-6 smooth subspace plus an isotropic floor; data std 0.5), whose denoiser E[x0 | x_t] is exact. A small
residual MLP denoiser trains on fresh samples every iteration (infinite data, so no overfitting). Every
`eval_every` iterations the EMA model is scored by
  - weighted_mse (primary): the exact denoising error e_n = E||D_theta(x_t) - D*(x_t)||^2 per dimension at each
    time t_n at which the sampler evaluates the denoiser (x_t drawn from the exact marginal, 512 per time, fixed),
    weighted as the sampler uses it: w_n is what a unit per-dimension error of D at evaluation n costs the final
    sample, measured once per family by finite differences through the sampler run on the exact denoiser (so the
    flow's own dynamics, e.g. where trajectories commit to a class, are in the weight). sum_n w_n e_n is the
    final-sample MSE the model's errors cause to first order; it is smooth in training, as a low-noise metric
    must be. The per-time errors are kept, to split them by SpeeD's areas.
  - sample_rmse (secondary): the RMS distance between the samples the model's denoiser produces and those the
    exact denoiser produces, from the same 512 x_T with the same solver and steps (paired, nonlinear: a few
    trajectories that change class move it, so it is noisier).
DDPM-family denoisers are clipped to the data range (+-2) as DDPM samplers (IDDPM, diffusers) clip x0; EDM and VP
samplers do not clip, as in EDM's code.
Solvers, per family: DDPM (linear betas, 1000 steps): DPM-Solver++(2M), 10 log-SNR-uniform steps. EDM: EDM's Heun
sampler, 10 steps, every step corrected (20 NFE: the grid ends at sigma_min, not 0), Karras rho = 7 over sigma in
[0.01, 80] (0.01 is the smallest sigma of the DDPM steps that SpeeD + FDM trains on; all three EDM-family methods
are scored on the same grid). VP (continuous linear): the same Heun sampler over the schedule's sigma range,
[0.0105, 152]. This differs from FDM's paper, which samples every model with EDM's sampler from
sigma = min(80, sigma_max); it matters for fdm_vp only: at sigma 152 FDM's input factor (m = 2, t' = 1) is 4e-8, so
the FDM-VP network sees no input at the first step (D = x there) and its samples keep the initial noise. The solvers
run with order_rule="diffusers" (SOLVER_OPTIONS), the samplers the cached runs were measured with: tdiff.sample's
default "stable" rule drops the Heun correction on long steps in lambda, which would change both the sampler and
the sensitivity weights the metric is made of.

Confirmation: digits (16x16, 1437 training images) with a small DiT; FD of 1000 class-balanced EMA samples
(`tdiff.metrics.frechet`) with the same per-family solvers.

For each metric, Q levels are defined on the baseline's best value B* (the minimum over evaluations of its
seed-mean curve, not its final value): Q = B* (1 + q), q in QUALITY. Per seed, "iterations to reach Q" is the first
crossing of the curve (interpolated in log metric between evaluations). The speed-up at Q is the geometric mean
over seeds of baseline iterations / method iterations (paired by seed), with a 95% t-interval on the log ratios;
iterations are reported as mean and 95% t-interval. A level some seed never reaches within the budget has no
ratio (reported as k/n reached). The headline level is q = 0.25 (pre-registered).

Methods (the paper defaults, each computed from its own paper): uniform (DDPM eps, uniform steps), speed (SpeeD:
k = 2, tau and areas from the schedule, lambda = 0.6), its two halves (sampling only, weights only), min_snr
(Min-SNR-5 on eps), p2 (P2, k = 1, gamma = 1), lognormal (EDM's log-normal steps, -1.2/1.2, on the DDPM eps
objective); edm (EDM preconditioning, log-normal, its weight), fdm (FDM on EDM: m = 2, input factor, its
lambda(sigma), warm-up over 10k images as in FDM's paper), fdm_nowarmup (ablation), speed_fdm (SpeeD + FDM, SpeeD's
supplement A.4: FDM's network, factor and warm-up; sigma from SpeeD's sampler on the DDPM steps, SpeeD's weights
times FDM's lambda(sigma)); vp (EDM's VP preconditioning and loss, uniform t), fdm_vp (FDM on VP). CLTS is not
included: its paper's schedule is not available here, and SpeeD's own CLTS baseline is known to be wrong.

Each finished (experiment, method, seed) run is cached under the tdiff cache directory (keyed by a hash of the
protocol and the method), so a killed bench resumes where it stopped; a cached run is rerun when the scorer it was
measured with (its evaluation times and, on the mixture, the sensitivity weights) is not the current one. --quick:
one seed, short budgets.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time

import torch
from torch import nn

from bench.common import plot_path, print_table, write_result
from tdiff import schedules as S
from tdiff.artefacts import load_json, save_json
from tdiff.data import image_mixture
from tdiff.models.defaults import default_schedule
from tdiff.models.embeddings import timestep_features
from tdiff.models.paths import cache_dir
from tdiff.preconditioning import Preconditioning
from tdiff.solvers import sample
from tdiff.solvers.sample import build_program
from tdiff.timesteps import edm_rho, logsnr_uniform
from tdiff.training import (DiffusionLoss, PreconditioningWeight, ProductWeight, SpeedWeight, WeightWarmup,
                            speed_areas)
from tdiff.training.train import optimise

VERSION = 2
SEEDS, QUICK_SEEDS = [0, 1, 2, 3, 4], [900]
QUALITY = (1.0, 0.5, 0.25, 0.1)
HEADLINE_Q = 0.25
MIXTURE = dict(side=8, k=10, rank=6, seed=0)
MIX_NET = dict(width=128, blocks=3, temb=64)
MIX_TRAIN = dict(iters=2000, batch=128, lr=2e-3, ema=0.995, eval_every=100)
MIX_QUICK = dict(iters=60, batch=64, lr=2e-3, ema=0.9, eval_every=20)
MIX_EVAL = dict(n=512, steps=10, quick_n=64)
DIGITS_NET = dict(hidden_size=64, depth=3, num_heads=4, patch_size=4)
DIGITS_TRAIN = dict(iters=1000, batch=64, lr=2e-3, ema=0.98, eval_every=100, samples=1000, steps=10)
DIGITS_QUICK = dict(iters=20, batch=16, lr=2e-3, ema=0.9, eval_every=10, samples=100, steps=4)
FDM_WARMUP_IMAGES = 10_000  # FDM's paper: the cap reaches lambda_end after 10k training images
MIXTURE_CLIP = 2.0  # the mixture's data lie within +-1.96 (2e5 samples): DDPM samplers clip x0 to the data range
#: EDM's Heun (every step corrected) and diffusers' DPM-Solver++(2M): the samplers the protocol was fixed with
SOLVER_OPTIONS = dict(order_rule="diffusers")


# ----------------------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------------------
def _edm_network_time(schedule):
    return lambda t: 250.0 * schedule.edm_sigma(t).log()  # EDM's c_noise (x1000), whatever the time axis


def _warmup(batch):
    return WeightWarmup(math.ceil(FDM_WARMUP_IMAGES / batch))


def make_loss(method: str, batch: int) -> DiffusionLoss:
    """The DiffusionLoss of each method (schedules are built fresh: losses keep per-device tables)."""
    if method == "uniform":
        return DiffusionLoss(default_schedule())
    if method == "speed":
        return DiffusionLoss(default_schedule(), sampler="speed", weighting="speed")
    if method == "speed_sampling":
        return DiffusionLoss(default_schedule(), sampler="speed")
    if method == "speed_weighting":
        return DiffusionLoss(default_schedule(), weighting="speed")
    if method == "min_snr":
        return DiffusionLoss(default_schedule(), weighting="min_snr", weighting_kwargs=dict(gamma=5.0))
    if method == "p2":
        return DiffusionLoss(default_schedule(), weighting="p2", weighting_kwargs=dict(k=1.0, gamma=1.0))
    if method == "lognormal":
        return DiffusionLoss(default_schedule(), sampler="lognormal")
    if method == "edm":
        return DiffusionLoss(S.EDM(), target="edm", weighting="edm")
    if method == "fdm":
        return DiffusionLoss(S.EDM(), process="fdm", warmup=_warmup(batch))
    if method == "fdm_nowarmup":
        return DiffusionLoss(S.EDM(), process="fdm")
    if method == "speed_fdm":
        ddpm = default_schedule()
        weight = ProductWeight(SpeedWeight(ddpm), PreconditioningWeight(ddpm, Preconditioning("edm", 0.5)))
        return DiffusionLoss(ddpm, sampler="speed", weighting=weight, process="fdm", precond="edm",
                             fdm_sigma_range=(0.002, 80.0), warmup=_warmup(batch),
                             network_time=_edm_network_time(ddpm))
    if method == "vp":
        return DiffusionLoss(S.VPLinear(), target="edm", precond="vp")
    if method == "fdm_vp":
        return DiffusionLoss(S.VPLinear(), process="fdm", warmup=_warmup(batch))
    raise ValueError(f"unknown method {method!r}")


FAMILY = {"uniform": "ddpm", "speed": "ddpm", "speed_sampling": "ddpm", "speed_weighting": "ddpm",
          "min_snr": "ddpm", "p2": "ddpm", "lognormal": "ddpm", "edm": "edm", "fdm": "edm", "fdm_nowarmup": "edm",
          "speed_fdm": "edm", "vp": "vp", "fdm_vp": "vp"}
BASELINE = {"ddpm": "uniform", "edm": "edm", "vp": "vp"}
MIXTURE_METHODS = list(FAMILY)
DIGITS_METHODS = ["uniform", "speed", "edm", "fdm"]
QUICK_MIXTURE_METHODS = ["uniform", "speed", "edm", "fdm", "speed_fdm", "vp", "fdm_vp"]
QUICK_DIGITS_METHODS = ["uniform", "speed", "edm", "fdm"]


def family_sampler(family: str, steps: int):
    """(schedule, timesteps, solver, order) the family's models are scored with."""
    if family == "ddpm":
        sched = default_schedule()
        return sched, logsnr_uniform(sched, steps), "dpmpp", 2
    if family == "edm":
        sched = S.EDM(sigma_min=0.01, sigma_max=80.0)
        return sched, edm_rho(sched, steps), "heun", 2
    sched = S.VPLinear()
    return sched, edm_rho(sched, steps), "heun", 2


def scoring_times(schedule, ts, solver: str, order: int) -> torch.Tensor:
    """The times at which the protocol's sampler evaluates the denoiser (float64)."""
    return build_program(schedule, ts, solver, order, **SOLVER_OPTIONS).eval_times.to(torch.float64)


class SigmaSpaceDenoiser(nn.Module):
    """A trained network's denoiser on another schedule of the same family (the EDM-family grid for SpeeD + FDM,
    trained on the DDPM steps): D(x_t, t) through the loss's own denoise at the same EDM sigma, clipped to
    [-clip, clip] when clip is set."""

    def __init__(self, loss: DiffusionLoss, model, schedule: S.NoiseSchedule, clip=None):
        super().__init__()
        self.loss, self.model, self.schedule, self.clip = loss, model, schedule, clip

    def forward(self, x, t, **cond):
        t = torch.as_tensor(t, dtype=torch.float64)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        sig = self.schedule.edm_sigma(t)
        own = sig if isinstance(self.loss.schedule, S.EDM) else self.loss.schedule.t_from_edm_sigma(sig)
        x_sigma = x / self.schedule.alpha(t).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        x0 = self.loss.denoise(self.model, x_sigma, own, **cond)
        return x0 if self.clip is None else x0.clamp(-self.clip, self.clip)


# ----------------------------------------------------------------------------------------------------------------
# The mixture experiment
# ----------------------------------------------------------------------------------------------------------------
class MixtureNet(nn.Module):
    """A residual MLP denoiser: input projection, `blocks` pre-norm residual blocks with the time embedding added,
    output projection. Time: sinusoidal features of the network time (the loss's convention)."""

    def __init__(self, dim: int, width: int, blocks: int, temb: int):
        super().__init__()
        self.temb = temb
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(temb, width), nn.SiLU(), nn.Linear(width, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(blocks))
        self.fc1 = nn.ModuleList(nn.Linear(width, 2 * width) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(2 * width, width) for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, dim))

    def forward(self, x, t, y=None):
        e = self.time(timestep_features(t, self.temb).to(x.dtype))
        h = self.inp(x)
        for norm, fc1, fc2 in zip(self.norms, self.fc1, self.fc2):
            h = h + fc2(torch.nn.functional.silu(fc1(norm(h) + e)))
        return self.out(h)


class MixtureScorer:
    """The fixed evaluation of one family: exact marginal samples at the sampler's evaluation times with their exact
    denoisings, the sampler's sensitivity to each evaluation, and the exact-denoiser samples from fixed x_T."""

    def __init__(self, gm, family: str, n: int, steps: int, n_sensitivity: int = 256):
        self.gm, self.family = gm, family
        self.schedule, self.ts, self.solver, self.order = family_sampler(family, steps)
        self.clip = MIXTURE_CLIP if family == "ddpm" else None
        self.times = scoring_times(self.schedule, self.ts, self.solver, self.order)
        g = torch.Generator().manual_seed(12345)
        self.xt, self.exact = [], []
        for t in self.times:
            x0 = gm.sample(n, generator=g)
            xt = self.schedule.alpha(t) * x0 + self.schedule.sigma(t) * torch.randn(x0.shape, generator=g,
                                                                                    dtype=torch.float64)
            self.xt.append(xt.float())
            self.exact.append(gm.posterior_mean(xt, t, self.schedule).float())
        self.x_T = (torch.randn(n, gm.dim, generator=g, dtype=torch.float64)
                    * self.schedule.sigma(self.ts[0])).float()
        self.reference = self._solve(self._exact, self.x_T.double()).float()
        self.weights = self._sensitivity(self.x_T[:n_sensitivity].double(), g)

    def _exact(self, x, t):
        return self.gm.posterior_mean(x, t, self.schedule)

    def _solve(self, den, x_T):
        return sample(den, x_T, self.ts, solver=self.solver, order=self.order, schedule=self.schedule,
                      **SOLVER_OPTIONS)

    def _sensitivity(self, x_T, g, eps: float = 1e-5, directions: int = 4) -> list:
        """w_n = E||dx_final||^2 / (eps^2 d) when the exact denoiser's output at evaluation n is moved by eps times
        a standard normal direction: what a unit per-dimension error of D at that evaluation costs the final sample,
        through the exact flow (finite differences in float64)."""
        base = self._solve(self._exact, x_T)
        weights = []
        for n in range(len(self.times)):
            total = 0.0
            for _ in range(directions):
                delta = torch.randn(x_T.shape, generator=g, dtype=torch.float64)
                calls = [0]

                def den(x, t, n=n, delta=delta, calls=calls):
                    out = self._exact(x, t)
                    if calls[0] == n:
                        out = out + eps * delta
                    calls[0] += 1
                    return out

                total += float((self._solve(den, x_T) - base).pow(2).mean()) / eps**2
            weights.append(total / directions)
        return weights

    @torch.no_grad()
    def score(self, loss: DiffusionLoss, model) -> dict:
        den = SigmaSpaceDenoiser(loss, model, self.schedule, self.clip)
        per_time = [float((den(x, t) - d).pow(2).mean()) for x, t, d in zip(self.xt, self.times, self.exact)]
        out = self._solve(den, self.x_T)
        rmse = float((out - self.reference).pow(2).mean().sqrt())
        weighted = sum(w * e for w, e in zip(self.weights, per_time))
        return {"weighted_mse": weighted if math.isfinite(weighted) else float("inf"),
                "sample_rmse": rmse if math.isfinite(rmse) else float("inf"), "denoise_mse_per_time": per_time}


def _area_of_times(times: torch.Tensor) -> list:
    """SpeeD's area (0 acceleration, 1 deceleration, 2 convergence) of each DDPM time."""
    sched = default_schedule()
    areas = speed_areas(sched)
    cells = torch.round(sched.index_from_t(times)).long().clamp(0, sched.n - 1)
    return areas.area_of(cells).tolist()


def train_mixture(method: str, seed: int, quick: bool, scorers: dict) -> dict:
    cfg = MIX_QUICK if quick else MIX_TRAIN
    gm = scorers["_gm"]
    torch.manual_seed(seed)
    model = MixtureNet(gm.dim, **MIX_NET)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    loss_fn = make_loss(method, cfg["batch"])
    scorer = scorers[FAMILY[method]]
    g = torch.Generator().manual_seed(10_000 + seed)
    areas_ddpm = speed_areas(default_schedule()) if loss_fn.cells.discrete else None
    curve = {"iter": [], "weighted_mse": [], "sample_rmse": [], "denoise_mse_per_time": [], "train_loss": [],
             "train_mse_by_area": []}
    running, by_area = [], [[], [], []]
    cpu0 = time.process_time()
    for it in range(1, cfg["iters"] + 1):
        x0 = gm.sample(cfg["batch"], generator=g).float()
        loss = loss_fn(model, x0, generator=g)
        optimise(loss, opt, loss_fn, model, ema, cfg["ema"])
        running.append(loss.item())
        if areas_ddpm is not None:  # the unweighted error per SpeeD area (the investigation's loss curves)
            area = areas_ddpm.area_of(loss_fn.cells.cell_of(loss_fn.last_t))
            for a in range(3):
                sel = loss_fn.last_mse[area == a]
                if sel.numel():
                    by_area[a].append(float(sel.mean()))
        if it % cfg["eval_every"] == 0:
            s = scorer.score(loss_fn, ema)
            curve["iter"].append(it)
            for k in ("weighted_mse", "sample_rmse", "denoise_mse_per_time"):
                curve[k].append(s[k])
            curve["train_loss"].append(sum(running) / len(running))
            curve["train_mse_by_area"].append([sum(v) / len(v) if v else None for v in by_area])
            running, by_area = [], [[], [], []]
    curve["cpu_seconds"] = time.process_time() - cpu0
    curve["eval_times"] = scorer.times.tolist()
    curve["eval_weights"] = scorer.weights
    return curve


# ----------------------------------------------------------------------------------------------------------------
# The digits confirmation
# ----------------------------------------------------------------------------------------------------------------
def train_digits(method: str, seed: int, quick: bool) -> dict:
    from tdiff.data.digits import load_digits_tensor
    from tdiff.metrics.frechet import frechet_distance
    from tdiff.models import DiT, DiTConfig

    cfg = DIGITS_QUICK if quick else DIGITS_TRAIN
    images, labels = load_digits_tensor(16, "train")
    loss_fn = make_loss(method, cfg["batch"])
    torch.manual_seed(seed)
    model = DiT(DiTConfig.preset("digits", **DIGITS_NET))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    g = torch.Generator().manual_seed(20_000 + seed)
    sched, ts, solver, order = family_sampler(FAMILY[method], cfg["steps"])
    n = cfg["samples"]
    y = torch.arange(n) % 10
    x_T = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(54321)) * sched.sigma(ts[0]).float()
    curve = {"iter": [], "fd": [], "train_loss": [], "eval_times": scoring_times(sched, ts, solver, order).tolist()}
    running = []
    cpu0 = time.process_time()
    for it in range(1, cfg["iters"] + 1):
        idx = torch.randint(0, len(images), (cfg["batch"],), generator=g)
        loss = loss_fn(model, images[idx], generator=g, y=labels[idx])
        optimise(loss, opt, loss_fn, model, ema, cfg["ema"])
        running.append(loss.item())
        if it % cfg["eval_every"] == 0:
            den = SigmaSpaceDenoiser(loss_fn, ema, sched, 1.0 if FAMILY[method] == "ddpm" else None)
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                imgs = sample(lambda x, t: den(x, t, y=y), x_T, ts, solver=solver, order=order, schedule=sched,
                              **SOLVER_OPTIONS)
                fd = frechet_distance(imgs.clamp(-1, 1))
            curve["iter"].append(it)
            curve["fd"].append(fd if math.isfinite(fd) else float("inf"))
            curve["train_loss"].append(sum(running) / len(running))
            running = []
    curve["cpu_seconds"] = time.process_time() - cpu0
    return curve


# ----------------------------------------------------------------------------------------------------------------
# Cache of finished runs
# ----------------------------------------------------------------------------------------------------------------
def _protocol(experiment: str, quick: bool) -> dict:
    if experiment == "mixture":
        return {"version": VERSION, "mixture": MIXTURE, "net": MIX_NET, "train": MIX_QUICK if quick else MIX_TRAIN,
                "eval": MIX_EVAL, "quick": quick, "warmup_images": FDM_WARMUP_IMAGES}
    return {"version": VERSION, "net": DIGITS_NET, "train": DIGITS_QUICK if quick else DIGITS_TRAIN, "quick": quick,
            "warmup_images": FDM_WARMUP_IMAGES}


def _scored_alike(curve: dict, expected: dict) -> bool:
    """Whether a cached curve was measured with the expected scorer: every entry of `expected` (eval_times, and on
    the mixture eval_weights) that the curve records matches (weights are finite differences: relative 1e-4)."""
    for name, want in expected.items():
        have = curve.get(name)
        if have is None:  # recorded by every mixture run; digits runs record their times since this check exists
            continue
        tol = 1e-4 if name == "eval_weights" else 1e-9
        if len(have) != len(want) or any(abs(a - b) > tol * max(abs(b), 1e-12) for a, b in zip(have, want)):
            return False
    return True


def _cached(experiment: str, method: str, seed: int, quick: bool, run_fn, log, expected: dict = None) -> dict:
    key = json.dumps({"protocol": _protocol(experiment, quick), "method": method, "seed": seed,
                      "loss": make_loss(method, (MIX_TRAIN if experiment == "mixture" else DIGITS_TRAIN)["batch"])
                      .config()}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), "bench_training_speedup", f"{experiment}-{method}-{seed}-{digest}.json")
    if os.path.exists(path):
        try:
            curve = load_json(path, "tdiff-bench-training-run", 1)["curve"]
        except ValueError as e:  # a damaged file is rerun, not trusted
            log(f"  cached run {path} unreadable ({e}); rerunning")
        else:
            if _scored_alike(curve, expected or {}):
                return curve
            log(f"  cached run {path} was scored with another sampler program; rerunning")
    t0 = time.perf_counter()
    curve = run_fn()
    save_json(path, "tdiff-bench-training-run", 1, {"key": json.loads(key), "curve": curve})
    log(f"  {experiment:8s} {method:16s} seed {seed}: {time.perf_counter() - t0:6.1f} s wall, "
        f"{curve['cpu_seconds']:6.1f} s CPU")
    return curve


# ----------------------------------------------------------------------------------------------------------------
# Analysis: iterations to reach Q, speed-ups with 95% intervals
# ----------------------------------------------------------------------------------------------------------------
def _t975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def crossing(iters, values, level):
    """First iteration at which the curve reaches `level`, interpolated linearly in log(value) between
    evaluations (from iteration 0 at +inf); None if it never does."""
    prev_i, prev_v = 0.0, math.inf
    for i, v in zip(iters, values):
        if v <= level:
            if not math.isfinite(prev_v):
                return float(i)
            lp, lv, ll = math.log(prev_v), math.log(v), math.log(level)
            return prev_i + (i - prev_i) * (lp - ll) / (lp - lv)
        prev_i, prev_v = float(i), v
    return None


def _mean_ci(xs):
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, m, m
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    h = _t975(n - 1) * sd / math.sqrt(n)
    return m, m - h, m + h


def speedups(runs: dict, metric: str, baseline: str, methods) -> dict:
    """Per method and Q level: iterations (mean, CI), reached k/n, speed-up (geometric mean, CI) vs baseline."""
    base = runs[baseline]
    iters = base[0]["iter"]
    mean_curve = [sum(r[metric][j] for r in base) / len(base) for j in range(len(iters))]
    best = min(mean_curve)
    out = {"baseline_best": best, "baseline_best_iter": iters[mean_curve.index(best)], "levels": {}}
    for q in QUALITY:
        level = best * (1 + q)
        row = {"level": level}
        base_it = [crossing(r["iter"], r[metric], level) for r in base]
        for m in methods:
            its = [crossing(r["iter"], r[metric], level) for r in runs[m]]
            reached = [i for i in its if i is not None]
            entry = {"iters": its, "reached": f"{len(reached)}/{len(its)}"}
            if reached:
                entry["iters_mean_ci"] = _mean_ci(reached)
            if all(i is not None for i in its) and all(b is not None for b in base_it):
                logs = [math.log(b / i) for b, i in zip(base_it, its)]
                m_, lo, hi = _mean_ci(logs)
                entry["speedup"], entry["speedup_ci"] = math.exp(m_), (math.exp(lo), math.exp(hi))
                entry["speedup_per_seed"] = [math.exp(v) for v in logs]
            row[m] = entry
        out["levels"][str(q)] = row
    return out


def _finals(runs, metric):
    return {m: _mean_ci([r[metric][-1] for r in rs]) for m, rs in runs.items()}


def _area_investigation(runs: dict) -> dict:
    """The DDPM family's sampler-grid denoising error split by SpeeD area, and the unweighted training error per
    area, at the baseline's best iteration and at the end (seed means)."""
    out = {}
    some = next(iter(runs.values()))[0]
    times = torch.tensor(some["eval_times"], dtype=torch.float64)
    areas = _area_of_times(times)
    for m, rs in runs.items():
        if FAMILY[m] != "ddpm":
            continue
        per_area = []
        for j in range(len(rs[0]["iter"])):
            sums = [0.0, 0.0, 0.0]
            counts = [0, 0, 0]
            for r in rs:
                for a, e in zip(areas, r["denoise_mse_per_time"][j]):
                    sums[a] += e / len(rs)
                    counts[a] += 1
            per_area.append([s / max(c / len(rs), 1) for s, c in zip(sums, counts)])
        train = [[sum(r["train_mse_by_area"][j][a] for r in rs) / len(rs)
                  if all(r["train_mse_by_area"][j][a] is not None for r in rs) else None for a in range(3)]
                 for j in range(len(rs[0]["iter"]))]
        out[m] = {"eval_denoise_mse_by_area": per_area, "train_mse_by_area": train}
    out["_times_per_area"] = {str(a): sum(1 for x in areas if x == a) for a in range(3)}
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------------
def _band(ax, iters, curves, label, **kw):
    n = len(curves)
    logs = torch.tensor([[math.log(max(v, 1e-300)) for v in c] for c in curves], dtype=torch.float64)
    m = logs.mean(0)
    h = _t975(n - 1) * logs.std(0) / math.sqrt(n) if n > 1 else torch.zeros_like(m)
    line, = ax.plot(iters, m.exp(), label=label, **kw)
    ax.fill_between(iters, (m - h).exp(), (m + h).exp(), alpha=0.2, color=line.get_color())


def _plot_areas(ax, mix, title):
    """Seed-mean sampler-grid denoising MSE per SpeeD area (acceleration, deceleration, convergence) over training,
    for the DDPM family's SpeeD variants and the uniform baseline."""
    styles = {0: "-", 1: "--", 2: ":"}
    names = {0: "acceleration", 1: "deceleration", 2: "convergence"}
    some = next((rs for m, rs in mix.items() if FAMILY[m] == "ddpm"), None)
    if some is None:
        ax.set_visible(False)
        return
    areas = _area_of_times(torch.tensor(some[0]["eval_times"], dtype=torch.float64))
    for m in ("uniform", "speed", "speed_sampling", "speed_weighting"):
        if m not in mix:
            continue
        color = None
        for a in (0, 1, 2):
            idx = [j for j, x in enumerate(areas) if x == a]
            if not idx:
                continue
            vals = [sum(sum(r["denoise_mse_per_time"][k][j] for j in idx) / len(idx) for r in mix[m]) / len(mix[m])
                    for k in range(len(mix[m][0]["iter"]))]
            line, = ax.plot(mix[m][0]["iter"], vals, linestyle=styles[a], color=color,
                            label=f"{m} / {names[a]}")
            color = line.get_color()
    ax.set(xlabel="training iteration", ylabel="denoising MSE at the sampler's times in the area", yscale="log",
           title=title)
    ax.legend(fontsize=6)


def _plot(mix, digits, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("mixture", "ddpm", "weighted_mse", "sampler-weighted denoising MSE (per dim)"),
              ("mixture", "edm", "weighted_mse", "sampler-weighted denoising MSE (per dim)"),
              ("mixture", "vp", "weighted_mse", "sampler-weighted denoising MSE (per dim)"),
              ("mixture", "ddpm", "sample_rmse", "sample RMSE to exact samples"),
              ("mixture", "edm", "sample_rmse", "sample RMSE to exact samples"),
              ("mixture", "vp", "sample_rmse", "sample RMSE to exact samples"),
              ("digits", "ddpm", "fd", "digits FD of the EMA model's samples"),
              ("digits", "edm", "fd", "digits FD of the EMA model's samples"),
              ("investigation", "ddpm", None, "DDPM family: denoising MSE per SpeeD area")]
    fig, axes = plt.subplots(3, 3, figsize=(17, 13))
    for ax, (exp, fam, metric, ylabel) in zip(axes.flat, panels):
        if exp == "investigation":
            _plot_areas(ax, mix, ylabel)
            continue
        runs = mix if exp == "mixture" else digits
        if not runs:
            ax.set_visible(False)
            continue
        for m, rs in runs.items():
            if FAMILY[m] != fam:
                continue
            _band(ax, rs[0]["iter"], [r[metric] for r in rs], m,
                  linestyle="--" if m in BASELINE.values() else "-")
        sm = summary.get(exp, {}).get(fam, {}).get(metric)
        if sm:
            for q in QUALITY:
                ax.axhline(sm["levels"][str(q)]["level"], color="gray", linewidth=0.6, linestyle=":")
        ax.set(xlabel="training iteration", ylabel=ylabel, yscale="log", title=f"{exp}: {fam} family")
        ax.legend(fontsize=7)
    fig.suptitle("Training speed-up: seed means with 95% confidence bands; dotted lines are the Q levels "
                 "(baseline best x (1 + q))")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    seeds = QUICK_SEEDS if quick else SEEDS
    wall0, cpu0 = time.perf_counter(), time.process_time()
    gm = image_mixture(**MIXTURE)
    n_eval = MIX_EVAL["quick_n"] if quick else MIX_EVAL["n"]
    scorers = {"_gm": gm}
    for fam in ("ddpm", "edm", "vp"):
        scorers[fam] = MixtureScorer(gm, fam, n_eval, MIX_EVAL["steps"])
    mix_methods = QUICK_MIXTURE_METHODS if quick else MIXTURE_METHODS
    dig_methods = QUICK_DIGITS_METHODS if quick else DIGITS_METHODS
    mix = {m: [] for m in mix_methods}
    digits = {m: [] for m in dig_methods}
    for seed in seeds:  # seed-major: a partial run already has every method on the first seeds
        for m in mix_methods:
            sc = scorers[FAMILY[m]]
            mix[m].append(_cached("mixture", m, seed, quick, lambda: train_mixture(m, seed, quick, scorers), log,
                                  {"eval_times": sc.times.tolist(), "eval_weights": sc.weights}))
        for m in dig_methods:
            sched, ts, solver, order = family_sampler(FAMILY[m], (DIGITS_QUICK if quick else DIGITS_TRAIN)["steps"])
            digits[m].append(_cached("digits", m, seed, quick, lambda: train_digits(m, seed, quick), log,
                                     {"eval_times": scoring_times(sched, ts, solver, order).tolist()}))

    summary = {"mixture": {}, "digits": {}}
    for fam, base in BASELINE.items():
        members = [m for m in mix_methods if FAMILY[m] == fam]
        if base in members:
            summary["mixture"][fam] = {metric: speedups(mix, metric, base, members)
                                       for metric in ("weighted_mse", "sample_rmse")}
    for fam, base in BASELINE.items():
        members = [m for m in dig_methods if FAMILY[m] == fam]
        if base in members:
            summary["digits"][fam] = {"fd": speedups(digits, "fd", base, members)}
    investigation = _area_investigation(mix)
    finals = {"mixture": {k: _finals(mix, k) for k in ("weighted_mse", "sample_rmse")},
              "digits": {"fd": _finals(digits, "fd")}}
    _print(summary, finals)
    targets = _targets(summary)
    print_table("targets (mixture, sampler-weighted denoising MSE, headline Q = baseline best x 1.25)",
                ["target", "measured", "95% CI", "met"],
                [[k, v["speedup"], v["ci"], v["met"]] for k, v in targets.items()])
    _plot(mix, digits, summary, plot_path("training_speedup", quick))
    cpu = time.process_time() - cpu0
    payload = {
        "protocol": {"version": VERSION, "seeds": seeds, "selection_seeds": [1000, 1001], "quality_q": QUALITY,
                     "headline_q": HEADLINE_Q, "mixture": MIXTURE, "mixture_net": MIX_NET,
                     "mixture_train": MIX_QUICK if quick else MIX_TRAIN, "mixture_eval": MIX_EVAL,
                     "digits_net": DIGITS_NET, "digits_train": DIGITS_QUICK if quick else DIGITS_TRAIN,
                     "fdm_warmup_images": FDM_WARMUP_IMAGES,
                     "methods": {m: make_loss(m, 256).config() for m in MIXTURE_METHODS}, "doc": __doc__},
        "targets": targets, "summary": summary, "final": finals, "investigation": investigation,
        "runs": {"mixture": mix, "digits": digits},
        "cpu_seconds_this_invocation": cpu, "wall_seconds_this_invocation": time.perf_counter() - wall0,
        "cpu_seconds_all_runs": sum(r["cpu_seconds"] for rs in list(mix.values()) + list(digits.values())
                                    for r in rs),
        "loadavg": os.getloadavg(), "threads": 1,
    }
    path = write_result("training_speedup", payload, quick)
    log(f"wrote {path}")
    return {"summary": summary, "targets": targets}


def _targets(summary) -> dict:
    out = {}
    for name, fam, method, need in (("SpeeD >= 2x fewer iterations than uniform, CI low > 1.3", "ddpm", "speed", 2.0),
                                    ("FDM >= 1.5x fewer iterations than EDM", "edm", "fdm", 1.5)):
        entry = summary["mixture"].get(fam, {}).get("weighted_mse", {}).get("levels", {}).get(str(HEADLINE_Q), {})
        entry = entry.get(method, {})
        sp, ci = entry.get("speedup"), entry.get("speedup_ci")
        met = sp is not None and sp >= need and (method != "speed" or ci[0] > 1.3)
        out[name] = {"speedup": sp, "ci": ci, "met": bool(met), "reached": entry.get("reached")}
    return out


def _fmt(entry):
    if "speedup" not in entry:
        return f"- ({entry['reached']})"
    lo, hi = entry["speedup_ci"]
    return f"{entry['speedup']:.2f} [{lo:.2f}, {hi:.2f}]"


def _print(summary, finals):
    for exp, fams in summary.items():
        for fam, metrics in fams.items():
            for metric, sm in metrics.items():
                methods = [m for m in next(iter(sm["levels"].values())) if m != "level"]
                rows = []
                for m in methods:
                    f = finals[exp][metric][m]
                    rows.append([m, f"{f[0]:.4g} [{f[1]:.4g}, {f[2]:.4g}]"]
                                + [_fmt(sm["levels"][str(q)][m]) for q in QUALITY])
                print_table(f"{exp} / {fam} / {metric}: baseline best {sm['baseline_best']:.4g} at iteration "
                            f"{sm['baseline_best_iter']}; speed-up (geometric mean [95% CI]) to reach Q = best x (1+q)",
                            ["method", "final (mean [95% CI])"] + [f"q={q}" for q in QUALITY], rows)


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
