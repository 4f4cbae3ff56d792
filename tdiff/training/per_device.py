"""Tables the training loop indexes every iteration, built once and copied to each device once (a host->device
copy, and on a GPU a sync, per iteration otherwise)."""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch

Tables = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


class PerDevice:
    """`make()` (a tensor or a tuple of tensors) evaluated on first use, then one copy per device."""

    def __init__(self, make: Callable[[], Tables]):
        self._make = make
        self._copies: Dict[torch.device, Tables] = {}

    def on(self, device) -> Tables:
        device = torch.device(device)
        if device not in self._copies:
            value = next(iter(self._copies.values()), None)
            value = self._make() if value is None else value
            self._copies[device] = (tuple(v.to(device) for v in value) if isinstance(value, tuple)
                                    else value.to(device))
        return self._copies[device]
