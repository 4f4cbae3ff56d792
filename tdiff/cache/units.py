"""Where the cacheable units of a network are, and how a learned mask's columns map onto them.

A *unit* is one callable whose output is cached between sampling steps: the pre-gate attention branch and the
pre-gate MLP branch of a transformer block, or the residual `branch` of a UNet ResBlock / AttnBlock. Caching the
branch *before* its adaLN gate means the gate, which depends on the current time step, is still recomputed from
the current conditioning every step; only the expensive part is reused.

Granularities:
- "branch" (default): every unit is its own mask column (2 per transformer block).
- "block": one column per block; all units of a block share it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
from torch import nn

GRANULARITIES = ("branch", "block")

# ModuleList attribute names that hold the transformer blocks, in the order we look for them.
BLOCK_LIST_NAMES = ("blocks", "transformer_blocks")

# Per block type, the attributes whose outputs are the cacheable pre-gate branches, tried in order.
# - tdiff DiTBlock: attn_branch / mlp_branch methods.
# - diffusers BasicTransformerBlock (DiT, PixArt): the attn1 and ff submodules (their outputs are gated by the
#   block afterwards; PixArt's cross-attention attn2 is cheap and text-dependent, so it always runs).
# - tdiff UNet ResBlock / AttnBlock: `branch`.
UNIT_ATTRIBUTES = (("attn_branch", "mlp_branch"), ("attn1", "ff"), ("branch",))


@dataclass(frozen=True)
class Unit:
    block_index: int
    block_name: str  # qualified module name of the owning block
    attribute: str  # attribute of the block that is patched

    @property
    def name(self) -> str:
        return f"{self.block_name}.{self.attribute}"


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return granularity


def _unit_attributes(block: nn.Module):
    for attrs in UNIT_ATTRIBUTES:
        if all(hasattr(block, a) for a in attrs):
            return attrs
    return None


def find_blocks(model: nn.Module) -> List[tuple]:
    """(qualified name, block) pairs in execution order.

    Transformers: the first ModuleList named in BLOCK_LIST_NAMES (searched on the model and its submodules).
    UNets: every module that has a `branch` (ResBlock / AttnBlock), in registration order, which for our UNet
    is the order of execution.
    """
    for list_name in BLOCK_LIST_NAMES:
        for prefix, module in model.named_modules():
            candidate = getattr(module, list_name, None)
            if isinstance(candidate, nn.ModuleList) and len(candidate) and all(
                _unit_attributes(b) for b in candidate
            ):
                base = f"{prefix}.{list_name}" if prefix else list_name
                return [(f"{base}.{i}", b) for i, b in enumerate(candidate)]
    found = [(name, m) for name, m in model.named_modules() if name and _unit_attributes(m) == ("branch",)]
    if found:
        return found
    raise ValueError(
        f"cannot find cacheable blocks in {type(model).__name__}: looked for an nn.ModuleList named one of "
        f"{BLOCK_LIST_NAMES} whose blocks have {' or '.join('+'.join(a) for a in UNIT_ATTRIBUTES[:2])}, and for "
        f"modules with a `branch` (UNet ResBlock/AttnBlock)"
    )


def find_units(model: nn.Module) -> List[Unit]:
    units = []
    for index, (name, block) in enumerate(find_blocks(model)):
        for attr in _unit_attributes(block):
            units.append(Unit(index, name, attr))
    return units


def column_groups(units: List[Unit], granularity: str) -> List[List[int]]:
    """For each mask column, the unit indices it controls."""
    check_granularity(granularity)
    if granularity == "branch":
        return [[i] for i in range(len(units))]
    groups: dict = {}
    for i, u in enumerate(units):
        groups.setdefault(u.block_index, []).append(i)
    return [groups[k] for k in sorted(groups)]


def mask_columns(model: nn.Module, granularity: str = "branch") -> int:
    """How many columns a mask for this model and granularity has."""
    return len(column_groups(find_units(model), granularity))


def expand_to_units(mask: torch.Tensor, units: List[Unit], granularity: str) -> torch.Tensor:
    """(T, columns) mask -> (T, units) mask: a block column is copied to each of its units."""
    groups = column_groups(units, granularity)
    if mask.ndim != 2 or mask.shape[1] != len(groups):
        raise ValueError(
            f"mask must have shape (steps, {len(groups)}) for {granularity!r} granularity over "
            f"{len(units)} units, got {tuple(mask.shape)}"
        )
    out = mask.new_zeros(mask.shape[0], len(units))
    for col, members in enumerate(groups):
        out[:, members] = mask[:, col : col + 1]
    return out
