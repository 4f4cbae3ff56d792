"""tdiff: compiled-kernel time-step methods for diffusion models.

Submodules load lazily, so `import tdiff` stays cheap and a missing optional dependency only matters when the
feature that needs it is used.
"""
import importlib

from ._extension import check_installed as _check_installed
from ._version import __version__

_check_installed()  # one warning now if this install has no compiled extension (no torch import)

_SUBMODULES = {
    "schedules", "ops", "models", "data", "metrics", "solvers", "timesteps", "training", "cache", "artefacts",
    "denoisers", "schedulers",
}
# public name -> (module, attribute)
_EXPORTS = {
    "sample": ("tdiff.solvers", "sample"),
    "denoiser": ("tdiff.denoisers", "denoiser"),
    "ld3_learn": ("tdiff.timesteps", "ld3_learn"),
    "cached_dit": ("tdiff.cache", "cached_dit"),
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"tdiff.{name}")
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attr)
        # bound once: a module __getattr__ runs on every access, and tdiff.sample is called per batch (~20 us)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tdiff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _SUBMODULES | set(_EXPORTS))


__all__ = ["__version__", *sorted(_EXPORTS)]
