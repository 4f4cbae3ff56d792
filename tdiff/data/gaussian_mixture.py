"""An analytic Gaussian mixture: the one data distribution whose denoiser is known exactly.

If x0 ~ sum_k w_k N(m_k, C_k) and x_t = alpha x0 + sigma eps, then x_t is again a mixture,
sum_k w_k N(alpha m_k, alpha^2 C_k + sigma^2 I). With C_k = U_k diag(v_k) U_k^T (U_k = I for diagonal
covariances) everything is diagonal in the rotated coordinates z = U_k^T (x_t - alpha m_k): the posterior weights
r_k(x_t) come from that mixture (computed with logsumexp), and within a component
E[x0 | x_t, k] = m_k + U_k diag(alpha v_k / (alpha^2 v_k + sigma^2)) z. So E[x0 | x_t] = sum_k r_k E[x0 | x_t, k]
exactly: ground truth for solver and training error, in any dimension and for any schedule. Everything is plain
torch, so it is batched, float64-safe and differentiable in x and t.

`image_mixture` builds a structured one in image dimensions (8x8 by default): smooth class means, each class a
low-rank smooth subspace plus a small isotropic floor, so that denoising it needs a network (which class, then
which projection) while its exact denoiser stays known.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..schedules import NoiseSchedule, as_time


class GaussianMixture:
    """sum_k w_k N(means[k], C_k). C_k is diag(variances[k]) (variances (K,) isotropic or (K, d) diagonal), or a
    full symmetric positive semi-definite covariances[k] (K, d, d)."""

    def __init__(self, means, variances=None, weights=None, dtype: torch.dtype = torch.float64, covariances=None):
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim != 2 or means.shape[0] == 0 or means.shape[1] == 0:
            raise ValueError(f"means must have shape (K, d) with K, d >= 1, got {tuple(means.shape)}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        k, d = means.shape
        self.basis = None  # (K, d, d) eigenvectors (columns) of full covariances; None: diagonal
        if (variances is None) == (covariances is None):
            raise ValueError("give exactly one of variances (isotropic or diagonal) and covariances (full)")
        if covariances is not None:
            cov = torch.as_tensor(covariances, dtype=dtype)
            if cov.shape != (k, d, d):
                raise ValueError(f"covariances must have shape ({k}, {d}, {d}), got {tuple(cov.shape)}")
            if not bool(torch.isfinite(cov).all()) or not torch.allclose(cov, cov.transpose(1, 2), atol=1e-12):
                raise ValueError("covariances must be finite and symmetric")
            variances, self.basis = torch.linalg.eigh(cov)
            if bool((variances < -1e-10 * variances.abs().amax(1, keepdim=True).clamp(min=1)).any()):
                raise ValueError("covariances must be positive semi-definite")
            variances = variances.clamp(min=0.0)
        variances = torch.as_tensor(variances, dtype=dtype)
        if variances.shape == (k,):
            variances = variances[:, None].expand(k, d)
        if variances.shape != (k, d):
            raise ValueError(f"variances must have shape ({k},) (isotropic) or ({k}, {d}) (diagonal), "
                             f"got {tuple(variances.shape)}")
        if not bool(torch.isfinite(variances).all()) or bool((variances < 0).any()):
            raise ValueError("variances must be finite and >= 0")
        weights = torch.full((k,), 1.0 / k, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (k,) or not bool(torch.isfinite(weights).all()) or bool((weights <= 0).any()):
            raise ValueError(f"weights must have shape ({k},) with finite positive entries")
        self.means, self.variances = means, variances.contiguous()
        self.weights = weights / weights.sum()
        self.k, self.dim = k, d

    # ----- sampling -----
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        scaled = self.variances[comp].sqrt() * noise
        if self.basis is not None:
            scaled = torch.einsum("nde,ne->nd", self.basis[comp], scaled)
        x = self.means[comp] + scaled
        return (x, comp) if return_labels else x

    # ----- the noisy marginal p_t -----
    def _coefs(self, x: torch.Tensor, t, schedule: Optional[NoiseSchedule]):
        """Flattened x (B, d) and per-sample (B, 1, 1) alpha and sigma (alpha 1, sigma 0 when schedule is None)."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.dim:
            raise ValueError(f"x must hold {self.dim} values per sample, got {flat.shape[1]}")
        if schedule is None:
            one = torch.ones(x.shape[0], 1, 1, dtype=x.dtype, device=x.device)
            return flat, one, torch.zeros_like(one)
        t = as_time(t)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        a = schedule.alpha(t).to(x.dtype).reshape(-1, 1, 1)
        s = schedule.sigma(t).to(x.dtype).reshape(-1, 1, 1)
        return flat, a, s

    def _rotate(self, diff, inverse=False):
        """Into (or back from) each component's eigen-coordinates; the identity for diagonal covariances."""
        if self.basis is None:
            return diff
        u = self.basis.to(diff)
        return torch.einsum("kde,bke->bkd", u, diff) if inverse else torch.einsum("bkd,kde->bke", diff, u)

    def _components(self, x, t, schedule):
        flat, a, s = self._coefs(x, t, schedule)
        m, v = self.means.to(flat), self.variances.to(flat)
        var_t = a * a * v[None] + s * s  # (B, K, d)
        diff = self._rotate(flat[:, None, :] - a * m[None])  # (B, K, d), in eigen-coordinates
        log_comp = -0.5 * ((diff * diff / var_t) + var_t.log() + math.log(2 * math.pi)).sum(-1)
        log_joint = log_comp + self.weights.to(flat).log()[None]  # (B, K)
        return flat, a, v, var_t, diff, log_joint

    def log_prob(self, x: torch.Tensor, t=None, schedule: Optional[NoiseSchedule] = None) -> torch.Tensor:
        """log p_t(x) (B,); the data density when schedule is None."""
        return self._components(x, t, schedule)[-1].logsumexp(-1)

    def posterior_mean(self, x: torch.Tensor, t, schedule: NoiseSchedule) -> torch.Tensor:
        """E[x0 | x_t = x], same shape as x."""
        flat, a, v, var_t, diff, log_joint = self._components(x, t, schedule)
        r = torch.softmax(log_joint, dim=-1)  # (B, K) responsibilities
        comp_mean = self.means.to(flat)[None] + self._rotate(a * v[None] / var_t * diff, inverse=True)
        return (r[..., None] * comp_mean).sum(1).reshape(x.shape)

    def score(self, x: torch.Tensor, t, schedule: NoiseSchedule) -> torch.Tensor:
        """grad_x log p_t(x), same shape as x."""
        flat, a, v, var_t, diff, log_joint = self._components(x, t, schedule)
        r = torch.softmax(log_joint, dim=-1)
        return (r[..., None] * self._rotate(-diff / var_t, inverse=True)).sum(1).reshape(x.shape)

    def denoiser(self, schedule: NoiseSchedule):
        """The exact x0-predicting Denoiser for this mixture under `schedule`."""
        from ..denoisers import Denoiser

        return Denoiser(self.posterior_mean, schedule, prediction="x0", model_time=lambda t: t,
                        call=lambda fn, x, t, y=None: fn(x, t, schedule))

    def __repr__(self):
        return f"GaussianMixture(k={self.k}, dim={self.dim})"


