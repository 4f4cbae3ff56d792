"""UniPC (Zhao et al. 2023), data-prediction form, B(h) = hh (bh1) or expm1(hh) (bh2), with hh = -h.

Predictor UniP-p at step s -> t uses m_s and p-1 older outputs; the corrector UniC-p at the new point t reuses
the model evaluation made there (no extra NFE) and re-does the step from the corrected x_s:

  x_t = (sigma_t/sigma_s) x_s - alpha_t phi1 m_s - alpha_t B(h) sum_k rho_k (m_{s-k} - m_s)/r_k   (+ the m_t term)

with r_k = (lambda_{s-k} - lambda_s)/h and rho solving the order conditions R rho = b (R_ij = r_j^(i-1)). The
solve is torch.linalg.solve on tensors of the timesteps, so the gradient reaches the timesteps through rho too.
The corrector is skipped after the last step (there is no evaluation to reuse). The corrector and the next
predictor are folded into one fused update per evaluation (build_unipc's fold).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from . import arrays
from .ddim import first_order_row
from .grid import Grid
from .program import Alias, Eval, Program, Structure, Update, check_choice, check_flag, check_order, \
    choose_orders, mixed_rows, multistep_orders, structure

VARIANTS = ("bh1", "bh2")


def _phi_terms(h, p: int, variant: str):
    """phi1 = expm1(hh), B(h) and the right-hand side b (length p) of UniPC's order conditions."""
    hh = -h
    phi1 = arrays.expm1(hh)
    big_b = hh if variant == "bh1" else phi1
    b, h_phi_k, factorial = [], phi1 / hh - 1, 1.0
    for i in range(1, p + 1):
        b.append(h_phi_k * factorial / big_b)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return phi1, big_b, arrays.stack(b)


def _solve_rhos(rks: Sequence, b, n: int) -> list:
    """rho solving R[:n,:n] rho = b[:n], R_ij = rks_j^(i-1), batched over steps: rks holds (m,) tensors, b is
    (p, m); returns n tensors of shape (m,)."""
    rks = arrays.stack(list(rks), dim=-1)  # (m, p)
    powers = arrays.stack([rks**i for i in range(n)], dim=-2)  # (m, n, p)
    return arrays.unbind(arrays.solve_vectors(powers[..., :n, :n], b[:n].T), -1)


def _step_terms(g: Grid, i, p: int, variant: str):
    """What UniP and UniC share for step i -> i+1 at order p: c_x = sigma_{i+1}/sigma_i, alpha_{i+1}, h, phi1,
    B(h), the order conditions' b, and the step ratios r_k = (lambda_{i-k} - lambda_i)/h for k < p."""
    lam = g.lam
    h = lam[i + 1] - lam[i]
    phi1, big_b, b = _phi_terms(h, p, variant)
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
    return g.sigma[i + 1] / g.sigma[i], g.alpha[i + 1], h, phi1, big_b, b, rks


class _SharedTerms:
    """`_step_terms` per order, kept from the predictor's rows for the corrector's: UniP-p of step i and the UniC-p
    that re-does step i share every term, and the corrector's steps of an order are the predictor's but the last
    (in the common case: no disabled corrector), so its terms are slices of the predictor's (bit-identical). Host
    grids only: on a differentiable one the shared terms' gradients would sum in another order (not bit-identical
    to computing them twice, and the graph is not where the time goes)."""

    def __init__(self, g: Grid, variant: str):
        self.g, self.variant, self.kept = g, variant, {}
        self.share = arrays.on_host(g.lam)

    def __call__(self, i, p: int):
        hit = self.kept.get(p)
        if hit is not None and len(i) <= len(hit[0]) and np.array_equal(hit[0][:len(i)], i):
            m = len(i)
            c_x, a_t, h, phi1, big_b, b, rks = hit[1]
            return c_x[:m], a_t[:m], h[:m], phi1[:m], big_b[:m], b[:, :m], [r[:m] for r in rks]
        terms = _step_terms(self.g, i, p, self.variant)
        if self.share and arrays.on_host(i):
            self.kept[p] = (i, terms)
        return terms


