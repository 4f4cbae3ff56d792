"""Argument and input validation shared by the image networks (DiT, UNet)."""
from __future__ import annotations

from typing import Optional

import torch


def check_image_and_labels(x: torch.Tensor, y: Optional[torch.Tensor], in_channels: int, size: int,
                           null_label: int) -> None:
    """x must be (B, in_channels, size, size); y None or (B,) integer class indices in [0, null_label], the last
    being the null (unconditional) class. On CPU the label range is one reduction; elsewhere a device-side assert."""
    if x.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"x must have {in_channels} channels, got {x.shape[1]}")
    if x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"x must be {size}x{size}, got {x.shape[2]}x{x.shape[3]}")
    if y is None:
        return
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.is_floating_point():
        raise ValueError("y must be an integer (long) tensor of class indices")
    if not y.numel():
        return
    if y.device.type == "cpu":
        lo, hi = torch.stack(torch.aminmax(y)).tolist()
        if lo < 0 or hi > null_label:
            raise ValueError(f"class labels must be in [0, {null_label}] ({null_label} is the null class), "
                             f"got [{lo}, {hi}]")
    else:  # no host sync per model call: a device-side assert
        torch._assert_async(((y >= 0) & (y <= null_label)).all(),
                            f"tdiff: class labels must be in [0, {null_label}] ({null_label} is the null class)")


def config_from(config_cls: type, config, kwargs: dict):
    """The network's config: the one given, or one built from keyword arguments, never both."""
    if config is None:
        return config_cls(**kwargs)
    if kwargs:
        raise ValueError(f"pass either a {config_cls.__name__} or keyword arguments, not both")
    return config


class NetworkConfig:
    """What the network configs (dataclasses) share: named presets and the positive-integer checks."""

    PRESETS: dict = {}
    NETWORK = "network"  # the network's name in errors

    @classmethod
    def preset(cls, name: str, **overrides):
        if name not in cls.PRESETS:
            raise ValueError(f"unknown {cls.NETWORK} preset {name!r}; expected one of {sorted(cls.PRESETS)}")
        return cls(**{**cls.PRESETS[name], **overrides})

    def check_positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
