"""Denoiser preconditioning D(x) = c_skip x + c_out F(c_in x, c_noise), in the EDM noise level sigma = sigma/alpha,
with x the sigma-space sample x0 + sigma eps (= x_t / alpha).

- "edm":   Karras et al.: c_skip = sd^2/(s^2+sd^2), c_out = s sd/sqrt(s^2+sd^2), c_in = 1/sqrt(s^2+sd^2);
           own loss weight lambda = (s^2+sd^2)/(s sd)^2.
- "vp":    Song et al. (EDM's VPPrecond): c_skip = 1, c_out = -s, c_in = 1/sqrt(s^2+1); lambda = 1/s^2 (eps-loss).
- "ve":    Song et al. (EDM's VEPrecond): c_skip = 1, c_out = s, c_in = 1; lambda = 1/s^2.

For FDM (Wu et al., Table 1) c_in is *replaced* by the momentum factor e^{-mB(t')}(1+mB(t')) in every variant
("input" mode), or the factor scales x0 in the forward process and c_in stays ("mean" mode, paper Eq. 15); c_skip,
c_out and lambda are unchanged. The factor itself is `tdiff.schedules.FDMMomentum`.

The network's regression target follows from D = x0: F* = (x0 - c_skip x_in)/c_out, and the x0-space weight
lambda becomes lambda c_out^2 on F.

Used by the denoiser wrappers (sampling) and by DiffusionLoss (training), so both sides share one formula.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

KINDS = ("edm", "vp", "ve")


class Preconditioning:
    def __init__(self, kind: str, sigma_data: float = 0.5):
        if kind not in KINDS:
            raise ValueError(f"preconditioning kind must be one of {KINDS}, got {kind!r}")
        try:
            value = None if isinstance(sigma_data, (bool, str)) else float(sigma_data)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value) or not value > 0:
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data!r}")
        self.kind, self.sigma_data = kind, float(sigma_data)

    def c_skip(self, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "edm":
            return self.sigma_data**2 / (s * s + self.sigma_data**2)
        return torch.ones_like(s)

    def c_out(self, s: torch.Tensor) -> torch.Tensor:
        if self.kind == "edm":
            return s * self.sigma_data / torch.sqrt(s * s + self.sigma_data**2)
        return -s if self.kind == "vp" else s

    def c_in(self, s: torch.Tensor) -> torch.Tensor:
        sd = self.input_sigma_data()
        return torch.ones_like(s) if sd is None else torch.rsqrt(s * s + sd * sd)

    def input_sigma_data(self) -> Optional[float]:
        """The sigma_data that makes tdiff::noisy_sample write this c_in (None: c_in = 1)."""
        return {"edm": self.sigma_data, "vp": 1.0, "ve": None}[self.kind]

    def loss_weight(self, s: torch.Tensor) -> torch.Tensor:
        """The variant's own weight lambda(sigma) on the x0 (denoiser) error."""
        if self.kind == "edm":
            sd = self.sigma_data
            return (s * s + sd * sd) / (s * sd) ** 2
        return 1.0 / (s * s)

    @staticmethod
    def default_for(schedule) -> str:
        return "vp" if schedule.family == "vp" else ("edm" if type(schedule).__name__ == "EDM" else "ve")
