"""Timesteps and solvers to and from diffusers schedulers.

`from_diffusers_timesteps(scheduler)` reads a scheduler after `set_timesteps` and returns the tdiff equivalent of
its whole sampling loop: `.timesteps` (N+1 schedule times, taken from the scheduler's own sigmas), `.timesteps_cond`
(the timesteps it feeds the network, as schedule times), `.final_sigmas_type`, and the solver that reproduces its
`step()`: `.solver`, `.order` and `.options` (with the exact per-step orders of diffusers' rule). `sample()` accepts
the object directly and uses that solver unless told otherwise:

    den = tdiff.denoisers.from_diffusers(unet, scheduler)          # prediction type, clip_sample, schedule
    scheduler.set_timesteps(20)
    x0 = tdiff.sample(den, x_T, tdiff.solvers.from_diffusers_timesteps(scheduler))

Supported (see README, "diffusers scheduler configs"): DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
UniPCMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler, FlowMatchEulerDiscreteScheduler. A config
field tdiff cannot reproduce is refused with the field and its value named, never approximated.

diffusers' conventions that are recognised explicitly:
  - DDIM steps from t to t - T//N, then evaluates at the next listed timestep as if the sample were there
    (spacing "trailing"/"linspace"): the `targets` option of the ddim solver.
  - HeunDiscreteScheduler repeats every time but the first (predictor and corrector evaluations): the grid is
    the unique times, solved by tdiff's heun with diffusers' correction rule.
  - A last step of zero length (final_sigmas_type "sigma_min" equal to the last sigma, e.g. Euler/UniPC/DPM with
    "linspace" spacing or Karras sigmas; DDIM with set_alpha_to_one=False ending at timestep 0): a no-op in
    diffusers except that UniPC applies its corrector with the model evaluated there. It is dropped (one NFE
    fewer, the same result), and UniPC gets final_corrector=True.

`to_diffusers(timesteps, schedule)` goes back, to the `timesteps=` or `sigmas=` argument of a pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..schedules import DiscreteVP, NoiseSchedule, RectifiedFlow
from .dpmpp import dpmpp_orders
from .grid import check_timesteps
from .program import multistep_orders

SUPPORTED = ("DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
             "EulerDiscreteScheduler", "HeunDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")
_DPM_ALGORITHMS = {"dpmsolver++": "dpmpp", "sde-dpmsolver++": "dpmpp_sde", "dpmsolver": "dpmsolver",
                   "sde-dpmsolver": "dpmsolver_sde"}


@dataclass
class DiffusersTimesteps:
    timesteps: Tensor  # (N+1,) schedule times
    timesteps_cond: Tensor  # (N,) or (N+1,) schedule times of the network's timesteps
    final_sigmas_type: str  # "zero" when the scheduler's last sigma is 0
    solver: Optional[str] = None  # the tdiff solver that reproduces the scheduler's step()
    order: Optional[int] = None
    options: dict = field(default_factory=dict)


def _config_getter(scheduler):
    config = getattr(scheduler, "config", {})
    return config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))


def refuse(scheduler, field: str, value, why: str):
    raise ValueError(f"{type(scheduler).__name__} with {field}={value!r} cannot be reproduced by tdiff: {why}")


def _unused_final_time(schedule: NoiseSchedule, t_last: Tensor) -> Tensor:
    # With a final step to sigma = 0 the last grid time is unused; any valid smaller time will do.
    return torch.minimum(t_last * 0.5, torch.as_tensor(schedule.t_min, dtype=t_last.dtype))


def from_diffusers_timesteps(scheduler, schedule: Optional[NoiseSchedule] = None) -> DiffusersTimesteps:
    """The tdiff grid and solver of a diffusers scheduler after `set_timesteps` (see the module doc)."""
    name = type(scheduler).__name__
    if name not in SUPPORTED:
        raise ValueError(f"scheduler class {name} is not supported; supported: {', '.join(SUPPORTED)}")
    if getattr(scheduler, "timesteps", None) is None or getattr(scheduler, "num_inference_steps", None) is None:
        raise ValueError("scheduler must have had set_timesteps(...) called")
    get = _config_getter(scheduler)
    if get("thresholding", False):
        refuse(scheduler, "thresholding", True, "dynamic thresholding of x0 is not implemented (use clip_sample)")
    flow = name == "FlowMatchEulerDiscreteScheduler" or bool(get("use_flow_sigmas", False))
    if flow:
        schedule = schedule or RectifiedFlow()
        if not isinstance(schedule, RectifiedFlow):
            raise ValueError(f"a flow-matching scheduler needs a RectifiedFlow schedule, got {schedule!r}")
    else:
        schedule = schedule or DiscreteVP.from_diffusers(scheduler)
        if not isinstance(schedule, DiscreteVP):
            raise ValueError(f"{name} needs a DiscreteVP schedule (its alphas_cumprod), got {schedule!r}")
    if name in ("DDIMScheduler", "DDPMScheduler"):
        return _from_alphas_scheduler(scheduler, schedule, get)
    return _from_sigmas_scheduler(scheduler, schedule, get, flow)


def _network_times(scheduler, schedule, get, flow: bool, timesteps: Tensor) -> Tensor:
    if flow:
        return timesteps / float(get("num_train_timesteps", 1000))
    return schedule.t_from_index(timesteps)


def _grid(schedule, sigmas: Tensor, flow: bool) -> Tensor:
    """Schedule times of positive sigmas (diffusers' sigma/alpha; for flow schedulers, sigma = t)."""
    return sigmas if flow else schedule.t_from_edm_sigma(sigmas)


def _from_sigmas_scheduler(scheduler, schedule, get, flow: bool) -> DiffusersTimesteps:
    name = type(scheduler).__name__
    sigmas = torch.as_tensor(scheduler.sigmas).detach().to(torch.float64).flatten().cpu()
    steps = torch.as_tensor(scheduler.timesteps).detach().to(torch.float64).flatten().cpu()
    if name == "HeunDiscreteScheduler":
        # diffusers' Heun convention: sigmas [s0, s1, s1, ..., s_{N-1}, s_{N-1}, 0], timesteps [t0, t1, t1, ...]
        ok = sigmas.numel() % 2 == 0 and steps.numel() == sigmas.numel() - 1 and \
            bool((sigmas[1:-1:2] == sigmas[2:-1:2]).all()) and bool((steps[1::2] == steps[2::2]).all())
        if not ok:
            raise ValueError("HeunDiscreteScheduler's sigmas/timesteps do not follow its repeat-each-time pattern")
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        steps = torch.cat([steps[:1], steps[1::2]])
    n = steps.numel()
    if sigmas.numel() < n + 1:
        raise ValueError(f"{name} has {sigmas.numel()} sigmas for {n} timesteps; expected at least {n + 1}")
    t_cond = _network_times(scheduler, schedule, get, flow, steps)
    end = sigmas[n]
    final_zero = bool(end == 0)
    solver, order, options = _solver_of(scheduler, get, n, final_zero)
    zero_step = not final_zero and bool(sigmas[n - 1] == end)
    if zero_step:  # the last step has zero length: drop it (see the module doc)
        if n < 2:
            raise ValueError(f"{name}'s only step has zero length (sigma {float(end)} to itself)")
        options = _drop_zero_step(scheduler, solver, options, n)
        n -= 1
        end = sigmas[n]
    t = _grid(schedule, sigmas[:n], flow)
    t_end = _unused_final_time(schedule, t[-1:]) if final_zero else _grid(schedule, end.reshape(1), flow)
    timesteps = torch.cat([t, t_end])
    check_timesteps(schedule, timesteps)
    cond = t_cond[: n + 1] if options.get("final_corrector") else t_cond[:n]
    return DiffusersTimesteps(timesteps, cond, "zero" if final_zero else "sigma_min", solver, order, options)


def _drop_zero_step(scheduler, solver: str, options: dict, n: int) -> dict:
    options = dict(options)
    orders = options.get("orders")
    if orders is not None:
        if solver in ("dpmpp", "dpmpp_sde", "dpmsolver", "dpmsolver_sde") and orders[-1] == 3:
            refuse(scheduler, "solver_order", 3, "its last step has zero length, where diffusers' third-order step "
                   "divides 0 by 0 (NaN); use lower_order_final=True or another final sigma")
        if solver == "unipc" and orders[-1] > 1:
            refuse(scheduler, "lower_order_final", False, f"its last step has zero length, where diffusers' UniPC of "
                   f"order {orders[-1]} divides 0 by 0 (NaN)")
        options["orders"] = orders[:-1]
    if solver == "unipc":
        # diffusers evaluates the model at the final point and corrects the step before with it
        options["final_corrector"] = bool(options.get("use_corrector", True)) and \
            (n - 2) not in options.get("disable_corrector", ())
    return options


def _solver_of(scheduler, get, n: int, final_zero: bool) -> tuple:
    """(solver, order, options) reproducing the scheduler's step() over n steps."""
    name = type(scheduler).__name__
    if name in ("EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"):
        if get("timestep_type", "discrete") != "discrete":
            refuse(scheduler, "timestep_type", get("timestep_type"), "the network is fed 0.25 log(sigma); wrap it "
                   "with a model_time instead")
        if get("stochastic_sampling", False):
            refuse(scheduler, "stochastic_sampling", True, "the re-noising step is not implemented")
        if get("invert_sigmas", False):
            refuse(scheduler, "invert_sigmas", True, "the inverted (data to noise) direction is not supported")
        return "euler", 1, {}
    if name == "HeunDiscreteScheduler":
        return "heun", 2, {"order_rule": "diffusers"}
    order = int(get("solver_order", 2))
    lower_order_final = bool(get("lower_order_final", True))
    if name == "DPMSolverMultistepScheduler":
        algorithm = get("algorithm_type", "dpmsolver++")
        if algorithm not in _DPM_ALGORITHMS:
            refuse(scheduler, "algorithm_type", algorithm, f"supported: {sorted(_DPM_ALGORITHMS)}")
        solver = _DPM_ALGORITHMS[algorithm]
        if solver == "dpmsolver_sde" and order == 3:
            refuse(scheduler, "solver_order", 3, "diffusers has no third-order sde-dpmsolver step")
        orders = dpmpp_orders(n, order, lower_order_final, final_zero, bool(get("euler_at_final", False)))
        options = {"solver_type": get("solver_type", "midpoint"), "orders": orders}
        return solver, order, options
    # UniPCMultistepScheduler
    if not get("predict_x0", True):
        refuse(scheduler, "predict_x0", False, "the noise-prediction form of UniPC is not implemented")
    if get("solver_p", None) is not None:
        refuse(scheduler, "solver_p", type(get("solver_p")).__name__, "an external predictor is not supported")
    orders = multistep_orders(n, order, lower_order_final, False)
    if final_zero and orders[-1] > 1:
        refuse(scheduler, "lower_order_final", False, f"its last step goes to sigma = 0 at order {orders[-1]}, where "
               f"diffusers' UniPC divides by a zero step ratio (NaN)")
    options = {"variant": get("solver_type", "bh2"), "orders": orders,
               "disable_corrector": [int(k) for k in (get("disable_corrector", None) or [])]}
    return "unipc", order, options


def _from_alphas_scheduler(scheduler, schedule: DiscreteVP, get) -> DiffusersTimesteps:
    """DDIM and DDPM: integer timesteps, no sigmas. DDPM steps to the next listed timestep; DDIM to
    t - T//N (then evaluates at the next listed one)."""
    name = type(scheduler).__name__
    steps = torch.as_tensor(scheduler.timesteps).detach().to(torch.float64).flatten().cpu()
    n = steps.numel()
    n_train = int(get("num_train_timesteps", 1000))
    t = schedule.t_from_index(steps)
    if name == "DDPMScheduler":
        variance = get("variance_type", "fixed_small")
        if variance not in ("fixed_small", "fixed_small_log"):
            refuse(scheduler, "variance_type", variance, "only the posterior variance (fixed_small, "
                   "fixed_small_log) is implemented")
        end = _unused_final_time(schedule, t[-1:])
        timesteps = torch.cat([t, end])
        check_timesteps(schedule, timesteps)
        return DiffusersTimesteps(timesteps, t, "zero", "ddpm", 1, {})
    prev = steps - n_train // int(scheduler.num_inference_steps)
    if bool((prev[:-1] < 0).any()):
        raise ValueError("DDIMScheduler steps below timestep 0 before its last step; not supported")
    final_zero = bool(prev[-1] < 0) and bool(get("set_alpha_to_one", True))
    prev = prev.clamp_min(0)  # below 0: final_alpha_cumprod, alphas_cumprod[0] without set_alpha_to_one
    targets = schedule.t_from_index(prev)
    options = {}
    if get("clip_sample", True):
        options["use_clipped_model_output"] = False  # DDIMPipeline's default: eps from the raw model output
    if not final_zero and bool(targets[-1] == t[-1]):  # a last step of zero length: dropped
        n -= 1
        t, targets = t[:n], targets[:n]
        if n == 0:
            raise ValueError("DDIMScheduler's only step has zero length")
    end = _unused_final_time(schedule, t[-1:]) if final_zero else targets[-1:]
    if final_zero:
        targets = torch.cat([targets[:-1], end])
    timesteps = torch.cat([t, end])
    check_timesteps(schedule, timesteps)
    if not bool((targets[:-1] == t[1:]).all()):
        options["targets"] = targets
    return DiffusersTimesteps(timesteps, t, "zero" if final_zero else "sigma_min", "ddim", 1, options)


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
