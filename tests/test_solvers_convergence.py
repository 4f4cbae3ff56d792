"""Order of convergence on the analytic Gaussian mixture: the error against a tight reference ODE solve falls
like NFE^-p. We fit the log-log slope over NFE 12..32 on a uniform-logSNR grid and check it against each
solver's theoretical global order, with slack for the pre-asymptotic range.

Theoretical global orders as run here (lower_order_final off, so the last steps do not cap the order):
  euler/ddim 1; DPM-Solver++ 2M 2, 3M 3; UniPC-p with its corrector p+1; EDM Heun 2;
  iPNDM 2: its first steps are lower-order warm-up (Euler's O(h^2) local error stays in the global error) and its
  fixed Adams-Bashforth weights assume equal steps, so beyond order 2 it only lowers the constant.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("scipy")  # the reference ODE solve

from tdiff.data.gaussian_mixture import GaussianMixture
from tdiff.data.reference import reference_ode_solution
from tdiff.schedules import VPLinear
from tdiff.solvers import sample

SCHED = VPLinear()
MIX = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], [0.3, 0.5, 0.2], [1.0, 2.0, 1.5])
T0, T1 = 0.9, 0.1
NFES = [12, 16, 24, 32]


class Den:
    schedule = SCHED

    def __call__(self, x, t):
        return MIX.posterior_mean(x, t, SCHED)


def logsnr_grid(steps: int) -> torch.Tensor:
    lam = SCHED.lambda_(torch.tensor([T0, T1], dtype=torch.float64))
    return SCHED.t_from_lambda(torch.linspace(0, 1, steps + 1, dtype=torch.float64) * (lam[1] - lam[0]) + lam[0])


@pytest.fixture(scope="module")
def problem():
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    return x, reference_ode_solution(Den(), SCHED, x, T0, T1, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("solver,order,opts,expected", [
    ("euler", 1, {}, 1),
    ("dpmpp", 2, {}, 2),
    ("dpmpp", 3, {}, 3),
    ("unipc", 1, {}, 2),
    ("unipc", 2, {}, 3),
    ("unipc", 3, {}, 4),
    ("heun", 2, {}, 2),
    ("ipndm", 4, {}, 2),
])
def test_error_falls_at_the_theoretical_order(problem, solver, order, opts, expected):
    x, ref = problem
    errors = []
    for nfe in NFES:
        steps = nfe // 2 if solver == "heun" else nfe
        if solver in ("dpmpp", "unipc", "ipndm"):
            opts = {"lower_order_final": False, **opts}
        out = sample(Den(), x, logsnr_grid(steps), solver=solver, order=order, **opts)
        errors.append(float((out - ref).abs().max()))
    slope = -np.polyfit(np.log(NFES), np.log(errors), 1)[0]
    print(f"{solver}-{order} {opts}: slope {slope:.2f} (theory {expected}), errors {[f'{e:.1e}' for e in errors]}")
    assert errors[-1] < errors[0]
    assert slope > expected - 0.35, f"{solver}-{order}: slope {slope:.2f}, errors {errors}"
