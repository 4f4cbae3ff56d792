"""Uniform time sampling: uniform over the N training steps, or over [t_min, t_max] for continuous schedules."""
from __future__ import annotations

import torch

from ..schedules import NoiseSchedule
from .sampler_base import TableSampler


class UniformSampler(TableSampler):
    name = "uniform"

    def __init__(self, schedule: NoiseSchedule, n: int = 1000):
        from .time_grid import TimeGrid

        super().__init__(schedule, torch.ones(TimeGrid(schedule, n).n, dtype=torch.float64), n)
