"""Cacheable units, the two caching formulations, and how a mask's columns map onto units.

A *unit* is one piece of a network whose result is cached between sampling steps; which result depends on the
formulation:

- "output" (seed Eq. 3, the default): a skipped unit returns its cached *output*: the residual stream after a
  DiT attention / MLP sub-block, the output of a UNet ResBlock / AttnBlock, of a diffusers transformer block.
  A unit's output feeds only the units that read it, so the seed's rectification (Eq. 12) is exact here.
- "branch" (Learning-to-Cache / FORA): a skipped unit reuses its cached *pre-gate residual branch* (attention or
  MLP before the adaLN gate); the gate and the residual add are recomputed from the current step. Every branch
  reaches the model output through the residual stream, so no rectification is lossless here.

Units are listed in execution order by a per-model-class adapter (adapters.py). Mask columns:
- granularity "unit" (default; "branch" is accepted as its old name): one column per unit;
- granularity "block": one column per block (a DiT / transformer block, a UNet level); its units share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

FORMULATIONS = ("output", "branch")
GRANULARITIES = ("unit", "block")
_GRANULARITY_ALIASES = {"branch": "unit"}  # masks written before the formulations existed

# how a unit is wrapped: its module's forward, a method of its module, or by its block's forward (the adapter
# supplies one, for units that are not a call of their own, e.g. a DiT sub-block sharing the block's adaLN)
VIA = ("forward", "method", "block")


@dataclass(eq=False)
class Unit:
    index: int  # position in execution order
    name: str  # qualified name, e.g. "blocks.0.attn", "down_blocks.1.resnets.0"
    block: int  # index of the block it belongs to (granularity "block")
    module: nn.Module  # the module that owns it
    attribute: Optional[str]  # the method wrapped (via "method"), or the unit's role in its block (via "block")
    via: str = "forward"


def check_formulation(formulation: str) -> str:
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")
    return formulation


def check_granularity(granularity: str) -> str:
    granularity = _GRANULARITY_ALIASES.get(granularity, granularity)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def column_groups(units: List[Unit], granularity: str) -> List[List[int]]:
    """For each mask column, the unit indices it controls (in execution order)."""
    if check_granularity(granularity) == "unit":
        return [[u.index] for u in units]
    groups: dict = {}
    for u in units:
        groups.setdefault(u.block, []).append(u.index)
    return [groups[k] for k in sorted(groups)]


def unit_columns(units: List[Unit], granularity: str) -> torch.Tensor:
    """(units,) long: the mask column of each unit."""
    out = torch.empty(len(units), dtype=torch.long)
    for col, members in enumerate(column_groups(units, granularity)):
        out[members] = col
    return out


def expand_to_units(mask: torch.Tensor, units: List[Unit], granularity: str) -> torch.Tensor:
    """(..., columns) mask -> (..., units) mask: a block column is copied to each of its units."""
    groups = column_groups(units, granularity)
    if mask.ndim not in (2, 3) or mask.shape[-1] != len(groups):
        raise ValueError(
            f"mask must have shape (steps, {len(groups)}) (or (batch, steps, {len(groups)}) for one mask per "
            f"sample) for {check_granularity(granularity)!r} granularity over {len(units)} units, got "
            f"{tuple(mask.shape)}"
        )
    return mask[..., unit_columns(units, granularity)]


def find_units(model: nn.Module, formulation: str = "output") -> List[Unit]:
    """The model's cacheable units for `formulation`, in execution order (from its class's adapter)."""
    from .adapters import resolve

    _, network, adapter = resolve(model)
    return adapter.units(network, check_formulation(formulation))


def mask_columns(model: nn.Module, granularity: str = "unit", formulation: str = "output") -> int:
    """How many columns a mask for this model, granularity and formulation has."""
    return len(column_groups(find_units(model, formulation), granularity))
