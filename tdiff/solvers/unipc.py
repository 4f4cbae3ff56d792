"""UniPC (Zhao et al. 2023), data-prediction form, B(h) = hh (bh1) or expm1(hh) (bh2), with hh = -h.

Predictor UniP-p at step s -> t uses m_s and p-1 older outputs; the corrector UniC-p at the new point t reuses
the model evaluation made there (no extra NFE) and re-does the step from the corrected x_s:

  x_t = (sigma_t/sigma_s) x_s - alpha_t phi1 m_s - alpha_t B(h) sum_k rho_k (m_{s-k} - m_s)/r_k   (+ the m_t term)

with r_k = (lambda_{s-k} - lambda_s)/h and rho solving the order conditions R rho = b (R_ij = r_j^(i-1)). The
solve is a closed form (Lagrange) in plain arithmetic on the timesteps' arrays, so the gradient reaches the
timesteps through rho too.
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
from .program import Alias, Eval, Program, Structure, Update, blend_rows, check_choice, check_flag, check_order, \
    choose_orders, multistep_orders, structure

VARIANTS = ("bh1", "bh2")
#: diffusers' order rule for UniPC (by the count of steps, with warm-up)
_COUNT_RULE = functools.partial(multistep_orders, warmup=True)


def _phi_terms(h, p: int, variant: str):
    """phi1 = expm1(hh), B(h) and the right-hand side b (length p) of UniPC's order conditions."""
    hh = -h
    phi1 = arrays.expm1(hh)
    big_b = hh if variant == "bh1" else phi1
    b, h_phi_k, factorial = [], phi1 / hh - 1, 1.0
    for i in range(1, p + 1):
        b.append((h_phi_k if i == 1 else h_phi_k * factorial) / big_b)  # x * 1.0 is x: no op for the first
        if i < p:  # the next term (none after the last)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
    return phi1, big_b, arrays.stack(b)


def _solve_rhos(rks: Sequence, b, n: int) -> list:
    """rho solving R[:n,:n] rho = b[:n], R_ij = rks_j^(i-1), batched over steps: rks holds (m,) arrays, b is
    (p, m); returns n arrays of shape (m,).

    R is a transposed Vandermonde matrix, so the solve has a closed form: rho_j = sum_i b_i [x^i] L_j(x), with
    L_j(x) = prod_{k != j} (x - r_k) / (r_j - r_k) the Lagrange basis polynomial of the nodes r_0..r_{n-1}. In
    floating point it is at least as close to the exact solve as LU (tests/test_solvers_tables.py checks it
    against exact rational arithmetic), and it is plain arithmetic, so one expression serves the host tables
    and the differentiable ones. The last rho comes from the first condition (sum rho = b_0): where a history
    node is infinite (an output at alpha = 0, lambda = -inf), it gets weight 0 and the rest is the lower-order
    solve, as LU gave there."""
    nodes = list(rks[:n])
    rhos = []
    for j, r_j in enumerate(nodes[:-1] if n > 1 else nodes):
        # the monic prod_{k != j} (x - r_k): its coefficients below the leading 1, lowest first
        coeffs, denom = [], None
        for k, r_k in enumerate(nodes):
            if k != j:  # times (x - r_k); the leading coefficient is 1 (no product with it: x * 1 is x)
                coeffs = [-r_k * coeffs[0]] + [coeffs[i - 1] - r_k * coeffs[i] for i in range(1, len(coeffs))] + \
                    [coeffs[-1] - r_k] if coeffs else [-r_k]
                denom = r_j - r_k if denom is None else denom * (r_j - r_k)
        numer = b[len(coeffs)]
        for i, c in enumerate(coeffs):
            numer = numer + c * b[i]
        rhos.append(numer if denom is None else numer / denom)
    if n > 1:  # the last from the first condition, sum rho = b_0: the limit where another node is infinite
        rhos.append(b[0] - sum(rhos[1:], rhos[0]))
    return rhos


def _step_terms(g: Grid, i, p: int, variant: str):
    """What UniP and UniC share for step i -> i+1 at order p: c_x = sigma_{i+1}/sigma_i, alpha_{i+1}, h, phi1,
    B(h), the order conditions' b, and the step ratios r_k = (lambda_{i-k} - lambda_i)/h for k < p."""
    lam = g.lam
    h = lam[i + 1] - lam[i]
    phi1, big_b, b = _phi_terms(h, p, variant)
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
    return g.sigma[i + 1] / g.sigma[i], g.alpha[i + 1], h, phi1, big_b, b, rks


