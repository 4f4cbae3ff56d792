"""SpeeD's asymmetric time sampling (Wang et al., "A Closer Look at Time Steps is Worthy of Triple Speed-Up").

Steps before the threshold tau are drawn k times more often than steps after it (the convergence area, where
sqrt(1-alpha_bar) barely moves and the loss is nearly constant). As in SpeeD's code, half of the batch is then
"dual reflected" around the convergence boundary ms: step i becomes |ms - i|, which folds draws from the
convergence area back onto the early, informative steps while keeping the batch balanced.

Batch layout: the first ceil(B/2) entries are drawn, the remaining floor(B/2) are the reflections of the first
floor(B/2) draws. (SpeeD draws B//2 + 1 and truncates, which reflects one sample fewer for even B.)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..schedules import NoiseSchedule
from .per_device import PerDevice
from .sampler_base import TableSampler
from .speed_areas import speed_areas
from .time_grid import TimeGrid


def speed_tau_default(n: int) -> int:
    """SpeeD's tau = 700 of 1000 steps, scaled to a grid of n steps."""
    return int(round(0.7 * n))


class SpeedSampler(TableSampler):
    name = "speed"

    def __init__(self, schedule: NoiseSchedule, k: float = 2.0, tau: Optional[int] = None, reflect: bool = True,
                 threshold: float = 1e-4, n: int = 1000):
        grid = TimeGrid(schedule, n)
        if not (float(k) > 0) or k != k:
            raise ValueError(f"k (suppression ratio) must be > 0, got {k}")
        tau = speed_tau_default(grid.n) if tau is None else tau
        if int(tau) != tau or not (0 < int(tau) < grid.n):
            raise ValueError(f"tau must be an integer step inside the schedule, 0 < tau < {grid.n}, got {tau}")
        self.k, self.tau, self.reflect, self.threshold = float(k), int(tau), bool(reflect), float(threshold)
        probs = torch.ones(grid.n, dtype=torch.float64)
        probs[: self.tau] = self.k
        super().__init__(schedule, probs, n)
        self.areas = speed_areas(schedule, threshold=threshold, n=n)
        self.ms = self.areas.convergence
        # density of a reflected draw: mass of i moves to |ms - i|
        idx = torch.arange(self.grid.n)
        reflected = torch.zeros_like(self.probs).index_add_(0, (self.ms - idx).abs().clamp(max=self.grid.n - 1),
                                                             self.probs)
        # a batch element is a draw or a reflection with equal odds (exactly so for even batches)
        self.marginal = 0.5 * (self.probs + reflected) if self.reflect else self.probs
        self.density = PerDevice(lambda: self.marginal)

    def from_uniform(self, u):
        cell, jitter = self.cells_from_uniform(u)
        if self.reflect and u.numel() > 1:
            b = u.numel()
            half = b // 2
            cell = cell.clone()
            cell[b - half:] = (self.ms - cell[:half]).abs().clamp(max=self.grid.n - 1)
        return self.grid.time_of(cell, jitter)

    def config(self):
        return {"name": self.name, "k": self.k, "tau": self.tau, "reflect": self.reflect, "ms": self.ms}
