"""Building a sampler or weighting from a registry name, or taking an already-built one."""
from __future__ import annotations


def build_from_registry(what: str, value, registry: dict, base: type, schedule, **kwargs):
    """`value` itself if it is already a `base` (then options are refused), else registry[value](schedule,
    **kwargs). `what` names the argument in the errors."""
    if isinstance(value, base):
        if kwargs:
            raise ValueError(f"{what} options were given for an already-built {what}")
        return value
    if value not in registry:
        raise ValueError(f"{what} must be one of {sorted(registry)} or a {base.__name__}, got {value!r}")
    return registry[value](schedule, **kwargs)
