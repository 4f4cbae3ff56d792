"""An analytic Gaussian mixture: the one data distribution whose denoiser is known exactly.

If x0 ~ sum_k w_k N(m_k, diag(v_k)) and x_t = alpha x0 + sigma eps, then x_t is again a mixture,
sum_k w_k N(alpha m_k, alpha^2 v_k + sigma^2). The posterior weights r_k(x_t) come from that mixture (computed
with logsumexp), and within a component E[x0 | x_t, k] = m_k + alpha v_k / (alpha^2 v_k + sigma^2) (x_t - alpha m_k).
So E[x0 | x_t] = sum_k r_k E[x0 | x_t, k] exactly: ground truth for solver error, in any dimension and for any
schedule. Everything is plain torch, so it is batched, float64-safe and differentiable in x and t.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..schedules import NoiseSchedule, as_time


class GaussianMixture:
    def __init__(self, means, variances, weights=None, dtype: torch.dtype = torch.float64):
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        variances = torch.as_tensor(variances, dtype=dtype)
        if variances.shape == (k,):
            variances = variances[:, None].expand(k, d)
        if variances.shape != (k, d):
            raise ValueError(f"variances must have shape ({k},) (isotropic) or ({k}, {d}) (diagonal), "
                             f"got {tuple(variances.shape)}")
        if bool((variances < 0).any()):
            raise ValueError("variances must be >= 0")
        weights = torch.full((k,), 1.0 / k, dtype=dtype) if weights is None else torch.as_tensor(weights, dtype=dtype)
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(f"weights must have shape ({k},) with positive entries")
        self.means, self.variances = means, variances.contiguous()
        self.weights = weights / weights.sum()
        self.k, self.dim = k, d

    # ----- sampling -----
    def sample(self, n: int, generator: Optional[torch.Generator] = None, return_labels: bool = False):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        x = self.means[comp] + self.variances[comp].sqrt() * noise
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

    def _components(self, x, t, schedule):
        flat, a, s = self._coefs(x, t, schedule)
        m, v = self.means.to(flat), self.variances.to(flat)
        var_t = a * a * v[None] + s * s  # (B, K, d)
        diff = flat[:, None, :] - a * m[None]  # (B, K, d)
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
        comp_mean = self.means.to(flat)[None] + a * v[None] / var_t * diff
        return (r[..., None] * comp_mean).sum(1).reshape(x.shape)

    def score(self, x: torch.Tensor, t, schedule: NoiseSchedule) -> torch.Tensor:
        """grad_x log p_t(x), same shape as x."""
        flat, a, v, var_t, diff, log_joint = self._components(x, t, schedule)
        r = torch.softmax(log_joint, dim=-1)
        return (r[..., None] * (-diff / var_t)).sum(1).reshape(x.shape)

    def denoiser(self, schedule: NoiseSchedule):
        """The exact x0-predicting Denoiser for this mixture under `schedule`."""
        from ..denoisers import Denoiser

        return Denoiser(self.posterior_mean, schedule, prediction="x0", model_time=lambda t: t,
                        call=lambda fn, x, t, y=None: fn(x, t, schedule))

    def __repr__(self):
        return f"GaussianMixture(k={self.k}, dim={self.dim})"


def default_mixture_2d(dtype: torch.dtype = torch.float64) -> GaussianMixture:
    """A small 2D test mixture: 8 components on a circle plus one wide central one, uneven weights."""
    angles = torch.arange(8, dtype=dtype) * (2 * math.pi / 8)
    means = torch.cat([torch.stack([angles.cos(), angles.sin()], 1) * 2.0, torch.zeros(1, 2, dtype=dtype)])
    variances = torch.cat([torch.full((8,), 0.02, dtype=dtype), torch.tensor([0.3], dtype=dtype)])
    weights = torch.cat([torch.linspace(1.0, 2.0, 8, dtype=dtype), torch.tensor([1.5], dtype=dtype)])
    return GaussianMixture(means, variances, weights, dtype=dtype)
