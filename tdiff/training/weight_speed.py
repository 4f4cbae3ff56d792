"""SpeeD's change-aware weights: the per-step noise increment d(1-alpha_bar)/dt, min-max normalised to
[1-lambda, lambda] before the threshold tau, and 1 from tau on (SpeeD's `weighting="ours"`).

lambda must lie in [0.5, 1]: below 0.5 the ordering flips, above 1 the low end goes negative (SpeeD's own
constructor default lam=5 gives negative weights, their issue #11).
"""
from __future__ import annotations

from typing import Optional

from ..schedules import NoiseSchedule
from .sampler_speed import speed_tau_default
from .speed_areas import speed_areas
from .weighting_base import Weighting


class SpeedWeight(Weighting):
    name = "speed"
    tabulated = True

    def __init__(self, schedule: NoiseSchedule, lam: float = 0.6, tau: Optional[int] = None, n: int = 1000):
        super().__init__(schedule, n)
        if not (0.5 <= float(lam) <= 1.0):
            raise ValueError(f"lam (SpeeD lambda) must be in [0.5, 1], got {lam}")
        tau = speed_tau_default(self.grid.n) if tau is None else tau
        if int(tau) != tau or not (0 < int(tau) < self.grid.n):
            raise ValueError(f"tau must be an integer step inside the schedule, 0 < tau < {self.grid.n}, got {tau}")
        self.lam, self.tau = float(lam), int(tau)
        inc = speed_areas(schedule, n=n).increment
        norm = (inc - inc.min()) / (inc.max() - inc.min())
        w = (1.0 - self.lam) + (2.0 * self.lam - 1.0) * norm
        w[self.tau:] = 1.0
        self._w = self._check_table(w)

    def table(self):
        return self._w

    def formula(self, t):  # the same per-cell lookup as __call__ makes (tabulated)
        return self._w.to(t.device)[self.grid.cell_of(t)]

    def config(self):
        return {"name": self.name, "lam": self.lam, "tau": self.tau}