def predictor_row(g: Grid, i, p: int, variant: str, terms=None) -> list:
    """[c_x, c_m_i, c_m_{i-1}, ...] of UniP-p from point i to i+1 (i: a step index or an index array of them).
    terms: `_step_terms(g, i, p, variant)` when the caller has them already (the corrector's are the same),
    optionally followed by the products (a_t B(h), -a_t phi1) (`_host_step_rows`: computed once for every row)."""
    if p == 1:
        return first_order_row(g, i, i + 1)
    c_x, a_t, h, phi1, big_b, b, rks = _step_terms(g, i, p, variant) if terms is None else terms[:7]
    ab, nap = _products(terms)
    if p == 2:
        rhos = [0.5]  # the order-2 predictor is fixed at 1/2 (as in the paper and diffusers); a number: exact
    else:
        rhos = _solve_rhos(rks, b, p - 1)  # the last node (1) is not among the first p - 1
    weights = [(a_t * big_b if ab is None else ab) * rho / r for rho, r in zip(rhos, rks)]  # on (m_{i-k} - m_i)
    return [c_x, (-a_t * phi1 if nap is None else nap) + sum(weights), *[-w for w in weights]]


def corrector_row(g: Grid, i, p: int, variant: str, terms=None) -> list:
    """[c_x, c_m_{i+1}, c_m_i, c_m_{i-1}, ...] of UniC-p: re-do step i -> i+1 from the corrected x_i using the
    new output m_{i+1}. p is the order of the predictor that produced x_{i+1}; terms as in `predictor_row`."""
    c_x, a_t, h, phi1, big_b, b, rks = _step_terms(g, i, p, variant) if terms is None else terms[:7]
    ab, nap = _products(terms)
    if p == 1:
        rhos = [0.5]
    else:
        rhos = _solve_rhos(rks + [1.0], b, p)  # the new output's node r = 1 (a number: exact)
    weights = [(a_t * big_b if ab is None else ab) * rho / r for rho, r in zip(rhos[:-1], rks)]  # on (m_{i-k} - m_i)
    w_new = (a_t * big_b if ab is None else ab) * rhos[-1]  # on (m_{i+1} - m_i)
    return [c_x, -w_new, (-a_t * phi1 if nap is None else nap) + sum(weights) + w_new,  # sum([]) = 0: x + 0,
            *[-w for w in weights]]  # as x + zeros was


def _products(terms) -> tuple:
    """(a_t B(h), -a_t phi1) where the caller computed them once for all its rows (terms[7:]: host arrays or
    floats, so each row's a_t * B(h) * rho, which is (a_t * B(h)) * rho, is the same operations on the same
    values), else (None, None): each use forms its own, as a differentiable table's autograd graph always had."""
    return (None, None) if terms is None or len(terms) == 7 else terms[7:]


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
    plan = choose_orders("unipc", g.lam, order, lower_order_final, order_rule, g.final_zero, _COUNT_RULE, orders)
    orders = plan.top
    corrects, corrected = _corrections(n, use_corrector, tuple(disable_corrector), final_corrector)
    pred, corr = _step_rows(g, plan, corrected, variant)
    if not fold:
        predictors = [pred[j, :1 + p] for j, p in enumerate(orders)]
        correctors = [None] * (n + 1)
        for k, i in enumerate(i for i in range(n + 1) if corrects[i]):
            correctors[i] = corr[k, :2 + orders[i - 1]]
        return _unfolded(Program(eval_times=cond_times, eval_points=g.t, eval_alpha_sigma=g.points()), n, orders,
                         corrects, predictors, correctors)
    kw = dict(eval_times=cond_times, eval_points=g.t, eval_alpha_sigma=g.points())
    if arrays.on_host(pred):  # one matrix per row width, without a row view each (Program.of_groups)
        struct, at, groups = _host_fold_layout(tuple(orders), corrects)
        full = _host_folded(pred, corr, at)
        return Program.of_groups(struct, [(idx, full[rows, :width]) for idx, rows, width in groups], **kw)
    widths, parts = _folded_rows(n, orders, corrects, pred, corr)
    struct = _folded_structure(tuple(widths))
    rows = [None] * len(widths)
    for evals, mat in parts:
        for k, i in enumerate(evals):
            rows[i] = mat[k, :1 + widths[i]]
    return Program.of(struct, rows, **kw)


