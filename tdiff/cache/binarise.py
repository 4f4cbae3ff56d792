"""From continuous scores s in [0, 1] to a 0/1 mask: a threshold, optionally tightened to a MAC budget, and
the simple uniform-interval baseline mask (FORA / DeepCache style) the learned one is compared against."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def binarise(scores: torch.Tensor, threshold: float = 0.5, unit_macs: Optional[Sequence[float]] = None,
             base_macs: float = 0.0, target_mac_fraction: Optional[float] = None,
             then: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """m = s > threshold, row 0 forced on (no cache yet), then `then(m)` if given (e.g. `rectify`). With
    `target_mac_fraction`, the fewest lowest-score units are further switched off such that the final mask (after
    `then`) costs at most that fraction of the uncached MACs (`unit_macs` per column and `base_macs` per step,
    e.g. from tdiff.cache.unit_macs), so a transform that removes work does not push the mask below its budget."""
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.ndim != 2:
        raise ValueError(f"scores must be a (steps, columns) matrix, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):  # a NaN score would silently become "reuse the cache"
        raise ValueError("scores must be finite, got NaN or inf")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    then = then or (lambda m: m)
    m = s > threshold
    m[0] = True
    if target_mac_fraction is None:
        return then(m)
    if not 0.0 < target_mac_fraction <= 1.0:
        raise ValueError(f"target_mac_fraction must be in (0, 1], got {target_mac_fraction}")
    if unit_macs is None or len(unit_macs) != s.shape[1]:
        raise ValueError(f"unit_macs must give the MACs of each of the {s.shape[1]} columns for a MAC budget")
    cost = torch.as_tensor(unit_macs, dtype=torch.float64)
    budget = target_mac_fraction * s.shape[0] * (base_macs + float(cost.sum()))

    def spent(mask):
        return s.shape[0] * base_macs + float((mask.double() * cost).sum())

    # candidates to switch off, lowest score first; the smallest count whose final mask fits, by bisection (the
    # cost falls as more are switched off, and `then` only ever removes work)
    order = [(1 + f // s.shape[1], f % s.shape[1]) for f in torch.argsort(s[1:].flatten(), stable=True).tolist()]
    order = [(i, b) for i, b in order if m[i, b]]

    def switched_off(k):
        out = m.clone()
        for i, b in order[:k]:
            out[i, b] = False
        return then(out)

    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi) // 2
        if spent(switched_off(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return switched_off(lo)


def uniform_interval_mask(steps: int, columns: int, interval: int) -> torch.Tensor:
    """Every unit computes on steps 0, interval, 2*interval, ... and reuses its cache in between."""
    for name, value in (("steps", steps), ("columns", columns), ("interval", interval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    m = torch.zeros(steps, columns, dtype=torch.bool)
    m[::interval] = True
    return m


def uniform_mask_at_fraction(steps: int, column_macs: Sequence[float], base_macs: float,
                             fraction: float) -> torch.Tensor:
    """The uniform-interval baseline at a MAC budget: k evenly spaced steps compute every unit (step 0 among
    them), the largest k whose run fits `fraction` of the uncached MACs; the rest of the budget goes to one more
    step, in the middle of the longest gap, computing the first units in execution order (the prefix whose cost
    brings the total closest to the budget). So it can match another mask's MACs to within one unit's cost."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    cost = [float(c) for c in column_macs]
    per_step = base_macs + sum(cost)
    target = fraction * steps * per_step
    k = max(1, min(steps, int((target - steps * base_macs) // sum(cost)) if sum(cost) > 0 else steps))
    m = torch.zeros(steps, len(cost), dtype=torch.bool)
    computing = sorted({(j * steps) // k for j in range(k)})
    m[computing] = True
    left = target - (steps * base_macs + len(computing) * sum(cost))
    gaps = [(b - a, a) for a, b in zip(computing, computing[1:] + [steps]) if b - a > 1]
    if left > 0 and gaps:
        length, start = max(gaps)
        extra = start + length // 2
        spent, best, best_err = 0.0, 0, abs(left)
        for n, c in enumerate(cost, start=1):
            spent += c
            if abs(left - spent) < best_err:
                best, best_err = n, abs(left - spent)
        m[extra, :best] = True
    return m
