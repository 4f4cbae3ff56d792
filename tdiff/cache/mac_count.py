"""MACs of a cached model, counted by fvcore on the graph each mask row actually executes.

fvcore counts one fused multiply-add as one flop, so its totals are MACs. It has no handler for
`aten::scaled_dot_product_attention` and silently drops it, so one is registered here (QK^T plus AV).
Each distinct mask row is traced once: the cache is filled by a full step, then the next step (running that row)
is traced, so a skipped unit's work is really absent from the counted graph.
"""
from __future__ import annotations

import warnings
from math import prod
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .maskfile import LearnedMask, as_mask_matrix
from .runtime import LearnedCache
from .units import expand_to_units, find_units


def sdpa_macs(inputs, outputs) -> int:
    """fvcore handle: q (..., L, E), k (..., S, E), v (..., S, Ev) -> L*S*E for QK^T plus L*S*Ev for AV."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


class _Call(nn.Module):
    """fvcore traces module(*inputs); this lets keyword arguments through."""

    def __init__(self, model, kwargs):
        super().__init__()
        self.model, self.kwargs = model, kwargs

    def forward(self, *args):
        return self.model(*args, **self.kwargs)


def _count(model: nn.Module, args: tuple, kwargs: dict) -> float:
    from fvcore.nn import FlopCountAnalysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(_Call(model, kwargs), tuple(args))
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return float(analysis.total())


def _row_macs(model: nn.Module, row: torch.Tensor, args: tuple, kwargs: dict) -> float:
    """MACs of one model call running unit row `row` (units, bool) with warm caches."""
    cache = LearnedCache(model, torch.stack([torch.ones_like(row), row]))
    try:
        with torch.no_grad():
            model(*args, **kwargs)  # step 0 fills every cache
            return _count(model, args, kwargs)  # traced at step 1
    finally:
        cache.remove()


def macs(model: nn.Module, mask, example_inputs, example_kwargs: Optional[dict] = None,
         granularity: Optional[str] = None) -> Dict[str, object]:
    """{"per_step": [MACs of each step], "total": sum, "uncached_total": steps * MACs of the plain model,
    "fraction": total / uncached_total}. `example_inputs` is the tuple of positional arguments of one model call
    (e.g. (x, t, y)); the batch size scales the counts."""
    if isinstance(mask, LearnedMask):
        granularity, mask = granularity or mask.granularity, mask.matrix
    matrix = as_mask_matrix(mask)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    units = find_units(model)
    unit_rows = expand_to_units(matrix, units, granularity or "branch")
    unit_rows[0] = True  # the first step always computes
    per_row: Dict[Tuple[bool, ...], float] = {}
    per_step: List[float] = []
    for row in unit_rows:
        key = tuple(row.tolist())
        if key not in per_row:
            per_row[key] = _row_macs(model, row, tuple(example_inputs), kwargs)
        per_step.append(per_row[key])
    full = per_row.get(tuple([True] * len(units))) or _row_macs(model, torch.ones(len(units), dtype=torch.bool),
                                                                 tuple(example_inputs), kwargs)
    total = sum(per_step)
    return {"per_step": per_step, "total": total, "uncached_total": full * len(per_step),
            "fraction": total / (full * len(per_step))}


def unit_macs(model: nn.Module, args: tuple, kwargs: Optional[dict] = None) -> Tuple[float, List[float]]:
    """(MACs that always run per step, [MACs saved by skipping each unit]) from one call's inputs."""
    kwargs = dict(kwargs or {})
    n = len(find_units(model))
    full = _row_macs(model, torch.ones(n, dtype=torch.bool), tuple(args), kwargs)
    per_unit = []
    for u in range(n):
        row = torch.ones(n, dtype=torch.bool)
        row[u] = False
        per_unit.append(full - _row_macs(model, row, tuple(args), kwargs))
    return full - sum(per_unit), per_unit
