"""A high-accuracy probability-flow ODE solution, the ground truth that solver error is measured against.

Write y = x / alpha (the "EDM" sample) and lambda = log(alpha / sigma). Since y = x0 + e^{-lambda} eps along the
forward process, the probability-flow ODE in data-prediction form is simply

    dy/dlambda = D(alpha y, t(lambda)) - y,

smooth and well scaled over the whole range, for every schedule family. We integrate it with scipy's DOP853.
"""
from __future__ import annotations

import numpy as np
import torch

from ..schedules import NoiseSchedule, as_time


def reference_ode_solution(denoiser, schedule: NoiseSchedule, x_T: torch.Tensor, t_start, t_end,
                           rtol: float = 1e-10, atol: float = 1e-10, method: str = "DOP853",
                           return_nfe: bool = False, **cond):
    """Integrate the PF-ODE from x_T at time t_start to t_end (either direction). Returns x at t_end (float64)."""
    from scipy.integrate import solve_ivp

    if not torch.is_tensor(x_T):
        raise ValueError("x_T must be a tensor of shape (B, ...)")
    t_start, t_end = schedule.check_t(as_time(t_start), "t_start"), schedule.check_t(as_time(t_end), "t_end")
    if t_start.ndim or t_end.ndim:
        raise ValueError("t_start and t_end must be scalars")
    lam0, lam1 = float(schedule.lambda_(t_start)), float(schedule.lambda_(t_end))
    if not (np.isfinite(lam0) and np.isfinite(lam1)):
        raise ValueError(f"lambda must be finite at t_start and t_end (got {lam0}, {lam1}); move them inside "
                         f"the schedule's domain")
    shape = x_T.shape
    x64 = x_T.detach().to(torch.float64)
    y0 = (x64 / schedule.alpha(t_start).to(torch.float64)).reshape(-1).cpu().numpy()
    nfe = [0]

    def rhs(lam, y):
        t = schedule.t_from_lambda(torch.tensor(lam, dtype=torch.float64))
        yt = torch.from_numpy(y).reshape(shape).to(x_T.device)
        with torch.no_grad():
            d = denoiser(yt * schedule.alpha(t).to(torch.float64), t, **cond).to(torch.float64)
        nfe[0] += 1
        return (d - yt).reshape(-1).cpu().numpy()

    sol = solve_ivp(rhs, (lam0, lam1), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"reference ODE solve failed: {sol.message}")
    y1 = torch.from_numpy(sol.y[:, -1]).reshape(shape).to(x_T.device)
    x1 = y1 * schedule.alpha(t_end).to(torch.float64)
    return (x1, nfe[0]) if return_nfe else x1