@functools.lru_cache(maxsize=256)
def _corrections(n: int, use_corrector: bool, disabled: tuple, final_corrector: bool) -> tuple:
    """(corrects, corrected): per point i (0..n) whether the corrector runs there, and the steps those
    corrections re-do (i - 1), ascending. The corrector at point i (1 <= i <= n) re-does step i-1 -> i with the
    order mix its predictor used; its row reads (x, m_new, m_{i-1}, ...), one output more than the predictor's.
    Shared by every call: never written to."""
    corrects = [i > 0 and use_corrector and (i - 1) not in disabled for i in range(n + 1)]
    corrects[n] = corrects[n] and final_corrector
    return tuple(corrects), tuple(i - 1 for i in range(1, n + 1) if corrects[i])


def _step_rows(g: Grid, plan, corrected: tuple, variant: str) -> tuple:
    """Every step's predictor row and the corrected steps' corrector rows (`corrected`: their step indices,
    ascending), as two matrices zero-padded to the widest order: (n, 1 + p_max) and (len(corrected), 2 + p_max).

    Where the stable rule blends (plan.blend), a step's rows are weight row_p + (1 - weight) row_1 (`blend_rows`),
    row_1 zero-padded on the histories it does not read (the predictor's after (c_x, c_0), the corrector's after
    (c_x, c_new, c_0)). On a host grid, `_host_step_rows`. On a differentiable one, per order p its steps' rows
    are computed at once, each row function computing its own step terms, as before the builder was vectorised
    (shared terms' gradients would sum in another order); so a table costs a few tensor ops per order."""
    if arrays.on_host(g.lam):
        return _host_step_rows(g, plan, corrected, variant)
    groups, pred_order, corr_order = _rows_layout(tuple(plan.top), None if plan.blend is None else
                                                  tuple(plan.blend), corrected)
    width = max(plan.top)
    preds, corrs = [], []
    for p, idx, with_corr, mixed, mixed_corr, at_steps in groups:
        if p == 1:
            preds.append(_matrix(first_order_row(g, idx, idx + 1)))
            if with_corr is not None:
                corrs.append(_matrix(corrector_row(g, idx[with_corr], 1, variant)))
            continue
        pred = _matrix(predictor_row(g, idx, p, variant))
        corr = _matrix(corrector_row(g, idx, p, variant))[with_corr] if with_corr is not None else None
        if mixed is not None:
            w = plan.weight[idx[mixed]][:, None]
            first = _matrix(first_order_row(g, idx[mixed], idx[mixed] + 1))
            pred = blend_rows(pred, arrays.indices(mixed), w, first)
            if mixed_corr is not None:
                corr = blend_rows(corr, arrays.indices(mixed_corr), plan.weight[at_steps][:, None],
                                  _matrix(corrector_row(g, at_steps, 1, variant)))
        preds.append(pred)
        if with_corr is not None:
            corrs.append(corr)
    return _stack_rows(preds, pred_order, 1 + width), _stack_rows(corrs, corr_order, 2 + width) if corrs else None


