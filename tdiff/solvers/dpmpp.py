"""The DPM-Solver family of multistep exponential integrators (Lu et al. 2022, 2022b), as diffusers'
DPMSolverMultistepScheduler computes them, plus a true third-order variant. Notation: lambda = log(alpha/sigma),
h = lambda_t - lambda_s, r_k = h_k/h for the earlier steps h_0 = lambda_s - lambda_{s-1}, h_1 = ...

The history is written as divided differences of the model outputs m0 (newest), m1, m2, which are the
coefficients of the interpolating polynomial in u = (lambda - lambda_s)/h:  P(u) = D0 + D1 u + D2 u^2, with
  2 outputs: D1 = (m0 - m1)/r0
  3 outputs: D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1, D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1),
             D2 = (D1_0 - D1_1)/(r0 + r1).
Each step is c_x x + c0 D0 + c1 D1 + c2 D2 (+ c_z z), written out as one row over (x, m0, m1, m2, z) so one fused
update does it. phi1 = expm1(-h), phi2 = phi1/h + 1, phi3 = phi2/h - 1/2 (and psi_k the same at 2h).

  dpmpp (DPM-Solver++, data prediction D, the ODE):  c_x = sigma_t/sigma_s, c0 = -alpha_t phi1
      2M midpoint: c1 = -alpha_t phi1 / 2          2M heun (solver_type="heun"): c1 = alpha_t phi2
      3M:          c1 = alpha_t phi2, c2 = -alpha_t phi3
    3M is diffusers' and the paper's formula. Its D2 term carries half the exact quadratic integral (which is
    -2 alpha_t phi3 D2), so with exact history a step has local error O(h^3.2) rather than O(h^4): the method is
    second order, not third (ANCHORS, "Added after the first release"; tests/test_solvers_convergence.py).
  dpmpp_ab (exponential Adams-Bashforth in lambda): the exact integral of the interpolant,
      c1 = alpha_t phi2, c2 = -2 alpha_t phi3. Truly order p for p = 1, 2, 3 (order 2 is 2M heun).
  dpmpp_sde (SDE-DPM-Solver++):  c_x = (sigma_t/sigma_s) e^-h, c0 = -alpha_t psi1, c_z = sigma_t sqrt(-psi1)
      2M midpoint: c1 = -alpha_t psi1 / 2          2M heun: c1 = alpha_t psi2
      3M (diffusers' formula): c1 = alpha_t psi2, c2 = alpha_t (-psi2/(2h) - 1/2). That c2 tends to -alpha_t
      as h -> 0, where the integral's -2 alpha_t psi3 tends to 0, so the third order is nominal; kept as diffusers
      computes it (the SDE's noise limits it to a low strong order anyway).
  dpmsolver (DPM-Solver, noise prediction E, the ODE):  c_x = alpha_t/alpha_s, c0 = -sigma_t expm1(h)
      2 midpoint: c1 = -sigma_t expm1(h)/2         2 heun: c1 = -sigma_t (expm1(h)/h - 1)
      3: c1 = -sigma_t (expm1(h)/h - 1), c2 = -sigma_t ((expm1(h)/h - 1)/h - 1/2)
  dpmsolver_sde (SDE-DPM-Solver, noise prediction):  c_x = alpha_t/alpha_s, c0 = -2 sigma_t expm1(h),
      c_z = sigma_t sqrt(expm1(2h));  2 midpoint: c1 = -sigma_t expm1(h);  2 heun: c1 = -2 sigma_t (expm1(h)/h - 1)

Order 1 of the data-prediction ODE is DDIM; of the data-prediction SDE, DDPM's ancestral step (ddim.py).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence

from . import arrays
from .ddim import ddim_coefficients, first_order_row
from .grid import Grid
from .program import Eval, Noise, Program, Structure, Update, check_choice, check_flag, check_order, \
    choose_orders, mixed_groups, mixed_rows, structure

#: solver name -> (what the history holds, stochastic, allowed orders)
KINDS = {
    "dpmpp": ("x0", False, (1, 2, 3)),
    "dpmpp_ab": ("x0", False, (1, 2, 3)),
    "dpmpp_sde": ("x0", True, (1, 2, 3)),
    "dpmsolver": ("eps", False, (1, 2, 3)),
    "dpmsolver_sde": ("eps", True, (1, 2)),
}
SOLVER_TYPES = ("midpoint", "heun")


def dpmpp_orders(n_steps: int, order: int, lower_order_final: bool, final_zero: bool,
                 euler_at_final: bool = False) -> List[int]:
    """diffusers' rule (DPMSolverMultistepScheduler.step): warm up from order 1; with lower_order_final, drop to
    order 1 at the last step and order 2 at the one before, but only for runs under 15 steps; a final step to
    sigma = 0 (or any final step with euler_at_final) is first order. The diffusers-compatible mode
    (order_rule="diffusers", also the builders' own default) and the interop path use it; tdiff.sample's default is
    the stable rule (program.stable_orders)."""
    short = lower_order_final and n_steps < 15
    orders = []
    for i in range(n_steps):
        last, second_last = i == n_steps - 1, i == n_steps - 2
        if order == 1 or i < 1 or (last and (euler_at_final or short or final_zero)):
            orders.append(1)
        elif order == 2 or i < 2 or (second_last and short):
            orders.append(2)
        else:
            orders.append(3)
    return orders


def _phis(h, p: int = 3):
    """phi1 = expm1(-h), phi2 = phi1/h + 1, phi3 = phi2/h - 1/2: the first p of them."""
    phi1 = arrays.expm1(arrays.negative(h))
    if p == 1:
        return (phi1,)
    phi2 = phi1 / h + 1
    return (phi1, phi2) if p == 2 else (phi1, phi2, phi2 / h - 0.5)


def _step_coefficients(kind: str, g: Grid, i, j, p: int, solver_type: str) -> tuple:
    """(c_x, [c0, c1, c2][:max(p, 2)], c_z or None) of step i -> j = i+1 at order p. Only the terms order p uses
    are formed (a no-grad table is a few dozen small array operations, each costing about the same whatever its
    size), in the order they always were: the autograd graph, and so the gradients, stay the same."""
    lam, a_s, s_s, a_t, s_t = g.lam, g.alpha[i], g.sigma[i], g.alpha[j], g.sigma[j]
    h = lam[j] - lam[i]
    heun = solver_type == "heun"
    three = p == 3
    if kind in ("dpmpp", "dpmpp_ab"):
        second = three or heun or kind == "dpmpp_ab"  # c1 from phi2, else the midpoint's -phi1/2
        phis = _phis(h, p if second else 1)
        phi1 = phis[0]
        c1 = (a_t * phis[1]) if second else -0.5 * a_t * phi1
        c2 = -(2.0 if kind == "dpmpp_ab" else 1.0) * a_t * phis[2] if three else None
        return s_t / s_s, [arrays.negative(a_t) * phi1, c1, c2][:max(p, 2)], None
    if kind == "dpmpp_sde":
        psi1, psi2 = _phis(2 * h, 2)
        c1 = (a_t * psi2) if (three or heun) else -0.5 * a_t * psi1
        c2 = a_t * (-psi2 / (2 * h) - 0.5) if three else None
        c_x = s_t / s_s * arrays.exp(-h)
        return c_x, [-a_t * psi1, c1, c2][:max(p, 2)], s_t * arrays.sqrt_pos(-psi1)
    # noise prediction: e^h - 1 = expm1(h), (e^h - 1)/h - 1, ((e^h - 1)/h - 1)/h - 1/2
    e1 = arrays.expm1(h)
    e2 = e1 / h - 1
    e3 = e2 / h - 0.5 if three else None
    if kind == "dpmsolver":
        c1 = -s_t * e2 if (three or heun) else -0.5 * s_t * e1
        return a_t / a_s, [-s_t * e1, c1] + ([-s_t * e3] if three else []), None
    c1 = -2 * s_t * e2 if heun else -s_t * e1  # dpmsolver_sde
    return a_t / a_s, [-2 * s_t * e1, c1], s_t * arrays.sqrt_pos(arrays.expm1(2 * h))


def _history_weights(g: Grid, i, j, cs: list) -> list:
    """The weights on (m0, m1, (m2)) of c0 D0 + c1 D1 (+ c2 D2) for step i -> j = i+1 (p = len(cs) >= 2), D0, D1,
    D2 the divided differences of the module doc as rows over the outputs:
      2 outputs: D0 = (1, 0), D1 = (1/r0, -1/r0)
      3 outputs: D1_0 = (1/r0, -1/r0, 0), D1_1 = (0, 1/r1, -1/r1), D0 = (1, 0, 0),
                 D1 = D1_0 + w (D1_0 - D1_1) with w = r0/(r0+r1), D2 = (D1_0 - D1_1)/(r0 + r1).
    The structural zeros and ones of those rows are not multiplied out (a no-grad table is a few dozen small array
    operations, each costing about the same whatever its size); the sums keep their order, so the weights are the
    ones the full product gives (up to the sign of a zero)."""
    lam = g.lam
    lam_i, lam_b = lam[i], lam[i - 1]
    h = lam[j] - lam_i  # as _step_coefficients' h (formed again: the same autograd graph, so the same gradients)
    r0 = (lam_i - lam_b) / h
    if len(cs) == 2:
        c0, c1 = cs
        return [c0 + c1 * (1 / r0), c1 * (-1 / r0)]
    c0, c1, c2 = cs
    r1 = (lam_b - lam[i - 2]) / h
    # D1_0 = (a0, a1, 0), D1_1 = (0, b1, b2) with a1 = -1/r0 and b2 = -1/r1: formed as -a0 and known as -b1 (the
    # same bits: a rounded quotient changes sign with its numerator), two complex divisions fewer on
    # DM-NonUniform's complex-step columns, where they are most of this function's time
    a0, b1 = 1 / r0, 1 / r1
    a1 = arrays.negative(a0)
    s = r0 + r1
    w = r0 / s
    diff1, minus_b2 = a1 - b1, b1  # D1_0 - D1_1 = (a0, diff1, -b2)
    d1 = (a0 + w * a0, a1 + w * diff1, w * minus_b2)
    d2 = (a0 / s, diff1 / s, minus_b2 / s)
    return [c0 + c1 * d1[0] + c2 * d2[0], c1 * d1[1] + c2 * d2[1], c1 * d1[2] + c2 * d2[2]]


def step_row(kind: str, g: Grid, i, p: int, solver_type: str = "midpoint") -> list:
    """[c_x, c_m0, ..., c_m{p-1}, (c_z)] for step i -> i+1 at order p (i: a step index or an index array)."""
    if p == 1 and kind in ("dpmpp", "dpmpp_ab"):
        return first_order_row(g, i, i + 1)
    if p == 1 and kind == "dpmpp_sde":
        c_x, c_d, _, s = ddim_coefficients(g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1], eta=1.0)
        return [c_x, c_d, s]
    j = i + 1
    c_x, cs, c_z = _step_coefficients(kind, g, i, j, p, solver_type)
    cm = cs[:1] if p == 1 else _history_weights(g, i, j, cs)  # p = 1: the noise-prediction solvers
    return [c_x, *cm] + ([] if c_z is None else [c_z])


def build_multistep(kind: str, g: Grid, cond_times, order: int, lower_order_final: bool = True,
                    order_rule: str = "diffusers", euler_at_final: bool = False, solver_type: str = "midpoint",
                    orders: Optional[Sequence[int]] = None) -> Program:
    target, stochastic, allowed = KINDS[kind]
    check_order(kind, order, allowed)
    check_flag("lower_order_final", lower_order_final)
    check_flag("euler_at_final", euler_at_final)
    check_choice("solver_type", solver_type, SOLVER_TYPES)
    if target == "eps" and g.final_zero:
        raise ValueError(f"solver {kind!r} (noise prediction) cannot step to sigma = 0 (final_sigmas_type='zero'); "
                         f"use final_sigmas_type='sigma_min', as diffusers requires for algorithm_type="
                         f"{'sde-dpmsolver' if stochastic else 'dpmsolver'}")

    def count_rule(n, p, lof, fz):
        return dpmpp_orders(n, p, lof, fz, euler_at_final)

    explicit = orders is not None
    plan = choose_orders(kind, g.lam, order, lower_order_final, order_rule, g.final_zero, count_rule, orders,
                         allowed)
    if euler_at_final and not explicit:
        plan.first_order_at(g.n_steps - 1)
    n = g.n_steps
    noisy = tuple(stochastic and not (g.final_zero and i == n - 1) for i in range(n))
    struct = _structure("E" if target == "eps" else "D", target, tuple(plan.top), noisy)
    kw = dict(eval_times=cond_times, eval_points=g.t, eval_alpha_sigma=g.points())
    mixed = (plan.top, lambda p, idx: step_row(kind, g, idx, p, solver_type), plan.weight, plan.blend,
             int(stochastic))
    if noisy[-1] or not stochastic:
        return Program.of_groups(struct, mixed_groups(*mixed), **kw)
    rows = mixed_rows(*mixed)
    rows[-1] = rows[-1][:-1]  # no noise is added at sigma = 0 (its coefficient is 0)
    return Program.of(struct, rows, **kw)


@functools.lru_cache(maxsize=256)
def _structure(name: str, target: str, orders: tuple, noisy: tuple) -> Structure:
    """The instructions of a multistep run with these per-step orders (and noise): pure structure, cached (see
    program.Structure). Step i evaluates into name{i} and updates x with row i over its last orders[i] outputs."""
    names = [f"{name}{i}" for i in range(len(orders))]
    steps = []
    for i, p in enumerate(orders):
        hist = tuple(names[i - k] for k in range(p))
        step = [Eval(names[i], "x", i, target)]
        if noisy[i]:
            step.append(Noise("z"))
            hist = hist + ("z",)
        step.append(Update("x", "x", hist, i))
        steps.append(step)
    return structure(steps)


def build_dpmpp(g: Grid, cond_times, order: int = 2, lower_order_final: bool = True, order_rule: str = "diffusers",
                euler_at_final: bool = False, solver_type: str = "midpoint", orders=None, sde: bool = False
                ) -> Program:
    """DPM-Solver++ 1/2M/3M (sde=True: SDE-DPM-Solver++); see the module doc. `sde` is kept for callers that
    built the SDE variant through this function."""
    return build_multistep("dpmpp_sde" if sde else "dpmpp", g, cond_times, order, lower_order_final, order_rule,
                           euler_at_final, solver_type, orders)
