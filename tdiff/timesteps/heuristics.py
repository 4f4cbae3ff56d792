"""Time-step heuristics: N+1 strictly decreasing schedule times from t_max down to t_min, for any schedule.

Each heuristic places its points uniformly in some coordinate and maps them back to schedule time through the
schedule itself (`tdiff.schedules`), so nothing here knows the formula of any particular schedule:

  uniform_t        uniform in t                                  (DDPM/DDIM "time uniform")
  quadratic_t      t_i = ((N-i)/N)^rho (t_max - t_min) + t_min   (polynomial; rho = 2 is "time quadratic")
  edm_rho          uniform in sigma~^(1/rho), sigma~ = sigma/alpha  (Karras et al., rho = 7)
  logsnr_uniform   uniform in lambda = log(alpha/sigma)          (DPM-Solver's "logSNR")
  interpolate_schedule  log-linear interpolation of a reference schedule's noise levels to another step count
                   (how Align Your Steps stretches its 10-step tables to other NFE)

The two end points are written exactly (not round-tripped through an inverse), so every heuristic starts and
ends at the same times and they compare like for like.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..schedules import NoiseSchedule
from ..solvers.grid import check_timesteps


def check_nfe(nfe, name: str = "nfe", minimum: int = 1) -> int:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {nfe!r}")
    return nfe


def check_rho(rho) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho < float("inf"):
        raise ValueError(f"rho must be a finite number > 0, got {rho!r}")
    return float(rho)


def sampling_interval(schedule: NoiseSchedule, t_max: Optional[float] = None,
                      t_min: Optional[float] = None) -> tuple:
    """(t_max, t_min) as float64 0-dim tensors, defaulting to the schedule's sampling interval, validated."""
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
    hi = schedule.check_t(_scalar_time(schedule.t_max if t_max is None else t_max), "t_max")
    lo = schedule.check_t(_scalar_time(schedule.t_min if t_min is None else t_min), "t_min")
    if not bool(lo < hi):
        raise ValueError(f"t_min must be < t_max, got t_min={float(lo)}, t_max={float(hi)}")
    return hi, lo


def _scalar_time(value) -> Tensor:
    """A float64 0-dim tensor of value, detached; one already of that kind is reused (an interval passed on from an
    earlier sampling_interval: a new tensor costs more than the checks)."""
    if type(value) is Tensor and value.dim() == 0 and value.dtype == torch.float64 and value.device.type == "cpu":
        return value.detach()
    return torch.tensor(float(value), dtype=torch.float64)


def finite_ends(name: str, values: Tensor, what: str, hi: Tensor, lo: Tensor) -> None:
    """A heuristic spaced in a coordinate that is infinite at an end (lambda at sigma = 0 or alpha = 0, log sigma at
    sigma = 0) cannot place its points: a clear error instead of NaN times."""
    v = values.detach()
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{name} spaces points in {what}, which is {v.tolist()} at t_max={float(hi):.6g}, "
                         f"t_min={float(lo):.6g}; it must be finite at both ends (move t_max/t_min inside the schedule's "
                         f"domain, or use uniform_t / quadratic_t)")


def with_exact_ends(t: Tensor, hi: Tensor, lo: Tensor) -> Tensor:
    # an inverse map (t_from_lambda, ...) is exact only up to rounding; pin the ends so every heuristic agrees
    return torch.cat([hi.reshape(1), t[1:-1], lo.reshape(1)])


def uniform_t(schedule: NoiseSchedule, nfe: int, t_max=None, t_min=None) -> Tensor:
    check_nfe(nfe)
    hi, lo = sampling_interval(schedule, t_max, t_min)
    return torch.linspace(float(hi), float(lo), nfe + 1, dtype=torch.float64)


