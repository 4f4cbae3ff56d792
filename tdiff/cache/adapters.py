"""Per-model-class adapters: where a network's cacheable units are, for each formulation, and what its time input
is (like diffusers' TransformerBlockRegistry, instead of guessing blocks from attribute names).

An adapter lists a model's units in execution order (units.Unit), says which formulations it supports, where the
network time sits in a call (for the automatic start of a new sampling run), and may give a block its own
forward when its units are not calls of their own (a DiT block's two sub-blocks share one adaLN modulation).
tdiff's own DiT and UNet are registered here; diffusers' models in tdiff.integrations.diffusers.blocks, loaded
the first time a diffusers model is seen. Register your own with `register_adapter(ModelClass, adapter)`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .units import FORMULATIONS, Unit

_REGISTRY: Dict[type, "CacheAdapter"] = {}


class CacheAdapter(ABC):
    """Describes one model class. `searched` names the attributes it looks at (for error messages)."""

    formulations: Tuple[str, ...] = FORMULATIONS
    searched: str = ""

    @abstractmethod
    def units(self, model: nn.Module, formulation: str) -> List[Unit]:
        """The model's units for `formulation`, in execution order (Unit.index = position)."""

    def time(self, args: tuple, kwargs: dict):
        """The network time of a call (scalar or (B,) tensor), or None when unknown."""
        return None

    def block_forwards(self, model: nn.Module, formulation: str, cache, units: List[Unit]
                       ) -> List[Tuple[nn.Module, Callable]]:
        """(block, forward) pairs for units wrapped via their block; the forwards call into `cache`."""
        return []

    def check(self, model: nn.Module, formulation: str) -> None:
        if formulation not in self.formulations:
            raise ValueError(f"{type(model).__name__} supports the caching formulation(s) {self.formulations}, "
                             f"not {formulation!r}")


def register_adapter(model_class: type, adapter: CacheAdapter) -> None:
    """Teach tdiff.cache where the units of `model_class` (and its subclasses) are."""
    if not isinstance(model_class, type) or not isinstance(adapter, CacheAdapter):
        raise ValueError("register_adapter(model_class, adapter) takes a class and a CacheAdapter instance")
    _REGISTRY[model_class] = adapter


def _lookup(module: nn.Module) -> Optional[CacheAdapter]:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _load_integrations(model: nn.Module) -> None:
    if any(type(m).__module__.startswith("diffusers.") for m in model.modules()):
        import tdiff.integrations.diffusers.blocks  # noqa: F401  (registers diffusers' model classes)


