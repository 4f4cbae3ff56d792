"""Training time-step samplers: which times t a training batch sees. Every sampler is an inverse CDF applied to a
uniform draw.

That one shape gives three things at once: sampling stays on the device (a torch.Generator on the device, a
precomputed CDF and `torch.searchsorted`: no numpy, no CPU multinomial, no host sync); stratified sampling across
DDP ranks only has to stratify the uniforms; and the sampling density p(t) is known, so the "unbiased" loss mode
can importance-correct by it.

`relative_density(t)` is p(t) divided by the uniform density over the training interval (or the uniform pmf 1/N
of a discrete schedule), so 1/relative_density is the importance weight back to uniform training.

- uniform:      uniform over the N training steps, or over [t_min, t_max] for continuous schedules.
- speed:        SpeeD (Wang et al.): steps before tau drawn k times more often, half the batch dual-reflected
                around the convergence boundary (tau and the boundary from `speed_areas`).
- lognormal:    EDM (Karras et al.): ln(sigma) ~ N(P_mean, P_std^2), defaults -1.2, 1.2.
- logitnormal:  SD3 (Esser et al.): logit of t rescaled to [0, 1] ~ N(m, s^2), defaults 0, 1.
- loguniform:   ln(sigma) uniform over the training interval (EDM's VE and FDM's VE losses).

(They are "time-step samplers"; a "sampler" in `tdiff.solvers` is the sampling loop.)
"""
from __future__ import annotations

import abc
import math
from typing import Optional

import torch

from ..schedules import EDM, NoiseSchedule
from .. import checks
from .cells import PerDevice, TimeCells, build_from_registry
from .speed_areas import DEFAULT_THRESHOLD, speed_areas

# keep u off 0 and 1 so that inverse normal CDFs stay finite
_U_EPS = 1e-12


