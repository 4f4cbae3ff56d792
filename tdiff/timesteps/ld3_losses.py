"""The per-sample distance d(student output, teacher output) that LD3 minimises.

  "l2"                 mean squared error over all values. The offline default: it needs no network. The LD3 paper
                       uses LPIPS and its ablation shows L2 is clearly worse on images (FFHQ, NFE 5: FID 15.61 with
                       L2 against 10.56 with LPIPS), so use a perceptual loss where one is available.
  "l1"                 mean absolute error.
  "lpips"              LPIPS-VGG (Zhang et al. 2018), the paper's default, through the `lpips` package. Nothing is
                       downloaded: the ImageNet VGG16 trunk weights must be on disk (see `lpips_loss`); the
                       LPIPS linear-layer weights ship inside the package. Images (B, 1 or 3, H, W) in [-1, 1].
  "digits_perceptual"  an LPIPS-style distance in the feature space of tdiff's digits metric classifier
                       (`tdiff.metrics.frechet.DigitsClassifier`, trained locally in seconds, so it needs no
                       download): at conv1, conv2 and fc1, the features are unit-normalised over channels and the
                       squared differences are averaged over positions and summed over layers, with equal layer
                       weights (LPIPS's "baseline" without learned weights). For (B, 1, H, W) digits-like images.
  a callable           (pred, target) -> (B,) losses.
"""
from __future__ import annotations

import os
from bisect import bisect_right
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("l2", "l1", "lpips", "digits_perceptual")
#: what each built-in loss is, recorded in a LearnedSchedule's metadata
LOSS_NOTES = {
    "l2": "mean squared error (offline default; the LD3 paper uses LPIPS, and its ablation finds L2 clearly worse)",
    "l1": "mean absolute error (the LD3 paper uses LPIPS)",
    "lpips": "LPIPS-VGG through the lpips package (the LD3 paper's loss)",
    "digits_perceptual": "LPIPS-style distance in tdiff's digits classifier features (conv1, conv2, fc1; equal "
                         "weights); a stand-in for LPIPS that needs no download",
}
#: torchvision's ImageNet VGG16 weights, which LPIPS-VGG's trunk is made of
VGG16_FILE = "vgg16-397923af.pth"
_VGG_SLICE_ENDS = (4, 9, 16, 23, 30)  # lpips' vgg16 slices: features[0:4], [4:9], [9:16], [16:23], [23:30]


def resolve_loss(loss, lpips_weights: Optional[str] = None) -> Tuple[Callable[[Tensor, Tensor], Tensor], str]:
    """(per-sample loss function, its name for the metadata)."""
    if callable(loss):
        return loss, getattr(loss, "__name__", "callable")
    if loss == "l2":
        return (lambda a, b: (a - b).pow(2).flatten(1).mean(1)), "l2"
    if loss == "l1":
        return (lambda a, b: (a - b).abs().flatten(1).mean(1)), "l1"
    if loss == "lpips":
        return lpips_loss(lpips_weights), "lpips"
    if loss == "digits_perceptual":
        return digits_perceptual_loss(), "digits_perceptual"
    raise ValueError(f"loss must be one of {LOSSES} or a callable (pred, target) -> (B,) losses, got {loss!r}")


def _vgg16_weights(weights: Optional[str]) -> str:
    if weights is None:
        return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILE)
    weights = os.fspath(weights)
    if os.path.isdir(weights):
        for cand in (os.path.join(weights, VGG16_FILE), os.path.join(weights, "checkpoints", VGG16_FILE)):
            if os.path.isfile(cand):
                return cand
        return os.path.join(weights, VGG16_FILE)
    return weights


