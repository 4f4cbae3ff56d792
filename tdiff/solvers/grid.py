"""The time grid a solver walks: validated times and the per-point schedule quantities.

Everything here is a differentiable torch function of the timesteps (no detach, no `.item()`), so autograd reaches
the timesteps through every coefficient built from a Grid. The only host syncs are the up-front checks.
Where no gradient is asked for, `Grid.on_host` hands the builders the same quantities as numpy float64 arrays, and
the same formula code (arrays.py) builds the tables on the host.

Convention: `timesteps` holds N+1 decreasing times t_0 > ... > t_N; a multistep solver evaluates the denoiser at
t_0 .. t_{N-1} and lands at t_N. With `final_sigmas_type="zero"` the last step lands on clean data (alpha = 1,
sigma = 0) instead, as diffusers does; t_N is then still validated but otherwise unused.
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..schedules import NoiseSchedule
from . import arrays

FINAL_SIGMAS_TYPES = ("sigma_min", "zero")


def check_timesteps(schedule: NoiseSchedule, timesteps, name: str = "timesteps") -> Tensor:
    """A 1-D, strictly decreasing, NaN-free tensor of at least two times inside the schedule's domain."""
    if timesteps is None:
        raise ValueError(f"{name} must be a 1-D tensor of decreasing schedule times (or an object with .timesteps, "
                         f"e.g. from tdiff.timesteps or from_diffusers_timesteps), got None")
    if not isinstance(timesteps, Tensor):
        try:
            timesteps = torch.as_tensor(timesteps, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{name} must be a 1-D tensor of decreasing schedule times, got "
                             f"{type(timesteps).__name__} ({e})") from None
    if timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise ValueError(f"{name} must hold real times, got dtype {timesteps.dtype}")
    if not timesteps.is_floating_point():
        timesteps = timesteps.to(torch.float64)
    if timesteps.dim() != 1 or timesteps.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor of at least 2 times, got shape {tuple(timesteps.shape)}")
    values = timesteps.tolist()  # one transfer; domain and order are checked on the host
    lo, hi = schedule.domain
    if type(schedule).check_t is not NoiseSchedule.check_t or not (
            math.isfinite(sum(values)) and lo <= min(values) and max(values) <= hi):
        schedule.check_t(timesteps.detach(), name)  # the schedule's own check (and its message: NaN, inf, domain)
    if all(map(operator.gt, values, values[1:])):  # the common case, in one pass (in C)
        return timesteps
    if any(b == a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must not hold duplicated times (got {values}); diffusers' "
                         f"HeunDiscreteScheduler repeats its times by design: pass such a scheduler through "
                         f"tdiff.solvers.from_diffusers_timesteps, which recognises that convention")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"{name} must be strictly decreasing (from noise to data), got {values}")
    return timesteps


@dataclass
class Grid:
    """Per-point quantities over the N+1 points (float64 unless the timesteps are another float dtype)."""

    t: Optional[Tensor]  # (N+1,); None for a grid built from lambda alone
    alpha: Tensor
    sigma: Tensor
    lam: Tensor  # log(alpha/sigma); +inf at a final zero point (never used there)
    final_zero: bool
    # Where each step lands, when that differs from the next point (diffusers' DDIM/DDPM with "trailing" or
    # "linspace" spacing step from t_i to t_i - T//N, then evaluate at t_{i+1} as if the sample were there).
    # None: step i lands on point i+1.
    alpha_to: Optional[Tensor] = None  # (N,)
    sigma_to: Optional[Tensor] = None

    @property
    def n_steps(self) -> int:
        return len(self.lam) - 1

    @functools.cached_property
    def sigma_tilde(self) -> Tensor:
        """EDM sigma, sigma/alpha = e^-lambda; 0 at a final zero point."""
        return arrays.exp(-self.lam)

    def points(self) -> Optional[tuple]:
        """(alpha, sigma) at the times t as host arrays, where they are the schedule's own values at t (all points
        but a final zero one): what a denoiser's conversion at those times needs. None on the torch path."""
        if not arrays.on_host(self.alpha) or self.t is None:
            return None
        m = len(self.alpha) - int(self.final_zero)
        return self.alpha[:m], self.sigma[:m]

    def on_host(self) -> "Grid":
        """This grid with its per-point quantities as numpy float64 arrays (t stays a tensor: the denoiser's times
        are built from it), when none of them needs a gradient; else the grid itself. The rows built from a host
        grid are the same formulas evaluated on the host (see arrays.py), sealed into tensors by
        Program.seal_rows."""
        fields = ("alpha", "sigma", "lam", "alpha_to", "sigma_to")
        values = [getattr(self, f) for f in fields]
        if any(v is not None and (v.requires_grad or v.dtype != torch.float64
                                  or torch._C._functorch.is_functorch_wrapped_tensor(v)) for v in values):
            return self  # differentiable (autograd, or a torch.func transform), or another dtype: torch tables
        alpha, sigma, lam = torch.stack(values[:3]).detach().cpu().numpy()  # one transfer (two with targets)
        alpha_to = sigma_to = None
        if self.alpha_to is not None:
            alpha_to, sigma_to = torch.stack(values[3:]).detach().cpu().numpy()
        return Grid(self.t, alpha, sigma, lam, self.final_zero, alpha_to, sigma_to)

    def landing(self) -> tuple:
        """(alpha, sigma) of the N points the steps land on."""
        if self.alpha_to is None:
            return self.alpha[1:], self.sigma[1:]
        return self.alpha_to, self.sigma_to


