"""Public entry points: the diffusers-style `LearnedCacheConfig` + `apply_learned_cache(module, config)`, and the
short form `cached_dit(model, mask)`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from .maskfile import LearnedMask, as_mask_matrix, load_mask
from .runtime import LearnedCache
from .units import check_granularity, expand_to_units, find_units

MaskLike = Union[torch.Tensor, LearnedMask, str]


@dataclass
class LearnedCacheConfig:
    """mask: a (steps, columns) 0/1 matrix, a LearnedMask, or the path of a saved mask file.
    granularity: "branch" (attention and MLP branch separately, the default) or "block"; taken from the mask
    when it is a LearnedMask / file.
    nfe: when given, a mask with another number of steps is refused.
    check_model: refuse a LearnedMask / file whose model fingerprint differs from the module's."""

    mask: MaskLike
    granularity: Optional[str] = None
    nfe: Optional[int] = None
    check_model: bool = True


def _resolve(module: nn.Module, config: LearnedCacheConfig):
    mask = config.mask
    if isinstance(mask, str):
        mask = load_mask(mask)
    if isinstance(mask, LearnedMask):
        if config.granularity is not None and config.granularity != mask.granularity:
            raise ValueError(f"granularity {config.granularity!r} contradicts the mask's {mask.granularity!r}")
        if config.check_model:
            mask.check_model(module)
        if config.nfe is not None:
            mask.check_nfe(config.nfe)
        return mask.matrix, mask.granularity
    matrix = as_mask_matrix(mask)
    if config.nfe is not None and matrix.shape[0] != config.nfe:
        raise ValueError(f"mask has {matrix.shape[0]} steps but nfe={config.nfe}")
    return matrix, check_granularity(config.granularity or "branch")


def apply_learned_cache(module: nn.Module, config: LearnedCacheConfig) -> LearnedCache:
    """Install learned per-step caching on `module` in place and return the handle (reset, sampling_run,
    cache_context, sample_rows, remove)."""
    if not isinstance(config, LearnedCacheConfig):
        raise ValueError(f"config must be a LearnedCacheConfig, got {type(config).__name__}")
    matrix, granularity = _resolve(module, config)
    units = find_units(module)
    return LearnedCache(module, expand_to_units(matrix, units, granularity))


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


def cached_dit(model: nn.Module, mask: MaskLike, granularity: Optional[str] = None,
               nfe: Optional[int] = None) -> CachedModel:
    """Short form of apply_learned_cache: `fast = cached_dit(dit, mask)`; then `with fast.sampling_run(): ...`."""
    cache = apply_learned_cache(model, LearnedCacheConfig(mask=mask, granularity=granularity, nfe=nfe))
    return CachedModel(model, cache)
