"""Integrations with other libraries. Each lives in its own subpackage and is the only place that imports that
library, lazily: `import tdiff` never imports diffusers.

- tdiff.integrations.diffusers: learned caching as diffusers hooks (hooks.py), per-model-class unit adapters for
  diffusers' networks (blocks.py), and running a pipeline for mask training (pipelines.py).
"""


def is_diffusers_pipeline(obj) -> bool:
    """Whether obj is a diffusers DiffusionPipeline (checked by class, without importing diffusers)."""
    return any(c.__name__ == "DiffusionPipeline" and c.__module__.startswith("diffusers.")
               for c in type(obj).__mro__)


__all__ = ["is_diffusers_pipeline"]
