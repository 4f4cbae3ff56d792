"""DM-NonUniform's surrogate objective (Xue et al. 2024, Eq. 35) and its exact Jacobian.

A multistep exponential integrator in data-prediction form lands at

    x_N = (sigma_N / sigma_0) x_0 + sigma_N sum_s sum_j w[s, j] D(lambda_{s-j})

so an error e_n in the model output at node n moves the result by sigma_N sum_s P[s, n] e_n, with P[s, n] the weight
step s gives node n. With the per-node error proxy eps_n = sigma_n^p / alpha_n (Lemma 1), the objective is

    J(lambda_1 .. lambda_{N-1}) = sum_{s alone} ||eps * P[s, :]||_2 + sum_n |c_n|,   c_n = eps_n sum_{s not alone} P[s, n]

where the first `warmup_steps` steps and the last are "alone": counted per step, without cancellation between steps.
This is what the reference implementation (scxue/DM-NonUniform, `sel_lambdas_lof_obj`) computes: its steps 0 and N-1
enter as |w eps|, its steps 1 and 2 (`truncNum = 3`) as a 2-norm, and only the remaining steps' weights are summed per
node before |.|. (Its comment suggests truncNum = 0 above NFE 7; its code uses 3 everywhere, and so do we: with
warmup_steps=0 the optimum degenerates, the steps collapse onto the minimum gap at t_min where eps is tiny and
cancellation hides the large-noise errors; measured at NFE 6 and 10, J drops 100-500x and the exact mixture error
grows 10-15x.)

Two sources of P (the `objective` argument):

  "lagrange" (default; the paper's Eq. 18): w[s, j] = int_{lambda_s}^{lambda_{s+1}} e^lambda l_j(lambda) dlambda, the
             integral of e^lambda against the Lagrange basis polynomial of node s-j in step s's local interpolation.
             Orders as the reference: 1 at the first and last steps, 2 next to them, `order` elsewhere
             (`paper_orders`). It depends on the solver only through the order: the paper models every solver
             built on local polynomials in lambda by the exact integral of its interpolant.
  "solver":  P read off the solver's own coefficient rows (`sensitivity.step_output_weights`), with the solver's own
             order rule; covers UniPC's corrector. DPM-Solver++'s builder runs on host arrays of B columns at once
             (`_COLUMN_BUILDERS`): an evaluation is one builder call and one reverse sweep (~0.3 ms at NFE 20); UniPC
             and the stable order rule build their rows in torch, point by point (about 10x that).
             Its rows act on x rather than x/sigma, so its values carry the factor sigma_N: compare J within one
             objective only.

Both objectives depend on the schedule only through lambda: the proxy is evaluated on the variance-preserving
alpha and sigma of each lambda, alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda), as the reference does
(it computes them from lambda, not from its noise schedule). So a schedule family (VP, VE, EDM, flow) changes only
the end points and the map back to time, and the same network re-expressed in another family gets the same steps
in lambda. p = 2 (the reference's code, Lemma 1's sigma^2/alpha) is the default; the reference recommends p = 1 for
pixel-space models, which is a constant error in the noise prediction (x0 error = e^-lambda eps-error).

The Jacobian is exact (no finite differences). For the Lagrange weights, with u = lambda - lambda_s, nodes
d_i = lambda_{s-i} - lambda_s and h = lambda_{s+1} - lambda_s:

    dw_j / dlambda_{s+1} = e^{lambda_{s+1}} l_j(h)            (upper limit)
    dw_j / dlambda_{s-i} = -l_j'(d_i) w_i  [- e^{lambda_s} if i = j = 0: the lower limit]

since moving node i changes every basis polynomial by dl_j/dd_i = -l_j'(d_i) l_i(u). For the solver rows: by complex
step where the builder takes columns (one column lambda + i h e_m per lambda_m, h = 1e-30: Im P / h is dP/dlambda_m
to rounding, no difference taken, and Re P is P), else torch's Jacobian of the rows, pushed forward through the
solver program in numpy (`sensitivity.step_output_weight_tangents`).
"""
from __future__ import annotations

import functools
import math
import types
from typing import Tuple

import numpy as np
import torch
from scipy.special import expit

from ..schedules import NoiseSchedule
from ..solvers.dpmpp import build_dpmpp
from ..solvers.grid import Grid, grid_from_lambda, grid_from_log_alpha
from ..solvers.unipc import build_unipc
from .heuristics import HEURISTICS, check_nfe, karras_sigmas, sampling_interval, with_exact_ends
from .sensitivity import step_output_weight_columns, step_output_weight_tangents

