"""TdiffScheduler: tdiff's solvers and time steps inside any diffusers pipeline (`SchedulerMixin` + `ConfigMixin`).

    pipe.scheduler = TdiffScheduler.from_config(pipe.scheduler.config, solver="unipc", order=2,
                                                timesteps="logsnr_uniform")     # or a LearnedSchedule, a tensor, ...
    image = pipe(..., num_inference_steps=8).images[0]

The pipeline calls the network; `step()` hands its output to the very executor `tdiff.sample` runs
(`tdiff.solvers.sample.Execution`): the output is converted at the sample's own grid point and every update is the
fused `tdiff::multistep_update` op, with coefficient rows built once in `set_timesteps`. One `step()` runs the
solver program's instructions from the model call the pipeline just made up to the next one, and returns the sample
the next call sees (`prev_sample`). So a pipeline run equals `tdiff.sample(den, x_T, grid, solver, order)` on the
same x_T (tests/test_diffusers_scheduler.py checks it to 1e-5 in six pipelines).

What the config describes
  - the noise schedule, from the pipeline's own scheduler config: DDPM-family betas (DiscreteVP, zero terminal SNR
    included) or flow matching (FlowMatchEulerDiscreteScheduler, or `use_flow_sigmas`: RectifiedFlow, fed
    num_train_timesteps * t); `prediction_type` and `clip_sample`/`clip_sample_range` as diffusers reads them.
    `from_config` records the config's class as `source_scheduler` and honours every value in it (diffusers would
    replace the values another class left at *its* defaults by ours).
  - `solver`, `order`, `solver_options` (a dict of the solver's options, e.g. {"variant": "bh1"}): any tdiff solver
    whose program starts with a model call at x_T (all but Heun with churn). Default: the solver a LearnedSchedule
    was learned for, the source scheduler's own for timesteps="diffusers", else "dpmpp" at its default order.
    `scheduler.order` keeps diffusers' meaning (model calls per `step()`: 1); the solver's order is `config.order`.
  - `timesteps`: the grid.
      * "logsnr_uniform", "uniform_t", "quadratic_t", "edm_rho" (tdiff.timesteps' heuristics) or "dm_nonuniform"
        (optimised for the solver), made for `num_inference_steps` steps over the schedule's sampling interval;
      * "diffusers": the grid of the source scheduler itself (its spacing, Karras sigmas, `shift`, `mu`, ...) and its
        network times, as `tdiff.solvers.from_diffusers_timesteps` reads them; with solver=None also its solver, so
        the pipeline computes what it computed before, on tdiff's fused op;
      * a `LearnedSchedule` (LD3, with its decoupled network times: the pipeline is handed the network's times, the
        solver walks its grid), or a tensor of N+1 decreasing schedule times: a fixed grid (num_inference_steps
        must then be omitted or equal N). It is stored in the config, so `save_pretrained` / `from_pretrained` (and
        `from_config(scheduler.config)`) keep it exactly, and it is refused when it contradicts the config: learned
        for another noise schedule (other betas, flow vs DDPM, another num_train_timesteps), another prediction
        type, or another solver or order.
  - `final_sigmas_type`: "sigma_min" (land on the grid's last time, as `tdiff.sample`) or "zero" (a last first-order
    step to clean data, as diffusers' multistep schedulers) for every grid but a LearnedSchedule (which keeps the
    one it was learned with) and "diffusers" (the source's own).

Time steps and inputs: `timesteps` are the network's times in the pipeline's convention (float32: the fractional
training index N t - 1 of a DDPM schedule, never rounded; 1000 t for flow matching). x is tdiff's state
x = alpha x0 + sigma eps, so `init_noise_sigma` is 1 and `scale_model_input` is the identity. A pipeline's own
`timesteps=` (training indices) or `sigmas=` (sigma/alpha; for flow matching, diffusers' sigmas, shifted as its
scheduler shifts them) replace the grid's evaluation points for that call, unless the grid is fixed (refused).

`step()` takes the keywords pipelines pass: `eta` (honoured by solver="ddim": it sets the stochastic step unless
solver_options fixes another; any other solver accepts only 0), `use_clipped_model_output` (ddim; elsewhere only
where it changes nothing), `generator` (a generator or one per sample, for the stochastic solvers), `return_dict`.
`set_begin_index(i)` (img2img) restarts the solver's warm-up at model call i; `add_noise`/`scale_noise` noise
clean samples at a network time, at the grid's own noise level when that time is one of `timesteps`.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

import diffusers
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput

from ...denoisers import convert, from_diffusers
from ...solvers.grid import FINAL_SIGMAS_TYPES, check_timesteps
from ...solvers.interop import _unused_final_time, from_diffusers_timesteps
from ...solvers.program import Eval
from ...solvers.sample import DEFAULT_ORDER, SOLVERS, Sampler
from ...timesteps.heuristics import HEURISTICS

FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
#: the names `timesteps` may take (besides a LearnedSchedule or a tensor)
GRIDS = tuple(HEURISTICS) + ("dm_nonuniform", "diffusers")
_FIXED_KEYS = ("timesteps", "timesteps_cond", "final_sigmas_type", "metadata", "any_solver")


def _init_keys(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}


#: the scheduler classes whose configs are recognised by their keys when they carry no _class_name (a scheduler
#: built directly, not loaded, has none)
KNOWN_SCHEDULERS = tuple(e.name for e in KarrasDiffusionSchedulers) + FLOW_SCHEDULERS


def scheduler_class_name(config: dict) -> Optional[str]:
    """The class a scheduler config belongs to: its _class_name, else the one known class whose constructor takes
    exactly the config's keys (None when none or several do)."""
    name = config.get("_class_name")
    if isinstance(name, str):
        return name
    keys = {k for k in config if not k.startswith("_")}
    matches = [n for n in KNOWN_SCHEDULERS if hasattr(diffusers, n) and _init_keys(getattr(diffusers, n)) == keys]
    return matches[0] if len(matches) == 1 else None


