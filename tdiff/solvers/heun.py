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
    kept in full up to h = HEUN_H[0], dropped from HEUN_H[1] (and its evaluation saved), and blended linearly
    between (program.stable_orders explains why a blend rather than a switch). order_rule="diffusers" corrects
    every step but a final one to sigma = 0 (diffusers' HeunDiscreteScheduler, EDM).
NFE = 2N minus one per uncorrected step.

Correction in x-space (Delta = sigma~_{i+1} - sigma^, x^ = sample at sigma^, x' = Euler result, n = i+1):
  x_n = (alpha_n/alpha^ + alpha_n Delta/(2 sigma^)) x^ - alpha_n Delta alpha^/(2 sigma^) D
        + alpha_n Delta/(2 sigma_n) x' - alpha_n^2 Delta/(2 sigma_n) D'
"""
from __future__ import annotations

import math

import torch

from ..schedules import NoiseSchedule
from .ddim import first_order_coefficients
from .grid import Grid
from .program import ORDER_RULES, Alias, Eval, Noise, Program, Update, check_choice, ramp


def _gammas(g: Grid, s_churn: float, s_min: float, s_max: float) -> list:
    """EDM's per-step churn gamma_i, decided on the host once (the loop stays sync-free)."""
    if s_churn <= 0:
        return [0.0] * g.n_steps
    sig = g.sigma_tilde.detach().tolist()
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
    h = g.lam[1:] - g.lam[:-1]
    weights = [ramp(v, *HEUN_H) if order_rule == "stable" else None for v in h]
    prog = Program()
    eval_times, eval_points = [], []
    for i, gamma in enumerate(_gammas(g, s_churn, s_min, s_max)):
        n = i + 1
        step = []
        a_hat, s_hat, st_hat = g.alpha[i], g.sigma[i], g.sigma_tilde[i]
        t_eval = cond_times[i]
        if gamma > 0:
            st_hat = g.sigma_tilde[i] * (1 + gamma)
            t_eval = schedule.t_from_edm_sigma(st_hat)
            a_hat = schedule.alpha(t_eval)
            s_hat = a_hat * st_hat
            # x^ = alpha^ (x/alpha_i + sqrt(sigma^2 - sigma~_i^2) S_noise z)
            noise = a_hat * (st_hat**2 - g.sigma_tilde[i] ** 2).sqrt() * s_noise
            step += [Noise("z"), Update("x", "x", ("z",), prog.row([a_hat / g.alpha[i], noise]))]
        eval_times.append(t_eval)
        eval_points.append(t_eval if gamma > 0 else g.t[i])
        step += [Eval("D", "x", len(eval_times) - 1),
                 Update("xp", "x", ("D",), prog.row(first_order_coefficients(a_hat, s_hat, g.alpha[n], g.sigma[n])))]
        last_to_zero = g.final_zero and n == g.n_steps
        w = weights[i]
        if w is not None and float(w.detach()) >= 1:
            w = None
        if last_to_zero or (w is not None and not float(w.detach()) > 0):
            step.append(Alias("x", "xp"))  # the Euler step alone (to sigma = 0 it lands on D exactly)
        else:
            eval_times.append(cond_times[n])
            eval_points.append(g.t[n])
            a_n, s_n = g.alpha[n], g.sigma[n]
            delta = g.sigma_tilde[n] - st_hat
            half = a_n * delta / 2
            row = [a_n / a_hat + half / s_hat, -a_n * half / s_n, -half * a_hat / s_hat, half / s_n]
            if w is not None:  # w (Heun) + (1 - w) (Euler, which is xp itself)
                row = [w * c for c in row[:3]] + [w * row[3] + (1 - w)]
            step += [Eval("Dp", "xp", len(eval_times) - 1), Update("x", "x", ("Dp", "D", "xp"), prog.row(row))]
        prog.add_step(step)
    prog.eval_times, prog.eval_points = torch.stack(eval_times), torch.stack(eval_points)
    return prog