OBJECTIVES = ("lagrange", "solver")
# Only the exponential integrators: the surrogate is derived for solvers built on local polynomials in lambda
# (the paper's Eq. 10). iPNDM's Adams-Bashforth weights assume equal steps and its history holds slopes, not model
# outputs; its "optimised" steps measured 5-30x worse than the heuristics on the exact mixture.
_BUILDERS = {"dpmpp": build_dpmpp, "unipc": build_unipc}
SOLVERS = tuple(_BUILDERS)
#: the builders whose formulas run on a Grid of (N+1, B) host arrays, all B columns in one call (`_column_grid`);
#: UniPC's per-step linear solves and the stable order rule (which reads the step sizes on the host) take one point
#: per call, so they keep the torch path (a reverse-mode Jacobian of the rows, ~10x the cost)
_COLUMN_BUILDERS = ("dpmpp",)
#: (solver, order, nfe, warmup_steps, options) -> (steps, coupled nodes) of a column builder's program, found by one
#: check build at the first construction (a third of a construction at NFE 5): both depend on the program's
#: instructions alone (the order rule and the options), not on the schedule or the time steps
_COLUMN_STRUCTURE: dict = {}
#: the complex step: d f / d lambda_m = Im f(lambda + i h e_m) / h, exact to rounding for any h this small (no
#: difference is taken; the real part is f(lambda) to O(h^2)), so one builder call gives the rows and their Jacobian
_COMPLEX_STEP = 1e-30
#: the reference's initialisations ("unif", "unif_t", "edm", "quad"), by tdiff heuristic name
STARTS = ("logsnr_uniform", "uniform_t", "edm_rho", "quadratic_t")


def error_proxy(lam: np.ndarray, p: float) -> Tuple[np.ndarray, np.ndarray]:
    """eps = sigma^p / alpha on the variance-preserving alpha, sigma of lambda, and d eps / d lambda."""
    alpha_sq, sigma_sq = expit(2 * lam), expit(-2 * lam)
    eps = np.exp(0.5 * p * np.log(sigma_sq) - 0.5 * np.log(alpha_sq))
    # d log(eps)/d lambda = p/2 dlog(sigma^2) - 1/2 dlog(alpha^2) = -p alpha^2 - sigma^2
    return eps, -eps * (p * alpha_sq + sigma_sq)


def paper_orders(n_steps: int, order: int) -> list:
    """The reference's order rule: 1 at the first and last steps, 2 next to them, `order` elsewhere."""
    return [min(order, s + 1, n_steps - s) for s in range(n_steps)]


_SERIES_TERMS = 16
_SERIES_POWERS = np.arange(_SERIES_TERMS)
_INV_FACT = 1.0 / np.cumprod(np.concatenate([[1.0], np.arange(1.0, _SERIES_TERMS)]))


def exp_moments(h: np.ndarray, k: int) -> np.ndarray:
    """(len(h), k): phi_q(h) = int_0^h e^u u^q du for q < k (the reference's H0, H1, H2, ...).

    The recursion phi_q = e^h h^q - q phi_{q-1} cancels for small h (phi_q ~ h^{q+1}/(q+1)); below |h| = 1/2 the
    power series h^{q+1} sum_i h^i / (i! (q+1+i)) is used instead (16 terms: remainder < 2^-16/16!)."""
    h = np.asarray(h, dtype=np.float64)
    out = np.empty((h.size, k))
    out[:, 0] = np.expm1(h)
    exp_h, h_power = np.exp(h), np.ones_like(h)
    for m in range(1, k):
        h_power = h_power * h
        out[:, m] = exp_h * h_power - m * out[:, m - 1]
    small = np.abs(h) < 0.5
    if small.any():  # only there: the optimiser's steps are mostly wider
        hs = h[small]
        powers = np.ones((hs.size, _SERIES_TERMS + k))  # h^0 .. h^(15 + k)
        powers[:, 1:] = np.cumprod(np.broadcast_to(hs[:, None], (hs.size, _SERIES_TERMS + k - 1)), axis=1)
        q = np.arange(k)
        series = powers[:, :_SERIES_TERMS] @ (_INV_FACT[:, None] / (q + 1 + _SERIES_POWERS[:, None]))
        out[small] = series * powers[:, 1:k + 1]
    return out