def quadratic_t(schedule: NoiseSchedule, nfe: int, rho: float = 2.0, t_max=None, t_min=None) -> Tensor:
    """Polynomial in t (LD3 App. B.2, Eq. 8): dense near t_min for rho > 1. rho = 1 is uniform_t."""
    check_nfe(nfe)
    check_rho(rho)
    hi, lo = sampling_interval(schedule, t_max, t_min)
    u = torch.linspace(1.0, 0.0, nfe + 1, dtype=torch.float64)  # (N - i)/N
    return with_exact_ends(u**rho * (hi - lo) + lo, hi, lo)


def karras_sigmas(sigma_hi, sigma_lo, u, rho: float = 7.0):
    """Karras et al.'s noise levels at the fractions u in [0, 1]: uniform in sigma^(1/rho). numpy or torch."""
    s_hi, s_lo = sigma_hi ** (1.0 / rho), sigma_lo ** (1.0 / rho)
    return (s_hi + u * (s_lo - s_hi)) ** rho


def edm_rho(schedule: NoiseSchedule, nfe: int, rho: float = 7.0, t_max=None, t_min=None) -> Tensor:
    """Karras et al.'s steps in EDM sigma (sigma/alpha) space, mapped back through the schedule."""
    check_nfe(nfe)
    check_rho(rho)
    hi, lo = sampling_interval(schedule, t_max, t_min)
    ends = schedule.edm_sigma(torch.stack([hi, lo]))
    finite_ends("edm_rho", ends.log(), "log sigma/alpha", hi, lo)
    sigmas = karras_sigmas(ends[0], ends[1], torch.linspace(0.0, 1.0, nfe + 1, dtype=torch.float64), rho)
    interior = schedule.t_from_edm_sigma(sigmas[1:-1])
    return torch.cat([hi.reshape(1), interior, lo.reshape(1)])


def logsnr_uniform(schedule: NoiseSchedule, nfe: int, t_max=None, t_min=None) -> Tensor:
    check_nfe(nfe)
    hi, lo = sampling_interval(schedule, t_max, t_min)
    ends = schedule.lambda_(torch.stack([hi, lo]))
    finite_ends("logsnr_uniform", ends, "lambda = log(alpha/sigma)", hi, lo)
    lam = torch.linspace(float(ends[0]), float(ends[1]), nfe + 1, dtype=torch.float64)
    return with_exact_ends(schedule.t_from_lambda(lam), hi, lo)


def interpolate_schedule(schedule: NoiseSchedule, reference, nfe: int) -> Tensor:
    """Stretch a reference schedule (R+1 decreasing schedule times, e.g. an AYS table converted to times) to
    nfe+1 points: log(sigma/alpha) is interpolated linearly over the normalised step index, as AYS does."""
    check_nfe(nfe)
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
    ref = check_timesteps(schedule, torch.as_tensor(reference, dtype=torch.float64).detach(), "reference")
    log_sigma = schedule.edm_sigma(ref).log()
    finite_ends("interpolate_schedule", log_sigma[[0, -1]], "log sigma/alpha", ref[0], ref[-1])
    x_ref = torch.linspace(0.0, 1.0, ref.numel(), dtype=torch.float64)
    x_new = torch.linspace(0.0, 1.0, nfe + 1, dtype=torch.float64)
    idx = torch.searchsorted(x_ref, x_new).clamp(1, ref.numel() - 1)
    w = (x_new - x_ref[idx - 1]) / (x_ref[idx] - x_ref[idx - 1])
    interp = log_sigma[idx - 1] + w * (log_sigma[idx] - log_sigma[idx - 1])
    return with_exact_ends(schedule.t_from_edm_sigma(interp.exp()), ref[0], ref[-1])


#: the heuristics LD3 chooses its start from (name -> fn(schedule, nfe, t_max=, t_min=))
HEURISTICS = {
    "uniform_t": uniform_t,
    "quadratic_t": quadratic_t,
    "edm_rho": edm_rho,
    "logsnr_uniform": logsnr_uniform,
}
