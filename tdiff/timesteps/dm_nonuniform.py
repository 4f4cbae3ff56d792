"""DM-NonUniform (Xue et al. 2024): time steps that minimise a bound on the accumulated model error.

An error e_n in the model output D_n moves the final sample by sum_s P[s, n] e_n, where P[s, n] is the weight
step s gives D_n in the whole solve (`sensitivity.step_output_weights`, read off the solver's own coefficient
rows, so orders and the UniC corrector are covered without re-deriving their formulas). With the per-node error
proxy eps_n = sigma_n^p / alpha_n (Lemma 1: ||x_theta - x0|| <~ sigma^2/alpha; p = 1 for pixel models):

    J(lambda_1 .. lambda_{N-1}) = sum_{s early or last} ||eps * P[s, :]||_2 + sum_n |eps_n sum_{s other} P[s, n]|

with lambda_0 = lambda(t_max), lambda_N = lambda(t_min) fixed, minimised over the N-1 interior lambdas subject to
lambda_{i+1} - lambda_i >= margin (linear constraints), locally from the uniform-logSNR start. The first
`warmup_steps` (3) steps and the last are counted per step, without cancellation between steps, as the reference
implementation does: if every weight may cancel (the plain sum_n eps_n |c_n| of the paper's Eq. 35), the optimum
is degenerate -- the steps bunch at t_min, where sigma^p/alpha is tiny, and cancellation hides the large-noise
errors; we measured a 10x lower J with 10x worse samples. The solver's own order rule is used (order 1 at the
first and last steps, 2 next to them, `order` elsewhere, for dpmpp/unipc with lower_order_final). The gradient is
exact: torch autograd of J in float64 (through a numpy reverse sweep for P), handed to scipy (the reference uses
finite differences).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..integrations.diffusers.pipelines import from_pipeline, is_pipeline
from ..schedules import NoiseSchedule
from ..solvers.dpmpp import build_dpmpp
from ..solvers.grid import grid_from_lambda
from ..solvers.unipc import build_unipc
from .heuristics import check_nfe, sampling_interval, with_exact_ends
from .sensitivity import step_output_weights

# build_program validates the timesteps (host syncs, errors on a non-monotone point); the optimiser may probe
# slightly infeasible points, so the objective goes to the solver builders directly with an unchecked grid.
# Only the exponential integrators: the surrogate is derived for solvers built on local polynomials in lambda
# (the paper's Eq. 10). iPNDM's Adams-Bashforth weights assume equal steps and its history holds slopes, not
# model outputs; its "optimised" steps measured 5-30x worse than the heuristics on the exact mixture.
_BUILDERS = {"dpmpp": build_dpmpp, "unipc": build_unipc}
METHODS = ("SLSQP", "trust-constr")


class SurrogateObjective:
    """J and dJ/dlambda_interior for one (schedule, nfe, solver, order, p) as numpy callables for scipy."""

    def __init__(self, schedule: NoiseSchedule, nfe: int, solver: str = "dpmpp", order: int = 3, p: float = 2.0,
                 t_max=None, t_min=None, warmup_steps: int = 3, **solver_opts):
        if solver not in _BUILDERS:
            raise ValueError(f"solver must be one of {tuple(_BUILDERS)}, got {solver!r}")
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p!r}")
        self.schedule, self.nfe, self.solver, self.order, self.p = schedule, check_nfe(nfe, minimum=2), solver, \
            order, float(p)
        self.solver_opts, self.warmup_steps = solver_opts, int(warmup_steps)
        hi, lo = sampling_interval(schedule, t_max, t_min)
        self.t_hi, self.t_lo = hi, lo
        self.lam_start, self.lam_end = schedule.lambda_(hi).reshape(1), schedule.lambda_(lo).reshape(1)
        if not bool(torch.isfinite(torch.cat([self.lam_start, self.lam_end])).all()):
            raise ValueError("lambda must be finite at t_max and t_min; move them inside the schedule's domain")

    def timesteps(self, lam_interior: Tensor) -> Tensor:
        lam = torch.cat([self.lam_start, lam_interior, self.lam_end])
        return with_exact_ends(self.schedule.t_from_lambda(lam), self.t_hi, self.t_lo)

    def value(self, lam_interior: Tensor) -> Tensor:
        grid = grid_from_lambda(self.schedule, torch.cat([self.lam_start, lam_interior, self.lam_end]))
        prog = _BUILDERS[self.solver](grid, None, order=self.order, **self.solver_opts)
        weighted = step_output_weights(prog) * (grid.sigma[:-1] ** self.p / grid.alpha[:-1])  # (S, N)
        steps = torch.arange(weighted.shape[0])
        alone = (steps < self.warmup_steps) | (steps == weighted.shape[0] - 1)
        # early steps and the last one: their errors are counted without cancellation (a norm per step); the
        # others' weights are summed per node first, so errors that later steps cancel are not counted
        return weighted[alone].norm(dim=1).sum() + weighted[~alone].sum(0).abs().sum()

    def fun(self, z: np.ndarray) -> float:
        with torch.no_grad():
            return float(self.value(torch.from_numpy(np.asarray(z, dtype=np.float64))))

    def fun_and_grad(self, z: np.ndarray):
        lam = torch.from_numpy(np.array(z, dtype=np.float64)).requires_grad_(True)
        with torch.enable_grad():
            j = self.value(lam)
            (g,) = torch.autograd.grad(j, lam)
        return float(j.detach()), g.numpy().copy()

    def grad(self, z: np.ndarray) -> np.ndarray:
        return self.fun_and_grad(z)[1]

    def initial(self) -> np.ndarray:
        """Interior lambdas of the uniform-logSNR schedule (the reference's start point)."""
        lam = np.linspace(float(self.lam_start), float(self.lam_end), self.nfe + 1)
        return lam[1:-1]


def dm_nonuniform(schedule: NoiseSchedule, nfe: int, solver: str = "dpmpp", order: int = 3, p: float = 2.0,
                  method: str = "SLSQP", gradient: str = "analytic", t_max=None, t_min=None,
                  margin: Optional[float] = None, maxiter: int = 100, tol: float = 1e-8,
                  return_result: bool = False, **solver_opts):
    """Optimised time steps (N+1 decreasing schedule times) for `solver`/`order` at `nfe` model calls.

    p: exponent of the error proxy sigma^p/alpha (2 for latent models as in the paper, 1 for pixel models).
    method: "SLSQP" (fast, default) or "trust-constr" (the reference's choice).
    gradient: "analytic" (autograd, float64) or "finite-difference" (scipy 2-point, as the reference does).
    margin: the smallest allowed lambda gap (default 1e-3 of the lambda range / N).
    return_result: also return scipy's OptimizeResult (fun, nit, ...).
    """
    if is_pipeline(schedule):  # a diffusers pipeline: a TdiffScheduler for its config (integrations.diffusers)
        return from_pipeline(dm_nonuniform, locals())
    from scipy.optimize import minimize

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if gradient not in ("analytic", "finite-difference"):
        raise ValueError(f"gradient must be 'analytic' or 'finite-difference', got {gradient!r}")
    obj = SurrogateObjective(schedule, nfe, solver, order, p, t_max, t_min, **solver_opts)
    span = float(obj.lam_end - obj.lam_start)
    margin = 1e-3 * span / nfe if margin is None else float(margin)
    if not 0 <= margin < span / nfe:
        raise ValueError(f"margin must be in [0, lambda range / nfe = {span / nfe:.4g}), got {margin}")
    z0 = obj.initial()
    cons = [_constraint_rows(obj, margin)]
    if gradient == "analytic":
        # separate callables: SLSQP's line search asks for J alone ~4x as often as for the gradient, and J without
        # the autograd graph costs a third as much
        fun, jac = obj.fun, obj.grad
    else:
        fun, jac = obj.fun, "2-point"
    options = {"maxiter": maxiter}
    if method == "SLSQP":
        options["ftol"] = tol
    else:
        options.update(gtol=tol, xtol=tol)
    res = minimize(fun, z0, jac=jac, method=method, constraints=cons, options=options)
    z = res.x
    if not np.all(np.diff(np.concatenate([[float(obj.lam_start)], z, [float(obj.lam_end)]])) > 0):
        raise RuntimeError("DM-NonUniform returned non-monotone steps; try method='trust-constr' or a larger margin")
    with torch.no_grad():
        t = obj.timesteps(torch.from_numpy(np.asarray(z, dtype=np.float64)))
    return (t, res) if return_result else t


def _constraint_rows(obj: SurrogateObjective, margin: float):
    from scipy.optimize import LinearConstraint

    n = obj.nfe - 1
    # rows: lambda_1 - lambda_0 >= m ; lambda_{i+1} - lambda_i >= m ; lambda_N - lambda_{N-1} >= m
    a = np.zeros((n + 1, n))
    lb = np.full(n + 1, margin)
    for i in range(n):
        a[i, i] += 1.0
        a[i + 1, i] -= 1.0
    lb[0] += float(obj.lam_start)
    lb[n] -= float(obj.lam_end)
    return LinearConstraint(a, lb, np.full(n + 1, np.inf))
