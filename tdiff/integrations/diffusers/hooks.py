"""Learned caching as diffusers hooks (diffusers.hooks.HookRegistry / ModelHook).

- `LearnedCacheModelHook` on the network itself: one call = one step (LearnedCache.begin_call / end_call). It is
  stateful: diffusers resets it with the network's other stateful hooks (`_reset_stateful_cache`, which pipelines
  call after every run on CacheMixin models), and its StateManager follows diffusers' `cache_context(name)`, so
  the halves of split classifier-free guidance keep separate caches.
- `LearnedCacheUnitHook` on every unit module (a resnet, an attention, a transformer block, or an attn1 / ff):
  its `new_forward` hands the original forward to LearnedCache.run_unit, which computes or reuses.

Hooks chain with diffusers' own (FirstBlockCache, layerwise casting, ...) through the registry. Removal takes our
hooks out of every registry and, where tdiff created the registry and no other hook is left, deletes the registry
and the forward attribute it left behind, so the model is as it was.
"""
from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from tdiff.cache.runtime import LearnedCache, mark, unmark

MODEL_HOOK = "tdiff_learned_cache"
UNIT_HOOK = "tdiff_learned_cache_unit"


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        """Nothing to reset: the LearnedCache holds the state."""


class _ContextTracker(StateManager):
    """diffusers sets the cache context on every StateManager of a stateful hook; this one passes the context's
    name on to the LearnedCache."""

    def __init__(self, cache: LearnedCache):
        super().__init__(_NoState)
        self._cache = cache

    def set_context(self, context) -> None:
        super().set_context(context)
        self._cache.set_context(None if context is None else context.name)


class LearnedCacheModelHook(ModelHook):
    _is_stateful = True

    def __init__(self, cache: LearnedCache):
        super().__init__()
        self.cache = cache
        self.state_manager = _ContextTracker(cache)

    def pre_forward(self, module, *args, **kwargs):
        self.cache.begin_call(args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        return self.cache.end_call(output)

    def reset_state(self, module):
        self.cache.reset()
        return module


class LearnedCacheUnitHook(ModelHook):
    def __init__(self, cache: LearnedCache, unit: int):
        super().__init__()
        self.cache, self.unit = cache, unit

    def new_forward(self, module, *args, **kwargs):
        return self.cache.run_unit(self.unit, self.fn_ref.original_forward, args, kwargs)


def install_hooks(cache: LearnedCache) -> None:
    """Register the model hook on cache.network and a unit hook on every unit module."""
    network = cache.network
    for unit in cache.units:
        if unit.via != "forward":
            raise ValueError(f"unit {unit.name} is wrapped via {unit.via!r}; diffusers hooks wrap module forwards")
    mark(network, cache)
    registered = []

    def register(module, hook, name):
        state = ("_diffusers_hook" in module.__dict__, "forward" in module.__dict__)
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        registered.append((module, name, state))

    try:
        register(network, LearnedCacheModelHook(cache), MODEL_HOOK)
        for unit in cache.units:
            register(unit.module, LearnedCacheUnitHook(cache, unit.index), UNIT_HOOK)
    except BaseException:
        _remove(network, registered)
        raise
    HookRegistry.check_if_exists_or_initialize(network).invalidate_child_registries_cache()
    cache._uninstall = lambda: _remove(network, registered)


def _remove(network, registered) -> None:
    for module, name, (had_registry, had_forward) in reversed(registered):
        registry = module._diffusers_hook
        registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            if not had_forward and "forward" in module.__dict__:
                del module.__dict__["forward"]
            if not had_registry:
                del module.__dict__["_diffusers_hook"]
    registered.clear()
    if "_diffusers_hook" in network.__dict__:
        network._diffusers_hook.invalidate_child_registries_cache()
    unmark(network)
