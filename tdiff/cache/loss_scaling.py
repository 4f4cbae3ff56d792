"""Timestep-aware loss scaling (seed Sec. 3.4, Eqs. 9-10).

delta[i] = ||end_{i+1} - end_i|| / ||end_i|| is the relative change of the uncached model's end-block features
from sampling step i to the next. Where features barely move (small delta) caching is safe, so the sparsity
terms get a larger weight there and the mask is pushed harder; where they change a lot, fidelity wins.
"""
from __future__ import annotations

from typing import Sequence

import torch


def relative_feature_variation(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T,) delta from the end-block features of each step. The last step has no successor and takes the value
    of the one before it."""
    if len(features) < 2:
        return torch.ones(len(features), dtype=torch.float64)
    d = [float((features[i + 1].double() - features[i].double()).norm() / features[i].double().norm().clamp_min(1e-12))
         for i in range(len(features) - 1)]
    return torch.tensor(d + [d[-1]], dtype=torch.float64)


def loss_weights(delta: torch.Tensor) -> torch.Tensor:
    """Eq. 10: 2.0 where delta/max < 0.1, 1.5 where it is < 0.5, else 1.0."""
    r = delta / delta.max().clamp_min(1e-12)
    return torch.where(r < 0.1, 2.0, torch.where(r < 0.5, 1.5, 1.0)).to(torch.float64)
