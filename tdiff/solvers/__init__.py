"""Multistep diffusion solvers with differentiable coefficient tables and a fused update.

    tdiff.solvers.sample(denoiser, x_T, timesteps, solver="unipc", order=2)

Solvers: dpmpp (DPM-Solver++ 1/2M/3M as diffusers computes them), dpmpp_ab (exponential Adams-Bashforth, true
orders 1-3), dpmpp_sde (SDE-DPM-Solver++ 1-3), dpmsolver / dpmsolver_sde (noise prediction), unipc (bh1/bh2,
orders 1-3, UniC corrector), ipndm (orders 1-4), euler / ddim (eta) / ddpm (first order), heun (EDM, optional churn).
`from_diffusers_timesteps(scheduler)` gives the grid and solver that reproduce a diffusers scheduler.
"""
from .grid import check_timesteps, make_grid
from .interop import from_diffusers_timesteps, to_diffusers
from .program import Program
from .sample import SOLVERS, Sampler, build_program, sample

__all__ = ["sample", "Sampler", "build_program", "SOLVERS", "Program", "check_timesteps", "make_grid",
           "from_diffusers_timesteps", "to_diffusers"]
