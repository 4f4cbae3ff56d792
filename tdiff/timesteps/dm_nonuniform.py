"""DM-NonUniform (Xue et al. 2024): time steps that minimise a bound on the accumulated model error.

The objective (`dmn_objective.SurrogateObjective`) is J(lambda) = smooth(lambda) + sum_n |c_n(lambda)| over the N-1
interior lambdas, with lambda_0 = lambda(t_max) and lambda_N = lambda(t_min) fixed and the lambdas increasing. The
|.| terms make it non-smooth exactly where it matters: at the optimum several c_n are zero (the errors of different
steps cancel there), so a smooth optimiser stalls at the kinks (SLSQP "converged" after 29 iterations 54% above
the optimum at NFE 10) and the reference's finite-difference trust-constr crawls (20-40 s, poor optimality).

The default method ("sqp") removes the kinks with slack variables, an LP-like smooth reformulation:

    min_{lambda, s}  smooth(lambda) + sum_n s_n   s.t.   -s_n <= c_n(lambda) <= s_n,
                     lambda_{i+1} - lambda_i >= margin,

solved by SQP with the exact Jacobians of smooth and c and the exact Lagrangian Hessian (`_exact_sqp`: the Hessian by
differences of the Jacobian at n probes, all in one batched pass; each step a small QP solved by DAQP, which picks
the kinks and the gaps at the margin itself; ~10-25 iterations where SLSQP's BFGS took ~200 at NFE 20), from several
starts (the reference's initialisations: uniform logSNR, uniform t, EDM rho = 7, quadratic t), screened: each start
gets a short burst of iterations and only the leader afterwards runs to the end (`_optimise`; 2-3x fewer iterations
than running every start to the end, at the same optimum in every setting checked). SLSQP (`_slsqp`) remains where a
Jacobian is not one cheap pass (UniPC's rows, by torch) and as the fallback. At a solution s_n = |c_n|, so both
problems have the same minimisers; the kinks become active constraints. SLSQP's quasi-Newton model converges only
linearly along the kinks' manifold (~250 iterations per start at NFE 20), and so does the SQP with its Hessian's
negative eigenvalues floored to make the QP convex, so Newton on the active set's KKT system finishes
(`_active_set_newton`, tried along the way and at the end, kept only where it certifies a local minimum): across
VP/VE/EDM/flow schedules, p 1 and 2, orders 2 and 3, NFE 5-20, the result matches a 1e-14-tolerance SLSQP run to 1e-13
relative. With the paper's objective Newton is first tried from the leading start itself: where the optimum has no kink
(no c_n = 0, no gap at the margin: NFE 5 and 6 for the DDPM, cosine, EDM and flow schedules at order 3) it certifies
the optimum there without any SLSQP iteration (7 batched passes, 1.6x faster end to end at NFE 5 and 6); elsewhere the
try fails after 1-2 passes and SLSQP runs as before (over those 256 settings, J never above the SLSQP-first result by
more than 5e-14 relative). With the solver rows' objective (complex-step Jacobians: a Hessian is one batched pass as
well) the same try runs, first from the heuristic start of lowest J (`_heuristic_start_try`): where it certifies
(NFE 5 here) the "lagrange" start, which optimises the paper's objective first, is never computed. A full-Newton
try reads the active set and J at its start from its own first batched pass (no separate evaluation).

method="trust-constr" is the reference's optimiser (scipy trust-constr, BFGS Hessian, from uniform logSNR, its
default iteration limit of 1000), with finite-difference gradients as the reference or the exact ones.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Sequence

import numpy as np
from scipy.linalg import lapack, null_space
from scipy.optimize import LinearConstraint, OptimizeResult, minimize

from ..integrations.diffusers.pipelines import from_pipeline, is_pipeline
from ..schedules import NoiseSchedule
from .dmn_objective import OBJECTIVES, STARTS, SurrogateObjective, paper_orders
from .heuristics import check_nfe

# a multi-threaded BLAS under SLSQP's tiny subproblems costs 40x on a loaded machine (2.7 vs 0.07 ms a call)
from threadpoolctl import ThreadpoolController

import daqp  # the exact-Hessian SQP's QP solver (`_exact_sqp`; a dual active-set method)

METHODS = ("sqp", "trust-constr")
_BURST = 3  # SLSQP iterations every start gets before only the leader continues (`_optimise`)
_CHORD_CONTRACTION = 0.03  # `_active_set_newton` keeps its Hessian while a step shrinks the KKT residual this much
_HESSIAN_STEP = 1e-7  # of the forward differences of the exact gradient that give `_active_set_newton` its Hessian
_RANK_STARTS_UP_TO = 10  # up to this NFE the starts are ranked by their own J, without a burst (`_optimise`)
#: per objective, how many times a Newton try may retry with the kinks released whose multiplier came out above 1
#: (`_active_set_newton`'s report). Chosen on the solver rows' objective (cosine, EDM and flow schedules, orders 2
#: and 3, p 1 and 2, NFE 16 and 20; not the bench's DDPM): 6% less time in all, never a higher J, and 1.6x faster
#: where it applies (a kink guessed from |c_n| small that Newton then shows to be none); guessing with larger
#: thresholds as well (1e-3, 1e-2) cost more tries than it saved. The paper's objective is left as it was.
_RELEASE_ROUNDS = {"lagrange": 0, "solver": 3}
#: the objectives whose slack SQP runs with the exact Hessian (`_exact_sqp`) rather than SLSQP's BFGS; both, since
#: both Jacobians are one batched pass (the paper's analytic one, the solver rows' by complex step)
_EXACT_SQP = ("lagrange", "solver")
#: `_exact_sqp`'s QP has no curvature in the slacks: DAQP solves it by proximal iterations (exact in the limit), with
#: this weight relative to the largest eigenvalue of H, and at most `_QP_ITERATIONS` iterations. Chosen on the cosine,
#: EDM and flow schedules (NFE 6, 12, 16, 20, both objectives): a small curvature rho on the slacks instead either
#: cycled (rho = 1e-6 of H's largest eigenvalue; it also biases the model by rho |c|, 5e-6 in J once) or ran into
#: the iteration limit (rho = 1e-6 / max |c|, unbiased but ill-conditioned: 10x the time); a weight of 1e-6 took 1.3x
#: the time of 1e-4.
_QP_PROXIMAL = 1e-4
_QP_ITERATIONS = 2000
#: full-Newton steps a try on an SQP iterate's active set may take (`_exact_sqp`); 4 lost a certification at NFE 20
_SETTLED_NEWTON_STEPS = 6
#: `_active_set_newton` stops at a gradient this small (relative) where no constraint is active (no kink, no gap at
#: the margin): J is then smooth at the point and its error quadratic in the gradient (~1e-16 relative here), so
#: the pass that would take it to 1e-13 (one of 5-6 at NFE 5 and 6) is not needed
_SMOOTH_NEWTON_TOL = 1e-8
#: `_active_set_newton`'s predicted finish applies only below this residual (relative, as the tolerance), deep in
#: the quadratic basin
_FINISH_BELOW = 1e-3
GRADIENTS = ("analytic", "finite-difference")
__all__ = ["dm_nonuniform", "sampling_options", "METHODS", "GRADIENTS", "OBJECTIVES", "STARTS", "SurrogateObjective"]


def sampling_options(nfe: int, order: int, objective: str = "lagrange") -> dict:
    """The solver options to sample DM-NonUniform's steps with: the order plan its objective assumed. The paper's
    objective assumes the reference's orders (1 at the first and last steps, 2 next to them, `order` elsewhere),
    the solver-row objective the builders' own (diffusers') rule; `sample()`'s default stable rule is neither.
    `tdiff.sample(den, x, dm_nonuniform(s, n, "dpmpp", 3), "dpmpp", 3, **sampling_options(n, 3))`."""
    check_nfe(nfe)
    if objective == "lagrange":
        if isinstance(order, bool) or order not in (1, 2, 3):
            raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
        return {"orders": paper_orders(nfe, order)}
    if objective == "solver":
        return {"order_rule": "diffusers"}
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def dm_nonuniform(schedule: NoiseSchedule, nfe: int, solver: str = "dpmpp", order: int = 3, p: float = 2.0, *,
                  objective: str = "lagrange", method: str = "sqp", gradient: str = "analytic",
                  starts: Optional[Sequence[str]] = None, t_max=None, t_min=None, margin: Optional[float] = None,
                  maxiter: Optional[int] = None, tol: Optional[float] = None, warmup_steps: int = 3,
                  return_result: bool = False, **solver_opts):
    """Optimised time steps (N+1 decreasing schedule times, the ends exact) for `solver`/`order` at `nfe` calls.

    objective: "lagrange" (the paper's Eq. 18 weights, default) or "solver" (the solver's own coefficient rows;
        takes the solver's options, e.g. variant= for UniPC). See `tdiff.timesteps.dmn_objective`.
    p: exponent of the error proxy sigma^p/alpha: 2 (default, the reference's code and the paper's Lemma 1); the
        reference recommends 1 for pixel-space models.
    method: "sqp" (slack reformulation, exact Jacobians, several starts; default) or "trust-constr" (the reference).
    gradient: for "trust-constr" only: "analytic" or "finite-difference" (the reference's).
    starts: the initialisations, of `STARTS` (the reference's four heuristics) and, for objective="solver",
        "lagrange" (the optimum of the paper's objective at the same order and p). Defaults: for "sqp" all four
        heuristics with the paper's objective, ("lagrange", "logsnr_uniform") with the solver's (each of its
        evaluations costs ~10x more); for trust-constr ("logsnr_uniform",), the reference's "unif". Every start's own
        J counts as a candidate, so the result is never worse than the best start. With "lagrange" among them (and a
        complex-step Jacobian), full Newton from the best other start (by default: the best of all four heuristics by
        J, one batched evaluation; 1-3 fewer Newton passes than from uniform logSNR on the cosine, EDM and flow
        schedules at NFE 5) is tried first; a certified local minimum there is the result, and the "lagrange"
        start is not computed (checked on the cosine, EDM and flow schedules, orders 2 and 3, p 1 and 2, NFE 5, 6,
        8, 12, 16: J never changed by more than 1e-13 relative).
    margin: the smallest lambda gap (default 1e-3 of the lambda range / N; the reference uses 0, which lets the
        Lagrange weights divide by zero).
    maxiter, tol: per start; defaults 300 and 1e-7 (SLSQP's ftol, relative to J at the start; Newton then
        converges) for "sqp", 1000 and 1e-8 (gtol and xtol) for trust-constr: scipy's defaults, which the
        reference keeps.
    warmup_steps: the first steps counted alone, without cancellation (the reference's truncNum = 3).
    return_result: also return a scipy OptimizeResult: x (interior lambdas), fun (J there), start (the winning
        start), nit and nfev (summed over starts), per_start ({start: J reached}).
    """
    if is_pipeline(schedule, solver_opts.get("pipeline_kwargs")):  # a diffusers pipeline: a TdiffScheduler for its config (integrations.diffusers)
        return from_pipeline(dm_nonuniform, locals())
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if method == "sqp" and gradient != "analytic":
        raise ValueError("gradient='finite-difference' applies to method='trust-constr' only (the slack SQP needs "
                         "the constraint Jacobian)")
    obj = SurrogateObjective(schedule, nfe, solver, order, p, objective, t_max, t_min, warmup_steps, **solver_opts)
    valid_starts = STARTS + (("lagrange",) if objective == "solver" else ())
    # the heuristics ranked for the solver rows' first Newton try: all four by default (`_heuristic_start_try`)
    try_starts = STARTS if starts is None else None
    if starts is None:
        starts = ("logsnr_uniform",) if method == "trust-constr" else \
            STARTS if objective == "lagrange" else ("lagrange", "logsnr_uniform")
    starts = (starts,) if isinstance(starts, str) else tuple(starts)
    if not starts or any(s not in valid_starts for s in starts):
        raise ValueError(f"starts must be a non-empty sequence of {valid_starts}, got {starts!r}")
    span = obj.lam_end - obj.lam_start
    margin = 1e-3 * span / nfe if margin is None else float(margin)
    if not 0 <= margin < span / nfe:
        raise ValueError(f"margin must be in [0, lambda range / nfe = {span / nfe:.4g}), got {margin}")
    maxiter = (300 if method == "sqp" else 1000) if maxiter is None else maxiter
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be an integer >= 1, got {maxiter!r}")
    tol = (1e-7 if method == "sqp" else 1e-8) if tol is None else float(tol)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")

    # SQP and Newton steps may probe far outside the interval (exp overflows there): J is then inf or NaN and the
    # point is rejected, so the floating-point warnings say nothing
    with _single_threaded_blas(), np.errstate(all="ignore"):
        best, per_start, nit, nfev = _optimise(obj, starts, method, gradient, margin, maxiter, tol,
                                               try_starts=try_starts)
    if best is None or not np.isfinite(best[0]):
        raise RuntimeError(f"DM-NonUniform found no increasing lambdas (per start: {per_start}); check t_max/t_min")
    t = obj.timesteps(best[1])
    if not return_result:
        return t
    return t, OptimizeResult(x=best[1], fun=best[0], start=best[2], nit=nit, nfev=nfev, per_start=per_start,
                             objective=objective, method=method, p=obj.p, order=order, margin=margin,
                             warmup_steps=warmup_steps)


@functools.lru_cache(maxsize=None)
def _controller() -> ThreadpoolController:
    """The BLAS libraries, found once: threadpool_limits() searches the loaded libraries at every call (2-5 ms, more
    than the whole optimisation at NFE 5)."""
    return ThreadpoolController()


@contextlib.contextmanager
def _single_threaded_blas():
    """The BLAS libraries limited to one thread for the block, unless every one already runs one (the limit's own
    bookkeeping, ~20 us a call, is then skipped)."""
    controller = _controller()
    if all(lib.num_threads == 1 for lib in controller.lib_controllers):
        yield
    else:
        with controller.limit(limits=1):
            yield


def _optimise(obj: SurrogateObjective, starts, method: str, gradient: str, margin: float, maxiter: int,
              tol: float, burst: Optional[int] = None, try_starts: Optional[Sequence[str]] = None):
    """Run from every start; (J, z, start) of the best point seen, J per start, total iterations and evaluations.

    With "sqp" and several starts, the starts are screened: each runs `burst` SLSQP iterations (default `_BURST`
    above NFE 10, none up to it; no Newton try); then the leader runs to the end from its point, and the next ones
    in the order of their J only while none has ended at a point Newton certified a local minimum (an uncertified end
    may be a stall). A start left after the burst reports its J there in per_start. Checked against running every start
    to the end (the best one winning where they do not all reach the same minimum): on the paper's objective for the
    DDPM, cosine, EDM and flow schedules, orders 2 and 3, p 1 and 2, NFE 5, 6, 7, 8, 10, 12, 14, 15, 16, 18, 20 (176
    settings), the screened J was never above by more than 1e-13 relative; on the solver-row objective, DDPM and
    cosine, orders 2 and 3, p 1 and 2, NFE 5, 8, 12, 16 (32 settings), within 1e-9 but for one (cosine, order 3, p 1,
    NFE 16: 4.7e-5 above with the leader alone, 4e-15 with the fallback). A burst of 5 lost 46% in one setting (cosine,
    order 2, p 2, NFE 20, where two starts fail), with the fallback too, so the burst is kept short.

    Up to NFE `_RANK_STARTS_UP_TO` (10) there is no burst: the starts are ranked by their own J (one batched
    evaluation), half the evaluations at NFE 5. Checked against the burst of 3 on the paper's objective (DDPM,
    cosine, EDM, flow; orders 2 and 3; p 1 and 2; NFE 5 to 20, 256 settings): never above by more than 6e-14 relative
    up to NFE 18, 1.6e-7 once at NFE 19 (cosine, order 3, p 2), hence the limit; on the solver rows' (same grid, NFE
    5 and 8) never above by more than 5e-16."""
    nfe = obj.nfe
    burst = (0 if nfe <= _RANK_STARTS_UP_TO else _BURST) if burst is None else burst
    screen = method == "sqp" and len(starts) > 1 and burst < maxiter
    best, per_start, nit, nfev, after_burst = None, {}, 0, 0, []

    def consider(start, points, values=None):  # the best J among points; keeps the best point seen
        nonlocal best
        values = _values(obj, points, margin) if values is None else values
        i = int(np.argmin(values))
        if best is None or values[i] < best[0]:
            best = (values[i], points[i], start)
        return values[i]

    if method == "sqp" and "lagrange" in starts and obj.cheap_jacobian:
        early = _heuristic_start_try(obj, try_starts or [start for start in starts if start != "lagrange"], margin)
        if early is not None:
            return early
    z0s = _start_points(obj, starts, margin, maxiter, tol)
    start_values = _values(obj, z0s, margin)  # one batched evaluation
    for start, z0, j0 in zip(starts, z0s, start_values):
        consider(start, [z0], [j0])  # a start is a candidate too
        if method == "trust-constr":
            res = _trust_constr(obj, z0, margin, maxiter, tol, gradient)
            points = [res.x]
        elif screen and burst == 0:  # ranked by the starts' own J
            per_start[start] = j0
            after_burst.append((j0, start, z0))
            continue
        elif screen:
            res, _ = _slack_sqp(obj, z0, margin, burst, tol, newton=False)
            points = [res.x[: nfe - 1]]
        else:
            res, polished = _slack_sqp(obj, z0, margin, maxiter, tol)
            points = [res.x[: nfe - 1]] + ([polished] if polished is not None else [])
        nit, nfev = nit + res.nit, nfev + res.nfev
        per_start[start] = consider(start, points)
        if screen:
            after_burst.append((per_start[start], start, points[0] if np.isfinite(per_start[start]) else z0))
    for _, start, z in sorted(after_burst, key=lambda run: run[0]):
        res, polished = _slack_sqp(obj, z, margin, maxiter - burst, tol)
        nit, nfev = nit + res.nit, nfev + res.nfev
        per_start[start] = min(per_start[start],
                               consider(start, [res.x[: nfe - 1]] + ([polished] if polished is not None else [])))
        if polished is not None:
            break
    return best, per_start, nit, nfev


def _heuristic_start_try(obj: SurrogateObjective, heuristics, margin: float):
    """`_optimise`'s result when full Newton from the best heuristic start certifies a local minimum, else None: the
    "lagrange" start (optimising the paper's objective first: ~40% of the time at NFE 5) is then not needed."""
    if not heuristics:
        return None
    points = obj.initials(heuristics)
    first = None
    if len(points) == 1:  # one start: no ranking
        values = np.zeros(1)
    else:
        # ranked by J from full Newton's first batched pass at every start (each point and its probes): Newton from
        # the best then starts from that pass (one pass fewer than ranking by a separate evaluation: 10% less time
        # at NFE 5, where the try certifies; the same J on the cosine, EDM and flow schedules, orders 2 and 3, p 1
        # and 2, NFE 5, 6, 8)
        ok = np.array([_increasing(obj, z, margin * (1 - 1e-6)) for z in points])
        values = np.full(len(points), np.inf)
        if ok.any():
            width = points[0].size + 1
            probes = _hessian_probes(width - 1)
            batch = obj.parts_batch(np.concatenate([z + probes for z, good in zip(points, ok) if good]))
            values[ok] = batch[0][::width] + np.abs(batch[2][::width]).sum(-1)
        i = int(np.argmin(values))
        if np.isfinite(values[i]):
            at = int(ok[:i].sum()) * width
            first = tuple(part[at:at + width] for part in batch)
    i = int(np.argmin(values))
    done = _newton_try(obj, points[i], margin, full_newton=True, first=first) if np.isfinite(values[i]) else None
    if done is None:
        return None
    per_start = {**dict(zip(heuristics, values)), heuristics[i]: done[0]} if len(points) > 1 else \
        {heuristics[i]: done[0]}
    return (done[0], done[1], heuristics[i]), per_start, 0, 0


def _start_points(obj: SurrogateObjective, starts, margin: float, maxiter: int, tol: float) -> list:
    heuristics = obj.initials([start for start in starts if start != "lagrange"])
    return [_lagrange_optimum(obj, margin, maxiter, tol) if start == "lagrange" else heuristics.pop(0)
            for start in starts]


def _lagrange_optimum(obj: SurrogateObjective, margin: float, maxiter: int, tol: float) -> np.ndarray:
    # the paper's objective models the same solver: its optimum (cheap) is a good start for the solver rows'
    paper = SurrogateObjective(obj.schedule, obj.nfe, obj.solver, obj.order, obj.p, "lagrange", float(obj.t_hi),
                               float(obj.t_lo), obj.warmup_steps)
    return _optimise(paper, STARTS, "sqp", "analytic", margin, maxiter, tol)[0][1]


def _values(obj: SurrogateObjective, points, margin: float) -> np.ndarray:
    """J at each point (one batched evaluation), inf where the lambdas are not increasing by the margin."""
    ok = np.array([_increasing(obj, z, margin * (1 - 1e-6)) for z in points])
    values = np.full(len(points), np.inf)
    if ok.any():
        values[ok] = obj.fun_batch(np.stack([z for z, good in zip(points, ok) if good]))
    return values


def _increasing(obj: SurrogateObjective, z: np.ndarray, margin: float) -> bool:
    """Every gap of lambda_0, z, lambda_N at least margin. The ends are finite, so a NaN or infinite z gives a NaN
    or -inf gap: False. The end gaps as floats, not through a concatenated copy (called ~10 times an optimisation)."""
    if not (z[0] - obj.lam_start >= margin and obj.lam_end - z[-1] >= margin):
        return False
    return bool((z[1:] - z[:-1] >= margin).all())


def _monotone_rows(n: int, lam_start: float, lam_end: float, margin: float):
    """A z >= lb for the N gaps: z_0 - lambda_0, z_{i+1} - z_i, lambda_N - z_{n-1}, each >= margin."""
    a = np.zeros((n + 1, n))
    idx = np.arange(n)
    a[idx, idx] = 1.0
    a[idx + 1, idx] = -1.0
    lb = np.full(n + 1, margin)
    lb[0] += lam_start
    lb[n] -= lam_end
    return a, lb


def _slack_sqp(obj: SurrogateObjective, z0: np.ndarray, margin: float, maxiter: int, tol: float,
               newton: bool = True):
    """The slack reformulation from z0; (its result, a certified local minimum from `_active_set_newton` or None): by
    the exact-Hessian SQP (`_exact_sqp`) where a Hessian is one batched pass (`_EXACT_SQP`), else by SLSQP
    (`_slsqp`: UniPC's rows, whose torch Jacobian costs ~7 evaluations)."""
    if obj.objective in _EXACT_SQP and obj.cheap_jacobian:
        return _exact_sqp(obj, z0, margin, maxiter, tol, newton)
    return _slsqp(obj, z0, margin, maxiter, tol, newton=newton)


def _slsqp(obj: SurrogateObjective, z0: np.ndarray, margin: float, maxiter: int, tol: float,
           polish_every: int = 20, newton: bool = True):
    """SLSQP on the slack reformulation; (its result, a certified local minimum from `_active_set_newton` or None).
    After `polish_every` iterations, then at doubling intervals (20, 60, 140, ...), and at the end (with the paper's
    objective also at the start, before any iteration), Newton tries to finish from the current point; SLSQP stops
    as soon as that certifies a local minimum at or below its own J."""
    n, m = z0.size, int(obj.coupled.sum())
    a, lb = _monotone_rows(n, obj.lam_start, obj.lam_end, margin)
    # the Jacobians' constant blocks, built once (np.block at every iteration cost as much as an evaluation)
    slack_rows = np.zeros((2 * m, n + m))
    slack_rows[:m, n:] = slack_rows[m:, n:] = np.eye(m)
    gap_rows = np.hstack([a, np.zeros((n + 1, m))])

    # SLSQP asks for the Jacobians at most points it evaluates (its first line-search step is mostly taken): where one
    # pass for both costs less than two (the paper's objective: a Jacobian ~1.7x a value; the solver rows' by
    # complex step: ~1.3x), they come with the values; else (UniPC's torch Jacobian: ~7x) only where SLSQP asks
    eager = obj.cheap_jacobian

    def f(v):
        return obj.parts(v[:n], jacobian=eager)[0] + v[n:].sum()

    def f_grad(v):
        return np.concatenate([obj.parts(v[:n])[1], np.ones(m)])

    def slack(v):  # s - c >= 0 and s + c >= 0
        c = obj.parts(v[:n], jacobian=eager)[2]
        return np.concatenate([v[n:] - c, v[n:] + c])

    def slack_jac(v):
        dc = obj.parts(v[:n])[3]
        out = slack_rows.copy()
        out[:m, :n], out[m:, :n] = -dc, dc
        return out

    found, iterations, next_try = [], [0], [polish_every, polish_every]  # (iteration of the next try, interval)
    # with the paper's objective a try costs a few batched passes (~1.5 evaluations each), so it is also tried at the
    # start (full Newton): where the optimum has no kink (NFE 5 and 6) it needs no active set from SLSQP, and a failed
    # try stops after 1-2 passes (leaving the feasible set). The former early try after 5 SLSQP iterations succeeded
    # in exactly the settings where the start try now does (256 checked), so it is gone. The solver rows' complex-step
    # Jacobian (cheap_jacobian) makes a Hessian one batched pass too, so they try it as well (not UniPC's torch one)
    start_try = obj.cheap_jacobian

    def try_newton(z, full_newton=False):
        done = _newton_try(obj, z, margin, full_newton)
        if done is not None:
            found.append(done[1])
        return done is not None

    def callback(v):
        iterations[0] += 1
        if newton and iterations[0] == next_try[0]:
            if try_newton(v[:n].copy()):
                raise StopIteration
            next_try[1] *= 2  # back off: a failed try costs a Hessian and its Newton steps
            next_try[0] += next_try[1]

    constraints = [{"type": "ineq", "fun": lambda v: a @ v[:n] - lb, "jac": lambda v: gap_rows}]
    if m:
        constraints.append({"type": "ineq", "fun": slack, "jac": slack_jac})
    v0 = np.concatenate([z0, np.abs(obj.parts(z0)[2])])
    if newton and start_try and try_newton(z0.copy(), full_newton=True):
        return OptimizeResult(x=v0, fun=f(v0), nit=0, nfev=0, success=True), found[0]
    # SLSQP's ftol is absolute; ours is relative to J at the start
    res = minimize(f, v0, jac=f_grad, method="SLSQP", constraints=constraints, callback=callback,
                   options={"maxiter": maxiter, "ftol": tol * obj.fun(z0)})
    if newton and not found:
        try_newton(res.x[:n].copy())
    return res, (found[0] if found else None)


def _exact_sqp(obj: SurrogateObjective, z0: np.ndarray, margin: float, maxiter: int, tol: float,
               newton: bool = True):
    """SQP with the exact Lagrangian Hessian on the slack reformulation; (its result, a certified local minimum from
    `_newton_try` or None), as `_slack_sqp`.

    Each iteration takes one batched pass at z and its n probes z + h e_i (the complex-step Jacobians: J, the
    gradients and, by differences, the Hessian of smooth + sum y_n c_n, y the last QP's multipliers of the |c_n|)
    and solves the QP

        min_{d, s}  g.d + d.H d / 2 + sum s_n   s.t.   -s_n <= c_n + dc_n.d <= s_n,   gaps(z + d) >= margin

    (DAQP, a dual active-set solver, by proximal iterations since the slacks have no curvature: ~0.1-0.4 ms at these
    sizes; H's eigenvalues floored to make it convex). At its solution s_n = |c_n + dc_n.d|, so its objective is
    J's model g.d + d.H d / 2 + sum |c_n + dc_n.d| (the l1 penalty is exact). The QP picks the active set
    (the kinks and the gaps at the margin) itself, so the iterations are SQP's few rather than SLSQP's ~200 along the
    kinks' manifold (its BFGS model learns the curvature there one iteration at a time). Step length: J itself is
    the l1 merit function; the candidate steps 1, 1/2, 1/4, 1/10 are evaluated in one batched pass (values only)
    and the longest with an Armijo decrease is taken; a trust box on d (halved after a shortened step, doubled after
    a full one that reached it) keeps the steps where the model holds. With H's negative eigenvalues floored, SQP
    converges only linearly along the kinks' manifold, so once two QPs in a row pick the same kinks, full Newton on
    that active set's KKT system (`_newton_try`, at most `_SETTLED_NEWTON_STEPS` steps) tries to finish and certify.
    Else it ends when the QP's predicted decrease is below tol * J (or no step decreases J), and Newton tries from
    there. Where DAQP finds no step even with proximal regularisation, SLSQP (`_slsqp`) goes on from z.

    Selected on the cosine, EDM and flow schedules (orders 2 and 3, p 1 and 2, NFE 8, 12, 16, 20; not the bench's
    DDPM): on the solver rows' objective 2.6x less time in all than SLSQP, J within 1e-9 relative in 46 of 48 settings,
    36% lower in one (cosine, order 2, p 2, NFE 20) and 7e-4 higher in one (cosine, order 3, p 2, NFE 20: another
    local minimum from the same start); on the paper's, 1.5x less time, J within 3e-14 in all 48."""
    n, m = z0.size, int(obj.coupled.sum())
    rows, lb = _monotone_rows(n, obj.lam_start, obj.lam_end, margin)
    probes = _hessian_probes(n)
    qp_a = np.zeros((2 * m + n + 1, n + m))
    qp_a[m:2 * m, n:] = qp_a[:m, n:] = np.eye(m)
    qp_a[2 * m:, :n] = rows
    qp_f = np.concatenate([np.zeros(n), np.ones(m)])
    # the first n + m bounds are simple bounds on (d, s): d in the trust box, s free (s >= 0 is implied, and a bound
    # there too, active with both slack rows at a kink, made DAQP cycle)
    upper = np.full(n + m + 2 * m + n + 1, np.inf)
    sense = np.zeros(upper.size, dtype=np.intc)
    radius = (obj.lam_end - obj.lam_start) / obj.nfe
    alphas = np.array([1.0, 0.5, 0.25, 0.1])
    if newton:  # as `_slsqp`: full Newton from the start certifies an optimum without kinks (NFE 5, 6) at once
        done = _newton_try(obj, z0.copy(), margin, full_newton=True)
        if done is not None:
            return OptimizeResult(x=z0, fun=done[0], nit=0, nfev=0, success=True), done[1]
    z, y, nit, nfev, found = z0.copy(), None, 0, 0, None
    kinks, tried = np.zeros(m, dtype=bool), set()
    smooth, d_smooth, c, dc = obj.parts_batch(z + probes)
    nfev += 1
    j = smooth[0] + np.abs(c[0]).sum()
    for nit in range(1, maxiter + 1):
        if y is None:
            y = np.sign(c[0])
        grads = d_smooth + np.einsum("m,bmn->bn", y, dc)
        hess = _hessian_by_differences(grads[1:], grads[0])
        eig, vec = np.linalg.eigh(hess)
        eig = np.maximum(eig, 1e-8 * max(np.abs(eig).max(), 1e-300))
        qp_h = np.zeros((n + m, n + m))
        qp_h[:n, :n] = (vec * eig) @ vec.T
        qp_f[:n] = d_smooth[0]
        qp_a[:m, :n], qp_a[m:2 * m, :n] = -dc[0], dc[0]
        upper[:n] = radius
        lower = np.concatenate([np.full(n, -radius), np.full(m, -np.inf), c[0], -c[0], lb - rows @ z])
        x, _, flag, info = daqp.solve(qp_h, qp_f, qp_a, upper, lower, sense, eps_prox=_QP_PROXIMAL * eig.max(),
                                      iter_limit=_QP_ITERATIONS)
        if flag < 1:  # no step (rare: DAQP's iteration limit): SLSQP goes on from here, as without this solver
            res, found = _slsqp(obj, z, margin, max(maxiter - nit + 1, 1), tol, newton=newton)
            return OptimizeResult(x=res.x[:n], fun=res.fun, nit=nit + res.nit, nfev=nfev + res.nfev,
                                  success=res.success), found
        d = x[:n]
        lam = info["lam"][n + m:]
        y = lam[m:2 * m] - lam[:m]
        previous_kinks, kinks = kinks, np.abs(c[0] + dc[0] @ d) <= 1e-9 * (1 + np.abs(c[0]).max())
        if newton and nit > 1 and (kinks == previous_kinks).all() and kinks.tobytes() not in tried:
            # the QP has settled on an active set: Newton on its KKT system converges quadratically where SQP on
            # the floored Hessian goes linearly
            tried.add(kinks.tobytes())
            done = _newton_try(obj, z.copy(), margin, full_newton=True, kinks=kinks,
                               max_steps=_SETTLED_NEWTON_STEPS, release_rounds=0)
            if done is not None:
                return OptimizeResult(x=done[1], fun=done[0], nit=nit, nfev=nfev, success=True), done[1]
        model = smooth[0] + d_smooth[0] @ d + 0.5 * d @ qp_h[:n, :n] @ d + np.abs(c[0] + dc[0] @ d).sum()
        predicted = j - model
        if predicted <= tol * j:
            break
        trial = z + alphas[:, None] * d
        values = _values(obj, trial, margin)
        nfev += 1
        ok = np.flatnonzero(values <= j - 1e-4 * alphas * predicted)
        if not ok.size:  # the model is off even at a tenth of the step: a smaller box, the same point and Hessian
            radius = 0.05 * np.abs(d).max()
            if radius <= 1e-12 * (obj.lam_end - obj.lam_start):
                break
            continue
        z = trial[ok[0]]
        # the trust box: halved after a shortened step, doubled after a full one that reached it
        if ok[0]:
            radius *= 0.5
        elif np.abs(d).max() >= 0.99 * radius:
            radius *= 2.0
        smooth, d_smooth, c, dc = obj.parts_batch(z + probes)
        nfev += 1
        j = smooth[0] + np.abs(c[0]).sum()
    if newton:
        found = _newton_try(obj, z.copy(), margin)
        found = None if found is None else found[1]
    return OptimizeResult(x=z, fun=j, nit=nit, nfev=nfev, success=True), found


def _newton_try(obj: SurrogateObjective, z: np.ndarray, margin: float, full_newton: bool = False,
                kinks: Optional[np.ndarray] = None, max_steps: int = 12, release_rounds: Optional[int] = None,
                first: Optional[tuple] = None):
    """`_active_set_newton` from z, retried with the kinks it releases (`_RELEASE_ROUNDS`); (J, z) of the certified
    point if it is at or below J at z, else None."""
    if not _increasing(obj, z, margin * (1 - 1e-6)):
        return None
    # J before Newton: full Newton's first batched pass gives it (in its report); else from the evaluation with the
    # Jacobian that Newton starts with (memoised: one pass for both)
    j_here, release, start = None, None, z
    if not full_newton:
        obj.parts(z)
        j_here = obj.fun(z)
    for _ in range(1 + (_RELEASE_ROUNDS[obj.objective] if release_rounds is None else release_rounds)):
        report = {}
        done = _active_set_newton(obj, start, margin, full_newton=full_newton, release=release, report=report,
                                  kinks=kinks, max_steps=max_steps, first=first)
        first = None  # for the first round only
        if j_here is None:
            j_here = report["j_start"] if "j_start" in report else obj.fun(z)
        if done is not None and done[0] <= j_here * (1 + 1e-12):
            return done
        if "release" not in report:
            return None
        release, start = report["release"], report["z"]  # retry from the converged point, those kinks off
    return None


def _active_set_newton(obj: SurrogateObjective, z: np.ndarray, margin: float, max_steps: int = 12,
                       full_newton: bool = False, release: Optional[dict] = None, report: Optional[dict] = None,
                       kinks: Optional[np.ndarray] = None, first: Optional[tuple] = None):
    """(J, z) after Newton on the KKT conditions of the active set at z, or None if that fails.

    Near the optimum SLSQP converges only linearly (its BFGS model has to learn the curvature along the kinks'
    manifold: ~250 iterations per start at NFE 20), so it stops early and this finishes. With the kinks z sits on
    (c_n ~ 0), the gaps at the margin, and fixed signs s_n elsewhere, it solves
        grad(smooth) + s dc_I + mu dc_A + nu a_M = 0,   c_A = 0,   a_M z = lb_M
    by Newton, with the Lagrangian's Hessian from forward differences of the exact Jacobians, kept across steps while
    they contract the residual 30-fold (`_CHORD_CONTRACTION`) (each Hessian costs n Jacobians: with the solver-row
    objective that is most of the polish). With full_newton (the try from a start, far from the optimum, where chord
    steps contract slowly: 4 Hessians and 11 gradients at NFE 6) every step takes a fresh Hessian from the same
    batched pass as its gradient (n + 1 points: ~1.5 evaluations with the paper's objective; 7 passes at NFE 6).
    The point is kept only if it is feasible and certified a local minimum: the multipliers (|mu| <= 1, else leaving
    that kink would lower J; nu <= 0, else opening that gap would), unchanged signs off the kinks, and a Lagrangian
    Hessian positive semi-definite along the active set.

    The kinks are the c_n with |c_n| <= 1e-4 max |c|, but those in release ({n: sign}: held off, on that side).
    report: a dict that receives "release" (those, and every kink whose multiplier came out above 1, on the side of
    its multiplier's sign, where leaving the kink lowers J) and "z" when that was the only fault of a converged
    point, for a retry from there."""
    n = z.size
    probes = _hessian_probes(n)
    # full Newton's first pass (z and its probes) also gives what the active set is read from, and J at z
    if full_newton and first is None:
        first = obj.parts_batch(z + probes)
    c = first[2][0] if full_newton else obj.parts(z)[2]
    if report is not None and full_newton:
        report["j_start"] = first[0][0] + float(np.abs(c).sum())
    if kinks is None:
        kinks = np.abs(c) <= 1e-4 * np.abs(c).max() if c.size else np.zeros(0, bool)
    kinks = kinks.copy()
    signs = np.sign(c) * ~kinks
    if release:
        held = np.fromiter(release, dtype=np.intp)
        kinks[held], signs[held] = False, np.fromiter(release.values(), dtype=np.float64)
    at_margin = np.diff(obj.full(z)) - margin <= 1e-9 * (obj.lam_end - obj.lam_start)  # the gaps' rows @ z - lb
    if at_margin.any():
        rows, lb = _monotone_rows(n, obj.lam_start, obj.lam_end, margin)
        rows, lb = rows[at_margin], lb[at_margin]
    else:  # (mostly: none of the n + 1 rows is built)
        rows, lb = np.zeros((0, n)), np.zeros(0)
    k_kinks, k = int(kinks.sum()), int(kinks.sum() + at_margin.sum())

    def gradient(zz, mu):  # of the Lagrangian, with the kinks' Jacobian rows and values
        _, d_smooth, cc, dc = obj.parts(zz)
        return d_smooth + signs @ dc + mu[:k_kinks] @ dc[kinks], dc[kinks], cc[kinks]

    def gradients(zs, mu, parts=None):  # at a batch of points in one pass (the Hessian's columns), with the kinks'
        weight = signs.copy()           # rows and values; or from that pass's parts, already computed
        weight[kinks] = mu[:k_kinks]
        smooth, d_smooth, cc, dc = obj.parts_batch(zs) if parts is None else parts
        return d_smooth + weight @ dc, dc[:, kinks], cc, smooth

    if full_newton:
        grads, a, _, _ = gradients(None, np.zeros(k), first)
        g, a = grads[0], a[0]
    else:
        g, a, _ = gradient(z, np.zeros(k))
    mult = np.linalg.lstsq(np.vstack([a, rows]).T, -g, rcond=None)[0] if k else np.zeros(0)
    hess, previous, at_z = None, np.inf, None  # at_z: (smooth, c) at z where the last batched pass gave them
    for _ in range(max_steps):
        if full_newton:
            grads, a, c_all, smooth = gradients(z + probes, mult, first)
            first = None  # used once: the next steps' points are new
            g, a, c_kinks, hess = grads[0], a[0], c_all[0][kinks], _hessian_by_differences(grads[1:], grads[0])
            at_z = (smooth[0], c_all[0])
        else:
            g, a, c_kinks = gradient(z, mult)
        # with nothing active (no kink, no gap at the margin) the KKT system is Newton's on g alone
        residual = np.concatenate([g + mult[k_kinks:] @ rows, c_kinks, rows @ z - lb]) if k else g
        size = np.abs(residual).max()
        scale = 1 + np.abs(g).max()
        if size <= 1e-13 * scale or (k == 0 and size <= _SMOOTH_NEWTON_TOL * scale):
            break
        # chord steps while they contract fast, else a fresh Hessian
        if not full_newton and (hess is None or size > _CHORD_CONTRACTION * previous):
            hess = _hessian_by_differences(gradients(z + probes[1:], mult)[0], g)
        # full Newton on a smooth problem (a fresh Hessian every step: the rate is quadratic) whose last two
        # residuals show that rate: K = size / previous^2 predicts the residual after this step, K size^2; where that
        # is within the tolerance, the step is the last one and its point is not evaluated with probes again (a
        # value at the end replaces a batched pass: ~10% of the time at NFE 5)
        finish = (full_newton and k == 0 and size <= _FINISH_BELOW * scale and previous < np.inf
                  and size ** 3 <= _SMOOTH_NEWTON_TOL * scale * previous ** 2)
        previous = size
        if k:
            jac = np.vstack([a, rows])
            kkt = np.zeros((n + k, n + k))  # [[hess, jac.T], [jac, 0]], assembled by hand (np.block costs ~20 us)
            kkt[:n, :n], kkt[:n, n:], kkt[n:, :n] = hess, jac.T, jac
        # LAPACK's solver directly: numpy's wrapper costs ~4 us a call in checks, a tenth of a Newton step at NFE 5
        _, _, step, singular = lapack.dgesv(kkt if k else hess, -residual)
        if singular:
            return None
        z, mult, at_z = z + step[:n], mult + step[n:], None
        if not _increasing(obj, z, margin * (1 - 1e-6)):  # left the feasible set: not this active set's minimum
            return None
        if finish:
            break
    if hess is None:  # converged at once: the second-order check below still needs the Hessian
        hess = _hessian_by_differences(gradients(z + probes[1:], mult)[0], g)
    smooth, c_all = at_z if at_z is not None else obj.parts(z, jacobian=False)[::2]
    c_free = c_all[~kinks]
    bounded = np.abs(mult[:k_kinks]) <= 1 + 1e-9
    rest = (np.all(mult[k_kinks:] <= 1e-9) and np.all(np.sign(c_free) == signs[~kinks])
            and _positive_on_null_space(hess, np.vstack([a, rows])) and _increasing(obj, z, margin * (1 - 1e-9)))
    if not (rest and bounded.all()):
        if rest and report is not None:
            over = np.flatnonzero(kinks)[~bounded]
            report["release"] = {**(release or {}), **dict(zip(over.tolist(), np.sign(mult[:k_kinks][~bounded])))}
            report["z"] = z
        return None
    return smooth + float(np.abs(c_all).sum()), z


def _positive_on_null_space(hess: np.ndarray, active: np.ndarray) -> bool:
    """Second-order condition: the Lagrangian's Hessian is positive semi-definite along the active set."""
    basis = null_space(active) if active.size else None  # None: nothing active, the whole space
    if basis is not None and basis.shape[1] == 0:
        return True
    reduced = hess if basis is None else basis.T @ hess @ basis
    # every eigenvalue >= -tol, as: reduced + tol I is positive definite (Cholesky succeeds; LAPACK's directly, a
    # fifth of an eigenvalue decomposition's cost at these sizes); a NaN fails
    shifted = reduced + (1e-6 * max(1.0, np.abs(hess).max())) * np.eye(reduced.shape[0])
    return bool(np.isfinite(shifted).all()) and lapack.dpotrf(shifted, lower=1)[1] == 0


@functools.lru_cache(maxsize=64)
def _hessian_probes(n: int) -> np.ndarray:
    """(n + 1, n) offsets of a point and its n probes for `_hessian_by_differences`: 0 and `_HESSIAN_STEP` e_i.
    Made once per n (read-only: callers add it to a point)."""
    probes = np.vstack([np.zeros(n), _HESSIAN_STEP * np.eye(n)])
    probes.flags.writeable = False
    return probes


def _hessian_by_differences(shifted: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Forward differences of an exact gradient g at z, given its values at z + `_HESSIAN_STEP` e_i (rows of
    `shifted`), symmetrised: the Hessian sets Newton's rate, not its solution."""
    hess = (shifted - g).T / _HESSIAN_STEP
    return 0.5 * (hess + hess.T)


def _trust_constr(obj: SurrogateObjective, z0: np.ndarray, margin: float, maxiter: int, tol: float, gradient: str):
    """The reference's optimiser: scipy trust-constr on J itself, its options otherwise scipy's defaults."""
    a, lb = _monotone_rows(z0.size, obj.lam_start, obj.lam_end, margin)
    jac = obj.grad if gradient == "analytic" else "2-point"
    return minimize(obj.fun, z0, jac=jac, method="trust-constr", constraints=[LinearConstraint(a, lb, np.inf)],
                    options={"maxiter": maxiter, "gtol": tol, "xtol": tol})
