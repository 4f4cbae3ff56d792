"""Reproducible per-rank time-step and noise streams for data-parallel training.

Each rank draws from its own generator seeded by (seed, rank, step): ranks see different time steps, a rerun sees
the same ones, and a single process can rebuild the whole global batch's draws (`global_timesteps`) to check a
DDP run against it. With `stratified=True` the global batch of G = world * b uniforms is stratified, u_j =
(j + U_j)/G, and stratum j goes to rank j mod world, in a per-rank random order (so that SpeeD's first-half /
reflected-half split still sees random strata). Every sampler is an inverse CDF, so stratifying u stratifies t.

Weights and the FDM warm-up need nothing here: they are functions of t and of the optimiser step count, which
every rank advances alike.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from .samplers import TimestepSampler

_MASK = (1 << 63) - 1


def stream_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed mixing (seed, rank, step) so that nearby triples give unrelated streams."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(rank) * 0xBF58476D1CE4E5B9 + int(step) * 0x94D049BB133111EB) & _MASK
    h ^= h >> 31
    h = (h * 0xD6E8FEB86659FD93) & _MASK
    return h ^ (h >> 29)


def _dist_rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class RankStreams:
    def __init__(self, seed: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                 stratified: bool = False):
        r, w = _dist_rank_world()
        self.seed = checks.integer("seed", seed, low=0)
        self.world_size = w if world_size is None else checks.integer("world_size", world_size, low=1)
        self.rank = r if rank is None else checks.integer("rank", rank, low=0)
        if not self.rank < self.world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        self.stratified = checks.flag("stratified", stratified)

    def generator(self, step: int, device="cpu", rank: Optional[int] = None, stream: int = 0) -> torch.Generator:
        """The generator of one rank at one step; stream 0 is for times, 1 for noise."""
        g = torch.Generator(device=device)
        g.manual_seed(stream_seed(self.seed + 1_000_003 * stream, self.rank if rank is None else rank, step))
        return g

    def local_batch(self, global_batch: int) -> int:
        global_batch = checks.integer("global_batch", global_batch, low=1)
        if global_batch % self.world_size:
            raise ValueError(f"global_batch={global_batch} is not divisible by world_size={self.world_size}; "
                             "stratified sampling needs an equal share per rank")
        return global_batch // self.world_size

    def uniforms(self, batch: int, step: int, device="cpu", rank: Optional[int] = None) -> torch.Tensor:
        rank = self.rank if rank is None else rank
        g = self.generator(step, device, rank)
        u = torch.rand(batch, generator=g, device=device, dtype=torch.float64)
        if not self.stratified:
            return u
        total = batch * self.world_size
        order = torch.randperm(batch, generator=g, device=device)
        strata = rank + self.world_size * order
        return (strata.to(torch.float64) + u) / total

    def timesteps(self, sampler: TimestepSampler, batch: int, step: int, device="cpu",
                  rank: Optional[int] = None) -> torch.Tensor:
        """This rank's (batch,) time steps for `step` (batch is the local batch)."""
        return sampler.from_uniform(self.uniforms(batch, step, device, rank))

    def noise(self, shape, step: int, device="cpu", dtype=torch.float32, rank: Optional[int] = None):
        g = self.generator(step, device, rank, stream=1)
        return torch.randn(tuple(shape), generator=g, device=device, dtype=dtype)

    def global_timesteps(self, sampler: TimestepSampler, global_batch: int, step: int, device="cpu"):
        """Every rank's draws for `step`, concatenated in rank order: the single-process view of a DDP step."""
        b = self.local_batch(global_batch)
        return torch.cat([self.timesteps(sampler, b, step, device, r) for r in range(self.world_size)])

    def global_noise(self, shape, step: int, device="cpu", dtype=torch.float32):
        """shape is the local (per-rank) shape; returns the rank-order concatenation."""
        return torch.cat([self.noise(shape, step, device, dtype, r) for r in range(self.world_size)])
