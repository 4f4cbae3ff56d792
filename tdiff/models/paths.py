"""Where tdiff keeps things it builds itself (default checkpoints, the metric classifier)."""
import os


def cache_dir() -> str:
    """$TDIFF_CACHE_DIR if set, else ~/.cache/tdiff. Read on every call so tests can point it elsewhere."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TDIFF_CACHE_DIR") or "~/.cache/tdiff"))