def make_grid(schedule: NoiseSchedule, timesteps: Tensor, final_sigmas_type: str = "sigma_min",
              targets: Optional[Tensor] = None) -> Grid:
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
    t = timesteps
    log_alpha, log_sigma = schedule.log_alpha_sigma(t)  # one schedule evaluation
    alpha, sigma, lam = log_alpha.exp(), log_sigma.exp(), log_alpha - log_sigma
    final_zero = final_sigmas_type == "zero"
    if final_zero:
        # Replace the last point by clean data. Built by concatenation (not in-place) so the graph stays intact.
        one, zero = torch.ones_like(alpha[-1:]), torch.zeros_like(alpha[-1:])
        alpha = torch.cat([alpha[:-1], one])
        sigma = torch.cat([sigma[:-1], zero])
        lam = torch.cat([lam[:-1], torch.full_like(one, float("inf"))])
    grid = Grid(t=t, alpha=alpha, sigma=sigma, lam=lam, final_zero=final_zero)
    if targets is not None:
        targets = check_targets(schedule, t, targets)
        grid.alpha_to, grid.sigma_to = schedule.alpha(targets), schedule.sigma(targets)
        if final_zero:
            grid.alpha_to = torch.cat([grid.alpha_to[:-1], alpha[-1:]])
            grid.sigma_to = torch.cat([grid.sigma_to[:-1], sigma[-1:]])
    return grid


def host_grid(schedule: NoiseSchedule, timesteps: Tensor, final_sigmas_type: str = "sigma_min",
              targets: Optional[Tensor] = None) -> Grid:
    """`make_grid(...).on_host()`: where the timesteps need no gradient and the schedule evaluates on the host
    (NoiseSchedule.log_alpha_sigma_host), the per-point quantities are computed there directly, without a torch op
    (a schedule evaluation in torch is ~20 ops of a few microseconds each on ~20 values)."""
    if targets is None and final_sigmas_type in FINAL_SIGMAS_TYPES and arrays.readable_on_host(timesteps):
        host = schedule.log_alpha_sigma_host(timesteps.numpy())
        if host is not None:
            log_alpha, log_sigma = host
            alpha, sigma, lam = np.exp(log_alpha), np.exp(log_sigma), log_alpha - log_sigma
            final_zero = final_sigmas_type == "zero"
            if final_zero:  # the last point is clean data (make_grid's rule)
                alpha[-1], sigma[-1], lam[-1] = 1.0, 0.0, float("inf")
            return Grid(t=timesteps, alpha=alpha, sigma=sigma, lam=lam, final_zero=final_zero)
    return make_grid(schedule, timesteps, final_sigmas_type, targets).on_host()


def check_targets(schedule: NoiseSchedule, timesteps: Tensor, targets) -> Tensor:
    """N landing times, each strictly below the time its step starts from."""
    n = timesteps.numel() - 1
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets, dtype=timesteps.dtype)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"targets must be a 1-D tensor of {n} times (where each step lands), got "
                             f"{type(targets).__name__} ({e})") from None
    if targets.dim() != 1 or targets.numel() != n:
        raise ValueError(f"targets must be a 1-D tensor of {n} times (where each step lands), got shape "
                         f"{tuple(targets.shape)}")
    schedule.check_t(targets.detach(), "targets")
    targets = targets.to(timesteps.dtype)
    if not bool((targets < timesteps[:-1]).all()):
        raise ValueError("targets[i] must be below timesteps[i] (each step moves towards the data)")
    return targets


def grid_from_lambda(schedule: NoiseSchedule, lam: Tensor) -> Grid:
    """The grid at the given lambdas, without the times (which the exponential integrators' rows never use):
    cheaper than `make_grid` and exact for any schedule, since alpha and sigma are closed forms of lambda."""
    return grid_from_log_alpha(schedule.log_alpha_from_lambda(lam), lam)


def grid_from_log_alpha(log_alpha, lam) -> Grid:
    """The grid of log alpha and lambda at its points (tensors, or numpy arrays, complex ones included):
    alpha = e^(log alpha), sigma = e^(log alpha - lambda)."""
    return Grid(t=None, alpha=arrays.exp(log_alpha), sigma=arrays.exp(log_alpha - lam), lam=lam, final_zero=False)


def condition_times(schedule: NoiseSchedule, timesteps: Tensor, timesteps_cond: Optional[Tensor]) -> Tensor:
    """The times fed to the denoiser at t_0 .. t_N (LD3's decoupled time), validated like timesteps. N given values
    are completed with t_N; the multistep solvers evaluate at t_0 .. t_{N-1} only, Heun's last corrector at t_N."""
    n = timesteps.numel() - 1
    if timesteps_cond is None:
        return timesteps
    if not isinstance(timesteps_cond, Tensor):
        timesteps_cond = torch.as_tensor(timesteps_cond, dtype=timesteps.dtype)
    if timesteps_cond.dim() != 1 or timesteps_cond.numel() not in (n, n + 1):
        raise ValueError(f"timesteps_cond must be a 1-D tensor of {n} or {n + 1} times (one per model "
                         f"evaluation, like timesteps), got shape {tuple(timesteps_cond.shape)}")
    schedule.check_t(timesteps_cond.detach(), "timesteps_cond")
    timesteps_cond = timesteps_cond.to(timesteps.dtype)
    return timesteps_cond if timesteps_cond.numel() == n + 1 else torch.cat([timesteps_cond, timesteps[n:]])
