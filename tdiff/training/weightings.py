"""Weighting registry: `make_weighting("min_snr", schedule, gamma=5, target="v")`."""
from __future__ import annotations

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
    if weighting is None:
        weighting = "none"
    if isinstance(weighting, Weighting):
        if kwargs:
            raise ValueError("weighting options were given for an already-built weighting")
        return weighting
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {sorted(WEIGHTINGS)} or a Weighting, got {weighting!r}")
    return WEIGHTINGS[weighting](schedule, **kwargs)
