"""Samplers that are a normal distribution in some transform x(t) of time.

- EDM log-normal (Karras et al.): x = ln(sigma_edm) = -lambda(t), x ~ N(P_mean, P_std^2), defaults -1.2, 1.2.
- SD3 logit-normal (Esser et al.): x = logit of t rescaled to [0, 1] over the training interval, x ~ N(m, s^2),
  defaults 0, 1.

Continuous schedules invert x exactly (t clamped into the training interval, except EDM whose sigma is
unbounded). Discrete schedules get the normal's mass per training step (CDF differences at the cell edges, tails
lumped into the end steps) and sample it as a table.
"""
from __future__ import annotations

import abc

import math

import torch

from ..schedules import EDM, NoiseSchedule
from .sampler_base import _U_EPS, TableSampler, TimestepSampler


class _NormalInTransform(TimestepSampler):
    def __init__(self, schedule: NoiseSchedule, mean: float, std: float, n: int = 1000):
        super().__init__(schedule, n)
        if not (std > 0) or math.isnan(mean) or math.isinf(mean):
            raise ValueError(f"std must be > 0 and mean finite, got mean={mean}, std={std}")
        self.mean, self.std = float(mean), float(std)
        self._table = None
        if self.grid.discrete:
            g = self.grid
            inner = g.t_lo + g.width * torch.arange(1, g.n, dtype=torch.float64)
            cdf = torch.special.ndtr((self.x_of_t(inner) - self.mean) / self.std)
            cdf = torch.cat([cdf.new_zeros(1), cdf, cdf.new_ones(1)])
            self._table = TableSampler(schedule, (cdf[1:] - cdf[:-1]).clamp(min=0), n)

    # the transform, increasing in t
    @abc.abstractmethod
    def x_of_t(self, t):
        """Subclasses define this."""

    @abc.abstractmethod
    def t_of_x(self, x):
        """Subclasses define this."""

    @abc.abstractmethod
    def dx_dt(self, t):
        """Subclasses define this."""

    def from_uniform(self, u):
        if self._table is not None:
            return self._table.from_uniform(u)
        z = math.sqrt(2.0) * torch.erfinv(2.0 * u.clamp(_U_EPS, 1 - _U_EPS) - 1.0)
        return self.t_of_x(self.mean + self.std * z)

    def relative_density(self, t):
        if self._table is not None:
            return self._table.relative_density(t)
        t64 = t.to(torch.float64)
        z = (self.x_of_t(t64) - self.mean) / self.std
        pdf_t = torch.exp(-0.5 * z * z) / (self.std * math.sqrt(2 * math.pi)) * self.dx_dt(t64).abs()
        return (pdf_t * (self.grid.t_hi - self.grid.t_lo)).to(t.dtype)

    def config(self):
        return {"name": self.name, "mean": self.mean, "std": self.std}


class LogNormalSampler(_NormalInTransform):
    name = "lognormal"

    def __init__(self, schedule: NoiseSchedule, p_mean: float = -1.2, p_std: float = 1.2, n: int = 1000):
        self.is_edm = isinstance(schedule, EDM)
        super().__init__(schedule, p_mean, p_std, n)

    def x_of_t(self, t):
        return -self.schedule.lambda_(t)

    def t_of_x(self, x):
        if self.is_edm:
            return x.exp()  # t is sigma; EDM's log-normal is not truncated
        # t_from_lambda, not t_from_edm_sigma: the latter validates and would sync the host
        return self.schedule.t_from_lambda(-x).clamp(self.grid.t_lo, self.grid.t_hi)

    def dx_dt(self, t):
        return -self.schedule.d_lambda(t)


class LogitNormalSampler(_NormalInTransform):
    name = "logitnormal"

    def __init__(self, schedule: NoiseSchedule, mean: float = 0.0, std: float = 1.0, n: int = 1000):
        super().__init__(schedule, mean, std, n)

    def _span(self):
        return self.grid.t_lo, self.grid.t_hi - self.grid.t_lo

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
