"""Timestep-aware loss scaling (seed Sec. 3.4, Eqs. 9-10).

delta[i] = ||end_i - end_{i-1}|| / ||end_i|| is the relative change of the uncached network's end features between
the step whose cache step i reuses (i - 1) and step i itself. Where features barely move (small delta) caching is
safe, so the sparsity terms get a larger weight there and the mask is pushed harder; where they change a lot,
fidelity wins.

Deviation from the seed: Eq. 9 as printed, ||x_{t-1} - x_t|| / ||x_t|| with t counting down, is a forward
difference (step i against step i + 1), but the cache used at step i was filled at step i - 1, so the change that
matters for step i is the backward one. Step 0 (never cached) takes step 1's value.
"""
from __future__ import annotations

from typing import Sequence

import torch


def relative_feature_variation(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T,) delta from the end features of each step (any shape; each step's tensor as a whole)."""
    if len(features) < 2:
        return torch.ones(len(features), dtype=torch.float64)
    d = [float((features[i].double() - features[i - 1].double()).norm() /
               features[i].double().norm().clamp_min(1e-12)) for i in range(1, len(features))]
    return torch.tensor([d[0]] + d, dtype=torch.float64)


def loss_weights(delta: torch.Tensor) -> torch.Tensor:
    """Eq. 10: 2.0 where delta/max < 0.1, 1.5 where it is < 0.5, else 1.0."""
    r = delta / delta.max().clamp_min(1e-12)
    return torch.where(r < 0.1, 2.0, torch.where(r < 0.5, 1.5, 1.0)).to(torch.float64)
