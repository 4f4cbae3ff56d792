"""Sample-based distances between two point clouds (e.g. solver samples vs exact mixture samples)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..checks import integer, positive


def _flat_pair(x: torch.Tensor, y: torch.Tensor):
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise ValueError("x and y must be tensors")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise TypeError(f"x and y must be floating-point tensors, got {x.dtype} and {y.dtype}")
    if x.dim() < 1 or y.dim() < 1:
        raise ValueError("x and y must have a sample dimension")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError("x and y need at least 2 samples each")
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, n_projections: int = 256, seed: int = 0,
                       p: int = 2) -> torch.Tensor:
    """Sliced p-Wasserstein distance with seeded random directions. Unequal sample counts are compared through
    their quantile functions on a common grid."""
    x, y = _flat_pair(x, y)
    n_projections = integer("n_projections", n_projections, low=1)
    p = integer("p", p, low=1)
    g = torch.Generator().manual_seed(integer("seed", seed, low=0))
    dirs = torch.randn(x.shape[1], n_projections, generator=g, dtype=x.dtype).to(x.device)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    if px.shape[0] != py.shape[0]:
        n = max(px.shape[0], py.shape[0])
        q = (torch.arange(n, dtype=x.dtype, device=x.device) + 0.5) / n
        px, py = torch.quantile(px, q, dim=0), torch.quantile(py, q, dim=0)
    return (px - py).abs().pow(p).mean().pow(1.0 / p)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Unbiased squared maximum mean discrepancy with a sum of RBF kernels. Default bandwidths are multiples of
    the median pairwise distance of the pooled samples."""
    x, y = _flat_pair(x, y)
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).square()
    if bandwidths is None:
        med = d2[d2 > 0].median().sqrt() if bool((d2 > 0).any()) else torch.tensor(1.0, dtype=z.dtype)
        bandwidths = [float(med) * f for f in (0.25, 0.5, 1.0, 2.0, 4.0)]
    else:
        if isinstance(bandwidths, (str, bytes)) or not hasattr(bandwidths, "__len__") or len(bandwidths) == 0:
            raise TypeError(f"bandwidths must be a non-empty sequence of positive numbers, got {bandwidths!r}")
        bandwidths = [positive(f"bandwidths[{i}]", b) for i, b in enumerate(bandwidths)]
    k = sum(torch.exp(-d2 / (2 * bw * bw)) for bw in bandwidths)
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return term_x + term_y - 2 * kxy.mean()
