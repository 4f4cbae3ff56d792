"""Sampler registry: `make_sampler("speed", schedule, k=2, tau=700)`."""
from __future__ import annotations

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
    if isinstance(sampler, TimestepSampler):
        if kwargs:
            raise ValueError("sampler options were given for an already-built sampler")
        return sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)} or a TimestepSampler, got {sampler!r}")
    return SAMPLERS[sampler](schedule, **kwargs)