def source_config(scheduler_or_config) -> dict:
    """A scheduler's config as a plain dict whose _class_name is the diffusers scheduler it describes (for a
    TdiffScheduler, the one it was made from), so tdiff reads it as that class's config."""
    if hasattr(scheduler_or_config, "config"):
        config = dict(scheduler_or_config.config)
        name = type(scheduler_or_config).__name__
    else:
        config = dict(scheduler_or_config)
        name = scheduler_class_name(config)
    if name in (None, "TdiffScheduler") and "source_scheduler" in config:  # a TdiffScheduler's config
        name = config["source_scheduler"]
    config["_class_name"] = name or ("FlowMatchEulerDiscreteScheduler" if config.get("use_flow_sigmas")
                                     else "DDPMScheduler")
    return config


def _pipeline_calls_network(*args, **kwargs):
    raise RuntimeError("TdiffScheduler never calls the network: the pipeline does and hands its output to step()")


def _same_schedule(a: dict, b: dict) -> bool:
    """Schedule configs equal, floats to 1e-6 relative (a DiscreteVP's log-alpha sum is rounded when recorded)."""
    if not isinstance(a, dict) or set(a) != set(b):
        return False
    for k, v in a.items():
        w = b[k]
        if isinstance(v, float) or isinstance(w, float):
            if not isinstance(v, (int, float)) or not isinstance(w, (int, float)) or \
                    abs(v - w) > 1e-6 * max(1.0, abs(v), abs(w)):
                return False
        elif v != w:
            return False
    return True


@dataclass
class FixedGrid:
    """A grid fixed when the scheduler is made (a LearnedSchedule or a tensor), in the JSON form the config keeps."""

    timesteps: Tensor
    timesteps_cond: Optional[Tensor] = None
    final_sigmas_type: Optional[str] = None
    metadata: dict = field(default_factory=dict)
    any_solver: bool = False

    @property
    def steps(self) -> int:
        return self.timesteps.numel() - 1

    @property
    def options(self) -> dict:
        """The solver options it was made with (as LearnedSchedule.options)."""
        return {} if self.any_solver else dict(self.metadata.get("solver_options") or {})

    def to_json(self) -> dict:
        return {"timesteps": self.timesteps.tolist(),
                "timesteps_cond": None if self.timesteps_cond is None else self.timesteps_cond.tolist(),
                "final_sigmas_type": self.final_sigmas_type, "metadata": self.metadata, "any_solver": self.any_solver}


