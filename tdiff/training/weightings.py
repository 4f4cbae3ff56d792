"""Weighting registry: `make_weighting("min_snr", schedule, gamma=5, target="v")`."""
from __future__ import annotations

from .registry import build_from_registry
from .weight_edm import EDMWeight
from .weight_snr import MinSNRWeight, P2Weight
from .weight_speed import SpeedWeight
from .weighting_base import UnitWeight, Weighting

WEIGHTINGS = {
    "none": UnitWeight,
    "speed": SpeedWeight,
    "min_snr": MinSNRWeight,
    "p2": P2Weight,
    "edm": EDMWeight,
}


def make_weighting(weighting, schedule, **kwargs) -> Weighting:
    return build_from_registry("weighting", "none" if weighting is None else weighting, WEIGHTINGS, Weighting,
                               schedule, **kwargs)
