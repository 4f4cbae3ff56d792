"""iPNDM (Zhang & Chen 2023, as in diff-sampler): Adams-Bashforth in EDM sigma space on the slope
d = (x~ - D)/sigma~ = (x - alpha D)/sigma, with x~ = x/alpha and sigma~ = sigma/alpha:

  x~_{i+1} = x~_i + (sigma~_{i+1} - sigma~_i) sum_k c_k d_{i-k}
  c = (1), (3, -1)/2, (23, -16, 5)/12, (55, -59, 37, -9)/24      (fixed: the steps are treated as equal)

The slope is the noise prediction: d = (x - alpha D)/sigma = eps, since x = alpha x0 + sigma eps. So each
evaluation asks for the eps target, the loop's fused update converts the raw network output to it (and keeps it as
history) in the pass that makes the step: one fused update per evaluation (what the Sampler builds). slopes="x0"
forms d_i from D_i in an update of its own (two updates per evaluation): for a denoiser that clamps its x0 prediction
(clip_x0), whose clamp must reach the slopes, and for the analyses that read a program as linear in the D's
(tdiff.timesteps.sensitivity; build_program's default).
"""
from __future__ import annotations

import functools

from . import arrays
from .grid import Grid
from .program import Eval, Program, Structure, Update, check_choice, check_flag, check_order, choose_orders, \
    mixed_groups, mixed_rows, multistep_orders, structure

ADAMS_BASHFORTH = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def slope_row(g: Grid, i) -> list:
    """d_i = x_i/sigma_i - (alpha_i/sigma_i) D_i (i: a point index, a slice or a LongTensor of them): the eps
    target's conversion from D, spelt out for the clamped form."""
    return [1 / g.sigma[i], -g.alpha[i] / g.sigma[i]]


def step_row(g: Grid, i, p: int) -> list:
    """[c_x, c_d_i, c_d_{i-1}, ...]: x_{i+1} = alpha_{i+1} (x_i/alpha_i + dsigma~ sum_k c_k d_{i-k})
    (i: a step index or a LongTensor of them)."""
    a_next = g.alpha[i + 1]
    scale = a_next * (g.sigma_tilde[i + 1] - g.sigma_tilde[i])
    return [a_next / g.alpha[i], *[scale * c for c in ADAMS_BASHFORTH[p]]]


def _count_rule(n_steps: int, order: int, lower_order_final: bool, final_zero: bool) -> list:
    # the step to sigma = 0 only reads earlier slopes, so it keeps the full order
    return multistep_orders(n_steps, order, lower_order_final, final_zero=False)


SLOPES = ("eps", "x0")


def build_ipndm(g: Grid, cond_times, order: int = 4, lower_order_final: bool = True, order_rule: str = "diffusers",
                orders=None, slopes: str = "x0") -> Program:
    """order_rule="stable" lowers the order by the step size in lambda (program.stable_orders; a final step to
    sigma = 0 is then first order); "diffusers" keeps the count rule of diff-sampler (warm-up, and with
    lower_order_final the steps left). slopes: "eps" (the slope is the eps prediction, one fused update per
    evaluation) or "x0" (formed from the data prediction, clamped if the denoiser clamps; see the module doc)."""
    check_order("ipndm", order, (1, 2, 3, 4))
    check_flag("lower_order_final", lower_order_final)
    check_choice("slopes", slopes, SLOPES)
    plan = choose_orders("ipndm", g.lam, order, lower_order_final, order_rule, g.final_zero, _count_rule, orders,
                         (1, 2, 3, 4))
    mixed = (plan.top, lambda q, idx: step_row(g, idx, q), plan.weight, plan.blend)
    kw = dict(eval_times=cond_times, eval_points=g.t, eval_alpha_sigma=g.points())
    if slopes == "eps":
        return Program.of_groups(_structure(tuple(plan.top), slopes), mixed_groups(*mixed), **kw)
    rows = mixed_rows(*mixed)
    slope_rows = arrays.rows(slope_row(g, slice(0, g.n_steps)))
    # row 2i: step i's slope from D_i; row 2i + 1: step i's update
    return Program.of(_structure(tuple(plan.top), slopes), [r for pair in zip(slope_rows, rows) for r in pair], **kw)


@functools.lru_cache(maxsize=256)
def _structure(orders: tuple, slopes: str) -> Structure:
    """iPNDM's instructions for these per-step orders (pure structure, cached: see program.Structure)."""
    slope = [f"d{i}" for i in range(len(orders))]
    if slopes == "eps":
        return structure([[Eval(slope[i], "x", i, "eps"), Update("x", "x", tuple(slope[i - k] for k in range(p)), i)]
                          for i, p in enumerate(orders)])
    return structure([[Eval(f"D{i}", "x", i), Update(slope[i], "x", (f"D{i}",), 2 * i),
                       Update("x", "x", tuple(slope[i - k] for k in range(p)), 2 * i + 1)]
                      for i, p in enumerate(orders)])