def lpips_loss(weights: Optional[str] = None) -> Callable[[Tensor, Tensor], Tensor]:
    """LPIPS-VGG as a per-sample loss. `weights`: torchvision's VGG16 ImageNet file (`vgg16-397923af.pth`), or a
    directory holding it (directly or under checkpoints/); by default torch's hub cache
    (`$TORCH_HOME/hub/checkpoints`), where torchvision itself keeps it."""
    try:
        import lpips
    except Exception as e:  # ImportError, or torchvision failing inside lpips' own imports
        raise ImportError(
            f"loss='lpips' uses the `lpips` package (LPIPS-VGG, the LD3 paper's loss), which could not be imported "
            f"({type(e).__name__}: {e}). lpips imports torchvision, so it needs `pip install lpips` and a torchvision "
            f"build that matches this torch ({torch.__version__}); where torchvision cannot be installed, LPIPS is "
            f"not available. Alternatives that need neither: loss='l2' (the offline default) or "
            f"loss='digits_perceptual' for digits-like images.") from e
    path = _vgg16_weights(weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"loss='lpips' needs the ImageNet VGG16 weights ({VGG16_FILE}, as torchvision saves them) on disk, and "
            f"nothing is downloaded at run time: not found at {path!r}. Copy the file there (torch's hub cache, "
            f"$TORCH_HOME/hub/checkpoints), or pass lpips_weights=<the file, or a directory holding it>. The LPIPS "
            f"linear-layer weights ship inside the lpips package.")
    # a random trunk is built without any download; the real trunk weights are then loaded from the local file
    net = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = {}
    for key, value in state.items():
        if key.startswith("features."):
            index, rest = key[len("features."):].split(".", 1)
            trunk[f"slice{bisect_right(_VGG_SLICE_ENDS, int(index)) + 1}.{index}.{rest}"] = value
    try:
        net.net.load_state_dict(trunk, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path!r} is not torchvision's VGG16 weights file: {e}") from e
    net.eval().requires_grad_(False)

    def lpips_distance(pred: Tensor, target: Tensor) -> Tensor:
        a, b = _as_images(pred, (1, 3), "lpips"), _as_images(target, (1, 3), "lpips")
        if a.shape[1] == 1:  # grey images: the same value in all three channels
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        m = net.to(device=a.device, dtype=a.dtype)
        return m(a, b).flatten()

    return lpips_distance


def _as_images(x: Tensor, channels: tuple, name: str) -> Tensor:
    if x.dim() != 4 or x.shape[1] not in channels:
        raise ValueError(f"loss={name!r} needs images of shape (B, C, H, W) with C in {channels}, got "
                         f"{tuple(x.shape)}; use loss='l2' for other data")
    return x


def _unit(h: Tensor) -> Tensor:
    return h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def digits_perceptual_loss() -> Callable[[Tensor, Tensor], Tensor]:
    from ..metrics.frechet import FEATURE_SIZE, digits_classifier

    net = digits_classifier()

    def layers(x: Tensor) -> list:
        w = {k: v.to(x.dtype) for k, v in net.state_dict().items()}
        if x.shape[-2:] != (FEATURE_SIZE, FEATURE_SIZE):
            x = F.interpolate(x, size=(FEATURE_SIZE, FEATURE_SIZE), mode="bilinear", align_corners=False)
        h1 = F.relu(F.conv2d(x, w["conv1.weight"], w["conv1.bias"], padding=1))
        h2 = F.relu(F.conv2d(F.max_pool2d(h1, 2), w["conv2.weight"], w["conv2.bias"], padding=1))
        h3 = F.relu(F.linear(F.max_pool2d(h2, 2).flatten(1), w["fc1.weight"], w["fc1.bias"]))
        return [h1, h2, h3[:, :, None, None]]

    def digits_perceptual(pred: Tensor, target: Tensor) -> Tensor:
        a, b = _as_images(pred, (1,), "digits_perceptual"), _as_images(target, (1,), "digits_perceptual")
        return sum((_unit(ha) - _unit(hb)).pow(2).sum(1).flatten(1).mean(1) for ha, hb in zip(layers(a), layers(b)))

    return digits_perceptual