def predictor_row(g: Grid, i, p: int, variant: str, terms=None) -> list:
    """[c_x, c_m_i, c_m_{i-1}, ...] of UniP-p from point i to i+1 (i: a step index or a LongTensor of them).
    terms: a `_SharedTerms` to take the step terms from (None: computed here)."""
    if p == 1:
        return first_order_row(g, i, i + 1)
    c_x, a_t, h, phi1, big_b, b, rks = _step_terms(g, i, p, variant) if terms is None else terms(i, p)
    if p == 2:
        rhos = [arrays.full_like(h, 0.5)]  # the order-2 predictor is fixed at 1/2 (as in the paper and diffusers)
    else:
        rhos = _solve_rhos(rks + [arrays.ones_like(h)], b, p - 1)
    weights = [a_t * big_b * rho / r for rho, r in zip(rhos, rks)]  # on (m_{i-k} - m_i)
    return [c_x, -a_t * phi1 + sum(weights), *[-w for w in weights]]


def corrector_row(g: Grid, i, p: int, variant: str, terms=None) -> list:
    """[c_x, c_m_{i+1}, c_m_i, c_m_{i-1}, ...] of UniC-p: re-do step i -> i+1 from the corrected x_i using the
    new output m_{i+1}. p is the order of the predictor that produced x_{i+1}; terms as in `predictor_row`."""
    c_x, a_t, h, phi1, big_b, b, rks = _step_terms(g, i, p, variant) if terms is None else terms(i, p)
    if p == 1:
        rhos = [arrays.full_like(h, 0.5)]
    else:
        rhos = _solve_rhos(rks + [arrays.ones_like(h)], b, p)
    weights = [a_t * big_b * rho / r for rho, r in zip(rhos[:-1], rks)]  # on (m_{i-k} - m_i)
    w_new = a_t * big_b * rhos[-1]  # on (m_{i+1} - m_i)
    return [c_x, -w_new, -a_t * phi1 + sum(weights, arrays.zeros_like(h)) + w_new,
            *[-w for w in weights]]


def build_unipc(g: Grid, cond_times, order: int = 2, variant: str = "bh2", lower_order_final: bool = True,
                order_rule: str = "diffusers", use_corrector: bool = True, disable_corrector: Sequence[int] = (),
                final_corrector: bool = False, orders=None, fold: bool = True) -> Program:
    """UniPC-p: predictor UniP-p at every step, corrector UniC at the start of the next step (reusing the model
    evaluation made there; none after the last step). final_corrector=True also evaluates the model at the last
    point and corrects the last step with it (NFE N+1), which is what diffusers' UniPCMultistepScheduler does
    when its last step has zero length (a final sigma_min equal to the last sigma).

    fold=True (the default) makes one update per model evaluation: the corrector and the next predictor start from
    the same corrected sample, and the corrector's step and the predictor's own step before it share c_x, so the
    corrected sample is the predicted one plus a combination of the outputs and the next predicted
    sample is one row over (predicted sample, new output, history) (`_folded_rows`). The state is then the predicted
    sample; the corrected one is never formed, but for the final correction (the result). fold=False keeps the
    corrected sample as a buffer of its own (two updates per evaluation; equal up to rounding)."""
    check_order("unipc", order, (1, 2, 3))
    check_choice("variant", variant, VARIANTS)
    check_flag("lower_order_final", lower_order_final)
    check_flag("use_corrector", use_corrector)
    check_flag("final_corrector", final_corrector)
    check_flag("fold", fold)
    if isinstance(disable_corrector, (str, bytes)) or not all(
            isinstance(k, int) and not isinstance(k, bool) for k in disable_corrector):
        raise ValueError(f"disable_corrector must be a list of step indices, got {disable_corrector!r}")
    if final_corrector and g.final_zero:
        raise ValueError("final_corrector needs a last point with sigma > 0 (final_sigmas_type='sigma_min')")
    n = g.n_steps
    plan = choose_orders("unipc", g.lam, order, lower_order_final, order_rule, g.final_zero,
                         functools.partial(multistep_orders, warmup=True), orders)
    orders = plan.top
    prog = Program(eval_times=cond_times, eval_points=g.t, eval_alpha_sigma=g.points())
    terms = _SharedTerms(g, variant)
    predictors = mixed_rows(orders, lambda p, idx: predictor_row(g, idx, p, variant, terms), plan.weight, plan.blend)
    # the corrector at point i (1 <= i <= n) re-does step i-1 -> i with the order mix its predictor used; its row
    # reads (x, m_new, m_{i-1}, ...), one output more than the predictor's, and pads the same way
    corrects = [i > 0 and use_corrector and (i - 1) not in disable_corrector for i in range(n + 1)]
    corrects[n] = corrects[n] and final_corrector
    shifted = None if plan.weight is None else arrays.cat([plan.weight[:1], plan.weight])  # position i: step i-1
    correctors = mixed_rows([orders[i - 1] if c else None for i, c in enumerate(corrects)],
                            lambda p, idx: corrector_row(g, idx - 1, p, variant, terms), shifted,
                            None if plan.blend is None else [c and plan.blend[i - 1] for i, c in enumerate(corrects)])
    if not fold:
        return _unfolded(prog, n, orders, corrects, predictors, correctors)
    rows = _folded_rows(n, corrects, predictors, correctors)
    return Program.of(_folded_structure(tuple(len(row) - 1 for row in rows)), rows, eval_times=prog.eval_times,
                      eval_points=prog.eval_points, eval_alpha_sigma=prog.eval_alpha_sigma)


