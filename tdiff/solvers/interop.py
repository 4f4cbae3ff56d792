"""Timesteps to and from diffusers schedulers.

`from_diffusers_timesteps(scheduler, schedule)` reads a scheduler after `set_timesteps` and returns the
equivalent tdiff grid: `.timesteps` (N+1 schedule times, taken from the scheduler's own sigmas so the noise
levels agree bit for bit), `.timesteps_cond` (the integer timesteps it feeds the network, as schedule times) and
`.final_sigmas_type`; `sample()` accepts the object directly. `to_diffusers(timesteps, schedule)` goes back, to the
`timesteps=` or `sigmas=` argument of a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..schedules import DiscreteVP, NoiseSchedule, RectifiedFlow
from .grid import check_timesteps


@dataclass
class DiffusersTimesteps:
    timesteps: Tensor  # (N+1,) schedule times
    timesteps_cond: Tensor  # (N,) schedule times of the network's integer timesteps
    final_sigmas_type: str  # "zero" when the scheduler's last sigma is 0


def _unused_final_time(schedule: NoiseSchedule, t_last: Tensor) -> Tensor:
    # With a final step to sigma = 0 the last grid time is unused; any valid smaller time will do.
    return torch.minimum(t_last * 0.5, torch.as_tensor(schedule.t_min, dtype=t_last.dtype))


def from_diffusers_timesteps(scheduler, schedule: Optional[NoiseSchedule] = None) -> DiffusersTimesteps:
    """Read `scheduler.timesteps` (and `.sigmas` when it has them) after `set_timesteps`."""
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler must have had set_timesteps(...) called")
    if _uses_flow_sigmas(scheduler):
        return _from_flow_scheduler(scheduler, schedule)
    schedule = schedule or DiscreteVP.from_diffusers(scheduler)
    index = torch.as_tensor(scheduler.timesteps).to(torch.float64)
    t_cond = schedule.t_from_index(index) if isinstance(schedule, DiscreteVP) else None
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        sigmas = torch.as_tensor(sigmas).to(torch.float64).flatten()
        final_zero = bool(sigmas[-1] == 0)
        t = schedule.t_from_edm_sigma(sigmas[: index.numel()])
        end = _unused_final_time(schedule, t[-1:]) if final_zero else schedule.t_from_edm_sigma(sigmas[-1:])
    else:
        # DDIM-style: no sigmas; each step goes to timestep - num_train_timesteps // N, or to the final alpha
        if not isinstance(schedule, DiscreteVP):
            raise ValueError("a scheduler without sigmas needs a DiscreteVP schedule")
        t = t_cond
        final_alpha_one = bool(getattr(scheduler.config, "set_alpha_to_one", True))
        final_zero = final_alpha_one
        end = _unused_final_time(schedule, t[-1:]) if final_zero else schedule.t_from_index(torch.zeros(1).double())
    # the sigma -> t inversion can land a rounding error outside the domain (e.g. 1 + 1e-16)
    timesteps = torch.cat([t, end]).clamp(schedule.domain[0], schedule.domain[1])
    check_timesteps(schedule, timesteps)
    return DiffusersTimesteps(timesteps, t if t_cond is None else t_cond, "zero" if final_zero else "sigma_min")


def _uses_flow_sigmas(scheduler) -> bool:
    return "FlowMatch" in type(scheduler).__name__ or bool(getattr(scheduler.config, "use_flow_sigmas", False))


def _from_flow_scheduler(scheduler, schedule: Optional[NoiseSchedule]) -> DiffusersTimesteps:
    """Flow-matching schedulers keep sigma = t of x_t = (1 - t) x0 + t eps, so their sigmas are the times."""
    schedule = schedule or RectifiedFlow()
    if not isinstance(schedule, RectifiedFlow):
        raise ValueError(f"a flow-matching scheduler needs a RectifiedFlow schedule, got {schedule!r}")
    sigmas = torch.as_tensor(scheduler.sigmas).to(torch.float64).flatten()
    n = torch.as_tensor(scheduler.timesteps).numel()
    final_zero = bool(sigmas[-1] == 0)
    t = sigmas[:n]
    end = _unused_final_time(schedule, t[-1:]) if final_zero else sigmas[-1:]
    timesteps = torch.cat([t, end])
    check_timesteps(schedule, timesteps)
    return DiffusersTimesteps(timesteps, t, "zero" if final_zero else "sigma_min")


def to_diffusers(timesteps, schedule: NoiseSchedule, kind: str = "sigmas") -> dict:
    """The N model-evaluation points of `timesteps` as a diffusers pipeline argument:
    kind="sigmas" -> {"sigmas": [sigma/alpha, ...]} (the scheduler appends its final sigma), kind="timesteps" ->
    {"timesteps": [int, ...]} (DiscreteVP only; rounded to training indices)."""
    timesteps = getattr(timesteps, "timesteps", timesteps)
    ts = check_timesteps(schedule, timesteps).detach().to(torch.float64)[:-1]
    if kind == "sigmas":
        # flow-matching pipelines take sigma = t; the others take the noise level sigma/alpha
        sig = ts if isinstance(schedule, RectifiedFlow) else schedule.edm_sigma(ts)
        return {"sigmas": sig.tolist()}
    if kind == "timesteps":
        if not isinstance(schedule, DiscreteVP):
            raise ValueError("kind='timesteps' needs a DiscreteVP schedule (integer training indices)")
        return {"timesteps": [int(round(v)) for v in schedule.index_from_t(ts).tolist()]}
    raise ValueError(f"kind must be 'sigmas' or 'timesteps', got {kind!r}")