def lagrange_step_weights(lam: np.ndarray, orders, jacobian: bool = True):
    """P (S, N) of the paper's Eq. 18 over lambda_0 .. lambda_N (S = N steps) and, if asked, dP/dlambda
    (S, N, N+1); else None. A batch of points lam (B, N+1) gives (B, S, N) and (B, S, N, N+1) in one pass (the
    optimiser's Hessians by differences of the Jacobian)."""
    st = _stencil(orders if isinstance(orders, tuple) else tuple(int(k) for k in orders))
    batched = lam.ndim == 2
    lam = np.atleast_2d(lam)
    b, n_steps = lam.shape[0], lam.shape[1] - 1
    weights, _, end_terms, node_terms = _lagrange_terms(lam, st, jacobian)
    jac = None
    if jacobian:
        jac = np.zeros((b, n_steps, n_steps, n_steps + 1))
        jac[:, st.s2, st.n2, st.s2_end] = end_terms
        jac[:, st.s3, st.n3j, st.n3i] = node_terms
    if not batched:
        return weights[0], None if jac is None else jac[0]
    return weights, jac


def _lagrange_terms(lam: np.ndarray, st: "_Stencil", jacobian: bool):
    """P (B, S, N) at a batch lam (B, N+1), its nonzero entries w (B, V) in `_Stencil.valid`'s order and, if asked,
    dP's nonzero entries: d/dlambda_{s+1} per valid (s, j) (B, V) and d/dlambda_{s-i} per valid (s, j, i) (B, V3);
    else None. `lagrange_step_weights` scatters them into the dense Jacobian, `SurrogateObjective.parts_batch`
    contracts them directly."""
    b, n_steps, k = lam.shape[0], lam.shape[1] - 1, st.k
    exp_lam = np.exp(lam)
    d = lam[:, st.node] - lam[:, :-1, None]  # (B, S, K) node offsets from the step's start, d[..., 0] = 0
    h = lam[:, 1:] - lam[:, :-1]
    coef = _lagrange_monomials(d, st)  # (B, S, basis, power)
    w = exp_lam[:, :-1, None] * (coef @ exp_moments(h.ravel(), k).reshape(b, n_steps, k, 1))[..., 0]
    weights = np.zeros((b, n_steps, n_steps))
    w_valid = w.reshape(b, -1)[:, st.valid_flat]
    weights[:, st.s2, st.n2] = w_valid
    if not jacobian:
        return weights, w_valid, None, None
    at_end = (coef @ (h[..., None] ** st.powers)[..., None])[..., 0]  # l_j(h)
    slope = (coef[..., 1:] * st.powers[1:]) @ np.swapaxes(d[..., None] ** st.powers[:-1], -1, -2)  # l_j'(d_i)
    node_terms = -slope * w[:, :, None, :]
    node_terms[:, :, 0, 0] -= exp_lam[:, :-1]  # the lower limit lambda_s is node 0 as well
    return (weights, w_valid, (exp_lam[:, 1:, None] * at_end).reshape(b, -1)[:, st.valid_flat],
            node_terms.reshape(b, -1)[:, st.valid3_flat])


class _Stencil:
    """Per step s of order k_s, padded to K = max order: node j is lambda_{s-j}, valid for j < k_s; and the flat
    indices of every valid (step, node) pair and (step, node j, node i) triple."""

    def __init__(self, orders: tuple):
        n_steps, self.k = len(orders), max(orders)
        s = np.arange(n_steps)[:, None]
        self.order = np.asarray(orders)
        self.two, self.three = np.flatnonzero(self.order == 2), np.flatnonzero(self.order == 3)
        self.valid = np.arange(self.k) < self.order[:, None]
        self.node = np.where(self.valid, s - np.arange(self.k), s)  # padding points at the step's own node
        self.s2, self.n2 = np.broadcast_to(s, self.valid.shape)[self.valid], self.node[self.valid]
        self.valid3 = self.valid[:, :, None] & self.valid[:, None, :]
        s3 = np.broadcast_to(s[:, :, None], self.valid3.shape)
        self.s3 = s3[self.valid3]
        self.n3j = np.broadcast_to(self.node[:, :, None], self.valid3.shape)[self.valid3]
        self.n3i = np.broadcast_to(self.node[:, None, :], self.valid3.shape)[self.valid3]
        # the same selections as flat indices, and the constants of the Jacobian (built once, used at every call)
        self.valid_flat, self.valid3_flat = np.flatnonzero(self.valid), np.flatnonzero(self.valid3)
        self.s2_end, self.powers = self.s2 + 1, np.arange(self.k)
        # `_lagrange_monomials`' flat positions in (step, basis j, power q): order 2's (j, q) = (0, 1), (1, 1), then
        # order 3's (0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2), each over its steps
        flat = lambda steps, j, q: steps * self.k * self.k + j * self.k + q
        self.monomial_flat = np.concatenate(
            [flat(self.two, 0, 1), flat(self.two, 1, 1)]
            + [flat(self.three, j, q) for j in range(3) for q in (1, 2)]).astype(np.intp)


