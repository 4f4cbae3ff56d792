"""Where the cacheable units of diffusers' networks are: one small adapter per model class (the idea of diffusers'
TransformerBlockRegistry), registered with tdiff.cache when this module is imported (tdiff.cache does that the
first time it meets a diffusers model).

Formulation "output" (seed Eq. 3) caches whole modules' outputs; "branch" caches the pre-gate attention and
feed-forward outputs inside a transformer block (the gates, norms and residual adds still run).

| model class | "output" units | "branch" units |
| --- | --- | --- |
| UNet2DModel, UNet2DConditionModel | resnets, attentions of every down, mid and up block | (none: no gates) |
| DiTTransformer2DModel, PixArtTransformer2DModel | transformer_blocks[i] | attn1, ff (PixArt's attn2 always runs) |
| SD3Transformer2DModel | transformer_blocks[i] (JointTransformerBlock) | attn (both streams), attn2, ff, ff_context |
| FluxTransformer2DModel | transformer_blocks[i], single_transformer_blocks[i] | attn, ff, ff_context; proj_mlp, attn |
"""
from __future__ import annotations

import inspect
from typing import List, Sequence, Tuple

from torch import nn

from tdiff.cache.adapters import CacheAdapter, call_time, register_adapter
from tdiff.cache.units import Unit


def _time_position(model_class: type) -> int:
    """Positional index of `timestep` in the class's forward (after self)."""
    names = list(inspect.signature(model_class.forward).parameters)[1:]
    return names.index("timestep")


class _DiffusersAdapter(CacheAdapter):
    def __init__(self, model_class: type):
        self._time_at = _time_position(model_class)

    def time(self, args, kwargs):
        return call_time(args, kwargs, "timestep", self._time_at)


class TransformerAdapter(_DiffusersAdapter):
    """Transformers: blocks in the ModuleLists `lists` (in order); per block class name, its branch units in the
    order the block runs them (absent or None ones are left out, e.g. SD3's last ff_context)."""

    def __init__(self, model_class: type, lists: Sequence[str], branches: dict):
        super().__init__(model_class)
        self.lists, self.branches = tuple(lists), branches
        self.searched = " + ".join(lists) + " holding " + ", ".join(
            f"{cls} (branches {'/'.join(attrs)})" for cls, attrs in branches.items())

    def units(self, model, formulation):
        self.check(model, formulation)
        out, block = [], 0
        for list_name in self.lists:
            for i, blk in enumerate(getattr(model, list_name)):
                name = f"{list_name}.{i}"
                if formulation == "output":
                    out.append(Unit(len(out), name, block, blk, None))
                else:
                    attrs = self.branches.get(type(blk).__name__)
                    if attrs is None:
                        raise ValueError(f"{name} is a {type(blk).__name__}; the branch formulation knows "
                                         f"{sorted(self.branches)}")
                    for attr in attrs:
                        sub = getattr(blk, attr, None)
                        if isinstance(sub, nn.Module):
                            out.append(Unit(len(out), f"{name}.{attr}", block, sub, None))
                block += 1
        return out


class UNetAdapter(_DiffusersAdapter):
    """UNet2DModel / UNet2DConditionModel: in each down block, the mid block and each up block, resnet i then
    attention i (the mid block: resnet 0, then attention i and resnet i + 1), as their forwards run them. A block
    for granularity "block" is one down / mid / up block. Only the "output" formulation: the resnets' residual
    branches are not separate calls."""

    formulations = ("output",)
    searched = "down_blocks / mid_block / up_blocks holding .resnets and .attentions"

    def units(self, model, formulation):
        self.check(model, formulation)
        out: List[Unit] = []
        blocks: List[Tuple[str, nn.Module]] = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
        if getattr(model, "mid_block", None) is not None:
            blocks.append(("mid_block", model.mid_block))
        blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
        for block_index, (name, blk) in enumerate(blocks):
            resnets = list(getattr(blk, "resnets", []))
            attentions = list(getattr(blk, "attentions", None) or [])
            if name == "mid_block":
                order = [("resnets", 0, resnets[0])]
                for i, (attn, res) in enumerate(zip(attentions, resnets[1:])):
                    order += [("attentions", i, attn), ("resnets", i + 1, res)]
            else:
                order = []
                for i, res in enumerate(resnets):
                    order.append(("resnets", i, res))
                    if i < len(attentions):
                        order.append(("attentions", i, attentions[i]))
            for kind, i, module in order:
                if module is not None:
                    out.append(Unit(len(out), f"{name}.{kind}.{i}", block_index, module, None))
        return out


def _register() -> None:
    from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel)

    basic = {"BasicTransformerBlock": ("attn1", "ff")}
    register_adapter(UNet2DModel, UNetAdapter(UNet2DModel))
    register_adapter(UNet2DConditionModel, UNetAdapter(UNet2DConditionModel))
    register_adapter(DiTTransformer2DModel, TransformerAdapter(DiTTransformer2DModel, ["transformer_blocks"], basic))
    register_adapter(PixArtTransformer2DModel, TransformerAdapter(PixArtTransformer2DModel, ["transformer_blocks"],
                                                                  basic))
    register_adapter(SD3Transformer2DModel, TransformerAdapter(
        SD3Transformer2DModel, ["transformer_blocks"],
        {"JointTransformerBlock": ("attn", "attn2", "ff", "ff_context")}))
    register_adapter(FluxTransformer2DModel, TransformerAdapter(
        FluxTransformer2DModel, ["transformer_blocks", "single_transformer_blocks"],
        {"FluxTransformerBlock": ("attn", "ff", "ff_context"), "FluxSingleTransformerBlock": ("proj_mlp", "attn")}))


_register()

__all__ = ["TransformerAdapter", "UNetAdapter"]
