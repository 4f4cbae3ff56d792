"""SpeeD's three areas of the forward process, from any schedule.

SpeeD (Wang et al.) splits training time into an acceleration area (the noise increment d(1-alpha_bar)/dt is
still growing), a deceleration area (it shrinks) and a convergence area (sqrt(1-alpha_bar) barely moves any more:
its per-step increment is below `threshold`). For the linear DDPM schedule the peak is at step 219 and the
convergence boundary ("meaningful steps", the dual-reflection point) at 642.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedules import NoiseSchedule
from .time_grid import TimeGrid


@dataclass(frozen=True)
class SpeedAreas:
    n: int  #: number of grid cells (training steps)
    peak: int  #: index of the peak of d(1-alpha_bar)/dt: acceleration is [0, peak)
    convergence: int  #: first index of the convergence area, SpeeD's "meaningful steps" ms
    t_peak: float  #: schedule time at the peak node
    t_convergence: float  #: schedule time at the convergence boundary
    one_minus_alpha_bar: torch.Tensor  #: (N,) for plotting
    increment: torch.Tensor  #: (N,) d(1-alpha_bar) per step, the quantity SpeeD weights by

    def area_of(self, index: torch.Tensor) -> torch.Tensor:
        """0 = acceleration, 1 = deceleration, 2 = convergence, for each step index."""
        return (index >= self.peak).long() + (index >= self.convergence).long()


def speed_areas(schedule: NoiseSchedule, threshold: float = 1e-4, n: int = 1000) -> SpeedAreas:
    if not (threshold > 0):
        raise ValueError(f"threshold must be a positive increment of sqrt(1-alpha_bar) per step, got {threshold}")
    grid = TimeGrid(schedule, n)
    omab = grid.one_minus_alpha_bar()
    increment = torch.gradient(omab)[0]  # central differences, as SpeeD (np.gradient)
    peak = int(increment.argmax())
    flat = torch.gradient(omab.sqrt())[0] < threshold
    flat[: peak + 1] = False  # the start of the process can be flat too (tiny beta); convergence comes after the peak
    hits = torch.nonzero(flat)
    if hits.numel() == 0:
        raise ValueError(
            f"sqrt(1-alpha_bar) never flattens below threshold={threshold} per step on this schedule; "
            "pass a larger threshold"
        )
    # SpeeD: argmax(grad < threshold) + 1
    convergence = min(int(hits[0]) + 1, grid.n - 1)
    return SpeedAreas(
        n=grid.n, peak=peak, convergence=convergence, t_peak=float(grid.nodes[peak]),
        t_convergence=float(grid.nodes[convergence]), one_minus_alpha_bar=omab, increment=increment,
    )
