"""Training acceleration: time-step samplers (uniform, SpeeD, EDM log-normal, SD3 logit-normal, log-uniform), loss
weights (SpeeD, Min-SNR, P2, EDM, FDM warm-up), FDM preconditioning, the composable `DiffusionLoss` on the fused
ops, and reproducible per-rank streams for DDP. The resumable trainer is `python -m tdiff.training.train`."""
from .cells import PerDevice, TimeCells
from .distributed import RankStreams, stream_seed
from .loss import DiffusionLoss, TrainedDenoiser, default_network_time, network_output
from ..preconditioning import Preconditioning
from .samplers import (SAMPLERS, LogitNormalSampler, LogNormalSampler, LogUniformSampler, SpeedSampler, TableSampler,
                       TimestepSampler, UniformSampler, make_sampler)
from .speed_areas import SpeedAreas, speed_areas
from .warmup import WeightWarmup
from .weightings import (WEIGHTINGS, EDMWeight, MinSNRWeight, P2Weight, PreconditioningWeight, ProductWeight,
                         SpeedWeight, UnitWeight, Weighting, make_weighting)

__all__ = [
    "DiffusionLoss", "TrainedDenoiser", "default_network_time", "network_output", "Preconditioning",
    "TimestepSampler", "TableSampler", "UniformSampler", "SpeedSampler", "LogNormalSampler", "LogitNormalSampler",
    "LogUniformSampler", "make_sampler", "SAMPLERS", "SpeedAreas", "speed_areas", "TimeCells", "PerDevice",
    "WeightWarmup", "Weighting", "UnitWeight", "SpeedWeight", "MinSNRWeight", "P2Weight", "EDMWeight",
    "PreconditioningWeight", "ProductWeight", "make_weighting", "WEIGHTINGS", "RankStreams", "stream_seed",
]
