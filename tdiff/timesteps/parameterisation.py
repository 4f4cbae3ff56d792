"""LD3's parameterisation of a time discretisation (Tong et al. 2024, Sec. 3.3).

xi (N+1 free reals) -> tau'(i) = sum_{n >= i} softmax(xi)[n], min-max normalised to [0, 1] and mapped to
[t_min, t_max] ("time" space) or to [lambda(t_max), lambda(t_min)] ("lambda" space, then back to t). Any xi gives
strictly decreasing times with the end points exactly fixed, so the optimiser needs no constraints.

Decoupled network times: t_c = t + clamp(xi_c, +-0.5 * the smallest gap), with the end points left unchanged, so
each t_c stays strictly between its neighbours and inside the sampling interval.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..schedules import NoiseSchedule
from .heuristics import with_exact_ends

SPACES = ("time", "lambda")


class StepParameterisation:
    def __init__(self, schedule: NoiseSchedule, nfe: int, t_max: Tensor, t_min: Tensor, space: str = "time"):
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        self.schedule, self.nfe, self.space = schedule, nfe, space
        self.t_max, self.t_min = t_max.to(torch.float64), t_min.to(torch.float64)
        if space == "lambda":
            self.lo, self.hi = schedule.lambda_(self.t_max), schedule.lambda_(self.t_min)  # lambda increases

    def _unit(self, xi: Tensor) -> Tensor:
        """(N+1,) in [0, 1], 1 at i = 0 and 0 at i = N, strictly decreasing."""
        tail = torch.softmax(xi, 0).flip(0).cumsum(0).flip(0)  # sum_{n >= i}
        return (tail - tail[-1]) / (tail[0] - tail[-1])

    def timesteps(self, xi: Tensor) -> Tensor:
        u = self._unit(xi.to(torch.float64))
        if self.space == "time":
            t = self.t_min + u * (self.t_max - self.t_min)
        else:
            t = self.schedule.t_from_lambda(self.hi + u * (self.lo - self.hi))
        return with_exact_ends(t, self.t_max, self.t_min)  # rounding in the map must not leave the domain

    def xi_from_timesteps(self, timesteps: Tensor) -> Tensor:
        """An xi that reproduces `timesteps` (the inverse of `timesteps`, up to the free scale of softmax)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).detach()
        if self.space == "time":
            u = (t - self.t_min) / (self.t_max - self.t_min)
        else:
            u = (self.schedule.lambda_(t) - self.hi) / (self.lo - self.hi)
        gaps = (u[:-1] - u[1:]).clamp_min(1e-12)  # softmax[i] / (1 - softmax[N]) for i < N
        last = 1.0 / (self.nfe + 1)  # softmax[N] is free; any value in (0, 1) works
        probs = torch.cat([gaps / gaps.sum() * (1 - last), torch.tensor([last], dtype=torch.float64)])
        return probs.log()

    @staticmethod
    def condition_times(timesteps: Tensor, xi_c: Tensor) -> Tensor:
        """t + clamp(xi_c, +-0.5 min gap), ends unchanged; (N+1,)."""
        half_gap = 0.5 * (timesteps[:-1] - timesteps[1:]).min().detach()
        shift = torch.clamp(xi_c, -half_gap, half_gap)
        shift = torch.cat([torch.zeros_like(shift[:1]), shift[1:-1], torch.zeros_like(shift[:1])])
        return timesteps + shift
