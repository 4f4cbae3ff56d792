"""Training acceleration: time-step samplers (uniform, SpeeD, EDM log-normal, SD3 logit-normal), loss weights
(SpeeD, Min-SNR, P2, EDM, FDM warm-up), FDM preconditioning, the composable `DiffusionLoss` on the fused ops, and
reproducible per-rank streams for DDP. The trainer is `python -m tdiff.training.train`."""
from .distributed import RankStreams, stream_seed
from .loss import DiffusionLoss, default_network_time
from ..preconditioning import Preconditioning
from .sampler_base import TableSampler, TimestepSampler
from .sampler_normal import LogitNormalSampler, LogNormalSampler
from .sampler_speed import SpeedSampler
from .sampler_uniform import UniformSampler
from .samplers import SAMPLERS, make_sampler
from .speed_areas import SpeedAreas, speed_areas
from .time_grid import TimeGrid
from .warmup import WeightWarmup
from .weight_edm import EDMWeight, PreconditioningWeight
from .weight_snr import MinSNRWeight, P2Weight
from .weight_speed import SpeedWeight
from .weighting_base import UnitWeight, Weighting
from .weightings import WEIGHTINGS, make_weighting

__all__ = [
    "DiffusionLoss", "default_network_time", "Preconditioning", "TimestepSampler", "TableSampler", "UniformSampler",
    "SpeedSampler", "LogNormalSampler", "LogitNormalSampler", "make_sampler", "SAMPLERS", "SpeedAreas",
    "speed_areas", "TimeGrid", "WeightWarmup", "Weighting", "UnitWeight", "SpeedWeight", "MinSNRWeight", "P2Weight",
    "EDMWeight", "PreconditioningWeight", "make_weighting", "WEIGHTINGS", "RankStreams", "stream_seed",
]
