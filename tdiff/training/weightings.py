"""Loss weights as functions of time, evaluated on the device without host syncs.

A weighting has a closed form in t, built only from `tdiff.schedules` quantities (snr, edm_sigma, ...). On a
discrete schedule the times are grid nodes, so the closed form is tabulated once over the N steps and looked up
(one gather instead of DiscreteVP's interpolation per call).

`space` says which error the weight multiplies: "target" (the network's regression target, as SpeeD, P2 and
Min-SNR define theirs) or "x0" (the denoised-sample error, as EDM and FDM define theirs). The loss converts x0-space
weights to its target.

- speed:   SpeeD's change-aware weights: the per-step noise increment d(1-alpha_bar)/dt, min-max normalised to
           [1-lambda, lambda] before tau, and 1 from tau on (SpeeD's `weighting="ours"`). lambda must lie in
           [0.5, 1]: below 0.5 the ordering flips, above 1 the low end goes negative (SpeeD's own constructor
           default lam=5 gives negative weights, their issue #11).
- min_snr: Min-SNR-gamma (Hang et al.): the x0-space weight min(snr, gamma), expressed per target: eps
           min(snr, gamma)/snr, x0 min(snr, gamma), v min(snr, gamma)/(snr+1), flow (the velocity u = alpha' x0 +
           sigma' eps) min(snr, gamma)/(alpha lambda')^2, which is min(snr, gamma) t^2 on rectified flow. Written so
           that snr = 0 (zero terminal SNR) and snr = inf give finite values: min(snr, g)/snr is g/max(snr, g),
           which is 1 at snr = 0.
- p2:      P2 (Choi et al.): 1/(k + snr)^gamma on the eps loss.
- edm:     EDM's weight (Karras et al.) on the denoised-sample error, (sigma^2 + sigma_d^2)/(sigma sigma_d)^2, with
           sigma the EDM noise level sigma/alpha of the schedule and sigma_d the schedule's sigma_data when it has
           one (EDM), else 0.5.
- preconditioning: a preconditioning's own x0-space weight lambda(sigma) (1/sigma^2 for VP/VE, EDM's for EDM),
           FDM's default.
"""
from __future__ import annotations

import abc
from typing import Optional

import torch

from ..preconditioning import Preconditioning
from ..schedules import NoiseSchedule
from .. import checks
from .cells import PerDevice, TimeCells, build_from_registry
from .speed_areas import DEFAULT_THRESHOLD, speed_areas


def schedule_sigma_data(schedule: NoiseSchedule, sigma_data: Optional[float], name: str = "sigma_data") -> float:
    """The data standard deviation of EDM's preconditioning: the schedule's own (EDM(sigma_data=...)) when it has
    one, which an explicit value must then agree with, else the given value or EDM's 0.5."""
    own = getattr(schedule, "sigma_data", None)
    if sigma_data is None:
        return 0.5 if own is None else float(own)
    value = checks.positive(name, sigma_data)
    if own is not None and value != float(own):
        raise ValueError(f"{name}={value} contradicts the schedule's sigma_data={own}; leave {name} unset to use "
                         "the schedule's")
    return value


class Weighting(abc.ABC):
    name = "base"
    space = "target"
    #: weights looked up in `table()` per cell even for continuous schedules (a per-step quantity)
    tabulated = False

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        self.schedule = schedule
        self.cells = TimeCells(schedule, n)
        self._tables = None  # built on first use: subclasses set their parameters after this

    def table_on(self, device) -> torch.Tensor:
        """The (N,) table on `device` (made once, copied to each device once)."""
        if self._tables is None:
            self._tables = PerDevice(lambda: self._check_table(self.table()))
        return self._tables.on(device)

    @abc.abstractmethod
    def formula(self, t: torch.Tensor) -> torch.Tensor:
        """float64 weights at float64 times."""

    def table(self) -> torch.Tensor:
        """(N,) weights on the cell nodes, for plotting and for discrete schedules."""
        return self.formula(self.cells.nodes)

    def _check_table(self, w: torch.Tensor) -> torch.Tensor:
        if torch.isnan(w).any() or bool((w < 0).any()):
            raise ValueError(f"{self.name} weights must be non-negative and not NaN; check its parameters")
        return w

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.cells.discrete or self.tabulated:
            return self.table_on(t.device)[self.cells.cell_of(t)].to(t.dtype)
        return self.formula(t.to(torch.float64)).to(t.dtype)

    def config(self) -> dict:
        return {"name": self.name}


class UnitWeight(Weighting):
    name = "none"

    def formula(self, t):
        return torch.ones_like(t, dtype=torch.float64)


class SpeedWeight(Weighting):
    name = "speed"
    tabulated = True

    def __init__(self, schedule: NoiseSchedule, lam: float = 0.6, tau: Optional[int] = None,
                 threshold: float = DEFAULT_THRESHOLD, n: int = 1000):
        super().__init__(schedule, n)
        self.lam = checks.real("lam (SpeeD's lambda)", lam, low=0.5, high=1.0)
        areas = speed_areas(schedule, threshold=threshold, n=n)
        self.threshold = float(threshold)
        self.tau = areas.tau if tau is None else checks.integer(
            "tau (a step index of the schedule's cells)", tau, low=1, high=self.cells.n - 1)
        inc = areas.increment
        norm = (inc - inc.min()) / (inc.max() - inc.min())
        w = (1.0 - self.lam) + (2.0 * self.lam - 1.0) * norm
        w[self.tau:] = 1.0
        self._w = self._check_table(w)

    def table(self):
        return self._w

    def formula(self, t):  # the same per-cell lookup as __call__ makes (tabulated)
        return self._w.to(t.device)[self.cells.cell_of(t)]

    def config(self):
        return {"name": self.name, "lam": self.lam, "tau": self.tau, "threshold": self.threshold}


