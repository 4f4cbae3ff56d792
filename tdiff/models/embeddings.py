"""Embeddings shared by the reference networks: sinusoidal timestep features and 2D sin-cos positions."""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a (B,) float time (the transformer positional code, as in DDPM and DiT).
    Frequencies go from 1 down to 1/max_period, so the network time should span roughly [0, 1000]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.frequency_size).to(self.mlp[0].weight.dtype))


def batch_time(t, batch: int, device, name: str = "t") -> torch.Tensor:
    """Accept a scalar or a (B,) time and return a float (B,) tensor on `device`."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position code (grid*grid, dim): half the channels encode the row, half the column."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2D sin-cos position code, got {dim}")

    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.flatten()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    gy, gx = torch.meshgrid(coords, coords, indexing="ij")
    # DiT puts the column (w) code first; the order only matters for loading original DiT weights
    return torch.cat([one_axis(gx, dim // 2), one_axis(gy, dim // 2)], dim=1).float()
