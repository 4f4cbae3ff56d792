"""Row views recycled between sampling runs: their memory is reused, never their values.

A sampling run's preparation splits its tables (coefficient rows, conversion rows, network times) into one small
tensor view per step or evaluation, which the loop hands to the kernels and the network. Making a view costs about
0.7 us and freeing it 0.2 us; a one-shot `tdiff.sample` of Heun at 20 steps makes over a hundred, a quarter of its
preparation. So the views of a run are kept after it, and the next run with the same layout, once nothing else
holds them, writes its own values into their table instead of making new ones.

Only without autograd: with gradient mode on, a graph may save a view without any reference that could be
counted here, so those runs neither keep nor reuse views.
"""
from __future__ import annotations

import sys
from typing import Hashable, Optional

import torch


def storage_users(t: torch.Tensor) -> int:
    """How many tensors share t's storage (the storage's own wrapper counts one): buffers.py and this module's
    test for memory that something else still uses."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _most_held(views: tuple) -> int:
    """The largest sys.getrefcount of the views (one pass in C: ~30 ns a view, a third of a Python loop's)."""
    return max(map(sys.getrefcount, views))


#: what `_most_held` says of a tensor that only its tuple holds (measured, not assumed: a Python version may borrow
#: a reference); never less for a view its tuple holds, so a larger count means something else holds one
_ALONE = _most_held((torch.empty(1),))


def _unheld(groups: tuple, users: tuple) -> bool:
    """Whether views are held by nothing but their tuples: no other Python reference (a Sampler, a run, a pending
    output, a model that kept its time), and no more tensors sharing each group's storage than when the views were
    made (users: those counts; a view of a view raises it)."""
    for views, count in zip(groups, users):
        if storage_users(views[0]) != count or _most_held(views) != _ALONE:
            return False
    return True


class RecycledViews:
    """The last views of each layout (key), up to max_entries layouts (the oldest is forgotten first)."""

    def __init__(self, max_entries: int = 32):
        self._entries: dict = {}
        self.max_entries = max_entries

    def take(self, key: Hashable) -> Optional[tuple]:
        """(table, groups, users) of the layout's last run, for the caller to overwrite the table (the views'
        memory) and `keep` again, when gradient mode is off and nothing else holds the views; else None.
        Thread-safe: an entry is popped, so two runs never get the same one."""
        if torch.is_grad_enabled():
            return None
        entry = self._entries.pop(key, None)
        if entry is None or not _unheld(entry[1], entry[2]):
            return None
        return entry

    def keep(self, key: Hashable, table, groups: tuple, users: Optional[tuple] = None) -> None:
        """Keep a run's views (groups: tuples of tensors, each tuple's views sharing one storage, held by table or
        by nothing) for the next run of this layout, not in gradient mode. users: the entry's, when it came from
        `take`; None for views just made (nothing but their tuples and the table may hold them yet)."""
        if torch.is_grad_enabled():
            return
        if users is None:
            users = tuple(storage_users(views[0]) for views in groups)
        if len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = table, groups, users