_stencil = functools.lru_cache(maxsize=64)(_Stencil)


def _lagrange_monomials(d: np.ndarray, st: "_Stencil") -> np.ndarray:
    """coef[b, s, j, q]: the coefficient of u^q in the Lagrange basis polynomial of node j over step s's first
    order[s] nodes d[b, s] (d[..., 0] = 0; zero for a padding node j), in closed form for the orders 1 to 3 the
    objective takes:

        order 2:  l_0 = 1 - u/d_1,                          l_1 = u/d_1
        order 3:  l_0 = (u - d_1)(u - d_2) / (d_1 d_2),     l_1 = u (u - d_2) / (d_1 (d_1 - d_2)),
                  l_2 = u (u - d_1) / (d_2 (d_2 - d_1))
    (a batched Vandermonde inverse gives the same at 3-4x the cost of these few vector operations)."""
    b, n_steps, k = d.shape
    if k > 3:
        raise ValueError(f"the Lagrange weights are implemented for orders 1 to 3, got order {k}")
    coef = np.zeros((b, n_steps, k, k))
    coef[:, :, 0, 0] = 1.0
    two, three = st.two, st.three  # the steps of order 2 and 3, as index arrays (cheaper than masks)
    if two.size:
        inv_d1 = 1.0 / d[:, two, 1]
        values = [-inv_d1, inv_d1]
    else:
        values = []
    if three.size:
        d1, d2 = d[:, three, 1], d[:, three, 2]
        a0, a1, a2 = 1.0 / (d1 * d2), 1.0 / (d1 * (d1 - d2)), 1.0 / (d2 * (d2 - d1))
        values += [-(d1 + d2) * a0, a0, -d2 * a1, a1, -d1 * a2, a2]
    if values:  # one fancy-indexed write (each costs ~1.5 us, more than the arithmetic here)
        coef.reshape(b, -1)[:, st.monomial_flat] = np.concatenate(values, axis=-1)
    return coef


@functools.lru_cache(maxsize=64)
def _complex_steps(n: int) -> np.ndarray:
    """(n, 1, n): i h e_m for each of n lambdas, the complex steps of `SurrogateObjective._column_grid` (made once
    per n, read-only)."""
    step = 1j * _COMPLEX_STEP * np.eye(n)[:, None, :]
    step.flags.writeable = False
    return step


def _lambda_of(schedule: NoiseSchedule, t: torch.Tensor) -> np.ndarray:
    """lambda at float64 times t as a numpy array: on the host where the schedule evaluates there (the same formula;
    a torch evaluation of an interpolated table is ~20 dispatches, ~60 us, a tenth of an optimisation at NFE 5),
    else by torch."""
    lam = schedule.lambda_host(t.numpy()) if t.dtype == torch.float64 else None
    if lam is None:
        with torch.no_grad():
            lam = schedule.lambda_(t).numpy()
    return lam.astype(np.float64, copy=False)