def _as_times(value, name: str) -> Tensor:
    try:
        t = torch.as_tensor(value.detach() if isinstance(value, Tensor) else value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {type(value).__name__} ({e})") from None
    return t.flatten().cpu() if t.dim() <= 1 else t


def _fixed_grid(spec) -> Optional[FixedGrid]:
    """A LearnedSchedule, a saved dict or a tensor/sequence of times as a FixedGrid; None for a grid name."""
    if isinstance(spec, str):
        if spec not in GRIDS:
            raise ValueError(f"timesteps must be one of {GRIDS}, a LearnedSchedule or a tensor of decreasing schedule "
                             f"times, got {spec!r}")
        return None
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(_FIXED_KEYS))
        if unknown or "timesteps" not in spec:
            raise ValueError(f"a timesteps dict (a saved grid) must have the keys {_FIXED_KEYS} ('timesteps' "
                             f"required), got unknown {unknown}" if unknown else "a timesteps dict needs 'timesteps'")
        meta = spec.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ValueError(f"timesteps['metadata'] must be a dict, got {type(meta).__name__}")
        cond = spec.get("timesteps_cond")
        return FixedGrid(_as_times(spec["timesteps"], "timesteps['timesteps']"),
                         None if cond is None else _as_times(cond, "timesteps['timesteps_cond']"),
                         spec.get("final_sigmas_type"), dict(meta), bool(spec.get("any_solver", False)))
    if hasattr(spec, "timesteps") and not isinstance(spec, Tensor):  # a LearnedSchedule
        cond = getattr(spec, "timesteps_cond", None)
        meta = dict(getattr(spec, "metadata", None) or {})
        if not meta and getattr(spec, "solver", None) is not None:  # from_diffusers_timesteps' record
            meta = {"solver": spec.solver, "order": spec.order}
        return FixedGrid(_as_times(spec.timesteps, "timesteps.timesteps"),
                         None if cond is None else _as_times(cond, "timesteps.timesteps_cond"),
                         getattr(spec, "final_sigmas_type", None), meta, bool(getattr(spec, "any_solver", False)))
    if isinstance(spec, (Tensor, list, tuple)):
        return FixedGrid(_as_times(spec, "timesteps"))
    raise ValueError(f"timesteps must be one of {GRIDS}, a LearnedSchedule or a tensor of decreasing schedule times, "
                     f"got {type(spec).__name__}")


