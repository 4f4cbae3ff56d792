"""Learned per-timestep block caching (seed: per-timestep block-mask caching; issues 7, 11, 13): at sampling step
i a unit (a DiT attention / MLP sub-block, a UNet ResBlock / AttnBlock, a diffusers transformer block or its
attention / feed-forward) either computes and refreshes its cache or reuses it, following a learned
(steps, units) 0/1 mask.

  mask = tdiff.cache.train_mask(dit, sample_fn)              # seed Sec. 3.3-3.5; or train_mask(pipe, pipeline_kwargs=)
  fast = tdiff.cached_dit(dit, mask)                         # or apply_learned_cache(model, LearnedCacheConfig(mask))
  tdiff.cache.macs(dit, mask, example_inputs)                # MACs per step and in total (fvcore, SDPA counted)

Formulations (units.py): "output" caches unit outputs (seed Eq. 3), where rectification (Eq. 12) is exact on the
traced dependency graph; "branch" caches pre-gate residual branches (Learning-to-Cache / FORA), where it is not.
Runs: the step advances once per network call, and a new sampling run starts by itself (after the mask's last step,
or when the network time returns to the run's first); `cache_context(name)` keeps separate caches for the halves
of split classifier-free guidance (diffusers' `cache_context` too). Serving: `with cache.sample_rows(rows)` runs
one batch whose samples each follow their own mask row (rows: (batch, units) bool), or pass a (batch, steps,
columns) mask. Masks are saved with `save_mask` (matrix, formulation, model fingerprint, granularity, solver,
network times, threshold, tdiff version); `load_mask` validates and refuses a wrong model or NFE.
"""
from .adapters import CacheAdapter, register_adapter
from .api import CachedModel, LearnedCacheConfig, apply_learned_cache, cached_dit, record_calls
from .binarise import binarise, uniform_interval_mask, uniform_mask_at_fraction
from .graph import UnitGraph, unit_graph
from .mac_count import macs, unit_macs
from .maskfile import LearnedMask, load_mask, resample_mask, save_mask
from .rectify import rectify
from .runtime import LearnedCache, installed_cache
from .train import train_mask
from .units import FORMULATIONS, Unit, find_units, mask_columns

__all__ = [
    "CacheAdapter", "CachedModel", "FORMULATIONS", "LearnedCache", "LearnedCacheConfig", "LearnedMask", "Unit",
    "UnitGraph", "apply_learned_cache", "binarise", "cached_dit", "find_units", "installed_cache", "load_mask",
    "macs", "mask_columns", "record_calls", "rectify", "register_adapter", "resample_mask", "save_mask", "train_mask",
    "uniform_interval_mask", "uniform_mask_at_fraction", "unit_graph", "unit_macs",
]
