"""tdiff inside diffusers (the only package that imports diffusers; nothing here is imported by `import tdiff`).

- hooks.py: learned caching as a diffusers ModelHook (`tdiff.cache.apply_learned_cache` on a diffusers model
  registers it through diffusers' HookRegistry);
- blocks.py: per-model-class adapters saying where the cacheable units of diffusers' networks are;
- pipelines.py: a pipeline's denoising network and one sampling run, for `tdiff.cache.train_mask(pipe, ...)`.
"""
from .pipelines import SUPPORTED, denoiser_network, pipeline_sampler

__all__ = ["SUPPORTED", "denoiser_network", "pipeline_sampler"]