class TdiffScheduler(SchedulerMixin, ConfigMixin):
    """tdiff's solvers and grids as a diffusers scheduler. See the module doc."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers] + list(FLOW_SCHEDULERS)
    order = 1  # diffusers' meaning: model calls per step() (the solver's order is config.order)

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, rescale_betas_zero_snr: bool = False,
                 prediction_type: Optional[str] = None, clip_sample: bool = False, clip_sample_range: float = 1.0,
                 thresholding: bool = False, use_flow_sigmas: bool = False, use_dynamic_shifting: bool = False,
                 source_scheduler: Optional[str] = None, solver: Optional[str] = None, order: Optional[int] = None,
                 solver_options: Optional[dict] = None, timesteps="logsnr_uniform",
                 final_sigmas_type: str = "sigma_min"):
        flow = source_scheduler in FLOW_SCHEDULERS or bool(use_flow_sigmas)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if source_scheduler is not None and not isinstance(source_scheduler, str):
            raise ValueError(f"source_scheduler must be a diffusers scheduler class name, got {source_scheduler!r}")
        if thresholding:
            raise ValueError("thresholding=True (dynamic thresholding of x0) cannot be reproduced by tdiff; use "
                             "clip_sample=True, or a config without thresholding")
        if flow and prediction_type not in (None, "flow_prediction"):
            raise ValueError(f"a flow-matching config ({source_scheduler or 'use_flow_sigmas=True'}) predicts the "
                             f"flow velocity: prediction_type must be 'flow_prediction' or None, got "
                             f"{prediction_type!r}")
        if not flow and prediction_type not in (None,) + VP_PREDICTIONS:
            raise ValueError(f"prediction_type must be one of {VP_PREDICTIONS} for a DDPM-family config, got "
                             f"{prediction_type!r}")
        ptype = "flow_prediction" if flow else (prediction_type or "epsilon")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
        if solver is not None and solver not in SOLVERS:
            raise ValueError(f"solver must be None or one of {SOLVERS}, got {solver!r}")
        if order is not None and (isinstance(order, bool) or not isinstance(order, int)):
            raise ValueError(f"order must be None or an integer, got {order!r}")
        if solver_options is not None and not isinstance(solver_options, dict):
            raise ValueError(f"solver_options must be None or a dict of the solver's options, got "
                             f"{type(solver_options).__name__}")
        self.register_to_config(prediction_type=ptype, use_flow_sigmas=flow)
        # the conversion of the network's output (prediction type, clip_sample) and the network's time, read from
        # the config exactly as tdiff.denoisers.from_diffusers reads any diffusers scheduler config
        self._denoiser = from_diffusers(_pipeline_calls_network, source_config(self.config))
        self.schedule = self._denoiser.schedule
        self._fixed = _fixed_grid(timesteps)
        if self._fixed is not None:
            self._check_fixed(self._fixed)
            self.register_to_config(timesteps=self._fixed.to_json())
        self.init_noise_sigma = 1.0
        self.timesteps: Optional[Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._built = None  # (key, recipe, sampler) of the last set_timesteps
        self._runs: dict = {}  # (eta, use_clipped_model_output, begin) -> the Sampler a run uses
        self._reset()
        if self._fixed is not None:
            self.set_timesteps()

    # ------------------------------------------------------------------------------------------------------------
    # config
    # ------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """`TdiffScheduler.from_config(pipe.scheduler.config, solver=..., order=..., timesteps=...)`. The config's
        class becomes `source_scheduler`, and every value in its config is honoured. A keyword that is neither
        TdiffScheduler's nor the source class's is refused (diffusers would drop it silently); a keyword of the
        source class (e.g. shift) goes into the config, for timesteps="diffusers"."""
        if config is None:
            config = kwargs.pop("pretrained_model_name_or_path", None)
        if not isinstance(config, dict):
            raise ValueError(f"config must be a scheduler config dict (scheduler.config), got {type(config).__name__}; "
                             f"use TdiffScheduler.from_pretrained(path) for a saved scheduler")
        config = dict(config)
        name = scheduler_class_name(config)
        if name is not None and name != cls.__name__:
            config.pop("_use_default_values", None)  # its defaults are that class's, and they are in force there
            config["source_scheduler"] = name
        source = kwargs.get("source_scheduler", config.get("source_scheduler"))
        theirs = _init_keys(getattr(diffusers, source)) if isinstance(source, str) and hasattr(diffusers, source) \
            else set()
        own = _init_keys(cls)
        for key in list(kwargs):
            if key in own:
                continue
            if key in theirs:
                config[key] = kwargs.pop(key)
                continue
            raise ValueError(f"unknown option {key!r} for TdiffScheduler; its options are {sorted(own)}"
                             + (f", and those of {source} ({sorted(theirs)})" if theirs else ""))
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def flow(self) -> bool:
        return bool(self.config.use_flow_sigmas)

    def _check_fixed(self, fixed: FixedGrid) -> None:
        """A fixed grid must fit this config: valid times of its schedule, and, where recorded, the schedule,
        prediction type and solver it was made for."""
        meta = fixed.metadata
        want = meta.get("schedule")
        got = self.schedule.config()
        if want is not None and not _same_schedule(want, got):
            kind = {True: "flow matching (RectifiedFlow)", False: "a DDPM schedule (DiscreteVP)"}
            why = f"a schedule for {want.get('class')}, this config describes {kind[self.flow]}" \
                if want.get("class") != got["class"] else "another noise schedule (other betas or training steps)"
            raise ValueError(f"timesteps: this schedule was made for {want}, not for this scheduler config ({got}): "
                             f"{why}. Learn or load a schedule for this pipeline's scheduler config")
        ptype = meta.get("prediction_type")
        if ptype is not None and ptype != self.config.prediction_type:
            raise ValueError(f"timesteps: this schedule was made for prediction_type {ptype!r}, this config has "
                             f"{self.config.prediction_type!r}")
        check_timesteps(self.schedule, fixed.timesteps, "timesteps")
        if fixed.timesteps_cond is not None:
            n = fixed.steps
            if fixed.timesteps_cond.dim() != 1 or fixed.timesteps_cond.numel() not in (n, n + 1):
                raise ValueError(f"timesteps_cond must hold {n} or {n + 1} times, got shape "
                                 f"{tuple(fixed.timesteps_cond.shape)}")
            self.schedule.check_t(fixed.timesteps_cond, "timesteps_cond")
        if fixed.final_sigmas_type not in (None,) + FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {fixed.final_sigmas_type!r}")
        self._solver_choice()  # a schedule learned for another solver is refused now, not at the first step

    def _solver_choice(self, carried=None) -> Tuple[str, int, dict]:
        """(solver, order, options): a fixed grid's recorded solver, else (timesteps="diffusers", solver=None) the
        source scheduler's own, else the config's (default dpmpp)."""
        cfg = self.config
        options = dict(cfg.solver_options or {})
        fixed = self._fixed
        want = fixed.metadata.get("solver") if fixed is not None and not fixed.any_solver else None
        if fixed is not None:  # the options it was made with (LD3's fixed-call Heun, DM-NonUniform's orders)
            options = {**fixed.options, **options}
        if want is not None:
            want_order = fixed.metadata.get("order")
            solver = cfg.solver or want
            order = cfg.order if cfg.order is not None else want_order
            if solver != want or (want_order is not None and order != want_order):
                raise ValueError(f"timesteps: this schedule was made for solver {want!r} order {want_order}, not "
                                 f"{solver!r} order {order}; learned steps are tuned to one solver (pass "
                                 f"learned.for_any_solver(), or its times as a tensor, to use it anyway)")
        elif carried is not None and cfg.solver is None:
            solver, order, opts = carried
            options = {**opts, **options}
        else:
            solver, order = cfg.solver or "dpmpp", cfg.order
        return solver, DEFAULT_ORDER[solver] if order is None else order, options

    # ------------------------------------------------------------------------------------------------------------
    # time steps
    # ------------------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps: Optional[List] = None, sigmas: Optional[List] = None, mu: Optional[float] = None):
        """Build the solver program for a run of `num_inference_steps` steps (or the pipeline's own `timesteps` /
        `sigmas`; or the fixed grid) and set `self.timesteps`, the network times of its model calls."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass at most one of timesteps= and sigmas=")
        given = timesteps is not None or sigmas is not None
        if self._fixed is not None:
            if given:
                raise ValueError(f"this TdiffScheduler holds a fixed grid of {self._fixed.steps} steps; the pipeline "
                                 f"passed {'timesteps' if timesteps is not None else 'sigmas'}=, which would replace it")
            if num_inference_steps not in (None, self._fixed.steps):
                raise ValueError(f"this TdiffScheduler holds a fixed grid of {self._fixed.steps} steps; call the "
                                 f"pipeline with num_inference_steps={self._fixed.steps}, got {num_inference_steps}")
        elif not given:
            if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or \
                    num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        self._check_mu(mu, given)
        key = None if given else (num_inference_steps, mu)
        if self._built is None or key is None or self._built[0] != key:
            recipe = self._recipe(num_inference_steps, timesteps, sigmas, mu)
            self._built = (key, recipe, self._sampler(recipe))
            self._runs = {}
        program = self._built[2].program
        ks = torch.tensor([e.k for e in program.evals()])  # eval_times may hold one more (the end point's)
        net = self._denoiser.model_time(program.eval_times.detach()[ks]).to(torch.float32)
        self._times = net.tolist()  # on the host, to check step()'s timestep without a device sync
        self.timesteps = net.to(device) if device is not None else net
        self.num_inference_steps = len(program.steps)
        self._reset()

    def _check_mu(self, mu, given: bool) -> None:
        if mu is None:
            return
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        used = self.flow and (given or self.config.timesteps == "diffusers")
        if not used and not self.config.use_dynamic_shifting:
            raise ValueError(f"mu={mu} shifts diffusers' own flow-matching grid; this TdiffScheduler's grid is "
                             f"{self._grid_name()!r}, which it does not shift (use timesteps='diffusers')")
        # with use_dynamic_shifting, pipelines always pass mu; a tdiff grid does not depend on the resolution

    def _grid_name(self) -> str:
        return "fixed" if self._fixed is not None else self.config.timesteps

    def _recipe(self, n, timesteps, sigmas, mu) -> dict:
        """What the Sampler is built from: grid, network times, final_sigmas_type, solver, order, options."""
        carried = None
        final = self.config.final_sigmas_type
        cond = None
        if self._fixed is not None:
            grid, cond = self._fixed.timesteps, self._fixed.timesteps_cond
            final = self._fixed.final_sigmas_type or "sigma_min"
        elif timesteps is not None or sigmas is not None:
            grid = self._given_grid(timesteps, sigmas, mu, final)
        elif self.config.timesteps == "diffusers":
            dt = from_diffusers_timesteps(self._source(n, mu=mu), self.schedule)
            grid, cond, final = dt.timesteps, dt.timesteps_cond, dt.final_sigmas_type
            carried = (dt.solver, dt.order, dt.options)
        elif self.config.timesteps == "dm_nonuniform":
            from ...timesteps import dm_nonuniform, sampling_options

            solver, order, options = self._solver_choice()
            grid = dm_nonuniform(self.schedule, nfe=n, solver=solver, order=order)
            # sample with the order plan DM-NonUniform's objective assumed, unless the config says otherwise
            return dict(timesteps=grid, timesteps_cond=None, final_sigmas_type=final, solver=solver, order=order,
                        options={**sampling_options(n, order), **options})
        else:
            grid = HEURISTICS[self.config.timesteps](self.schedule, nfe=n)
        solver, order, options = self._solver_choice(carried)
        return dict(timesteps=grid, timesteps_cond=cond, final_sigmas_type=final, solver=solver, order=order,
                    options=options)

    def _sampler(self, recipe: dict) -> Sampler:
        r = dict(recipe)
        sampler = Sampler(self._denoiser, r.pop("timesteps"), r.pop("solver"), r.pop("order"),
                          timesteps_cond=r.pop("timesteps_cond"), schedule=self.schedule,
                          final_sigmas_type=r.pop("final_sigmas_type"), **r.pop("options"))
        rows = [row.detach().flatten() for row in sampler.program.rows]
        if rows and not bool(torch.isfinite(torch.cat(rows)).all()):
            t0 = float(sampler.program.eval_points[0])
            raise ValueError(f"solver {sampler.solver!r} has coefficients that are not finite on this grid (it starts "
                             f"at t = {t0:.6g}; where alpha or sigma is 0, lambda is infinite, and a higher-order step "
                             f"that reaches back there is not finite): use a lower order, or a tdiff grid inside the "
                             f"schedule's sampling interval (e.g. timesteps='logsnr_uniform')")
        first = sampler.program.steps[0][0]
        if not (isinstance(first, Eval) and first.src == "x"):
            raise ValueError(f"solver {sampler.solver!r} with these options does something to x_T before its first "
                             f"model call (e.g. heun's churn), which a pipeline's loop cannot express (it calls the "
                             f"network on x_T first)")
        return sampler

    def _source(self, n, timesteps=None, sigmas=None, mu=None):
        """An instance of the source scheduler class, from this config, after its set_timesteps."""
        name = self.config.source_scheduler or ("FlowMatchEulerDiscreteScheduler" if self.flow else None)
        cls = getattr(diffusers, name, None) if isinstance(name, str) else None
        if cls is None:
            raise ValueError(f"timesteps='diffusers' needs the source scheduler's class; this config has "
                             f"source_scheduler={name!r}. Make the scheduler with TdiffScheduler.from_config("
                             f"pipe.scheduler.config, ...)")
        keys = _init_keys(cls)
        src = cls.from_config({k: v for k, v in self.config.items() if k in keys})
        params = set(inspect.signature(src.set_timesteps).parameters)
        kw = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas), ("mu", mu)) if v is not None}
        refused = sorted(set(kw) - params)
        if refused:
            raise ValueError(f"{name}.set_timesteps does not take {refused}")
        src.set_timesteps(**({"num_inference_steps": n} if n is not None and not (timesteps or sigmas) else {}), **kw)
        return src

    def _given_grid(self, timesteps, sigmas, mu, final: str) -> Tensor:
        """The grid of a pipeline's timesteps= (training indices) or sigmas= (sigma/alpha; flow: diffusers' sigmas,
        shifted by the source scheduler) plus the end point of final_sigmas_type."""
        name = "timesteps" if timesteps is not None else "sigmas"
        values = _as_times(timesteps if timesteps is not None else sigmas, name)
        if values.dim() != 1 or values.numel() < 1:
            raise ValueError(f"{name} must be a 1-D sequence of at least one value, got shape {tuple(values.shape)}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name} must be finite, got {values.tolist()}")
        if self.flow:
            src = self._source(None, timesteps=values.tolist() if timesteps is not None else None,
                               sigmas=values.tolist() if sigmas is not None else None, mu=mu)
            points = torch.as_tensor(src.sigmas, dtype=torch.float64)[: len(src.timesteps)].cpu()
        elif timesteps is not None:
            if bool((values < 0).any()) or bool((values > self.config.num_train_timesteps - 1).any()):
                raise ValueError(f"timesteps must be training indices in [0, {self.config.num_train_timesteps - 1}], "
                                 f"got {values.tolist()}")
            points = self.schedule.t_from_index(values)
        else:
            if not bool((values > 0).all()):
                raise ValueError(f"sigmas must be positive noise levels sigma/alpha (the final one is added by "
                                 f"final_sigmas_type), got {values.tolist()}")
            points = self.schedule.t_from_edm_sigma(values)
        if final == "zero":
            end = _unused_final_time(self.schedule, points[-1:])
        else:
            end = torch.tensor([self.schedule.t_min], dtype=torch.float64)
            if not bool(end < points[-1]):
                raise ValueError(f"the last of the {name} is at the schedule's end already (t = "
                                 f"{float(points[-1]):.6g}); use final_sigmas_type='zero'")
        check_timesteps(self.schedule, torch.cat([points, end]), name)
        return torch.cat([points, end])

    # ------------------------------------------------------------------------------------------------------------
    # the run
    # ------------------------------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._begin_index = None
        self._step_index = None
        self._run = None
        self._returned = None

    @property
    def step_index(self) -> Optional[int]:
        """The index in `timesteps` of the next model call step() expects (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the run at model call `begin_index` (img2img): the solver restarts its warm-up there."""
        if isinstance(begin_index, bool) or not isinstance(begin_index, int) or begin_index < 0:
            raise ValueError(f"begin_index must be an integer >= 0, got {begin_index!r}")
        if self.timesteps is not None and begin_index >= len(self._times):
            raise ValueError(f"begin_index must be below the {len(self._times)} model calls, got {begin_index}")
        self._begin_index = begin_index

    def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
        return sample  # the network takes tdiff's state x = alpha x0 + sigma eps as it is

    @staticmethod
    def _value(timestep) -> float:
        if isinstance(timestep, Tensor):
            return timestep.item() if timestep.dim() == 0 else float(timestep.reshape(-1)[0])
        return float(timestep)

    @classmethod
    def _matches(cls, timestep, t: float) -> bool:
        return abs(cls._value(timestep) - t) <= 1e-3 * max(1.0, abs(t))  # exact, or rounded to float16 by a pipeline

    def _index_of(self, timestep) -> Optional[int]:
        """The model call whose network time `timestep` is (the nearest within rounding), or None."""
        value = self._value(timestep)
        best = min(range(len(self._times)), key=lambda i: abs(self._times[i] - value))
        return best if self._matches(value, self._times[best]) else None

    def step(self, model_output: Tensor, timestep, sample: Tensor, eta: Optional[float] = None,
             use_clipped_model_output: Optional[bool] = None, generator=None, return_dict: bool = True):
        """Take the network's output at `sample` (at network time `timestep`, the next of `timesteps`) and run the
        solver up to its next model call; returns that call's input as `prev_sample` (the result after the last)."""
        if self._built is None or self.timesteps is None:
            raise ValueError("call set_timesteps(...) before step()")
        if not isinstance(sample, Tensor) or not isinstance(model_output, Tensor):
            raise ValueError("model_output and sample must be tensors")
        if self._run is None:
            self._start(timestep, sample, eta, use_clipped_model_output)
        elif (eta, use_clipped_model_output) != self._run_options:
            raise ValueError(f"eta / use_clipped_model_output changed during a run: {self._run_options} at the first "
                             f"step, {(eta, use_clipped_model_output)} now")
        i = self._step_index
        evals = self._evals
        j = i - self._offset
        if j >= len(evals):
            raise ValueError(f"all {len(self._times)} model calls of this run have been stepped; call "
                             f"set_timesteps(...) to start another")
        if not (isinstance(timestep, Tensor) and timestep.device.type != "cpu") or j == 0:
            if not self._matches(timestep, self._times[i]):  # on a device, checked once per run (a host sync)
                raise ValueError(f"step() got timestep {self._value(timestep)}, but the model call expected now is "
                                 f"timesteps[{i}] = {self._times[i]}: a pipeline steps once per element of "
                                 f"scheduler.timesteps, in order")
        pos = evals[j]
        step, ins = self._flat[pos]
        run = self._run
        if sample is not self._returned:  # the pipeline's latents (it may have changed them) become the state
            if sample.shape != run.buf[ins.src].shape:
                raise ValueError(f"sample has shape {tuple(sample.shape)}; this run's samples have shape "
                                 f"{tuple(run.buf[ins.src].shape)}")
            run.buf[ins.src] = sample.to(run.buf[ins.src].dtype)
        out = model_output
        if out.dim() == sample.dim() and out.shape[0] == sample.shape[0] and out.shape[1] == 2 * sample.shape[1]:
            out = out[:, : sample.shape[1]]  # learned-variance channels: the solvers use the mean prediction only
        if out.shape != sample.shape:
            raise ValueError(f"model_output has shape {tuple(model_output.shape)}; expected the shape of sample "
                             f"{tuple(sample.shape)} (or twice its channels)")
        run.generator = generator
        run.execute(ins, step, out=out)
        end = evals[j + 1] if j + 1 < len(evals) else len(self._flat)
        for step, ins in self._flat[pos + 1:end]:
            run.execute(ins, step)
        state = run.result() if end == len(self._flat) else run.buf[self._flat[end][1].src]
        prev = state.to(sample.dtype)
        self._returned = prev
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _start(self, timestep, sample: Tensor, eta, use_clipped_model_output) -> None:
        begin = self._begin_index
        if begin is None:
            begin = self._index_of(timestep)
            if begin is None:
                raise ValueError(f"step() got timestep {self._value(timestep)}, which is not one of scheduler.timesteps "
                                 f"{self._times}")
        key = (eta, use_clipped_model_output, begin)
        if key not in self._runs:
            self._runs[key] = self._run_sampler(eta, use_clipped_model_output, begin)
        sampler = self._runs[key]
        self._flat = [(s, ins) for s, step in enumerate(sampler.program.steps) for ins in step]
        self._evals = [p for p, (_, ins) in enumerate(self._flat) if isinstance(ins, Eval)]
        self._offset = begin
        self._run_options = (eta, use_clipped_model_output)
        self._step_index = begin
        self._run = sampler.start(sample)
        self._returned = sample

    def _run_sampler(self, eta, use_clipped_model_output, begin: int) -> Sampler:
        """The Sampler of a run: the built one, or rebuilt for the step options a pipeline passes (ddim) and for a
        start at model call `begin`."""
        _, recipe, sampler = self._built
        recipe = dict(recipe, options=dict(recipe["options"]))
        opts = recipe["options"]
        configured = dict(self.config.solver_options or {})
        changed = False
        for name, value, neutral in (("eta", eta, 0), ("use_clipped_model_output", use_clipped_model_output, None)):
            if value is None:
                continue
            if recipe["solver"] == "ddim":
                if name in configured and configured[name] != value:
                    raise ValueError(f"the pipeline passed {name}={value!r}, but this TdiffScheduler's solver_options "
                                     f"set {name}={configured[name]!r}")
                if opts.get(name, {"eta": 0, "use_clipped_model_output": True}[name]) != value:
                    opts[name] = value
                    changed = True
            elif name == "eta" and value != 0:
                raise ValueError(f"the pipeline passed eta={value!r}, DDIM's stochastic step, but solver "
                                 f"{recipe['solver']!r} has no eta; use solver='ddim' (which honours it) or eta=0")
            elif name == "use_clipped_model_output" and self.config.clip_sample:
                raise ValueError(f"the pipeline passed use_clipped_model_output={value!r}, which only solver='ddim' "
                                 f"distinguishes (solver {recipe['solver']!r} uses the clipped x0)")
        if begin:
            recipe = self._truncated(recipe, sampler, begin)
            changed = True
        return self._sampler(recipe) if changed else sampler

    def _truncated(self, recipe: dict, sampler: Sampler, begin: int) -> dict:
        """The recipe from the solver step whose first model call is `begin` on (warm-up restarts there, as diffusers'
        multistep schedulers restart their lower-order steps)."""
        firsts = [next(i.k for i in step if isinstance(i, Eval)) for step in sampler.program.steps]
        if begin not in firsts:
            raise ValueError(f"begin_index {begin} is not the first model call of a solver step (those are {firsts})")
        s = firsts.index(begin)
        opts = dict(recipe["options"])
        if "orders" in opts:
            opts["orders"] = [min(p, i + 1) for i, p in enumerate(list(opts["orders"])[s:])]
        if opts.get("targets") is not None:
            opts["targets"] = opts["targets"][s:]
        if "disable_corrector" in opts:
            opts["disable_corrector"] = [k - s for k in opts["disable_corrector"] if k >= s]
        cond = recipe["timesteps_cond"]
        return dict(recipe, timesteps=recipe["timesteps"][s:], options=opts,
                    timesteps_cond=None if cond is None else cond[s:])

    # ------------------------------------------------------------------------------------------------------------
    # noising
    # ------------------------------------------------------------------------------------------------------------
    def _schedule_times(self, timesteps: Tensor) -> Tensor:
        """Network times -> schedule times; a time that is one of `self.timesteps` maps to its grid point."""
        net = timesteps.detach().to(torch.float64).flatten().cpu()
        if self.flow:
            t = net / float(self.config.num_train_timesteps)
        else:
            t = self.schedule.t_from_index(net)
        if self.timesteps is not None:
            points = self._built[2].program.eval_points.detach().to(torch.float64)
            idx = [self._index_of(v) for v in net.tolist()]
            t = torch.stack([points[k] if k is not None else t[n] for n, k in enumerate(idx)])
        self.schedule.check_t(t, "timesteps")
        return t

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps) -> Tensor:
        """alpha(t) x0 + sigma(t) noise at network times `timesteps` (one, or one per sample)."""
        t = self._schedule_times(torch.as_tensor(timesteps))
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"timesteps must hold 1 or {original_samples.shape[0]} times, got {t.numel()}")
        alpha = self.schedule.alpha(t).to(original_samples.device)
        sigma = self.schedule.sigma(t).to(original_samples.device)
        return convert(original_samples, noise, alpha, sigma)

    def scale_noise(self, sample: Tensor, timestep, noise: Tensor) -> Tensor:
        """FlowMatchEulerDiscreteScheduler's name (and argument order) for add_noise."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps


TdiffScheduler.__module__ = "tdiff.schedulers"  # the public home: what a saved pipeline's model_index.json names
