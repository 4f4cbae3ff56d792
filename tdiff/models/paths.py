"""Where tdiff keeps what it trains on this machine: defaults of other configs or recipes, a metric classifier
with other settings (the shipped weights live in tdiff/weights)."""
import os


def cache_dir() -> str:
    """$TDIFF_CACHE_DIR if set, else ~/.cache/tdiff. Read on every call so tests can point it elsewhere."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TDIFF_CACHE_DIR") or "~/.cache/tdiff"))
