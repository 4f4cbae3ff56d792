"""Learned per-timestep block caching (issue 7): at sampling step i a unit (a DiT attention / MLP branch, or a
UNet block's residual branch) either computes and refreshes its cache or reuses its cached pre-gate output,
following a learned (steps, units) 0/1 mask.

  fast = tdiff.cached_dit(dit, mask)                         # or apply_learned_cache(dit, LearnedCacheConfig(mask))
  mask = tdiff.cache.train_mask(dit, sample_fn, ...)         # per-timestep mask training (seed Sec. 3.3-3.5)
  tdiff.cache.macs(dit, mask, example_inputs)                # MACs per step and in total (fvcore)

Sampling: `with fast.sampling_run(): x0 = tdiff.sample(...)` resets the caches and the step counter (which advances
once per model call); `fast.cache_context("cond")` keeps separate caches for samplers that call the model twice
per step for classifier-free guidance. Serving: `with fast.sample_rows(rows): fast(x, t, y)` runs one batch whose
samples each follow their own mask row (rows: (batch, units) bool), through the fused tdiff::cached_block op.
Masks are saved with `save_mask` (matrix, model fingerprint, granularity, solver, NFE, timesteps, threshold,
tdiff version) and `load_mask` refuses a wrong model or NFE; `resample_mask` maps one to another NFE explicitly.
"""
from .api import CachedModel, LearnedCacheConfig, apply_learned_cache, cached_dit
from .binarise import binarise, uniform_interval_mask
from .mac_count import macs, unit_macs
from .maskfile import LearnedMask, load_mask, resample_mask, save_mask
from .rectify import rectify
from .runtime import LearnedCache
from .train import train_mask
from .units import Unit, find_blocks, find_units, mask_columns

__all__ = [
    "CachedModel", "LearnedCache", "LearnedCacheConfig", "LearnedMask", "Unit", "apply_learned_cache", "binarise",
    "cached_dit", "find_blocks", "find_units", "load_mask", "mask_columns", "rectify", "resample_mask",
    "save_mask", "uniform_interval_mask", "macs", "unit_macs", "train_mask",
]
