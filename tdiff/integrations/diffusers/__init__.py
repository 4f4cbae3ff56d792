"""tdiff inside diffusers (the only package that imports diffusers; nothing here is imported by `import tdiff`).

- scheduler.py: `TdiffScheduler`, tdiff's solvers and time steps as a diffusers scheduler;
- pipelines.py: a pipeline's network, schedule and conditioning as a tdiff Denoiser, and the one-call helpers
  (`tdiff.ld3_learn(pipe, ...)`, `tdiff.timesteps.dm_nonuniform(pipe, ...)`) that return a TdiffScheduler;
- pipeline_runs.py: a pipeline's denoising network and one sampling run through it, for
  `tdiff.cache.train_mask(pipe, ...)`;
- hooks.py: learned caching as a diffusers ModelHook (`tdiff.cache.apply_learned_cache` on a diffusers model
  registers it through diffusers' HookRegistry);
- blocks.py: per-model-class adapters saying where the cacheable units of diffusers' networks are.
Public scheduler names are re-exported by `tdiff.schedulers`.
"""
from .pipeline_runs import SUPPORTED, denoiser_network, pipeline_sampler

__all__ = ["SUPPORTED", "denoiser_network", "pipeline_sampler"]
