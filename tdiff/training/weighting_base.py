"""Loss weights as functions of time, evaluated on the device without host syncs.

A weighting has a closed form in t, built only from `tdiff.schedules` quantities (snr, edm_sigma, ...). On a
discrete schedule the times are grid nodes, so the closed form is tabulated once over the N steps and looked up
(one gather instead of DiscreteVP's interpolation per call).

`space` says which error the weight multiplies: "target" (the network's regression target, as SpeeD, P2 and
Min-SNR define theirs) or "x0" (the denoised-sample error, as EDM and FDM define theirs). The loss converts x0-space
weights to its target.
"""
from __future__ import annotations

import abc

import torch

from ..schedules import NoiseSchedule
from .per_device import PerDevice
from .time_grid import TimeGrid


class Weighting(abc.ABC):
    name = "base"
    space = "target"
    #: weights looked up in `table()` per grid cell even for continuous schedules (a per-step quantity)
    tabulated = False

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        self.schedule = schedule
        self.grid = TimeGrid(schedule, n)
        self._tables = PerDevice(lambda: self._check_table(self.table()))

    @abc.abstractmethod
    def formula(self, t: torch.Tensor) -> torch.Tensor:
        """float64 weights at float64 times."""

    def table(self) -> torch.Tensor:
        """(N,) weights on the grid nodes, for plotting and for discrete schedules."""
        return self.formula(self.grid.nodes)

    def _check_table(self, w: torch.Tensor) -> torch.Tensor:
        if torch.isnan(w).any() or bool((w < 0).any()):
            raise ValueError(f"{self.name} weights must be non-negative and not NaN; check its parameters")
        return w

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.grid.discrete or self.tabulated:
            return self._tables.on(t.device)[self.grid.cell_of(t)].to(t.dtype)
        return self.formula(t.to(torch.float64)).to(t.dtype)

    def config(self) -> dict:
        return {"name": self.name}


class UnitWeight(Weighting):
    name = "none"

    def formula(self, t):
        return torch.ones_like(t, dtype=torch.float64)
