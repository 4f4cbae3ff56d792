"""DDIM (Song et al. 2021), with its stochastic family: eta = 0 is the first-order step that DDIM, Euler in
EDM-sigma space and DPM-Solver++(1) all reduce to; eta = 1 is DDPM's ancestral step (= SDE-DPM-Solver++(1)). The
formula lives here once and the other solvers call it.

From (alpha_s, sigma_s) to (alpha_t, sigma_t), with e^-h = (sigma_t alpha_s)/(sigma_s alpha_t), h the step in
lambda = log(alpha/sigma):

    s   = eta sigma_t sqrt(1 - e^-2h)                       (the noise std; DDIM's sigma_t(eta))
    x_t = alpha_t D + sqrt(sigma_t^2 - s^2) eps + s z,       eps = (x_s - alpha_s D)/sigma_s
    sqrt(sigma_t^2 - s^2) = sigma_t sqrt(1 - eta^2 (1 - e^-2h))  (= sigma_t e^-h at eta = 1)

With eta = 0: x_t = (sigma_t/sigma_s) x_s + (alpha_t - sigma_t alpha_s/sigma_s) D, DPM-Solver++'s -alpha_t expm1(-h)
written through sigma ratios, which stays finite (and differentiable) when the target is clean data (sigma_t = 0,
h infinite) and at a zero-SNR start (alpha_s = 0). It is exactly Euler on dx~/dsigma~ = (x~ - D)/sigma~ in the
scaled variables x~ = x/alpha, sigma~ = sigma/alpha (k-diffusion's and diffusers' Euler), and Euler on the
flow-matching velocity for RectifiedFlow. With eta = 1 it is the DDPM posterior q(x_t | x_s, x0 = D): mean
(alpha_s/alpha_t)(sigma_t/sigma_s)^2 x_s + alpha_t (1 - e^-2h) D, variance sigma_t^2 (1 - e^-2h), which is
diffusers' DDPMScheduler (variance_type "fixed_small") on a VP schedule.

use_clipped_model_output=False (diffusers' DDIM default) takes eps from the raw model output rather than from the
clamped x0 (they differ only when the denoiser clamps its x0 prediction, `clip_x0`).
"""
from __future__ import annotations

import functools

from . import arrays
from .grid import Grid
from .program import Eval, Noise, Program, Structure, Update, check_flag, structure


def ddim_coefficients(alpha_s, sigma_s, alpha_t, sigma_t, eta: float = 0.0) -> tuple:
    """(c_x, c_D, c_eps, s): x_t = c_x x_s + c_D D + s z, or = c_D' D + c_eps eps + s z with c_D' = alpha_t."""
    if eta == 0:
        ratio = sigma_t / sigma_s
        return ratio, alpha_t - ratio * alpha_s, sigma_t, None
    emh = (sigma_t * alpha_s) / (sigma_s * alpha_t)
    s = eta * sigma_t * arrays.sqrt_pos(1 - emh * emh)
    # sqrt(sigma_t^2 - s^2) with sigma_t taken out of the root: the root of sigma_t^2 - s^2 is the root of 0 on a
    # final step to sigma_t = 0, whose derivative (inf) times 0 made the time steps' gradient NaN there. At eta = 1
    # the root is e^-h itself (DDPM's posterior mean; SDE-DPM-Solver++(1)).
    c_eps = sigma_t * (emh if eta == 1 else arrays.sqrt_pos(1 - eta * eta * (1 - emh * emh)))
    c_x = c_eps / sigma_s
    return c_x, alpha_t - c_x * alpha_s, c_eps, s


def first_order_coefficients(alpha_s, sigma_s, alpha_t, sigma_t) -> list:
    """[c_x, c_D] of the first-order (eta = 0) step from (alpha_s, sigma_s) to (alpha_t, sigma_t)."""
    c_x, c_d, _, _ = ddim_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    return [c_x, c_d]


def first_order_row(g: Grid, s: int, t: int) -> list:
    return first_order_coefficients(g.alpha[s], g.sigma[s], g.alpha[t], g.sigma[t])


def build_ddim(g: Grid, cond_times, eta: float = 0.0, use_clipped_model_output: bool = True) -> Program:
    """DDIM with noise weight eta (0: deterministic; 1: DDPM ancestral sampling). Steps land on g.landing()."""
    if not isinstance(eta, (int, float)) or isinstance(eta, bool) or not 0 <= eta < float("inf"):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    check_flag("use_clipped_model_output", use_clipped_model_output)
    alpha_to, sigma_to = g.landing()
    n = g.n_steps
    # every step's coefficients at once (a handful of tensor ops, whatever the number of steps)
    c_x, c_d, c_eps, s = ddim_coefficients(g.alpha[:n], g.sigma[:n], alpha_to, sigma_to, float(eta))
    cols = [c_x, c_d] if use_clipped_model_output else [alpha_to * 0, alpha_to, c_eps]
    if s is not None:
        cols.append(s)
    rows = arrays.rows(cols)
    noisy = tuple(s is not None and not (g.final_zero and i == n - 1) for i in range(n))  # none at sigma = 0
    if s is not None and not noisy[-1]:
        rows[-1] = rows[-1][:-1]
    return Program.of(_structure(noisy, use_clipped_model_output), rows, eval_times=cond_times, eval_points=g.t,
                      eval_alpha_sigma=g.points())


@functools.lru_cache(maxsize=256)
def _structure(noisy: tuple, one_target: bool) -> Structure:
    """DDIM's instructions (pure structure, cached: see program.Structure): per step, an evaluation (into D{i},
    and E{i} as the unclipped eps unless one_target), noise where noisy[i], and the update with row i."""
    steps = []
    for i, noise in enumerate(noisy):
        names = (f"D{i}",) if one_target else (f"D{i}", f"E{i}")
        step = [Eval(f"D{i}", "x", i, extra=() if one_target else ((f"E{i}", "eps"),))]
        if noise:
            step.append(Noise("z"))
            names = names + ("z",)
        step.append(Update("x", "x", names, i))
        steps.append(step)
    return structure(steps)


def build_ddpm(g: Grid, cond_times) -> Program:
    """DDPM ancestral sampling (Ho et al. 2020): DDIM with eta = 1 (see the module doc)."""
    return build_ddim(g, cond_times, eta=1.0)
