"""SpeeD's three areas of the forward process and its threshold tau, derived from any schedule by one rule.

SpeeD (Wang et al.) splits training time into an acceleration area (the noise increment d(1-alpha_bar)/dt is
still growing), a deceleration area (it shrinks) and a convergence area (the process has reached noise and the
increments vanish). Everything is read off the schedule's own 1000-step time axis (`TimeCells`; for VE, EDM and
flow schedules 1 - alpha_bar is the variance-preserving equivalent 1/(1+snr)), with one threshold eps = 1e-4 on a
per-step increment, central differences as in SpeeD's `np.gradient`:

- peak:        argmax of the increment of 1 - alpha_bar (acceleration is [0, peak));
- convergence: the first step after the peak where the increment of sqrt(1 - alpha_bar) is below eps, plus one
               (SpeeD's code: `argmax(gradient(sqrt(1-alpha_bar)) < 1e-4) + 1`, its "meaningful steps" ms, the
               dual-reflection point);
- tau:         the first step after the peak where the increment of 1 - alpha_bar itself, the quantity SpeeD's
               weights are made of, is below eps, plus one: from tau on the weights are flat (SpeeD sets them to 1)
               and sampling is suppressed k-fold.

Since d(1-alpha_bar) = 2 sqrt(1-alpha_bar) d sqrt(1-alpha_bar) and sqrt(1-alpha_bar) < 1, tau >= convergence always.

On SpeeD's linear DDPM schedule (betas 1e-4..0.02, T = 1000) the rule gives peak 219, convergence 642 (SpeeD's
ms exactly) and tau 699; SpeeD's configs use the round tau = 700 (pass tau=700 to reproduce them). Elsewhere:
cosine (s = 0.008) peak 497, convergence 964, tau 985; rectified flow 499 / 922 / 957; EDM (sigma cells over
[0.002, 80]) 6 / 116 / 146, i.e. sigma 9.4 and 11.7 (11.9 on the linear DDPM schedule).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedules import NoiseSchedule
from .. import checks
from .cells import TimeCells

DEFAULT_THRESHOLD = 1e-4


@dataclass(frozen=True)
class SpeedAreas:
    n: int  #: number of cells (training steps)
    peak: int  #: index of the peak of d(1-alpha_bar)/dt: acceleration is [0, peak)
    convergence: int  #: first index of the convergence area, SpeeD's "meaningful steps" ms
    tau: int  #: SpeeD's threshold: suppressed sampling and unit weights from here on
    t_peak: float  #: schedule time at the peak node
    t_convergence: float  #: schedule time at the convergence boundary
    t_tau: float  #: schedule time at tau
    one_minus_alpha_bar: torch.Tensor  #: (N,) for plotting
    increment: torch.Tensor  #: (N,) d(1-alpha_bar) per step, the quantity SpeeD weights by

    def area_of(self, index: torch.Tensor) -> torch.Tensor:
        """0 = acceleration, 1 = deceleration, 2 = convergence, for each step index."""
        return (index >= self.peak).long() + (index >= self.convergence).long()


def _first_flat_after(increment: torch.Tensor, peak: int, threshold: float, what: str) -> int:
    flat = increment < threshold
    flat[: peak + 1] = False  # the start of the process can be flat too (tiny beta); convergence comes after the peak
    hits = torch.nonzero(flat)
    if hits.numel() == 0:
        raise ValueError(f"the per-step increment of {what} never falls below threshold={threshold} after its "
                         "peak on this schedule; pass a larger threshold")
    return min(int(hits[0]) + 1, increment.numel() - 1)


def speed_areas(schedule: NoiseSchedule, threshold: float = DEFAULT_THRESHOLD, n: int = 1000) -> SpeedAreas:
    threshold = checks.positive("threshold (a per-step increment of sqrt(1-alpha_bar))", threshold)
    cells = TimeCells(schedule, n)
    omab = cells.one_minus_alpha_bar()
    increment = torch.gradient(omab)[0]  # central differences, as SpeeD (np.gradient)
    peak = int(increment.argmax())
    convergence = _first_flat_after(torch.gradient(omab.sqrt())[0], peak, threshold, "sqrt(1-alpha_bar)")
    tau = _first_flat_after(increment.clone(), peak, threshold, "1-alpha_bar")
    nodes = cells.nodes
    return SpeedAreas(
        n=cells.n, peak=peak, convergence=convergence, tau=tau, t_peak=float(nodes[peak]),
        t_convergence=float(nodes[convergence]), t_tau=float(nodes[tau]), one_minus_alpha_bar=omab,
        increment=increment,
    )
