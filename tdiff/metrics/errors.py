"""Pixel-space errors between samples and references (e.g. a solver's output vs the reference ODE solution)."""
from __future__ import annotations

import math

import torch

from ..checks import positive

DATA_RANGE = 2.0  # images live in [-1, 1]


def _check_pair(a: torch.Tensor, b: torch.Tensor):
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        raise ValueError("a and b must be tensors")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 1 or a.shape[0] == 0:
        raise ValueError("a and b must have a non-empty batch dimension")
    if not (a.is_floating_point() and b.is_floating_point()):
        raise TypeError(f"a and b must be floating-point tensors, got {a.dtype} and {b.dtype}")


def per_sample_error(a: torch.Tensor, b: torch.Tensor, kind: str = "rmse") -> torch.Tensor:
    """(B,) error per sample: 'rmse', 'mse' or 'max' (largest absolute difference)."""
    _check_pair(a, b)
    d = (a - b).reshape(a.shape[0], -1)
    if kind == "mse":
        return d.square().mean(1)
    if kind == "rmse":
        return d.square().mean(1).sqrt()
    if kind == "max":
        return d.abs().amax(1)
    raise ValueError(f"kind must be 'rmse', 'mse' or 'max', got {kind!r}")


def rmse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root mean squared error over every element."""
    _check_pair(a, b)
    return (a - b).square().mean().sqrt()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = DATA_RANGE, reduction: str = "mean") -> torch.Tensor:
    """Peak signal-to-noise ratio in dB for images in [-1, 1] (data_range 2). reduction: 'mean' over per-sample
    PSNRs, or 'none' for the (B,) values. Identical images give +inf."""
    data_range = positive("data_range", data_range)
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    mse = per_sample_error(a, b, "mse")
    values = 20 * math.log10(data_range) - 10 * torch.log10(mse)
    return values.mean() if reduction == "mean" else values
