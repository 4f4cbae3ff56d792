"""From continuous scores s in [0, 1] to a 0/1 mask: a threshold, optionally tightened to a MAC budget, and
the simple uniform-interval baseline mask (FORA / DeepCache style) the learned one is compared against."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def binarise(scores: torch.Tensor, threshold: float = 0.5, unit_macs: Optional[Sequence[float]] = None,
             base_macs: float = 0.0, target_mac_fraction: Optional[float] = None) -> torch.Tensor:
    """m = s > threshold, row 0 forced on (no cache yet). With `target_mac_fraction`, units are further switched
    off in order of increasing score until the sampling run costs at most that fraction of the uncached MACs
    (`unit_macs` per column and `base_macs` per step, e.g. from tdiff.cache.unit_macs)."""
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.ndim != 2:
        raise ValueError(f"scores must be a (steps, columns) matrix, got shape {tuple(s.shape)}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    m = s > threshold
    m[0] = True
    if target_mac_fraction is None:
        return m
    if not 0.0 < target_mac_fraction <= 1.0:
        raise ValueError(f"target_mac_fraction must be in (0, 1], got {target_mac_fraction}")
    if unit_macs is None or len(unit_macs) != s.shape[1]:
        raise ValueError(f"unit_macs must give the MACs of each of the {s.shape[1]} columns for a MAC budget")
    cost = torch.as_tensor(unit_macs, dtype=torch.float64)
    full = s.shape[0] * (base_macs + float(cost.sum()))
    budget = target_mac_fraction * full
    spent = s.shape[0] * base_macs + float((m.double() * cost).sum())
    order = torch.argsort(s[1:].flatten(), stable=True)
    for flat in order.tolist():
        if spent <= budget:
            break
        i, b = 1 + flat // s.shape[1], flat % s.shape[1]
        if m[i, b]:
            m[i, b] = False
            spent -= float(cost[b])
    return m


def uniform_interval_mask(steps: int, columns: int, interval: int) -> torch.Tensor:
    """Every unit computes on steps 0, interval, 2*interval, ... and reuses its cache in between."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    m = torch.zeros(steps, columns, dtype=torch.bool)
    m[::interval] = True
    return m
