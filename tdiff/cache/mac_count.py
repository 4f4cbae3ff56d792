"""MACs of a cached model, counted by fvcore on the graph each mask row actually executes.

fvcore counts one fused multiply-add as one flop, so its totals are MACs. It has no handler for
`aten::scaled_dot_product_attention` and silently drops it, so one is registered here (QK^T plus AV).
Each distinct mask row is traced once: with fresh caches a full call fills them, then the next call (running that
row) is traced, so a skipped unit's work is really absent from the counted graph. A model with a learned cache
installed is counted through that cache (its formulation, and its mask unless another is given).
"""
from __future__ import annotations

import warnings
from math import prod
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .api import temporary_cache
from .maskfile import LearnedMask, as_mask_matrix
from .runtime import _tensors
from .units import check_granularity, column_groups, expand_to_units


def sdpa_macs(inputs, outputs) -> int:
    """fvcore handle: q (..., L, E), k (..., S, E), v (..., S, Ev) -> L*S*E for QK^T plus L*S*Ev for AV."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = prod(q[:-2])
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


class _Call(nn.Module):
    """fvcore traces module(*inputs). This one takes the call's positional and tensor keyword arguments as trace
    inputs, returns plain tensors (diffusers models return output dataclasses), followed by every unit input and
    result seen in the call (`keep`): a trace drops work whose result reaches no output, but the runtime does
    execute it, so it must be counted."""

    def __init__(self, model, kwargs: dict, keep: list):
        super().__init__()
        self.model, self.keep = model, keep
        self.tensor_keys = [k for k, v in kwargs.items() if torch.is_tensor(v)]
        self.constants = {k: v for k, v in kwargs.items() if not torch.is_tensor(v)}

    def inputs(self, args: tuple, kwargs: dict) -> tuple:
        return tuple(args) + tuple(kwargs[k] for k in self.tensor_keys)

    def forward(self, *flat):
        n = len(flat) - len(self.tensor_keys)
        kwargs = dict(self.constants, **dict(zip(self.tensor_keys, flat[n:])))
        self.keep.clear()
        out = self.model(*flat[:n], **kwargs)
        return tuple(_tensors(tuple(out.values()) if isinstance(out, dict) else out)) + tuple(self.keep)


def _count(model: nn.Module, args: tuple, kwargs: dict, keep: list) -> float:
    from fvcore.nn import FlopCountAnalysis

    call = _Call(model, kwargs, keep)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(call, call.inputs(args, kwargs))
        analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        return float(analysis.total())


def _row_macs(cache, model: nn.Module, row, args: tuple, kwargs: dict) -> float:
    """MACs of one call running unit row `row` with warm caches (fresh ones, the installed state untouched)."""
    with torch.no_grad(), cache.isolated():
        with cache.forced([True] * len(cache.units)):
            model(*args, **kwargs)  # fills every cache
        keep: list = []
        with cache.forced(row, keep=keep):
            return _count(model, args, kwargs, keep)


def _inputs(example_inputs) -> tuple:
    return tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)


def macs(model: nn.Module, mask=None, example_inputs=(), example_kwargs: Optional[dict] = None,
         granularity: Optional[str] = None, formulation: Optional[str] = None) -> Dict[str, object]:
    """{"per_step": [MACs of each step], "total": sum, "uncached_total": steps * MACs of the plain model,
    "fraction": total / uncached_total}. `example_inputs` is the tuple of positional arguments of one network call
    (e.g. (x, t, y)) and `example_kwargs` its keywords; the batch size scales the counts. `mask`: a (steps, columns)
    0/1 matrix or a LearnedMask; None counts the mask of the cache installed on the model."""
    if isinstance(mask, LearnedMask):
        granularity, formulation, mask = granularity or mask.granularity, formulation or mask.formulation, mask.matrix
    args, kwargs = _inputs(example_inputs), dict(example_kwargs or {})
    with temporary_cache(model, formulation) as cache:
        if mask is None:
            if cache.mask is None or cache.per_sample:
                raise ValueError("pass the mask to count: the model has no learned cache installed with one shared "
                                 "(steps, units) mask")
            unit_rows = cache.mask.clone()
        else:
            unit_rows = expand_to_units(as_mask_matrix(mask), cache.units, check_granularity(granularity or "unit"))
        unit_rows[0] = True  # the first step always computes
        full_row = (True,) * len(cache.units)
        per_row: Dict[Tuple[bool, ...], float] = {}
        per_step: List[float] = []
        for row in [full_row] + [tuple(r) for r in unit_rows.tolist()]:
            if row not in per_row:
                per_row[row] = _row_macs(cache, model, list(row), args, kwargs)
            per_step.append(per_row[row])
        full, per_step = per_step[0], per_step[1:]
    total = sum(per_step)
    return {"per_step": per_step, "total": total, "uncached_total": full * len(per_step),
            "fraction": total / (full * len(per_step))}


def unit_macs(model: nn.Module, args: tuple, kwargs: Optional[dict] = None, formulation: Optional[str] = None,
              granularity: str = "unit") -> Tuple[float, List[float]]:
    """(MACs that always run per call, [MACs saved by skipping each mask column alone]) from one call's inputs.
    Savings are per column; skipping several may save a little more (e.g. a DiT block's shared modulation)."""
    kwargs = dict(kwargs or {})
    with temporary_cache(model, formulation) as cache:
        n = len(cache.units)
        full = _row_macs(cache, model, [True] * n, _inputs(args), kwargs)
        saved = []
        for members in column_groups(cache.units, granularity):
            row = [u not in members for u in range(n)]
            saved.append(full - _row_macs(cache, model, row, _inputs(args), kwargs))
    return full - sum(saved), saved

