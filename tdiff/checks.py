"""Argument checks shared by the public API (training, metrics, data): a wrong type is a TypeError, a wrong value
a ValueError, and both name the argument and say what was expected (no NaN, no inf, nothing silently clamped)."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch


def real(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """A finite real number inside [low, high] (bounds open where asked); returns it as a float."""
    if torch.is_tensor(value) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    span = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must lie in {span}, got {v}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must lie in {span}, got {v}")
    return v


def positive(name: str, value) -> float:
    return real(name, value, low=0.0, low_open=True)


def integer(name: str, value, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integer (an int, or an integral float such as 700.0) inside [low, high]."""
    if torch.is_tensor(value) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not (math.isfinite(float(value)) and float(value) == int(value)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise ValueError(f"{name} must be an integer in [{'-inf' if low is None else low}, "
                         f"{'inf' if high is None else high}], got {v}")
    return v


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def choice(name: str, value, options: Sequence[str]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(options)} (a string), got {type(value).__name__} {value!r}")
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value
