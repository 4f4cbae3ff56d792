"""Time-step selection: heuristics, DM-NonUniform (optimised), LD3 (learned), and the LearnedSchedule artefact.

    ts = tdiff.timesteps.logsnr_uniform(schedule, nfe=6)
    ts = tdiff.timesteps.dm_nonuniform(schedule, nfe=10, solver="dpmpp", order=3)
    learned = tdiff.ld3_learn(denoiser, solver="unipc", nfe=5, shape=(1, 16, 16))
    x0 = tdiff.sample(denoiser, x_T, learned, solver="unipc")
"""
from .dm_nonuniform import dm_nonuniform, sampling_options
from .heuristics import HEURISTICS, edm_rho, interpolate_schedule, logsnr_uniform, quadratic_t, uniform_t
from .ld3 import LD3DivergedError, LD3Interrupted, ld3_learn, steps_for_nfe
from .learned import LearnedSchedule
from .remat import RematDenoiser, sample_remat

__all__ = ["uniform_t", "quadratic_t", "edm_rho", "logsnr_uniform", "interpolate_schedule", "HEURISTICS",
           "dm_nonuniform", "ld3_learn", "LD3DivergedError", "LD3Interrupted", "steps_for_nfe", "LearnedSchedule",
           "RematDenoiser", "sample_remat"]