def _host_step_rows(g: Grid, plan, corrected: tuple, variant: str) -> tuple:
    """`_step_rows` on a host grid (numpy), bit-identical, in fewer array ops: its cost is the count of numpy calls
    (~1 us each on arrays of ~20 entries), and most of `_step_rows`' went to the fixed cost of each order group
    (index arrays, gathers, a blend per group), one-step warm-up groups included.

    Here the rows of an order are computed for every step from p-1 on at once, on slices (views, no gathers),
    and the rows of that order's steps copied out; the first-order rows (every step needs them, as its own row or
    as a blend's partner) likewise for every step. An order with only a few steps (the warm-up's order 2 in an
    order-3 run) is computed per step in Python floats, the same formulas on the same float64 values (IEEE
    arithmetic, no fused operations; its sums have one term, so Python's compensated float sum (3.12+) cannot
    differ; expm1 comes from the arrays, numpy's and math's differ in the last bit). The blends
    are one `blend_rows` per matrix over the span of the blending steps (in place, `_host_layout`). Each entry is
    the same float64 operations on the same values as in `_step_rows`, so the matrices are equal (bit for bit
    over the 32640 host programs of the check in the commit that made this; a step inside the blending span
    that does not blend could only differ in the sign of a zero)."""
    top = plan.top
    n, width = len(top), max(top)
    ne, vector_orders, scalar_steps, corr_at, blending = _host_layout(
        tuple(top), None if plan.blend is None else tuple(plan.blend), corrected, g.final_zero)
    lam, alpha, sigma = g.lam, g.alpha, g.sigma
    # the step terms of every step but a final one to sigma = 0 (h infinite there, and its row is first order)
    h = lam[1:ne + 1] - lam[:ne]
    c_x, a_t = sigma[1:ne + 1] / sigma[:ne], alpha[1:ne + 1]
    phi1, big_b, b = _phi_terms(h, width, variant)
    ab, nap = a_t * big_b, -a_t * phi1  # every row's first products, once (`_products`)
    first = _matrix(first_order_row(g, slice(0, n), slice(1, n + 1)))
    pred = np.zeros((n, 1 + width))
    pred[:, :2] = first
    corr = None
    if corrected:
        corr = np.zeros((ne, 2 + width))
        first_corr = _matrix(corrector_row(g, None, 1, variant, (c_x, a_t, h, phi1, big_b, b, [], ab, nap)))
        corr[:, :3] = first_corr
    for p, steps, at in vector_orders:  # the rows at order p of every step from p - 1 on; those of its steps kept
        s = p - 1
        terms = (c_x[s:], a_t[s:], h[s:], phi1[s:], big_b[s:], b[:p, s:],
                 [(lam[s - k:ne - k] - lam[s:ne]) / h[s:] for k in range(1, p)], ab[s:], nap[s:])
        pred[steps, :1 + p] = _matrix(predictor_row(g, None, p, variant, terms))[at]
        if corr is not None:
            corr[steps, :2 + p] = _matrix(corrector_row(g, None, p, variant, terms))[at]
    for j, p, with_corr in scalar_steps:  # Python floats: the same float64 operations as on the arrays
        lam_j, h_j = lam.item(j), h.item(j)
        terms = (c_x.item(j), a_t.item(j), h_j, phi1.item(j), big_b.item(j), b[:p, j].tolist(),
                 [(lam.item(j - k) - lam_j) / h_j for k in range(1, p)], ab.item(j), nap.item(j))
        pred[j, :1 + p] = predictor_row(g, j, p, variant, terms)
        if with_corr:
            corr[j, :2 + p] = corrector_row(g, j, p, variant, terms)
    if blending is not None:
        steps, corr_steps = blending
        pred = blend_rows(pred, steps, plan.weight[steps][:, None], first[steps])
        if corr_steps is not None:
            corr = blend_rows(corr, corr_steps, plan.weight[corr_steps][:, None], first_corr[corr_steps])
    if corr is not None and corr_at is not None:
        corr = corr[corr_at]
    return pred, corr


#: an order (2, below the widest) of at most this many steps is computed per step in floats in _host_step_rows
SCALAR_STEPS = 3


@functools.lru_cache(maxsize=256)
def _host_layout(top: tuple, blend, corrected: tuple, final_zero: bool) -> tuple:
    """`_host_step_rows`' indexing, a function of the plan and the corrected steps alone (cached; shared by every
    call, never written to): (ne, vector_orders, scalar_steps, corr_at, blending). ne: the steps with a finite step
    in lambda; vector_orders: per order p > 1 computed on arrays, (p, its steps, their positions from step p - 1);
    scalar_steps: (step, p, corrected?) of the other orders > 1; corr_at: the corrected steps as an index (None:
    steps 0..ne-1, all of them); blending: the span of the blending steps and that of those corrected (None if
    none), or None."""
    n, width = len(top), max(top)
    ne = n - 1 if final_zero else n
    is_corr = [False] * n
    for j in corrected:
        is_corr[j] = True
    by_order: dict = {}
    for j, p in enumerate(top):
        if p > 1:
            by_order.setdefault(p, []).append(j)
    vector_orders, scalar_steps = [], []
    for p, steps in sorted(by_order.items()):
        if p == width or p > 2 or len(steps) > SCALAR_STEPS:  # order 2's rows sum one term: exact in floats
            vector_orders.append((p, _index(steps), _index([j - (p - 1) for j in steps])))
        else:
            scalar_steps.extend((j, p, is_corr[j]) for j in steps)
    corr_at = None if list(corrected) == list(range(ne)) else _index(list(corrected))
    blending = None
    if blend is not None:
        steps = [j for j in range(n) if blend[j] and top[j] > 1]
        if steps:
            corr_steps = [j for j in steps if is_corr[j]]
            # as slices from the first blending step to the last: a step between that does not blend has weight
            # exactly 1 (OrderPlan), and w x + (1 - w) f is x for w = 1 (x*1 + 0*f, f finite), so blending it
            # changes nothing and the blends need no gather and no scatter
            blending = (slice(steps[0], steps[-1] + 1),
                        slice(corr_steps[0], corr_steps[-1] + 1) if corr_steps else None)
    return ne, tuple(vector_orders), tuple(scalar_steps), corr_at, blending


