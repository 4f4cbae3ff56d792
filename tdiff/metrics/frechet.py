"""Fréchet distance for digits, in the feature space of a small CNN classifier that tdiff trains itself.

There is no Inception network to download, so the metric network is an ~18k-parameter CNN trained on the digits
train split in a few seconds, seeded, on one thread, deterministic. Its weights ship inside the package
(tdiff/weights/digits_classifier.safetensors, written by `python -m tdiff train-defaults classifier`); a damaged
shipped file is an error, never silently replaced. A classifier with other TRAIN_SETTINGS (tests use a shorter
one) is trained on first use into the cache dir; a cached file that cannot be read is reported with a warning and
retrained. Building or loading it never touches the caller's RNG.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from functools import lru_cache
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..artefacts import hash_state
from ..models.paths import cache_dir
from ..models.weights import load_weights, save_weights, seeded, shipped_path

FORMAT, VERSION = "tdiff-digits-classifier", 2
FEATURE_SIZE = 16  # the classifier sees 16x16 digits; other sizes are resized first
TRAIN_SETTINGS = {"seed": 0, "iters": 300, "batch_size": 64, "lr": 3e-3, "noise": 0.1}
SHIPPED_SETTINGS = dict(TRAIN_SETTINGS)  # the settings of the shipped classifier


class DigitsClassifier(nn.Module):
    """conv(8)-pool-conv(16)-pool-fc(64)-fc(10), ~18k parameters. `features` gives the 64-d penultimate
    activations that the Fréchet distance is computed in."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = _resize(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc1(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.features(x))


def _resize(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must have shape (N, 1, H, W), got {tuple(x.shape)}")
    x = x.float()
    if x.shape[-1] != FEATURE_SIZE or x.shape[-2] != FEATURE_SIZE:
        x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > FEATURE_SIZE)
    return x


def train_classifier(settings: Optional[dict] = None) -> Tuple[DigitsClassifier, float]:
    """Train from scratch (seeded); returns (classifier in eval mode, test accuracy)."""
    from ..data.digits import load_digits_tensor

    s = {**TRAIN_SETTINGS, **(settings or {})}
    g = torch.Generator().manual_seed(s["seed"])
    with seeded(s["seed"]):
        net = DigitsClassifier()
    x, y = load_digits_tensor(FEATURE_SIZE, "train")
    opt = torch.optim.Adam(net.parameters(), lr=s["lr"])
    net.train()
    threads = torch.get_num_threads()
    # one thread: the result then does not depend on the machine's core count (reduction order), and a tiny
    # CNN gains nothing from more on a shared CPU. enable_grad: callers may be under no_grad.
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            _fit(net, opt, x, y, s, g)
    finally:
        torch.set_num_threads(threads)
    net.eval()
    xt, yt = load_digits_tensor(FEATURE_SIZE, "test")
    with torch.no_grad():
        acc = float((net(xt).argmax(1) == yt).float().mean())
    return net, acc


