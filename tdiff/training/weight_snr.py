"""SNR-based weights.

- Min-SNR-gamma (Hang et al.): the x0-space weight min(snr, gamma), expressed per target:
  eps: min(snr, gamma)/snr, x0: min(snr, gamma), v: min(snr, gamma)/(snr+1), flow (v = eps - x0 with
  alpha = 1 - sigma): min(snr, gamma) sigma^2. Each is written so that snr = 0 (zero terminal SNR) and
  snr = inf give finite values: min(snr, g)/snr is g/max(snr, g), which is 1 at snr = 0.
- P2 (Choi et al.): 1/(k + snr)^gamma on the eps loss.
"""
from __future__ import annotations

import torch

from ..schedules import NoiseSchedule
from .weighting_base import Weighting

MIN_SNR_TARGETS = ("eps", "x0", "v", "flow")


class MinSNRWeight(Weighting):
    name = "min_snr"

    def __init__(self, schedule: NoiseSchedule, gamma: float = 5.0, target: str = "eps", n: int = 1000):
        super().__init__(schedule, n)
        if not (float(gamma) > 0):
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if target not in MIN_SNR_TARGETS:
            raise ValueError(f"target must be one of {MIN_SNR_TARGETS} for Min-SNR, got {target!r}")
        self.gamma, self.target = float(gamma), target
        self.space = "x0" if target == "x0" else "target"  # the x0 form converts to any other target

    def formula(self, t):
        snr = self.schedule.snr(t)
        g = self.gamma
        if self.target == "eps":
            return g / torch.clamp(snr, min=g)
        if self.target == "x0":
            return torch.clamp(snr, max=g)
        if self.target == "v":
            return torch.clamp(snr, max=g) / (snr + 1.0)  # inf snr: g/inf = 0
        sigma2 = self.schedule.sigma(t) ** 2  # flow
        return torch.clamp(snr, max=g) * sigma2

    def config(self):
        return {"name": self.name, "gamma": self.gamma, "target": self.target}


class P2Weight(Weighting):
    name = "p2"

    def __init__(self, schedule: NoiseSchedule, k: float = 1.0, gamma: float = 1.0, n: int = 1000):
        super().__init__(schedule, n)
        if not (float(k) > 0):
            raise ValueError(f"k must be > 0 (it keeps 1/(k+snr)^gamma finite at snr=0), got {k}")
        if not (float(gamma) >= 0):
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.k, self.gamma = float(k), float(gamma)

    def formula(self, t):
        return (self.k + self.schedule.snr(t)) ** (-self.gamma)

    def config(self):
        return {"name": self.name, "k": self.k, "gamma": self.gamma}