@functools.lru_cache(maxsize=256)
def _folded_structure(widths: tuple) -> Structure:
    """The folded program's instructions: evaluation i, then one update with row i over the widths[i] newest
    outputs (pure structure, cached: see program.Structure)."""
    names = [f"D{i}" for i in range(len(widths))]
    return structure([[Eval(names[i], "x", i), Update("x", "x", tuple(names[i - k] for k in range(w)), i)]
                      for i, w in enumerate(widths)])


def _folded_rows(n: int, corrects, predictors, correctors) -> list:
    """Per evaluation i, the folded row: the predictor's where no correction precedes it, else the predictor's
    row applied to the corrected sample, and after the last step (a final correction) [1, delta].

    The correction: UniC re-does the predictor's step from the same sample with the same c_x, so the corrected
    sample is x_c = x_p + delta . (m_new, m_i, m_{i-1}, ...) with delta = corrector[1:] - [0, predictor[1:]].
    The predictor [c_x, c_m] applied to x_c is one row over (x_p, m_new, ...): [c_x, c_x delta + c_m] (both
    zero-padded to the longer). Computed for all the evaluations of one (delta width, predictor width) at once,
    so a table costs a few array ops per width, whatever the number of steps."""
    count = n + 1 if corrects[n] else n
    rows: list = [None] * count
    groups: dict = {}
    for i in range(count):
        if not corrects[i]:
            rows[i] = predictors[i]
        else:
            groups.setdefault((len(correctors[i]) - 1, len(predictors[i]) if i < n else 0), []).append(i)
    for (dw, pw), idx in groups.items():
        corr = arrays.stack([correctors[i] for i in idx])  # (m, 1 + dw)
        prev = arrays.stack([predictors[i - 1] for i in idx])  # (m, dw): [c_x, c_m]
        delta = corr[:, 1:] - arrays.cat([arrays.zeros(corr, (len(idx), 1)), prev[:, 1:]], dim=1)
        if pw == 0:  # the final correction is the result
            mat = arrays.cat([arrays.ones_like(delta[:, :1]), delta], dim=1)
        else:
            pred = arrays.stack([predictors[i] for i in idx])
            c_x, c_m = pred[:, :1], pred[:, 1:]
            width = max(dw, pw - 1)
            pad = lambda v: arrays.cat([v, arrays.zeros(v, (len(idx), width - v.shape[1]))], dim=1)  # noqa: E731
            mat = arrays.cat([c_x, c_x * pad(delta) + pad(c_m)], dim=1)
        for i, row in zip(idx, arrays.unbind(mat, 0)):
            rows[i] = row
    return rows


def _unfolded(prog: Program, n: int, orders, corrects, predictors, correctors) -> Program:
    """The corrected sample as a buffer of its own ("xc"): two updates per evaluation (the folded program's oracle,
    and the form whose local error, from an exact corrected state, is the corrector's)."""
    for i in range(n + 1):
        if i == n and not corrects[n]:
            break
        step = [Eval(f"D{i}", "x", i)]
        # "xc" holds the (corrected) sample at the current point: the start of the predictor now and of the
        # corrector at the next point.
        if corrects[i]:
            pc = orders[i - 1]
            step.append(Update("xc", "xc", tuple(f"D{i - k}" for k in range(pc + 1)), prog.row(correctors[i])))
        else:
            step.append(Alias("xc", "x"))
        if i < n:
            p = orders[i]
            step.append(Update("x", "xc", tuple(f"D{i - k}" for k in range(p)), prog.row(predictors[i])))
        else:
            step.append(Alias("x", "xc"))  # the final correction is the result
        prog.add_step(step)
    return prog
