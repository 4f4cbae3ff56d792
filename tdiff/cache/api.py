"""Public entry points: the diffusers-style `LearnedCacheConfig` + `apply_learned_cache(module, config)`, and the
short form `cached_dit(model, mask)`.

On a diffusers ModelMixin the cache registers through diffusers' HookRegistry (tdiff.integrations.diffusers.hooks):
pipelines then reset it like any stateful hook, `cache_context` selects the cache, and it composes with diffusers'
other hooks. Elsewhere it patches the network's instance attributes (runtime.install_native).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .adapters import resolve
from .maskfile import LearnedMask, as_mask_matrix, load_mask
from .runtime import LearnedCache, install_native, installed_cache
from .units import check_formulation, check_granularity, expand_to_units

MaskLike = Union[torch.Tensor, LearnedMask, str]


@dataclass
class LearnedCacheConfig:
    """mask: a (steps, columns) 0/1 matrix, one per sample as (batch, steps, columns), a LearnedMask, or the path
    of a saved mask file.
    granularity: "unit" (one column per unit, the default) or "block"; formulation: "output" (cache unit outputs,
    seed Eq. 3, the default) or "branch" (cache pre-gate branches). Both are taken from a LearnedMask / file.
    nfe: when given, a mask with another number of steps is refused.
    check_model: refuse a LearnedMask / file whose model fingerprint differs from the module's."""

    mask: MaskLike
    granularity: Optional[str] = None
    formulation: Optional[str] = None
    nfe: Optional[int] = None
    check_model: bool = True


def _resolve_mask(module: nn.Module, config: LearnedCacheConfig):
    mask = config.mask
    if mask is None:
        raise ValueError("mask is None; pass a (steps, columns) 0/1 matrix, a LearnedMask or a mask file path "
                         "(tdiff.cache.train_mask makes one)")
    if isinstance(mask, str):
        mask = load_mask(mask)
    if isinstance(mask, LearnedMask):
        for name, check in (("granularity", check_granularity), ("formulation", check_formulation)):
            given = getattr(config, name)
            if given is not None and check(given) != getattr(mask, name):
                raise ValueError(f"{name} {given!r} contradicts the mask's {getattr(mask, name)!r}")
        if config.check_model:
            mask.check_model(module)
        if config.nfe is not None:
            mask.check_nfe(config.nfe)
        return mask.matrix, mask.granularity, mask.formulation, mask.network_times
    matrix = as_mask_matrix(mask, allow_per_sample=True)
    if config.nfe is not None and matrix.shape[-2] != config.nfe:
        raise ValueError(f"mask has {matrix.shape[-2]} steps but nfe={config.nfe}")
    return (matrix, check_granularity(config.granularity or "unit"),
            check_formulation(config.formulation or "output"), None)


def _is_diffusers_model(module: nn.Module) -> bool:
    return any(c.__module__.startswith("diffusers.") and c.__name__ == "ModelMixin" for c in type(module).__mro__)


def build_cache(module: nn.Module, formulation: str, mask=None, granularity: str = "unit",
                times=None) -> LearnedCache:
    """Install a LearnedCache on the network inside `module` (diffusers hooks or native patches)."""
    _, network, adapter = resolve(module)
    check_formulation(formulation)
    adapter.check(network, formulation)
    units = adapter.units(network, formulation)
    unit_mask = None if mask is None else expand_to_units(mask, units, granularity)
    cache = LearnedCache(network, adapter, units, formulation, unit_mask, times)
    if _is_diffusers_model(network):
        from tdiff.integrations.diffusers.hooks import install_hooks

        install_hooks(cache)
    else:
        install_native(cache)
    return cache


def apply_learned_cache(module: nn.Module, config: LearnedCacheConfig) -> LearnedCache:
    """Install learned per-step caching on `module` in place and return the handle (reset, sampling_run,
    cache_context, sample_rows, remove)."""
    if not isinstance(config, LearnedCacheConfig):
        raise ValueError(f"config must be a LearnedCacheConfig, got {type(config).__name__}")
    matrix, granularity, formulation, times = _resolve_mask(module, config)
    return build_cache(module, formulation, matrix, granularity, times)


@contextlib.contextmanager
def temporary_cache(model: nn.Module, formulation: Optional[str] = None):
    """The cache installed on `model` if any (its formulation must match `formulation` when given), else an
    always-compute cache of `formulation` (default "output") installed for the duration."""
    cache = installed_cache(model)
    if cache is not None:
        if formulation is not None and check_formulation(formulation) != cache.formulation:
            raise ValueError(f"the installed cache uses the {cache.formulation!r} formulation, not {formulation!r}")
        yield cache
        return
    cache = build_cache(model, formulation or "output")
    try:
        yield cache
    finally:
        cache.remove()


class CachedModel(nn.Module):
    """The model with learned caching installed; calls go straight to the model. The wrapped model itself is
    patched (as with diffusers hooks); `remove()` restores it."""

    def __init__(self, model: nn.Module, cache: LearnedCache):
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:  # forward_with_cfg, config, ... of the wrapped model
            return getattr(self._modules["model"], name)

    def reset(self):
        self.cache.reset()

    def sampling_run(self):
        return self.cache.sampling_run()

    def cache_context(self, name: str):
        return self.cache.cache_context(name)

    def sample_rows(self, rows):
        return self.cache.sample_rows(rows)

    def remove(self) -> nn.Module:
        self.cache.remove()
        return self.model


def cached_dit(model: nn.Module, mask: MaskLike, granularity: Optional[str] = None, nfe: Optional[int] = None,
               formulation: Optional[str] = None) -> CachedModel:
    """Short form of apply_learned_cache: `fast = cached_dit(dit, mask)`; then sample with `fast` (or `dit`)."""
    cache = apply_learned_cache(model, LearnedCacheConfig(mask=mask, granularity=granularity, nfe=nfe,
                                                          formulation=formulation))
    return CachedModel(model, cache)


def record_calls(model: nn.Module, sample_fn, formulation: Optional[str] = None) -> list:
    """Run `sample_fn(model)` without gradients and return every network call (runtime.Call: its cache context,
    step, inputs and output), e.g. to take example inputs for `macs` from a real pipeline run."""
    with torch.no_grad(), temporary_cache(model, formulation) as cache, cache.recording() as calls:
        sample_fn(model)
    return calls