def _fit(net, opt, x, y, s, g):
    for _ in range(s["iters"]):
        idx = torch.randint(0, len(y), (s["batch_size"],), generator=g)
        # light noise makes the features respond smoothly to imperfect samples
        xb = x[idx] + s["noise"] * torch.randn(x[idx].shape, generator=g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def classifier_path() -> str:
    """The shipped classifier when TRAIN_SETTINGS are the shipped ones, else a cache-dir file for those settings."""
    if TRAIN_SETTINGS == SHIPPED_SETTINGS:
        return shipped_path("digits_classifier")
    key = hashlib.sha256(json.dumps(TRAIN_SETTINGS, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), f"digits_classifier-{key}.safetensors")


def _load_classifier(path: str, settings: dict) -> DigitsClassifier:
    def check(doc):
        if doc.get("settings") != settings:
            raise ValueError(f"{path!r} was trained with {doc.get('settings')}, not {settings}")

    return load_weights(path, FORMAT, VERSION, lambda doc: DigitsClassifier(), check)[0]


def write_classifier(path: str, settings: Optional[dict] = None) -> dict:
    """Train the classifier (TRAIN_SETTINGS, or `settings`) and write it to `path`; returns its metadata."""
    settings = {**TRAIN_SETTINGS, **(settings or {})}
    net, acc = train_classifier(settings)
    meta = {"settings": settings, "test_accuracy": acc, "trained_sha256": hash_state(net.state_dict())}
    save_weights(path, FORMAT, VERSION, net, meta)
    return meta


@lru_cache(maxsize=4)
def _classifier_for(path: str) -> DigitsClassifier:
    if path == shipped_path("digits_classifier"):
        if not os.path.exists(path):
            raise FileNotFoundError(f"the shipped metric classifier {path!r} is missing (a broken install): "
                                    "reinstall tdiff, or run `python -m tdiff train-defaults classifier`")
        try:
            return _load_classifier(path, SHIPPED_SETTINGS)
        except ValueError as e:
            raise ValueError(f"the shipped metric classifier is unusable ({e}); reinstall tdiff") from e
    if os.path.exists(path):
        try:
            return _load_classifier(path, TRAIN_SETTINGS)
        except ValueError as e:  # corrupt, truncated, foreign or stale: never reuse it
            warnings.warn(f"digits classifier cache {path!r} is unusable ({e}); retraining it", RuntimeWarning)
    _reference_stats.cache_clear()  # stats from any earlier classifier no longer apply
    write_classifier(path)
    return _load_classifier(path, TRAIN_SETTINGS)


def digits_classifier() -> DigitsClassifier:
    """The metric classifier: the shipped one (or, for other TRAIN_SETTINGS, one trained into the cache dir)."""
    return _classifier_for(classifier_path())


@torch.no_grad()
def digit_features(images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    net = digits_classifier()
    images = images.detach().cpu()
    return torch.cat([net.features(images[i: i + batch_size]) for i in range(0, len(images), batch_size)]).double()


def _stats(features: torch.Tensor):
    f = features.numpy()
    return f.mean(0), np.cov(f, rowvar=False)


@lru_cache(maxsize=4)
def _reference_stats(size: int, path: str):
    from ..data.digits import load_digits_tensor

    return _stats(digit_features(load_digits_tensor(size)[0]))


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + Tr(C1 + C2 - 2 (C1 C2)^{1/2})."""
    from scipy import linalg

    with warnings.catch_warnings():
        # dead ReLU features make the covariances singular; the square root is still fine (checked below)
        warnings.simplefilter("ignore")
        covmean = linalg.sqrtm(cov1 @ cov2)
    if not np.isfinite(covmean).all():
        # near-singular product: regularise both covariances slightly, as pytorch-fid does
        eps = 1e-6 * np.eye(cov1.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            covmean = linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean), 0.0))


def frechet_distance(samples: torch.Tensor, reference: Optional[torch.Tensor] = None, size: int = 16) -> float:
    """Fréchet distance between `samples` (N, 1, H, W) in [-1, 1] and the real digits at `size` (or `reference`)
    in the metric classifier's penultimate feature space. Use at least a few hundred samples."""
    if not torch.is_tensor(samples) or samples.ndim != 4 or samples.shape[1] != 1:
        raise ValueError(f"samples must be a tensor of shape (N, 1, H, W), got {getattr(samples, 'shape', None)}")
    if samples.shape[0] < 2:
        raise ValueError("samples must hold at least 2 images")
    if not torch.isfinite(samples).all():
        raise ValueError("samples contain NaN or inf")
    mu1, cov1 = _stats(digit_features(samples))
    if reference is None:
        mu2, cov2 = _reference_stats(size, classifier_path())
    else:
        if not torch.is_tensor(reference) or reference.ndim != 4 or reference.shape[0] < 2:
            raise ValueError("reference must be a tensor of shape (N, 1, H, W) with N >= 2")
        mu2, cov2 = _stats(digit_features(reference))
    return frechet_from_stats(mu1, cov1, mu2, cov2)