class TimestepSampler(abc.ABC):
    name = "base"

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        self.schedule = schedule
        self.cells = TimeCells(schedule, n)

    @abc.abstractmethod
    def from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map float64 uniforms in [0, 1) to schedule times (float64), same shape."""

    @abc.abstractmethod
    def relative_density(self, t: torch.Tensor) -> torch.Tensor:
        """p(t) over the uniform density of the training interval (the uniform pmf of a discrete schedule)."""

    def sample(self, batch: int, generator: Optional[torch.Generator] = None, device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch,) schedule times."""
        batch = checks.integer("batch", batch, low=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
        return self.from_uniform(u).to(dtype)

    def sample_indices(self, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """(batch,) integer training steps of a discrete schedule: diffusers' `timesteps`, for
        `noise_scheduler.add_noise(x0, noise, timesteps)` and `model(noisy, timesteps)`."""
        if not self.cells.discrete:
            raise ValueError(f"sample_indices needs a discrete schedule (DiscreteVP); {type(self.schedule).__name__} "
                             "is continuous: use sample()")
        return self.cells.cell_of(self.sample(batch, generator, device, torch.float64))

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


class TableSampler(TimestepSampler):
    """A piecewise-constant density over the cells: exact inverse CDF, one uniform per sample (the position of u
    inside its cell's CDF mass doubles as the jitter inside the cell for continuous schedules)."""

    def __init__(self, schedule: NoiseSchedule, probs: torch.Tensor, n: int = 1000):
        super().__init__(schedule, n)
        probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
        if probs.numel() != self.cells.n:
            raise ValueError(f"probs must have one entry per cell ({self.cells.n}), got {probs.numel()}")
        if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or not bool(probs.sum() > 0):
            raise ValueError("probs must be finite and non-negative, with a positive sum")
        self.probs = probs / probs.sum()
        self._tables = PerDevice(self._make_tables)
        # the density relative_density reports (a subclass that transforms its draws sets its own)
        self.density = PerDevice(lambda: self.probs)

    def _make_tables(self):
        cdf = torch.cumsum(self.probs, 0)
        return self.probs, cdf / cdf[-1]

    def table_on(self, device):
        """(probs, cdf) on `device`."""
        return self._tables.on(device)

    def cells_from_uniform(self, u: torch.Tensor):
        probs, cdf = self.table_on(u.device)
        cell = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=self.cells.n - 1)
        below = torch.where(cell > 0, cdf[(cell - 1).clamp(min=0)], torch.zeros_like(u))
        jitter = ((u - below) / probs[cell].clamp(min=1e-300)).clamp(0.0, 1.0 - 1e-12)
        return cell, jitter

    def from_uniform(self, u):
        cell, jitter = self.cells_from_uniform(u)
        return self.cells.time_of(cell, jitter)

    def relative_density(self, t):
        return self.density.on(t.device)[self.cells.cell_of(t)] * self.cells.n


class UniformSampler(TableSampler):
    name = "uniform"

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        super().__init__(schedule, torch.ones(TimeCells(schedule, n).n, dtype=torch.float64), n)


class SpeedSampler(TableSampler):
    """SpeeD's asymmetric time sampling (Wang et al., "A Closer Look at Time Steps is Worthy of Triple Speed-Up").

    Steps before the threshold tau are drawn k times more often than steps after it (the convergence area, where
    the process has reached noise and the loss is nearly constant). As in SpeeD's code, half of the batch is then
    "dual reflected" around the convergence boundary ms: step i becomes |ms - i|, which folds draws from the
    convergence area back onto the early, informative steps while keeping the batch balanced. tau and ms come
    from the schedule (`speed_areas`: 699 and 642 on the linear DDPM schedule; SpeeD's configs use tau = 700).

    Batch layout: the first ceil(B/2) entries are drawn, the remaining floor(B/2) are the reflections of the first
    floor(B/2) draws. (SpeeD draws B//2 + 1 and truncates, which reflects one sample fewer for even B.)
    """

    name = "speed"

    def __init__(self, schedule: NoiseSchedule, k: float = 2.0, tau: Optional[int] = None, reflect: bool = True,
                 threshold: float = DEFAULT_THRESHOLD, n: int = 1000):
        cells = TimeCells(schedule, n)
        self.k = checks.positive("k (SpeeD's suppression ratio)", k)
        self.reflect = checks.flag("reflect", reflect)
        self.threshold = checks.positive("threshold", threshold)
        self.areas = speed_areas(schedule, threshold=self.threshold, n=n)
        self.tau = self.areas.tau if tau is None else checks.integer(
            "tau (a step index of the schedule's cells)", tau, low=1, high=cells.n - 1)
        probs = torch.ones(cells.n, dtype=torch.float64)
        probs[: self.tau] = self.k
        super().__init__(schedule, probs, n)
        self.ms = self.areas.convergence
        # density of a reflected draw: mass of i moves to |ms - i|
        idx = torch.arange(self.cells.n)
        reflected = torch.zeros_like(self.probs).index_add_(0, (self.ms - idx).abs().clamp(max=self.cells.n - 1),
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
            cell[b - half:] = (self.ms - cell[:half]).abs().clamp(max=self.cells.n - 1)
        return self.cells.time_of(cell, jitter)

    def config(self):
        return {"name": self.name, "k": self.k, "tau": self.tau, "reflect": self.reflect, "ms": self.ms,
                "threshold": self.threshold}


class _TransformSampler(TimestepSampler):
    """A law given in a transform x(t) increasing in t: continuous schedules invert x exactly (t clamped into the
    training interval, except EDM whose sigma is unbounded); discrete schedules get the law's mass per training
    step (CDF differences at the cell edges, tails lumped into the end steps) and sample it as a table."""

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        super().__init__(schedule, n)
        self._table = None
        if self.cells.discrete:
            c = self.cells
            inner = c.t_lo + c.width * torch.arange(1, c.n, dtype=torch.float64)
            cdf = self.cdf_of_x(self.x_of_t(inner))
            cdf = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])
            self._table = TableSampler(schedule, (cdf[1:] - cdf[:-1]).clamp(min=0), n)

    @abc.abstractmethod
    def x_of_t(self, t):
        """The transform, increasing in t."""

    @abc.abstractmethod
    def t_of_x(self, x):
        """Its inverse."""

    @abc.abstractmethod
    def dx_dt(self, t):
        """Its derivative."""

    @abc.abstractmethod
    def x_from_uniform(self, u):
        """The law's inverse CDF in x."""

    @abc.abstractmethod
    def cdf_of_x(self, x):
        """The law's CDF in x."""

    @abc.abstractmethod
    def pdf_of_x(self, x):
        """The law's density in x."""

    def from_uniform(self, u):
        if self._table is not None:
            return self._table.from_uniform(u)
        return self.t_of_x(self.x_from_uniform(u))

    def relative_density(self, t):
        if self._table is not None:
            return self._table.relative_density(t)
        t64 = t.to(torch.float64)
        pdf_t = self.pdf_of_x(self.x_of_t(t64)) * self.dx_dt(t64).abs()
        return (pdf_t * (self.cells.t_hi - self.cells.t_lo)).to(t.dtype)