class SurrogateObjective:
    """J(lambda interior) for one (schedule, nfe, objective, solver, order, p), as numpy callables for scipy, with
    its split into the smooth part (the alone steps' norms) and the per-node sums c (whose |.| makes the kinks)."""

    def __init__(self, schedule: NoiseSchedule, nfe: int, solver: str = "dpmpp", order: int = 3, p: float = 2.0,
                 objective: str = "lagrange", t_max=None, t_min=None, warmup_steps: int = 3, **solver_opts):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3 (the orders of {SOLVERS}), got {order!r}")
        if isinstance(p, bool) or not (isinstance(p, (int, float)) and 0 < p < math.inf):
            raise ValueError(f"p must be a finite number > 0, got {p!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if objective == "lagrange" and solver_opts:
            raise ValueError(f"solver options {sorted(solver_opts)} apply to objective='solver' only; the 'lagrange' "
                             "objective depends on the solver through `order` alone")
        self.schedule, self.nfe = schedule, check_nfe(nfe, minimum=2)
        self.solver, self.order, self.p, self.objective = solver, order, float(p), objective
        self.warmup_steps, self.solver_opts = warmup_steps, solver_opts
        hi, lo = sampling_interval(schedule, t_max, t_min)
        self.t_hi, self.t_lo = hi, lo
        lam_ends = _lambda_of(schedule, torch.stack([hi, lo]))
        if not np.isfinite(lam_ends).all():
            raise ValueError(f"lambda = log(alpha/sigma) must be finite at t_max and t_min (got {lam_ends.tolist()} "
                             f"for {schedule!r}); move them inside the schedule's domain")
        self.lam_start, self.lam_end = float(lam_ends[0]), float(lam_ends[1])
        stable_rule = solver_opts.get("order_rule", "diffusers") == "stable" and solver_opts.get("lower_order_final",
                                                                                                   True)
        self._columns = objective == "solver" and solver in _COLUMN_BUILDERS and not stable_rule
        #: whether a value and its Jacobian cost little more than the value alone (one pass gives both)
        self.cheap_jacobian = objective == "lagrange" or self._columns
        self._orders = tuple(paper_orders(self.nfe, order))
        self._cache_key, self._cache = None, None
        structure_key = (solver, order, self.nfe, warmup_steps, tuple(sorted(solver_opts.items())))
        try:
            known = _COLUMN_STRUCTURE.get(structure_key) if self._columns else None
        except TypeError:  # an unhashable option value: checked afresh
            known, structure_key = None, None
        if known is not None:  # these options were checked before: the same program structure
            n_steps, self.coupled = known[0], known[1].copy()
        else:
            if objective == "solver":
                lam0 = self.full(self.initial())
                # refuses a bad order or option up front
                check = self._build(self._column_grid(lam0[None], False)) if self._columns else \
                    _BUILDERS[solver](grid_from_lambda(schedule, torch.from_numpy(lam0)), None, order=order,
                                      **solver_opts)
                n_steps = len(check.steps)
            else:
                n_steps = self.nfe
            alone = (np.arange(n_steps) < warmup_steps) | (np.arange(n_steps) == n_steps - 1)
            # the solver rows' weights from the check's columns (`_column_weights` without a second build)
            weights = step_output_weight_columns(check)[0] if self._columns else \
                self.step_weights(self.full(self.initial()), jacobian=False)[0]
            # nodes that only alone steps use have c_n = 0 identically: no kink, no slack variable
            self.coupled = np.abs(weights[~alone]).sum(0) > 0
            if self._columns and structure_key is not None:
                _COLUMN_STRUCTURE[structure_key] = (n_steps, self.coupled.copy())
        steps = np.arange(n_steps)
        self.alone = (steps < warmup_steps) | (steps == n_steps - 1)
        # the same as index arrays: each evaluation indexes with them (masks cost a conversion every time)
        self._alone_steps, self._summed_steps = np.flatnonzero(self.alone), np.flatnonzero(~self.alone)
        # the summed steps are those after the warm-up but the last: a slice (a view, where indices copy)
        self._summed_range = slice(min(warmup_steps, n_steps - 1), n_steps - 1)
        self._coupled_nodes = np.flatnonzero(self.coupled)
        self._interior_nodes = np.arange(1, self.nfe - 1)  # nodes 1 .. N-2: their own lambda is interior

    # ----- lambda <-> interior vector -----
    def full(self, z: np.ndarray) -> np.ndarray:
        return np.concatenate([[self.lam_start], np.asarray(z, dtype=np.float64), [self.lam_end]])

    def timesteps(self, z: np.ndarray) -> torch.Tensor:
        lam = self.full(z)
        t = self.schedule.t_from_lambda_host(lam)  # on the host where the schedule inverts there
        if t is None:
            with torch.no_grad():
                t = self.schedule.t_from_lambda(torch.from_numpy(lam))
        else:
            t = torch.from_numpy(t)
        return with_exact_ends(t, self.t_hi, self.t_lo)

    def initial(self, start: str = "logsnr_uniform") -> np.ndarray:
        """Interior lambdas of a heuristic schedule (the reference's "unif" is logsnr_uniform)."""
        return self.initials((start,))[0]

    def initials(self, starts) -> list:
        """`initial` of several starts. Those spaced in lambda or EDM sigma (= e^-lambda) are placed in lambda
        directly, exact and without torch; those spaced in t go through the schedule's lambda in one call."""
        if any(start not in STARTS for start in starts):
            raise ValueError(f"start must be one of {STARTS}, got {starts!r}")
        u = np.linspace(0.0, 1.0, self.nfe + 1)[1:-1]
        out = {"logsnr_uniform": self.lam_start + u * (self.lam_end - self.lam_start)}
        if "edm_rho" in starts:
            out["edm_rho"] = -np.log(karras_sigmas(np.exp(-self.lam_start), np.exp(-self.lam_end), u))
        in_t = [start for start in starts if start not in out]
        if in_t:
            t = torch.cat([HEURISTICS[start](self.schedule, self.nfe, t_max=self.t_hi, t_min=self.t_lo)[1:-1]
                           for start in in_t])
            lam = _lambda_of(self.schedule, t).reshape(len(in_t), -1)
            out.update(zip(in_t, lam))
        return [out[start] for start in starts]

    # ----- the objective -----
    def step_weights(self, lam: np.ndarray, jacobian: bool = True):
        """P (S, N) and, if asked, dP/dlambda (S, N, N+1); with a batch lam (B, N+1), (B, S, N) and (B, S, N, N+1)."""
        if self.objective == "lagrange":
            return lagrange_step_weights(lam, self._orders, jacobian)
        if self._columns:
            return self._column_weights(lam, jacobian)
        if lam.ndim == 2:  # the solver's program is built point by point
            pairs = [self.step_weights(row, jacobian) for row in lam]
            return np.stack([w for w, _ in pairs]), np.stack([j for _, j in pairs]) if jacobian else None
        build = _BUILDERS[self.solver]

        def rows_of(lam_t):
            return build(grid_from_lambda(self.schedule, lam_t), None, order=self.order, **self.solver_opts)

        return step_output_weight_tangents(rows_of, torch.from_numpy(lam), jacobian)

    def _build(self, grid: Grid):
        return _BUILDERS[self.solver](grid, None, order=self.order, **self.solver_opts)

    def _column_grid(self, lam: np.ndarray, jacobian: bool) -> Grid:
        """The Grid of B host columns for a batch lam (M, N+1): the M points (B = M), or with `jacobian` each
        point's N+1 complex steps (B = M (N+1); column (i, m) is lambda_i + i h e_m). alpha and sigma by
        `grid_from_log_alpha`, as `grid_from_lambda` makes them; log alpha's complex step from its derivative (the
        schedule's closed form of lambda is element-wise; torch has no complex logaddexp)."""
        log_alpha_real = self.schedule.log_alpha_from_lambda(lam.T)  # (N+1, M), on the host
        if not jacobian:
            return grid_from_log_alpha(log_alpha_real, lam.T)
        slope = self.schedule.log_alpha_slope_from_lambda(lam.T)
        step = _complex_steps(lam.shape[1])  # (N+1, 1, N+1): lambda_m's tangent
        lam_c = (lam.T[:, :, None] + step).reshape(lam.shape[1], -1)
        log_alpha = (log_alpha_real[:, :, None] + slope[:, :, None] * step).reshape(lam.shape[1], -1)
        return grid_from_log_alpha(log_alpha, lam_c)

    def _column_weights(self, lam: np.ndarray, jacobian: bool):
        """`step_weights` of the solver rows by one builder call over all columns (`_column_grid`) and one reverse
        sweep (`sensitivity.step_output_weight_columns`)."""
        points = np.atleast_2d(lam)
        weights = step_output_weight_columns(self._build(self._column_grid(points, jacobian)))  # (B, S, N)
        jac = None
        if jacobian:
            weights = weights.reshape(points.shape[0], points.shape[1], *weights.shape[1:])  # (M, N+1, S, N)
            jac = np.moveaxis(weights.imag, 1, -1) / _COMPLEX_STEP
            weights = weights[:, 0].real
        if lam.ndim == 1:
            return weights[0], None if jac is None else jac[0]
        return weights, jac

    def parts(self, z: np.ndarray, jacobian: bool = True):
        """(smooth, d smooth/dz, c over coupled nodes, dc/dz): J = smooth + sum |c|. Memoised on z, since scipy asks
        for the value, the gradient and the constraints at the same point in separate calls."""
        key = (np.asarray(z, dtype=np.float64).tobytes(), jacobian)
        if self._cache_key == key or (not jacobian and self._cache_key == (key[0], True)):
            return self._cache
        smooth, d_smooth, c, dc = self.parts_batch(np.asarray(z, dtype=np.float64)[None], jacobian)
        self._cache_key, self._cache = key, (float(smooth[0]), None if d_smooth is None else d_smooth[0], c[0],
                                             None if dc is None else dc[0])
        return self._cache

    def parts_batch(self, z: np.ndarray, jacobian: bool = True):
        """`parts` at a batch of points z (B, N-1): smooth (B,), d smooth/dz (B, N-1), c (B, m), dc/dz (B, m, N-1)."""
        lam = np.empty((z.shape[0], z.shape[1] + 2))
        lam[:, 0], lam[:, 1:-1], lam[:, -1] = self.lam_start, z, self.lam_end
        if jacobian and self._columns:
            return self._column_parts(lam)
        sparse = jacobian and self.objective == "lagrange"
        if sparse:  # the Jacobian's nonzero entries only, contracted below by two products with constant matrices
            weights, w_valid, end_terms, node_terms = _lagrange_terms(lam, _stencil(self._orders), True)
            jac = None
        else:
            weights, jac = self.step_weights(lam, jacobian)
        eps, deps = error_proxy(lam[:, :-1], self.p)
        weighted = weights * eps[:, None, :]
        alone_rows = weighted[:, self._alone_steps]
        norms = np.sqrt(np.einsum("bsn,bsn->bs", alone_rows, alone_rows))
        smooth = norms.sum(-1)
        c = weighted[:, self._summed_steps].sum(1)[:, self._coupled_nodes]
        d_smooth = dc = None
        if sparse:
            con = self._contraction
            # entry e of d(weighted) = dP_e eps_n(e), or P_e eps'_n(e) on the diagonal (m = n)
            terms = np.concatenate([end_terms, node_terms, w_valid], axis=1) \
                * np.concatenate([eps, deps], axis=1)[:, con.proxy]
            unit = (alone_rows / np.maximum(norms, 1e-300)[..., None]).reshape(z.shape[0], -1)
            d_smooth = (terms[:, con.alone] * unit[:, con.unit]) @ con.to_smooth
            dc = (terms @ con.to_c).reshape(z.shape[0], self._coupled_nodes.size, z.shape[1])
        elif jacobian:
            # d(weighted)[s, n, m] = dP[s, n, m] eps_n + P[s, n] eps'_n [m = n]
            dweighted = jac * eps[:, None, :, None]
            idx = np.arange(lam.shape[1] - 1)
            dweighted[:, :, idx, idx] += weights * deps[:, None, :]
            d_smooth = np.einsum("bsn,bsnm->bm", alone_rows / np.maximum(norms, 1e-300)[..., None],
                                 dweighted[:, self._alone_steps])[:, 1:-1]
            dc = dweighted[:, self._summed_steps].sum(1)[:, self._coupled_nodes, 1:-1]
        return smooth, d_smooth, c, dc

    def _column_parts(self, lam: np.ndarray):
        """`parts_batch` with the Jacobian for the solver rows on complex-step columns, contracted from the columns'
        weights without forming the dense dP (M, S, N, N+1): only the alone steps' rows (a few) and the summed steps'
        per-node sums are read off the imaginary parts (at NFE 20 the dense path cost 8 of a Hessian pass's 9 ms).
        With W[b, m] the weights of point b's column m (m = 0: no step; Im W[b, m] / h = dP/dlambda_m):

            d smooth/dlambda_m = sum_{s alone, n} u[s, n] (eps_n dP[s, n, m] + P[s, n] eps'_n [m = n])
            dc_n/dlambda_m     = eps_n sum_{s summed} dP[s, n, m] + eps'_n sum_{s summed} P[s, n] [m = n]

        with u the unit vectors of the alone rows eps P[s, :]."""
        n_points, n_lam = lam.shape
        columns = step_output_weight_columns(self._build(self._column_grid(lam, True)))  # (M (N+1), S, N)
        columns = columns.reshape(n_points, n_lam, *columns.shape[1:])  # a view: point, complex step, step, node
        eps, deps = error_proxy(lam[:, :-1], self.p)
        # (products and sums rather than einsum, transpose rather than swapaxes: numpy's Python-level wrappers cost
        # more than these small arrays' arithmetic, and this runs once per pass)
        alone = columns[:, :, self._alone_steps]  # (M, N+1, A, N): a few steps, copied
        alone_p = alone[:, 0].real
        alone_rows = alone_p * eps[:, None, :]
        norms = np.sqrt((alone_rows * alone_rows).sum(-1))
        unit = alone_rows / np.maximum(norms, 1e-300)[..., None]
        summed = columns[:, :, self._summed_range].sum(2)  # (M, N+1, N): one strided reduction, no copy first
        summed_p = summed[:, 0].real
        c = (summed_p * eps)[:, self._coupled_nodes]
        # the diagonal terms P eps' land on lambda m = n, n < N
        d_smooth = (alone.imag * (unit * eps[:, None, :])[:, None]).sum((2, 3)) / _COMPLEX_STEP
        d_smooth[:, :-1] += (unit * alone_p).sum(1) * deps
        dc = summed.imag[:, 1:-1].transpose(0, 2, 1) * (eps / _COMPLEX_STEP)[:, :, None]  # (M, N, N-1) interior m
        nodes = self._interior_nodes  # node n = m for interior m < N
        dc[:, nodes, nodes - 1] += (summed_p * deps)[:, nodes]
        return norms.sum(-1), d_smooth[:, 1:-1], c, dc[:, self._coupled_nodes]

    @functools.cached_property
    def _contraction(self):
        """The constants of `parts_batch`'s sparse Jacobian (the paper's objective): per nonzero entry e = (step s,
        node n, lambda m) of d(weighted), in `_lagrange_terms`' order then the diagonal P eps' terms: `proxy` (the
        column of [eps, eps'] it is scaled by); `alone` (the entries of alone steps) with `unit` (their position in
        the alone rows, flat) and `to_smooth` (one-hot of their interior m); `to_c` (E, m * (N-1)), one-hot of
        (coupled n, interior m) for the summed steps' entries. A product with these replaces the dense (S, N, N+1)
        Jacobian and its scatters and reductions (most of an evaluation's cost at NFE 5-6)."""
        st, n = _stencil(self._orders), self.nfe
        step = np.concatenate([st.s2, st.s3, st.s2])
        node = np.concatenate([st.n2, st.n3j, st.n2])
        lam_index = np.concatenate([st.s2_end, st.n3i, st.n2])
        proxy = np.concatenate([st.n2, st.n3j, n + st.n2])
        interior = (lam_index >= 1) & (lam_index <= n - 1)
        alone_pos = np.full(n, -1)
        alone_pos[self._alone_steps] = np.arange(self._alone_steps.size)
        alone = np.flatnonzero(self.alone[step] & interior)
        to_smooth = np.zeros((alone.size, n - 1))
        to_smooth[np.arange(alone.size), lam_index[alone] - 1] = 1.0
        coupled_pos = np.full(n, -1)
        coupled_pos[self._coupled_nodes] = np.arange(self._coupled_nodes.size)
        summed = np.flatnonzero(~self.alone[step] & self.coupled[node] & interior)
        to_c = np.zeros((step.size, self._coupled_nodes.size * (n - 1)))
        to_c[summed, coupled_pos[node[summed]] * (n - 1) + lam_index[summed] - 1] = 1.0
        return types.SimpleNamespace(proxy=proxy, alone=alone, unit=alone_pos[step[alone]] * n + node[alone],
                                     to_smooth=to_smooth, to_c=to_c)

    def fun(self, z: np.ndarray) -> float:
        smooth, _, c, _ = self.parts(z, jacobian=False)
        return smooth + float(np.abs(c).sum())

    def fun_batch(self, z: np.ndarray) -> np.ndarray:
        """J at a batch of points z (B, N-1), in one pass."""
        smooth, _, c, _ = self.parts_batch(z, jacobian=False)
        return smooth + np.abs(c).sum(-1)

    def fun_and_grad(self, z: np.ndarray):
        smooth, d_smooth, c, dc = self.parts(z)
        # a subgradient at a kink (sign 0 there)
        return smooth + float(np.abs(c).sum()), d_smooth + np.sign(c) @ dc

    def grad(self, z: np.ndarray) -> np.ndarray:
        return self.fun_and_grad(z)[1]