def _index(positions: list):
    """An index of these ascending positions: a slice where they are contiguous (a view, no gather)."""
    if positions and positions[-1] - positions[0] == len(positions) - 1:
        return slice(positions[0], positions[-1] + 1)
    return arrays.indices(positions)


@functools.lru_cache(maxsize=256)
def _rows_layout(top: tuple, blend, corrected: tuple) -> tuple:
    """The indexing `_step_rows` does on a differentiable grid, a function of the plan's orders and blends and of
    the corrected steps alone, worked out once per such plan: (groups, pred_order, corr_order). groups: per order
    p, in order of first appearance, (p, its steps idx, with_corr, mixed, mixed_corr, at_steps): with_corr the
    positions in idx of its corrected steps, mixed those of its blending steps, mixed_corr the positions in
    with_corr of its blending corrected steps and at_steps those steps; each None where empty. pred_order /
    corr_order: the permutation that puts the groups' stacked rows in step order (None for one group). Shared by
    every call: never written to."""
    n = len(top)
    has_corr = [False] * n
    for j in corrected:
        has_corr[j] = True
    by_order: dict = {}
    for j, p in enumerate(top):
        by_order.setdefault(p, []).append(j)
    groups, pred_parts, corr_parts = [], [], []
    for p, steps in by_order.items():
        idx = arrays.indices(steps)
        with_corr = [k for k, j in enumerate(steps) if has_corr[j]]
        mixed = [k for k, j in enumerate(steps) if blend is not None and blend[j]] if p > 1 else []
        mixed_corr = [c for c, k in enumerate(with_corr) if blend[steps[k]]] if mixed else []
        at_steps = [steps[with_corr[c]] for c in mixed_corr]  # the blending corrected steps
        groups.append((p, idx, arrays.indices(with_corr) if with_corr else None,
                       arrays.indices(mixed) if mixed else None, arrays.indices(mixed_corr) if mixed_corr else None,
                       arrays.indices(at_steps) if at_steps else None))
        pred_parts.append(idx)
        if with_corr:
            corr_parts.append(idx[with_corr])

    def order(parts: list):
        return np.argsort(np.concatenate(parts), kind="stable") if len(parts) > 1 else None

    return tuple(groups), order(pred_parts), order(corr_parts)


def _matrix(columns: list):
    """The (steps, width) matrix of a row function's columns."""
    return arrays.stack(columns, dim=1)


def _stack_rows(mats: list, order, width: int):
    """The matrices' rows zero-padded to `width`, stacked and put in step order by the permutation `order` (None:
    one matrix, in step order already)."""
    mats = [m if m.shape[1] == width else arrays.cat([m, arrays.zeros(m, (m.shape[0], width - m.shape[1]))], dim=1)
            for m in mats]
    if order is None:
        return mats[0]
    return arrays.cat(mats)[order]


@functools.lru_cache(maxsize=256)
def _folded_structure(widths: tuple) -> Structure:
    """The folded program's instructions: evaluation i, then one update with row i over the widths[i] newest
    outputs (pure structure, cached: see program.Structure)."""
    names = [f"D{i}" for i in range(len(widths))]
    return structure([[Eval(names[i], "x", i), Update("x", "x", tuple(names[i - k] for k in range(w)), i)]
                      for i, w in enumerate(widths)])


