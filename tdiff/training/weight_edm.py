"""EDM's loss weight (Karras et al.) on the denoised-sample error: (sigma^2 + sigma_d^2)/(sigma sigma_d)^2,
with sigma the EDM noise level sigma/alpha of the schedule. With EDM preconditioning it makes the effective
weight on the network output exactly 1."""
from __future__ import annotations

from ..schedules import NoiseSchedule
from ..preconditioning import Preconditioning
from .weighting_base import Weighting


class PreconditioningWeight(Weighting):
    """A preconditioning's own x0-space weight lambda(sigma) (1/sigma^2 for VP/VE, EDM's for EDM): FDM's default."""

    name = "preconditioning"
    space = "x0"

    def __init__(self, schedule: NoiseSchedule, precond: Preconditioning, n: int = 1000):
        super().__init__(schedule, n)
        self.precond = precond

    def formula(self, t):
        return self.precond.loss_weight(self.schedule.edm_sigma(t))

    def config(self):
        return {"name": self.name, "kind": self.precond.kind, "sigma_data": self.precond.sigma_data}


class EDMWeight(PreconditioningWeight):
    """EDM's weight for any schedule: the EDM preconditioning's own, whatever preconditioning the loss uses."""

    name = "edm"

    def __init__(self, schedule: NoiseSchedule, sigma_data: float = 0.5, n: int = 1000):
        super().__init__(schedule, Preconditioning("edm", sigma_data), n)
        self.sigma_data = self.precond.sigma_data

    def config(self):
        return {"name": self.name, "sigma_data": self.sigma_data}
