"""The compiled extension tdiff._C: whether this install has it, loading it, and one loud warning when it cannot.

Without it every CPU op runs on its pure-PyTorch reference (correct, slower). That happens when the install was
built with TDIFF_NO_EXT=1, when TDIFF_NO_EXT=1 is set at run time, or when the extension was compiled against
another torch than the one installed (its C++ ABI): tdiff says which, once, naming TDIFF_NO_EXT and the fallback.
`import tdiff` checks that the file is there (cheaply, without importing torch); the first op imports it.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import re
import warnings
from typing import Optional

REBUILD = "MAX_JOBS=2 pip install --no-build-isolation --force-reinstall --no-deps ."
_warned = False


def _warn(reason: str) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"tdiff: the compiled extension tdiff._C is not used ({reason}); the CPU ops run on their pure-PyTorch "
        f"reference (correct, several times slower). Rebuild it against the installed torch with `{REBUILD}`, or "
        f"set TDIFF_NO_EXT=1 to choose the reference deliberately.",
        RuntimeWarning, stacklevel=3)


def built_for_torch() -> Optional[str]:
    """The torch version this install's extension was compiled against (its `torch==X` requirement), or None."""
    try:
        requirements = importlib.metadata.requires("tdiff") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for r in requirements:
        m = re.fullmatch(r"\s*torch\s*==\s*([0-9][0-9A-Za-z.]*)\s*", r)
        if m:
            return m.group(1)
    return None


def check_installed() -> None:
    """At `import tdiff`: warn once if this install has no extension file (built with TDIFF_NO_EXT=1, or copied
    without it). Cheap: no torch import."""
    if os.environ.get("TDIFF_NO_EXT") == "1":
        return  # chosen deliberately at run time: load() says so at the first op
    if importlib.util.find_spec("tdiff._C") is None:
        _warn("this install has no tdiff._C: it was built with TDIFF_NO_EXT=1 or its build failed")


def load() -> bool:
    """Import tdiff._C (registering its kernels with the dispatcher); False, with one warning, if it cannot be."""
    if os.environ.get("TDIFF_NO_EXT") == "1":
        _warn("TDIFF_NO_EXT=1 is set")
        return False
    import torch

    built = built_for_torch()
    running = torch.__version__.split("+")[0]
    if built is not None and built != running:
        _warn(f"it was compiled against torch {built}, but torch {running} is installed, and its C++ ABI differs")
        return False
    try:
        importlib.import_module("tdiff._C")
    except ImportError as e:
        _warn(f"importing it failed: {e}")
        return False
    return True