def _smooth_fields(n: int, side: int, generator: torch.Generator, dtype) -> torch.Tensor:
    """(n, side*side) random fields smoothed by a 3x3 box blur twice (image-like correlations)."""
    f = torch.randn(n, 1, side, side, generator=generator, dtype=dtype)
    box = torch.ones(1, 1, 3, 3, dtype=dtype) / 9.0
    for _ in range(2):
        f = torch.nn.functional.conv2d(torch.nn.functional.pad(f, (1, 1, 1, 1), mode="replicate"), box)
    return f.reshape(n, side * side)


def image_mixture(side: int = 8, k: int = 10, rank: int = 6, mean_rms: float = 0.5, spread: float = 0.25,
                  floor: float = 0.02, seed: int = 0, dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """A structured mixture in side*side dimensions: k equally likely classes, each a smooth mean pattern (RMS
    mean_rms per pixel) plus a rank-`rank` subspace of smooth directions with standard deviations decaying from
    `spread` (spread / (1 + j/2) for direction j), plus an isotropic floor of standard deviation `floor`."""
    for name, v in (("side", side), ("k", k), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    d = side * side
    if rank > d:
        raise ValueError(f"rank must be at most side*side = {d}, got {rank}")
    for name, v in (("mean_rms", mean_rms), ("spread", spread), ("floor", floor)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite positive number, got {v!r}")
    g = torch.Generator().manual_seed(int(seed))
    means = _smooth_fields(k, side, g, dtype)
    means = means * (mean_rms / means.pow(2).mean(1, keepdim=True).sqrt())
    dirs = torch.linalg.qr(_smooth_fields(k * rank, side, g, dtype).reshape(k, rank, d).transpose(1, 2))[0]
    stds = spread / (1.0 + 0.5 * torch.arange(rank, dtype=dtype))
    cov = torch.einsum("kdr,r,ker->kde", dirs, stds**2, dirs) + floor**2 * torch.eye(d, dtype=dtype)
    return GaussianMixture(means, weights=None, dtype=dtype, covariances=0.5 * (cov + cov.transpose(1, 2)))


def default_mixture_2d(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """A small 2D test mixture: 8 components on a circle plus one wide central one, uneven weights."""
    angles = torch.arange(8, dtype=dtype) * (2 * math.pi / 8)
    means = torch.cat([torch.stack([angles.cos(), angles.sin()], 1) * 2.0, torch.zeros(1, 2, dtype=dtype)])
    variances = torch.cat([torch.full((8,), 0.02, dtype=dtype), torch.tensor([0.3], dtype=dtype)])
    weights = torch.cat([torch.linspace(1.0, 2.0, 8, dtype=dtype), torch.tensor([1.5], dtype=dtype)])
    return GaussianMixture(means, variances, weights, dtype=dtype)