def resolve(model: nn.Module) -> Tuple[str, nn.Module, CacheAdapter]:
    """(qualified name, network, adapter): the model itself when its class is registered, else the first
    submodule whose class is (e.g. a DiT inside a wrapper)."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _load_integrations(model)
    for name, module in model.named_modules():
        adapter = _lookup(module)
        if adapter is not None:
            return name, module, adapter
    try:  # name diffusers' classes too when diffusers is installed
        import tdiff.integrations.diffusers.blocks  # noqa: F401
    except ImportError:
        pass
    known = "; ".join(f"{cls.__module__}.{cls.__name__} ({a.searched})" for cls, a in _REGISTRY.items())
    raise ValueError(
        f"cannot find cacheable units in {type(model).__name__}: neither it nor any submodule is a class tdiff.cache "
        f"has an adapter for. Searched classes and attributes: {known}. Register an adapter with "
        f"tdiff.cache.register_adapter(YourModelClass, adapter)"
    )


def call_time(args: tuple, kwargs: dict, name: str, position: int = 1):
    """The argument `name` (keyword) or positional `position`: where most networks take their time input."""
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


# ------------------------------------------------------------------------------------------------------------------
# tdiff's reference models
# ------------------------------------------------------------------------------------------------------------------
class DiTAdapter(CacheAdapter):
    """tdiff DiT: per block, the attention and MLP sub-blocks ("attn", "mlp"). Both formulations run through a
    block forward that computes the adaLN modulation once (and not at all when the output formulation skips
    the whole block)."""

    searched = "blocks[i] with modulation / attn_branch / mlp_branch / attn_residual / mlp_residual"

    def units(self, model, formulation):
        self.check(model, formulation)
        out = []
        for i, block in enumerate(model.blocks):
            for role in ("attn", "mlp"):
                out.append(Unit(len(out), f"blocks.{i}.{role}", i, block, role, via="block"))
        return out

    def time(self, args, kwargs):
        return call_time(args, kwargs, "t")

    def block_forwards(self, model, formulation, cache, units):
        pairs = []
        for i, block in enumerate(model.blocks):
            ua, um = (u.index for u in units if u.block == i)
            make = _dit_branch_forward if formulation == "branch" else _dit_output_forward
            pairs.append((block, make(cache, block, ua, um)))
        return pairs


def _dit_branch_forward(cache, block, ua: int, um: int):
    def forward(x, c):
        sm, cm, gm, sp, cp, gp = block.modulation(c)
        x = cache.run_gated(ua, block.attn_branch, x, gm, sm, cm, block.gated_residual)
        return cache.run_gated(um, block.mlp_branch, x, gp, sp, cp, block.gated_residual)

    return forward


def _dit_output_forward(cache, block, ua: int, um: int):
    def forward(x, c):
        # a block whose two sub-blocks both reuse their outputs needs no modulation either
        mod = block.modulation(c) if cache.computes(ua) or cache.computes(um) else (None,) * 6
        sm, cm, gm, sp, cp, gp = mod
        x = cache.run_unit(ua, block.attn_residual, (x, sm, cm, gm), {})
        return cache.run_unit(um, block.mlp_residual, (x, sp, cp, gp), {})

    return forward


class UNetAdapter(CacheAdapter):
    """tdiff UNet: every ResBlock and AttnBlock, in execution order (down path, middle, up path). "output"
    caches the block's output (its forward), "branch" its residual `branch`. Blocks for granularity "block":
    each down / up step (a ResBlock and its AttnBlock) and each middle module."""

    searched = "down_blocks / mid_blocks / up_blocks holding ResBlock and AttnBlock (.branch)"

    def units(self, model, formulation):
        from tdiff.models.unet import AttnBlock, ResAttn, ResBlock

        self.check(model, formulation)
        out, block = [], 0
        for list_name in ("down_blocks", "mid_blocks", "up_blocks"):
            for i, module in enumerate(getattr(model, list_name)):
                if isinstance(module, ResAttn):
                    members = [(f"{list_name}.{i}.res", module.res)]
                    if module.attn is not None:
                        members.append((f"{list_name}.{i}.attn", module.attn))
                elif isinstance(module, (ResBlock, AttnBlock)):
                    members = [(f"{list_name}.{i}", module)]
                else:  # down/up sampling: always runs
                    continue
                for name, m in members:
                    if formulation == "branch":
                        out.append(Unit(len(out), f"{name}.branch", block, m, "branch", via="method"))
                    else:
                        out.append(Unit(len(out), name, block, m, None, via="forward"))
                block += 1
        return out

    def time(self, args, kwargs):
        return call_time(args, kwargs, "t")


def _register_builtin() -> None:
    from tdiff.models.dit import DiT
    from tdiff.models.unet import UNet

    register_adapter(DiT, DiTAdapter())
    register_adapter(UNet, UNetAdapter())


_register_builtin()

__all__ = ["CacheAdapter", "register_adapter", "resolve", "call_time", "DiTAdapter", "UNetAdapter"]


def time_value(t) -> Optional[float]:
    """The largest network time of a call as a python float (None when unknown)."""
    if t is None:
        return None
    if torch.is_tensor(t):
        return float(t.detach().max()) if t.numel() else None
    return float(t)
