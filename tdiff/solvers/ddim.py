"""First-order step (DDIM, eta = 0): the one formula that DDIM, Euler in EDM-sigma space and DPM-Solver++(1)
all reduce to, so it lives here once and the others call it.

x_t = (sigma_t / sigma_s) x_s + (alpha_t - sigma_t alpha_s / sigma_s) D_s

That is DPM-Solver++'s -alpha_t expm1(-h) with h = lambda_t - lambda_s written through sigma ratios, which stays
finite (and differentiable) when the target is clean data (sigma_t = 0, where h is infinite). It is also exactly
Euler on dx~/dsigma~ = (x~ - D)/sigma~ in the scaled variables x~ = x/alpha, sigma~ = sigma/alpha (k-diffusion's
and diffusers' Euler), and Euler on the flow-matching velocity for RectifiedFlow.
"""
from __future__ import annotations

from .grid import Grid
from .program import Eval, Program, Update


def first_order_coefficients(alpha_s, sigma_s, alpha_t, sigma_t) -> list:
    """[c_x, c_D] of the first-order step from (alpha_s, sigma_s) to (alpha_t, sigma_t)."""
    ratio = sigma_t / sigma_s
    return [ratio, alpha_t - ratio * alpha_s]


def first_order_row(g: Grid, s: int, t: int) -> list:
    return first_order_coefficients(g.alpha[s], g.sigma[s], g.alpha[t], g.sigma[t])


def build_ddim(g: Grid, cond_times, order: int = 1, **_) -> Program:
    prog = Program(eval_times=cond_times)
    for i in range(g.n_steps):
        r = prog.row(first_order_row(g, i, i + 1))
        prog.add_step([Eval(f"D{i}", "x", i), Update("x", "x", (f"D{i}",), r)])
    return prog
