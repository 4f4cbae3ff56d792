"""scikit-learn's 8x8 digits (1797 images, bundled with sklearn: no download), upsampled to 16 or 32 pixels.

Images are single-channel in [-1, 1]. The fixed split is a seeded permutation: 80% train, 20% test.
The bundled CSV is read directly (importing scikit-learn costs a second of CPU per process); its
`load_digits` is the fallback when the file is not where scikit-learn keeps it.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

SIZES = (8, 16, 32)
SPLITS = (None, "train", "test")
_SPLIT_SEED, _TRAIN_FRACTION = 0, 0.8


def _bundled_csv() -> Optional[str]:
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    return path if os.path.exists(path) else None


@lru_cache(maxsize=None)
def _raw() -> Tuple[torch.Tensor, torch.Tensor]:
    path = _bundled_csv()
    if path is not None:
        table = np.loadtxt(path, delimiter=",")  # 64 pixel values 0..16 and the label per row
        pixels, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels, target = d.images, d.target
    if pixels.shape != (1797, 8, 8):
        raise ValueError(f"scikit-learn's digits have an unexpected shape {pixels.shape}; expected (1797, 8, 8)")
    images = torch.as_tensor(pixels, dtype=torch.float32)[:, None] / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    return images, torch.as_tensor(target, dtype=torch.long)


def load_digits_tensor(size: int = 16, split: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) float32 in [-1, 1], labels (N,) long). Bilinear upsampling from 8x8."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    images, labels = _raw()
    if split is not None:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_SPLIT_SEED))
        n_train = int(_TRAIN_FRACTION * len(labels))
        idx = perm[:n_train] if split == "train" else perm[n_train:]
        images, labels = images[idx], labels[idx]
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(-1.0, 1.0).contiguous(), labels.clone()


def digits_loader(batch_size: int = 128, size: int = 16, split: Optional[str] = "train", shuffle: bool = True,
                  seed: int = 0, drop_last: bool = True) -> DataLoader:
    """A DataLoader of (image, label) batches; shuffling is seeded so that training is reproducible."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images, labels = load_digits_tensor(size, split)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed))
