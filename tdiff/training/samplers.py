"""Sampler registry: `make_sampler("speed", schedule, k=2, tau=700)`."""
from __future__ import annotations

from .registry import build_from_registry
from .sampler_base import TimestepSampler
from .sampler_normal import LogitNormalSampler, LogNormalSampler
from .sampler_speed import SpeedSampler
from .sampler_uniform import UniformSampler

SAMPLERS = {
    "uniform": UniformSampler,
    "speed": SpeedSampler,
    "lognormal": LogNormalSampler,
    "edm": LogNormalSampler,
    "logitnormal": LogitNormalSampler,
    "sd3": LogitNormalSampler,
}


def make_sampler(sampler, schedule, **kwargs) -> TimestepSampler:
    return build_from_registry("sampler", sampler, SAMPLERS, TimestepSampler, schedule, **kwargs)