def _folded_rows(n: int, orders, corrects, pred, corr) -> tuple:
    """Per evaluation i, the folded row: the predictor's where no correction precedes it, else the predictor's
    row applied to the corrected sample, and after the last step (a final correction) [1, delta]. Returned as
    (widths, parts): widths[i] the number of outputs row i reads, parts [(evaluations, matrix)] whose matrix row k,
    cut to 1 + widths[evals[k]], is the row of evals[k] (a later part's rows replace an earlier one's).

    The correction: UniC re-does the predictor's step from the same sample with the same c_x, so the corrected
    sample is x_c = x_p + delta . (m_new, m_i, m_{i-1}, ...) with delta = corrector[1:] - [0, predictor[1:]].
    The predictor [c_x, c_m] applied to x_c is one row over (x_p, m_new, ...): [c_x, c_x delta + c_m] (both
    zero-padded to the longer). pred and corr are `_step_rows`' zero-padded matrices, so this is a handful of
    array ops for all the corrected evaluations at once."""
    widths, at, inner = _folded_widths(tuple(orders), tuple(corrects))
    parts = [(list(range(n)), pred)]
    if not at:
        return widths, parts
    prev = arrays.indices(at) - 1
    before = pred[prev]  # the predictor whose step each correction re-does
    delta = corr[:, 1:] - arrays.cat([arrays.zeros(corr, (len(at), 1)), before[:, 1:]], dim=1)
    if inner:
        nxt = pred[arrays.indices(at[:inner])]
        c_x = nxt[:, :1]
        c_m = arrays.cat([nxt[:, 1:], arrays.zeros(nxt, (inner, 1))], dim=1)
        parts.append((at[:inner], arrays.cat([c_x, c_x * delta[:inner] + c_m], dim=1)))
    if inner < len(at):  # the final correction is the result
        last = delta[inner, :1 + orders[n - 1]]
        parts.append(([n], arrays.cat([arrays.ones_like(last[:1]), last])[None]))
    return widths, parts


@functools.lru_cache(maxsize=256)
def _folded_widths(orders: tuple, corrects: tuple) -> tuple:
    """(widths, at, inner) of the folded program: widths[i] the number of outputs evaluation i's row reads, at the
    corrected evaluations (ascending), inner how many of them a predictor follows (all but a final correction).
    Shared by every call: never written to."""
    n = len(orders)
    count = n + 1 if corrects[n] else n
    at = tuple(i for i in range(1, count) if corrects[i])
    inner = len(at) - 1 if at and at[-1] == n else len(at)
    widths = list(orders)
    for i in at[:inner]:
        widths[i] = max(1 + orders[i - 1], orders[i])
    if inner < len(at):
        widths.append(1 + orders[n - 1])
    return tuple(widths), at, inner


@functools.lru_cache(maxsize=256)
def _host_fold_layout(orders: tuple, corrects: tuple) -> tuple:
    """`_host_folded`'s indexing and the program's structure, a function of the orders and the corrected
    evaluations alone (cached; shared by every call, never written to): (struct, at, groups). at: None without
    corrections, else (the evaluations a predictor follows, the steps their corrections re-do, their count, the
    final correction's width or 0); groups: per row width, (row indices, the same as an index, width)."""
    widths, at, inner = _folded_widths(orders, corrects)
    struct = _folded_structure(widths)
    groups = tuple((idx, _index(idx), width) for width, idx in struct.row_widths().items())
    if not at:
        return struct, None, groups
    n = len(orders)
    return struct, (_index(list(at[:inner])), _index([i - 1 for i in at]), inner,
                    1 + orders[n - 1] if inner < len(at) else 0), groups


def _host_folded(pred, corr, at):
    """`_folded_rows` on the host as one (evaluations, 2 + p_max) matrix (row i, cut to its width, is evaluation
    i's row), written in place: the same float64 operations as there, on the matrices `_step_rows` returned
    (corr is changed)."""
    n, width = pred.shape
    full = np.zeros((n + (at is not None and at[3] > 0), width + 1))
    full[:n, :width] = pred
    if at is None:
        return full
    followed, redone, inner, last = at
    delta = corr[:, 1:]  # minus [0, the redone predictor's output coefficients]: x - 0 is x
    delta[:, 1:] -= pred[redone, 1:]
    if inner:  # [c_x, c_x delta + c_m], c_m = [the predictor's output coefficients, 0]: full's row already
        full[followed, 1:] = pred[followed, :1] * delta[:inner] + full[followed, 1:]
    if last:  # the final correction is the result: [1, delta]
        full[n, 0] = 1.0
        full[n, 1:1 + last] = delta[inner, :last]
    return full


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