MIN_SNR_TARGETS = ("eps", "x0", "v", "flow")


class MinSNRWeight(Weighting):
    name = "min_snr"

    def __init__(self, schedule: NoiseSchedule, gamma: float = 5.0, target: str = "eps", n: int = 1000):
        super().__init__(schedule, n)
        self.gamma = checks.positive("gamma", gamma)
        self.target = checks.choice("target (Min-SNR's regression target)", target, MIN_SNR_TARGETS)
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
        # |x0 err| / |u err| = sigma/(alpha sigma' - sigma alpha') = 1/|alpha lambda'|, so the weight is
        # min(snr, g)/(alpha lambda')^2 = min(1/sigma^2, g/alpha^2)/lambda'^2, finite at both ends
        s = self.schedule
        inv = torch.minimum(torch.exp(-2.0 * s.log_sigma(t)), g * torch.exp(-2.0 * s.log_alpha(t)))
        return inv / s.d_lambda(t) ** 2

    def config(self):
        return {"name": self.name, "gamma": self.gamma, "target": self.target}


class P2Weight(Weighting):
    name = "p2"

    def __init__(self, schedule: NoiseSchedule, k: float = 1.0, gamma: float = 1.0, n: int = 1000):
        super().__init__(schedule, n)
        self.k = checks.positive("k (P2's k keeps 1/(k+snr)^gamma finite at snr=0)", k)
        self.gamma = checks.real("gamma", gamma, low=0.0)

    def formula(self, t):
        return (self.k + self.schedule.snr(t)) ** (-self.gamma)

    def config(self):
        return {"name": self.name, "k": self.k, "gamma": self.gamma}


class PreconditioningWeight(Weighting):
    """A preconditioning's own x0-space weight lambda(sigma): FDM's default."""

    name = "preconditioning"
    space = "x0"

    def __init__(self, schedule: NoiseSchedule, precond: Preconditioning, n: int = 1000):
        super().__init__(schedule, n)
        if not isinstance(precond, Preconditioning):
            raise TypeError(f"precond must be a tdiff.preconditioning.Preconditioning, got {type(precond).__name__}")
        self.precond = precond

    def formula(self, t):
        return self.precond.loss_weight(self.schedule.edm_sigma(t))

    def config(self):
        return {"name": self.name, "kind": self.precond.kind, "sigma_data": self.precond.sigma_data}


class EDMWeight(PreconditioningWeight):
    """EDM's weight for any schedule: the EDM preconditioning's own, whatever preconditioning the loss uses."""

    name = "edm"

    def __init__(self, schedule: NoiseSchedule, sigma_data: Optional[float] = None, n: int = 1000):
        TimeCells(schedule, n)  # the schedule check, before its sigma_data is read
        super().__init__(schedule, Preconditioning("edm", schedule_sigma_data(schedule, sigma_data)), n)
        self.sigma_data = self.precond.sigma_data

    def config(self):
        return {"name": self.name, "sigma_data": self.sigma_data}


class ProductWeight(Weighting):
    """The product of weightings, e.g. SpeeD's change-aware weights on top of FDM's lambda(sigma) (SpeeD + FDM,
    SpeeD's supplement A.4). At most one factor may weigh the x0 error; the product is then an x0-space weight
    (the other factors multiply the target error as they would alone), and a warm-up clamps the whole product."""

    name = "product"

    def __init__(self, *factors: Weighting):
        if len(factors) < 2 or not all(isinstance(f, Weighting) for f in factors):
            raise TypeError("ProductWeight takes two or more Weighting objects")
        schedule = factors[0].schedule
        if any(f.schedule is not schedule for f in factors):
            raise ValueError("the factors of a ProductWeight must be built on the same schedule object")
        if sum(f.space == "x0" for f in factors) > 1:
            raise ValueError("at most one factor of a ProductWeight may be an x0-space weight")
        super().__init__(schedule, factors[0].cells.n)
        self.factors = tuple(factors)
        self.space = "x0" if any(f.space == "x0" for f in factors) else "target"

    def formula(self, t):
        out = self.factors[0].formula(t)
        for f in self.factors[1:]:
            out = out * f.formula(t)
        return out

    def __call__(self, t):
        out = self.factors[0](t)
        for f in self.factors[1:]:
            out = out * f(t)
        return out

    def table_on(self, device):
        for f in self.factors:
            if f.cells.discrete or f.tabulated:
                f.table_on(device)
        return super().table_on(device)

    def config(self):
        return {"name": self.name, "factors": [f.config() for f in self.factors]}


WEIGHTINGS = {
    "none": UnitWeight,
    "speed": SpeedWeight,
    "min_snr": MinSNRWeight,
    "p2": P2Weight,
    "edm": EDMWeight,
}


def make_weighting(weighting, schedule, **kwargs) -> Weighting:
    """`make_weighting("min_snr", schedule, gamma=5, target="v")`, or an already-built Weighting."""
    return build_from_registry("weighting", "none" if weighting is None else weighting, WEIGHTINGS, Weighting,
                               schedule, **kwargs)
