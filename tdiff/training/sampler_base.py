"""Time-step samplers: every sampler is an inverse CDF applied to a uniform draw.

That one shape gives three things at once: sampling stays on the device (a torch.Generator on the device, a
precomputed CDF and `torch.searchsorted`: no numpy, no CPU multinomial, no host sync); stratified sampling across
DDP ranks only has to stratify the uniforms; and the sampling density p(t) is known, so the "unbiased" loss mode
can importance-correct by it.

`relative_density(t)` is p(t) divided by the uniform density over the training interval (or the uniform pmf 1/N
of a discrete schedule), so 1/relative_density is the importance weight back to uniform training.
"""
from __future__ import annotations

import abc

from typing import Optional

import torch

from ..schedules import NoiseSchedule
from .per_device import PerDevice
from .time_grid import TimeGrid

# keep u off 0 and 1 so that inverse normal CDFs stay finite
_U_EPS = 1e-12


class TimestepSampler(abc.ABC):
    name = "base"

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        self.schedule = schedule
        self.grid = TimeGrid(schedule, n)

    @abc.abstractmethod
    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map float64 uniforms in [0, 1) to schedule times (float64), same shape."""

    @abc.abstractmethod
    def relative_density(self, t: torch.Tensor) -> torch.Tensor:
        """Subclasses define this."""

    def sample(self, batch: int, generator: Optional[torch.Generator] = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if int(batch) < 1:
            raise ValueError(f"batch must be a positive integer, got {batch}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(int(batch), generator=generator, device=device, dtype=torch.float64)
        return self.from_uniform(u).to(dtype)

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class TableSampler(TimestepSampler):
    """A piecewise-constant density over the grid cells: exact inverse CDF, one uniform per sample (the position
    of u inside its cell's CDF mass doubles as the jitter inside the cell for continuous schedules)."""

    def __init__(self, schedule: NoiseSchedule, probs: torch.Tensor, n: int = 1000):
        super().__init__(schedule, n)
        probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
        if probs.numel() != self.grid.n:
            raise ValueError(f"probs must have one entry per grid cell ({self.grid.n}), got {probs.numel()}")
        if torch.isnan(probs).any() or bool((probs < 0).any()) or not bool(probs.sum() > 0):
            raise ValueError("probs must be non-negative, not NaN, with a positive sum")
        self.probs = probs / probs.sum()
        self._tables = PerDevice(self._make_tables)
        # the density relative_density reports (a subclass that transforms its draws sets its own)
        self.density = PerDevice(lambda: self.probs)

    def _make_tables(self):
        cdf = torch.cumsum(self.probs, 0)
        return self.probs, cdf / cdf[-1]

    def cells_from_uniform(self, u: torch.Tensor):
        probs, cdf = self._tables.on(u.device)
        cell = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=self.grid.n - 1)
        below = torch.where(cell > 0, cdf[(cell - 1).clamp(min=0)], torch.zeros_like(u))
        jitter = ((u - below) / probs[cell].clamp(min=1e-300)).clamp(0.0, 1.0 - 1e-12)
        return cell, jitter

    def from_uniform(self, u):
        cell, jitter = self.cells_from_uniform(u)
        return self.grid.time_of(cell, jitter)

    def relative_density(self, t):
        return self.density.on(t.device)[self.grid.cell_of(t)] * self.grid.n
