"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2) on any schedule, in the scaled variables x~ = x/alpha,
sigma~ = sigma/alpha, where the probability-flow ODE is dx~/dsigma~ = (x~ - D)/sigma~.

Per step i: optional churn raises the noise level to sigma^ = sigma~_i (1 + gamma) by adding fresh noise; an
Euler step (the first-order formula of ddim.py) goes to t_{i+1}; then the trapezoidal (Heun) correction averages
the slopes at both ends, except:
  - on a final step to sigma = 0 (EDM's sampler does the same: the slope there is undefined);
  - with order_rule="stable" (the default of tdiff.sample), on a long step in lambda = -log sigma~: the
    correction evaluates the slope (x~ - D)/sigma~ at the *end* of the step, whose Lipschitz constant is
    ~1/sigma~_{i+1}; explicit Heun amplifies errors by ~(Delta/sigma~_{i+1})^2/2 there, so a long last step to a
    small sigma_min (uniform-t grids at NFE 4-5) blew up to errors of 8-59 where every other solver stays below
    0.5. The Euler step alone is a convex combination of x and D there and stays bounded. The corrected result is
    kept in full up to h = HEUN_H[0], dropped from HEUN_H[1] (and its evaluation saved), and blended between
    with program.ramp's smoothstep weight (program.stable_orders explains why a blend rather than a switch, and
    program.ramp why not a linear one). order_rule="diffusers" corrects
    every step but a final one to sigma = 0 (diffusers' HeunDiscreteScheduler, EDM).
NFE = 2N minus one per uncorrected step.

Correction in x-space (Delta = sigma~_{i+1} - sigma^, x^ = sample at sigma^, x' = Euler result, n = i+1):
  x_n = (alpha_n/alpha^ + alpha_n Delta/(2 sigma^)) x^ - alpha_n Delta alpha^/(2 sigma^) D
        + alpha_n Delta/(2 sigma_n) x' - alpha_n^2 Delta/(2 sigma_n) D'
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ..schedules import NoiseSchedule
from . import arrays
from .ddim import first_order_coefficients
from .grid import Grid
from .program import ORDER_RULES, Alias, Eval, Noise, Program, Update, check_choice, ramp, structure


def _gammas(g: Grid, s_churn: float, s_min: float, s_max: float) -> list:
    """EDM's per-step churn gamma_i, decided on the host once (the loop stays sync-free)."""
    if s_churn <= 0:
        return [0.0] * g.n_steps
    sig = arrays.tolist(g.sigma_tilde)
    gamma = min(s_churn / g.n_steps, math.sqrt(2) - 1)
    return [gamma if s_min <= sig[i] <= s_max else 0.0 for i in range(g.n_steps)]


#: the stable rule corrects a step fully up to HEUN_H[0] in lambda, not at all from HEUN_H[1] (a ratio
#: sigma~_i/sigma~_{i+1} of e), and blends the corrected and Euler results linearly between (chosen like
#: program.STABLE_H, for an error non-increasing in NFE)
HEUN_H = (0.3, 1.0)


def _check_number(name: str, value, minimum: float = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if minimum is not None and not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return float(value)


def build_heun(g: Grid, cond_times, schedule: NoiseSchedule = None, s_churn: float = 0.0, s_min: float = 0.0,
               s_max: float = float("inf"), s_noise: float = 1.0, order_rule: str = "diffusers") -> Program:
    for name, value in (("s_churn", s_churn), ("s_noise", s_noise)):
        if not _check_number(name, value, 0.0) < float("inf"):
            raise ValueError(f"{name} must be finite, got {value!r}")
    _check_number("s_min", s_min)
    _check_number("s_max", s_max)
    if s_min > s_max:
        raise ValueError(f"s_min must be <= s_max (churn applies to sigmas in [s_min, s_max]), got s_min={s_min!r}, "
                         f"s_max={s_max!r}")
    check_choice("order_rule", order_rule, ORDER_RULES)
    n = g.n_steps
    gammas = _gammas(g, s_churn, s_min, s_max)
    # on the host: which steps are corrected, and which of those blend with the Euler step (stable rule)
    h = g.lam[1:] - g.lam[:-1]
    hd = arrays.tolist(h)
    host = arrays.on_host(h)
    corrected, blended = [], []
    for i in range(n):
        if g.final_zero and i == n - 1:
            continue  # the Euler step alone: to sigma = 0 it lands on D exactly
        if order_rule == "stable" and not hd[i] < HEUN_H[1]:
            continue
        corrected.append(i)
        blended.append(order_rule == "stable" and hd[i] > HEUN_H[0])
    # every step's quantities at once (a few dozen tensor ops, whatever the number of steps)
    a_hat, s_hat, st_hat = g.alpha[:n], g.sigma[:n], g.sigma_tilde[:n]
    churned = [i for i, gamma in enumerate(gammas) if gamma > 0] if s_churn > 0 else []
    if churned:
        t_eval = cond_times[:n]
        at = arrays.indices(churned)
        st_c = g.sigma_tilde[at] * (1 + arrays.tensor(st_hat, [gammas[i] for i in churned]))
        t_c = schedule.t_from_edm_sigma(arrays.as_torch(st_c))  # the schedule's maths is torch's
        a_c = arrays.as_like(schedule.alpha(t_c), st_c)
        # x^ = alpha^ (x/alpha_i + sqrt(sigma^2 - sigma~_i^2) S_noise z)
        noise_mat = arrays.stack([a_c / g.alpha[at], a_c * arrays.sqrt(st_c**2 - g.sigma_tilde[at] ** 2) * s_noise],
                                 dim=1)
        st_hat, t_eval = arrays.put(st_hat, at, st_c), arrays.put(t_eval, at, t_c)
        a_hat = arrays.put(a_hat, at, a_c)
        s_hat = arrays.put(s_hat, at, a_c * st_c)
    # the rows as one (positions, width) matrix per kind (Program.of_groups): no row views to split and restack
    fixed = [False] * n
    for i in corrected:
        fixed[i] = True
    struct, points, where, idx, idx_host, (noise_at, euler_at, correction_at) = _structure(
        tuple(gamma > 0 for gamma in gammas) if churned else (False,) * n, tuple(fixed))
    groups = [(euler_at, arrays.stack(first_order_coefficients(a_hat, s_hat, g.alpha[1:], g.sigma[1:]), dim=1))]
    if corrected:
        m = len(corrected)
        # on the host, the first m steps (the common case) as views, not gathers; the torch path keeps the gathers
        # (its gradients' summation order, so t.grad, stay as they were)
        if host and corrected[-1] == m - 1:
            at, nx = slice(0, m), slice(1, m + 1)
        else:
            at = arrays.indices(corrected)
            nx = at + 1
        a_h, s_h = a_hat[at], s_hat[at]
        a_n, s_n = g.alpha[nx], g.sigma[nx]
        half = a_n * (g.sigma_tilde[nx] - st_hat[at]) / 2
        cols = [a_n / a_h + half / s_h, -a_n * half / s_n, -half * a_h / s_h, half / s_n]
        if not any(blended):
            mat = arrays.stack(cols, dim=1)
        elif host:  # the blend below, in place on the (4, m) matrix: 3 numpy calls, not 6 (and no where: the
            # ramp is exactly 1 at a step that does not blend, h <= HEUN_H[0]); the same operations per entry
            mat = np.array(cols)
            w = ramp(h[at], *HEUN_H)
            mat *= w
            mat[3] += 1 - w
            mat = mat.T
        else:  # w (Heun) + (1 - w) (Euler, which is xp itself); w = 1 where the step does not blend
            w = arrays.where(np.array(blended), ramp(g.lam[nx] - g.lam[at], *HEUN_H), 1.0)
            cols = [w * c for c in cols[:3]] + [w * cols[3] + (1 - w)]
            mat = arrays.stack(cols, dim=1)
        groups.append((correction_at, mat))
    if churned:
        groups.append((noise_at, noise_mat))
    prog = Program.of_groups(struct, groups)
    if host and not (cond_times.requires_grad or g.t.requires_grad):  # index_select: half the cost of t[idx]
        prog.eval_times = cond_times.index_select(0, idx)
        prog.eval_points = prog.eval_times if cond_times is g.t else g.t.index_select(0, idx)  # one gather
    else:
        prog.eval_times, prog.eval_points = cond_times[idx], g.t[idx]
    known = g.points()
    if known is not None and not churned and points[-1] < len(known[0]):  # points ascend
        prog.eval_alpha_sigma = (known[0].take(idx_host), known[1].take(idx_host))  # take: fancy indexing's fifth
    if churned:  # a churned predictor is evaluated (and converted) at its raised noise level
        pred, raised = torch.tensor([k for k, c in enumerate(where) if c]), t_eval[torch.tensor(churned)]
        prog.eval_times = prog.eval_times.index_put((pred,), raised)
        prog.eval_points = prog.eval_points.index_put((pred,), raised)
    return prog


@functools.lru_cache(maxsize=256)
def _structure(noisy: tuple, corrected: tuple) -> tuple:
    """(Structure, evaluation points, churned flags, points as an index tensor and array, (noise, Euler, correction) row
    numbers as index arrays, in step order) of a Heun run (pure structure,
    cached: see program.Structure): per step, churn noise where noisy[i], the predictor's evaluation and Euler step,
    and the corrector's evaluation and update where corrected[i] (else the Euler result is the step's). Per
    evaluation: the grid point it is at, and whether it is a churned predictor. The structure depends on the time
    steps' values only through these two flags per step (which steps churn, which get a correction), so every run
    of a grid of the same shape shares it and the sampling loop's closures compiled for it."""
    steps, points, where, r = [], [], [], 0
    kinds = ([], [], [])  # row numbers of the noise, Euler and correction updates
    for i in range(len(noisy)):
        step = []
        if noisy[i]:
            step += [Noise("z"), Update("x", "x", ("z",), r)]
            kinds[0].append(r)
            r += 1
        points.append(i)
        where.append(noisy[i])
        step += [Eval("D", "x", len(points) - 1), Update("xp", "x", ("D",), r)]
        kinds[1].append(r)
        r += 1
        if corrected[i]:
            points.append(i + 1)
            where.append(False)
            step += [Eval("Dp", "xp", len(points) - 1), Update("x", "x", ("Dp", "D", "xp"), r)]
            kinds[2].append(r)
            r += 1
        else:
            step.append(Alias("x", "xp"))  # the Euler step alone
        steps.append(step)
    return (structure(steps), tuple(points), tuple(where), torch.tensor(points), arrays.indices(points),
            tuple(map(arrays.indices, kinds)))
