"""DPM-Solver++ multistep (Lu et al. 2022) in data-prediction form: orders 1 (=DDIM), 2M (midpoint), 3M, and the
SDE variant of 2M. Notation: lambda = log(alpha/sigma), h = lambda_t - lambda_s, r = h_prev / h.

  2M:  x_t = (sigma_t/sigma_s) x - alpha_t phi1 D0 - 1/2 alpha_t phi1 D1,        D1 = (m0 - m1)/r0
  3M:  x_t = (sigma_t/sigma_s) x - alpha_t phi1 D0 + alpha_t phi2 D1 - alpha_t phi3 D2
       phi1 = expm1(-h), phi2 = phi1/h + 1, phi3 = phi2/h - 1/2, with D1, D2 the divided differences below
  SDE-2M: x_t = (sigma_t/sigma_s) e^-h x + alpha_t (1 - e^-2h)(D0 + D1/2) + sigma_t sqrt(1 - e^-2h) z

Each row is written over the raw model outputs m0 (newest), m1, m2, so one fused update does the step.
"""
from __future__ import annotations

from typing import List

import torch

from .ddim import first_order_row
from .grid import Grid
from .program import Eval, Noise, Program, Update, check_order, rows_by_group


def dpmpp_orders(n_steps: int, order: int, lower_order_final: bool, final_zero: bool,
                 euler_at_final: bool = False) -> List[int]:
    """diffusers' rule: warm up from order 1; with lower_order_final, drop to order 1 at the last step and order 2
    at the one before, but only for runs under 15 steps; a final step to sigma = 0 is always first order."""
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


def _ode_row(g: Grid, i, p: int) -> list:
    """[c_x, c_m0, c_m1, ...] for the ODE step i -> i+1 at order p (i: a step index or a LongTensor of them)."""
    if p == 1:
        return first_order_row(g, i, i + 1)
    lam, a_t = g.lam, g.alpha[i + 1]
    h = lam[i + 1] - lam[i]
    phi1 = torch.expm1(-h)
    c_x = g.sigma[i + 1] / g.sigma[i]
    r0 = (lam[i] - lam[i - 1]) / h
    if p == 2:
        return [c_x, -a_t * phi1 * (1 + 0.5 / r0), a_t * phi1 * 0.5 / r0]
    r1 = (lam[i - 1] - lam[i - 2]) / h
    phi2 = phi1 / h + 1
    phi3 = phi2 / h - 0.5
    # divided differences over (m0, m1, m2): D1_0 = (m0-m1)/r0, D1_1 = (m1-m2)/r1
    d10 = torch.stack([1 / r0, -1 / r0, torch.zeros_like(r0)])
    d11 = torch.stack([torch.zeros_like(r1), 1 / r1, -1 / r1])
    d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
    d2 = (d10 - d11) / (r0 + r1)
    d0 = torch.stack([torch.ones_like(h), torch.zeros_like(h), torch.zeros_like(h)])
    cm = a_t * (-phi1 * d0 + phi2 * d1 - phi3 * d2)
    return [c_x, cm[0], cm[1], cm[2]]


def _sde_row(g: Grid, i, p: int) -> list:
    """[c_x, c_m0, (c_m1), c_z] for the SDE-DPM-Solver++ step i -> i+1 at order p (1 or 2)."""
    # e^-h = (sigma_t alpha_s)/(sigma_s alpha_t), written as a ratio so a final step to sigma = 0 stays finite
    emh = (g.sigma[i + 1] * g.alpha[i]) / (g.sigma[i] * g.alpha[i + 1])
    one_m_e2h = 1 - emh * emh
    c_x = g.sigma[i + 1] / g.sigma[i] * emh
    c_z = g.sigma[i + 1] * one_m_e2h.clamp_min(0).sqrt()
    a_t = g.alpha[i + 1]
    if p == 1:
        return [c_x, a_t * one_m_e2h, c_z]
    r0 = (g.lam[i] - g.lam[i - 1]) / (g.lam[i + 1] - g.lam[i])
    return [c_x, a_t * one_m_e2h * (1 + 0.5 / r0), -a_t * one_m_e2h * 0.5 / r0, c_z]


def build_dpmpp(g: Grid, cond_times, order: int = 2, lower_order_final: bool = True, sde: bool = False,
                euler_at_final: bool = False, **_) -> Program:
    check_order("dpmpp_sde" if sde else "dpmpp", order, (1, 2) if sde else (1, 2, 3))
    prog = Program(eval_times=cond_times)
    orders = dpmpp_orders(g.n_steps, order, lower_order_final, g.final_zero, euler_at_final)
    rows = rows_by_group(orders, lambda p, idx: (_sde_row if sde else _ode_row)(g, idx, p))
    for i, p in enumerate(orders):
        hist = tuple(f"D{i - k}" for k in range(p))
        step = [Eval(f"D{i}", "x", i)]
        row = rows[i]
        if sde:
            if g.final_zero and i == g.n_steps - 1:
                row = row[:-1]  # no noise is added at sigma = 0
            else:
                step.append(Noise("z"))
                hist = hist + ("z",)
        step.append(Update("x", "x", hist, prog.row(row)))
        prog.add_step(step)
    return prog