class _NormalInTransform(_TransformSampler):
    def __init__(self, schedule: NoiseSchedule, mean: float, std: float, n: int, names=("mean", "std")):
        self.mean = checks.real(names[0], mean)
        self.std = checks.positive(names[1], std)
        super().__init__(schedule, n)

    def x_from_uniform(self, u):
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(_U_EPS, 1 - _U_EPS) - 1.0)
        return self.mean + self.std * z

    def cdf_of_x(self, x):
        return torch.special.ndtr((x - self.mean) / self.std)

    def pdf_of_x(self, x):
        z = (x - self.mean) / self.std
        return torch.exp(-0.5 * z * z) / (self.std * math.sqrt(2 * math.pi))

    def config(self):
        return {"name": self.name, "mean": self.mean, "std": self.std}


class _InLogSigma:
    """x = ln(sigma_edm) = -lambda(t)."""

    def x_of_t(self, t):
        return -self.schedule.lambda_(t)

    def t_of_x(self, x):
        if isinstance(self.schedule, EDM):
            return x.exp()  # t is sigma; EDM's log-normal is not truncated
        # t_from_lambda, not t_from_edm_sigma: the latter validates and would sync the host
        return self.schedule.t_from_lambda(-x).clamp(self.cells.t_lo, self.cells.t_hi)

    def dx_dt(self, t):
        return -self.schedule.d_lambda(t)


class LogNormalSampler(_InLogSigma, _NormalInTransform):
    name = "lognormal"

    def __init__(self, schedule: NoiseSchedule, p_mean: float = -1.2, p_std: float = 1.2, n: int = 1000):
        super().__init__(schedule, p_mean, p_std, n, names=("p_mean", "p_std"))


class LogitNormalSampler(_NormalInTransform):
    name = "logitnormal"

    def __init__(self, schedule: NoiseSchedule, mean: float = 0.0, std: float = 1.0, n: int = 1000):
        super().__init__(schedule, mean, std, n)

    def _span(self):
        return self.cells.t_lo, self.cells.t_hi - self.cells.t_lo

    def x_of_t(self, t):
        lo, span = self._span()
        return torch.logit((t - lo) / span)

    def t_of_x(self, x):
        lo, span = self._span()
        return lo + span * torch.sigmoid(x)

    def dx_dt(self, t):
        lo, span = self._span()
        r = (t - lo) / span
        return 1.0 / (span * r * (1.0 - r))


class LogUniformSampler(_InLogSigma, _TransformSampler):
    """ln(sigma) uniform between the EDM sigmas at the schedule's t_min and t_max: sigma_min (sigma_max/sigma_min)^u,
    EDM's and FDM's VE loss."""

    name = "loguniform"

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        self.schedule = schedule
        self.cells = TimeCells(schedule, n)
        self.x_lo, self.x_hi = (float(self.x_of_t(torch.tensor(v, dtype=torch.float64)))
                                for v in (schedule.t_min, schedule.t_max))
        if not (math.isfinite(self.x_lo) and math.isfinite(self.x_hi) and self.x_hi > self.x_lo):
            raise ValueError(f"loguniform needs a finite log-sigma range over the training interval of {schedule!r}, "
                             f"got [{self.x_lo}, {self.x_hi}]")
        super().__init__(schedule, n)

    def x_from_uniform(self, u):
        return self.x_lo + u * (self.x_hi - self.x_lo)

    def cdf_of_x(self, x):
        return ((x - self.x_lo) / (self.x_hi - self.x_lo)).clamp(0.0, 1.0)

    def pdf_of_x(self, x):
        return torch.full_like(x, 1.0 / (self.x_hi - self.x_lo))


SAMPLERS = {
    "uniform": UniformSampler,
    "speed": SpeedSampler,
    "lognormal": LogNormalSampler,
    "edm": LogNormalSampler,
    "logitnormal": LogitNormalSampler,
    "sd3": LogitNormalSampler,
    "loguniform": LogUniformSampler,
}


def make_sampler(sampler, schedule, **kwargs) -> TimestepSampler:
    """`make_sampler("speed", schedule, k=2, tau=700)`, or an already-built TimestepSampler."""
    return build_from_registry("sampler", sampler, SAMPLERS, TimestepSampler, schedule, **kwargs)
