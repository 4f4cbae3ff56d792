"""Reference networks (DiT, UNet) and the default models trained on digits, whose weights ship in tdiff/weights."""
from .dit import DiT, DiTBlock, DiTConfig, modulate
from .paths import cache_dir
from .unet import AttnBlock, ResBlock, UNet, UNetConfig


def __getattr__(name):
    # defaults pulls in the trainer and data; load it only when asked
    if name in ("load_default", "train_defaults", "train_default", "build_model", "checkpoint_metrics",
                "default_schedule", "shipped_metadata"):
        from . import defaults

        return getattr(defaults, name)
    raise AttributeError(f"module 'tdiff.models' has no attribute {name!r}")


__all__ = ["DiT", "DiTBlock", "DiTConfig", "modulate", "UNet", "UNetConfig", "ResBlock", "AttnBlock",
           "cache_dir", "load_default", "train_defaults", "train_default", "build_model", "checkpoint_metrics",
           "default_schedule", "shipped_metadata"]
