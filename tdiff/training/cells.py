"""The training-time cells that table-based samplers and weights live on, and the per-device copies of those tables.

A discrete schedule (DiscreteVP) already has N training steps, t_i = (i+1)/N. A continuous schedule is cut into N
equal cells over its training interval [t_min, t_max], with node t_i at the right edge of cell i, the same
convention as the discrete case. Table samplers (SpeeD) pick a cell and, for a continuous schedule, a uniform point
inside it; table weights look the cell up again from t.

1 - alpha_bar is taken from the half log-SNR as sigmoid(-2 lambda) = 1/(1+snr): for VP schedules that is exactly
1 - alpha_bar, and for VE/EDM/flow it is the variance-preserving equivalent, so "any schedule" has one meaning.

(Named cells, not grid: `tdiff.solvers.Grid` is the sampling-side grid of solver steps.)
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch

from ..schedules import DiscreteVP, NoiseSchedule
from .. import checks

Tables = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def check_schedule(schedule) -> NoiseSchedule:
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule must be a tdiff.schedules.NoiseSchedule, got {type(schedule).__name__}")
    return schedule


class TimeCells:
    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        self.schedule = check_schedule(schedule)
        self.discrete = isinstance(schedule, DiscreteVP)
        if self.discrete:
            self.n = schedule.n
            self.t_lo, self.t_hi = 0.0, 1.0
            self.nodes = schedule.t_from_index(torch.arange(self.n, dtype=torch.float64))
        else:
            self.n = checks.integer("n (training-time cells)", n, low=2)
            self.t_lo, self.t_hi = float(schedule.t_min), float(schedule.t_max)
            self.nodes = self.t_lo + (self.t_hi - self.t_lo) * torch.arange(1, self.n + 1, dtype=torch.float64) / self.n
        self.width = (self.t_hi - self.t_lo) / self.n

    def one_minus_alpha_bar(self) -> torch.Tensor:
        """(N,) float64: 1 - alpha_bar at the nodes, from the schedule's SNR."""
        return torch.sigmoid(-2.0 * self.schedule.lambda_(self.nodes))

    def cell_of(self, t: torch.Tensor) -> torch.Tensor:
        """Cell index of each t (long, clamped into [0, N-1]); exact for node values, no host sync."""
        pos = (t.to(torch.float64) - self.t_lo) / self.width
        if self.discrete:
            # times are the nodes (i+1)/N; rounding also absorbs float32 error (~1e-4 of a step at N = 1000)
            return (torch.round(pos) - 1).clamp(0, self.n - 1).long()
        # right-edge nodes: cell i holds (lo + i w, lo + (i+1) w]; the shift keeps float32-rounded nodes in
        # their own cell
        return (torch.ceil(pos - 1e-3) - 1).clamp(0, self.n - 1).long()

    def time_of(self, cell: torch.Tensor, jitter: torch.Tensor = None) -> torch.Tensor:
        """Node time of each cell; with jitter in [0, 1) a point inside the cell (continuous schedules)."""
        cell = cell.to(torch.float64)
        if jitter is None or self.discrete:
            return self.t_lo + (cell + 1.0) * self.width
        return self.t_lo + (cell + 1.0 - jitter.to(torch.float64)) * self.width


class PerDevice:
    """Tables the training loop indexes every iteration: `make()` (a tensor or a tuple of tensors) evaluated once,
    at construction (so that a compiled training step only looks them up), then copied to each device once (a
    host->device copy, and on a GPU a sync, per iteration otherwise)."""

    def __init__(self, make: Callable[[], Tables]):
        value = make()
        self._copies: Dict[torch.device, Tables] = {value[0].device if isinstance(value, tuple) else value.device:
                                                    value}

    def on(self, device) -> Tables:
        device = torch.device(device)
        if device not in self._copies:
            value = next(iter(self._copies.values()))
            self._copies[device] = (tuple(v.to(device) for v in value) if isinstance(value, tuple)
                                    else value.to(device))
        return self._copies[device]

    def copies(self):
        """Every per-device copy (to update them together)."""
        return list(self._copies.values())


def build_from_registry(what: str, value, registry: dict, base: type, schedule, **kwargs):
    """`value` itself if it is already a `base` (then options are refused), else registry[value](schedule,
    **kwargs). `what` names the argument in the errors."""
    if isinstance(value, base):
        if kwargs:
            raise ValueError(f"{what} options {sorted(kwargs)} were given for an already-built {what}")
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a name (one of {sorted(registry)}) or a {base.__name__}, "
                        f"got {type(value).__name__} {value!r}")
    if value not in registry:
        raise ValueError(f"{what} must be one of {sorted(registry)} or a {base.__name__}, got {value!r}")
    return registry[value](schedule, **kwargs)
