"""tdiff in diffusers (issue 11): the scheduler's per-step overhead against diffusers' own schedulers
(bench/diffusers_scheduler.py) and learned caching as a diffusers hook on real-shaped networks
(bench/diffusers_cache.py). Both write bench/results/diffusers.json, under "scheduler" and "caching"; each part runs
alone as `python -m bench diffusers_scheduler` / `python -m bench diffusers_cache`."""
from __future__ import annotations

from . import diffusers_cache, diffusers_scheduler


def run(quick: bool = False) -> dict:
    return {"scheduler": diffusers_scheduler.run(quick=quick), "caching": diffusers_cache.run(quick=quick)}
