"""The composable diffusion training loss.

    loss_fn = DiffusionLoss(schedule, sampler="speed", weighting="speed", process="standard", target="eps")
    loss = loss_fn(model, x0, y=labels)          # batch loss; per-sample values in loss_fn.last_per_sample
    loss.backward(); opt.step(); loss_fn.step()  # step() advances the FDM warm-up, if any
    x0_hat = tdiff.sample(loss_fn.denoiser(model), x_T, timesteps)   # sampling with what the loss trained

Hot path, per step: one time draw on the device (inverse CDF of a uniform), one fused pass building x_t and the
network input (the public op `tdiff.ops.noisy_sample`), the network, and one fused weighted per-sample MSE
(`tdiff.ops.weighted_mse`). No host syncs on GPU with check=False; check=True (the default) validates weights and
caller-given times, which on a GPU costs a device-side assert and, for caller-given times, one sync.

Models: any callable `model(x, t_net, **cond)` returning a tensor, a tuple whose first entry is the output, or
an object with `.sample` (diffusers' UNet2DOutput, Transformer2DModelOutput), so a diffusers UNet2DModel trains
as is: `loss_fn(unet, x0, class_labels=y)`. The network time `t_net` follows the sampling side's convention
(`tdiff.denoisers.default_model_time`): a DiscreteVP schedule (e.g. `DiscreteVP.from_diffusers(scheduler)`)
feeds diffusers' timestep index N t - 1, which is an integer at every training step.

Targets: every regression target is a per-sample combination A x0 + C eps of the data and the noise:
  eps (0, 1), x0 (1, 0), v = alpha eps - sigma x0, flow = the velocity alpha' x0 + sigma' eps (eps - x0 on
  rectified flow), and for a preconditioned denoiser ("edm", and every FDM variant) F* = (x0 - c_skip x_in)/c_out.
The prediction -> x0 conversion at sampling time is `tdiff.denoisers.prediction_to_x0`, the one the solvers use.
Weights: a weighting says which error it weighs ("target" or "x0"); an x0-space weight is converted to the
target with c^2, where |x0 error|^2 = c^2 |target error|^2. Modes: "reweight" multiplies the sampled objective by
the weight (SpeeD: sampling *and* weighting change the objective); "unbiased" also divides by the sampler's
relative density, so the objective is the uniform-time objective with that weight whatever the sampler.
Default time-step sampler: uniform for the standard targets; for a preconditioned denoiser the preconditioning's
own, as in EDM's and FDM's training code: log-normal sigma (EDM), uniform t (VP), log-uniform sigma (VE).
FDM (process="fdm", Wu et al. "Fast Diffusion Model"): the sigma-space sample x0 + sigma eps (sigma = sigma/alpha of
the schedule) goes into the network as factor * x ("input", FDM's code and Table 1) or x0 is scaled by the factor
("mean", Eq. 15), with VP, VE or EDM preconditioning; factor = e^{-mB(t')}(1 + mB(t')) with t' the position of
sigma in `fdm_sigma_range` (default: the schedule's sigma range; FDM's EDM network uses [0.002, 80], EDM()'s own).
The default weight is the preconditioning's own lambda(sigma), clamped by the warm-up while it runs. FDM's
default sampler is therefore log-normal on EDM (FDM's EDMLoss), uniform t on VP, log-uniform sigma on VE. Unlike
FDM's VE code, the multiplier m applies in every variant.
EDM's sigma_data is the schedule's (`EDM(sigma_data=...)`) unless the schedule has none (then 0.5).

torch.compile: with check=False, `torch.compile(lambda x0, t, noise: loss_fn(model, x0, t=t, noise=noise),
fullgraph=True)` traces without graph breaks (times and noise drawn outside, e.g. with `loss_fn.sample_t`); the
FDM warm-up cap is a tensor updated by `step()`, so it does not recompile as it grows. The "flow" target needs
autograd derivatives of the schedule and is not traceable in one graph.
"""
from __future__ import annotations

import json
from typing import Callable, Optional, Tuple, Union

import torch
from torch import nn

from .. import schedules as S
from ..denoisers import default_model_time, prediction_to_x0
from ..ops.noisy_sample import kernel_table, noisy_sample
from ..ops.weighted_mse import weighted_mse_with_mse
from ..preconditioning import KINDS as PRECOND_KINDS, Preconditioning
from .. import checks
from .cells import PerDevice, TimeCells, check_schedule
from .samplers import TableSampler, TimestepSampler, make_sampler
from .warmup import WeightWarmup
from .weightings import PreconditioningWeight, Weighting, make_weighting, schedule_sigma_data

PROCESSES = ("standard", "fdm")
TARGETS = ("eps", "x0", "v", "flow", "edm")
MODES = ("reweight", "unbiased")
FDM_ON = ("input", "mean")
#: the time-step sampler a preconditioned denoiser trains with by default (EDM's and FDM's losses)
PRECOND_SAMPLER = {"edm": "lognormal", "vp": "uniform", "ve": "loguniform"}


def default_network_time(schedule: S.NoiseSchedule) -> Callable[[torch.Tensor], torch.Tensor]:
    """The time the network is given: the same convention the sampling-side Denoiser uses."""
    return default_model_time(schedule)


def network_output(out, name: str = "model") -> torch.Tensor:
    """The prediction tensor of a model's output: a tensor, a tuple's first entry, or a diffusers output's
    `.sample` (UNet2DOutput, Transformer2DModelOutput)."""
    if torch.is_tensor(out):
        return out
    sample = getattr(out, "sample", None)
    if torch.is_tensor(sample):
        return sample
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"{name} must return a tensor, a tuple starting with one, or an object with a .sample tensor "
                    f"(diffusers outputs); got {type(out).__name__}")


def _first_difference(a, b, path: str = "") -> Optional[Tuple[str, object, object]]:
    """The first (path, a, b) at which two JSON-like trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return sub, a.get(key, "<missing>"), b.get(key, "<missing>")
            found = _first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (path, a, b)


class DiffusionLoss:
    def __init__(self, schedule: S.NoiseSchedule, sampler: Union[None, str, TimestepSampler] = None,
                 weighting: Union[None, str, Weighting] = None, process: str = "standard",
                 target: Optional[str] = None, mode: str = "reweight",
                 warmup: Union[None, int, WeightWarmup] = None, precond: Optional[str] = None,
                 fdm_multiplier: float = 2.0, fdm_on: str = "input", fdm_beta_min: float = 0.1,
                 fdm_beta_d: float = 19.9, fdm_sigma_range: Optional[Tuple[float, float]] = None,
                 sigma_data: Optional[float] = None, network_time: Optional[Callable] = None,
                 sampler_kwargs: Optional[dict] = None, weighting_kwargs: Optional[dict] = None,
                 grid_size: int = 1000, check: bool = True):
        check_schedule(schedule)
        self.process = checks.choice("process", process, PROCESSES)
        self.mode = checks.choice("mode", mode, MODES)
        self.check = checks.flag("check", check)
        self.schedule = schedule
        self.cells = TimeCells(schedule, grid_size)
        if precond is not None:
            checks.choice("precond", precond, PRECOND_KINDS)
        if network_time is not None and not callable(network_time):
            raise TypeError(f"network_time must be a callable mapping schedule times to network times, got "
                            f"{type(network_time).__name__}")
        for name, kw in (("sampler_kwargs", sampler_kwargs), ("weighting_kwargs", weighting_kwargs)):
            if kw is not None and not isinstance(kw, dict):
                raise TypeError(f"{name} must be a dict of options or None, got {type(kw).__name__}")

        self.fdm = None
        if self.process == "fdm":
            if target not in (None, "edm"):
                raise ValueError(f"process='fdm' trains the preconditioned denoiser; target must be None or 'edm', "
                                 f"got {target!r}")
            checks.choice("fdm_on", fdm_on, FDM_ON)
            m = checks.positive("fdm_multiplier", fdm_multiplier)
            bmin = checks.real("fdm_beta_min", fdm_beta_min, low=0.0)
            bd = checks.real("fdm_beta_d", fdm_beta_d, low=0.0)
            if fdm_sigma_range is None and isinstance(schedule, S.EDM):
                lo, hi = schedule.t_min, schedule.t_max  # t is sigma (exactly; exp(log sigma) rounds)
            elif fdm_sigma_range is None:
                lo, hi = float(schedule.edm_sigma(schedule.t_min)), float(schedule.edm_sigma(schedule.t_max))
            else:
                if not isinstance(fdm_sigma_range, (tuple, list)) or len(fdm_sigma_range) != 2:
                    raise TypeError(f"fdm_sigma_range must be a (sigma_min, sigma_max) pair, got {fdm_sigma_range!r}")
                lo = checks.positive("fdm_sigma_range[0]", fdm_sigma_range[0])
                hi = checks.real("fdm_sigma_range[1]", fdm_sigma_range[1], low=lo, low_open=True)
            self.precond = Preconditioning(precond or Preconditioning.default_for(schedule),
                                           schedule_sigma_data(schedule, sigma_data))
            self.target = "edm"  # the F target of the preconditioning
            self.fdm = S.FDMMomentum(m=m, beta_min=bmin, beta_d=bd, u_min=lo, u_max=hi, source="sigma", on=fdm_on)
            # the op's schedule for sigma-space samples: alpha = 1, sigma = t (t is the EDM sigma)
            self._sigma_space = S.EDM(sigma_min=lo, sigma_max=hi)
        else:
            for name, value, default in (("fdm_on", fdm_on, "input"), ("fdm_sigma_range", fdm_sigma_range, None),
                                         ("fdm_multiplier", fdm_multiplier, 2.0), ("fdm_beta_min", fdm_beta_min, 0.1),
                                         ("fdm_beta_d", fdm_beta_d, 19.9)):
                if not (value is default or value == default):
                    raise ValueError(f"{name} only applies to process='fdm' (got {name}={value!r})")
            self.target = checks.choice("target", "eps" if target is None else target, TARGETS)
            if precond is not None and self.target != "edm":
                raise ValueError("precond is only used with target='edm' or process='fdm'")
            self.precond = (Preconditioning(precond or "edm", schedule_sigma_data(schedule, sigma_data))
                            if self.target == "edm" else None)
            if sigma_data is not None and self.precond is None:
                raise ValueError("sigma_data is only used with target='edm' or process='fdm'")

        if sampler is None:
            sampler = PRECOND_SAMPLER[self.precond.kind] if self.precond is not None else "uniform"
        self.sampler = make_sampler(sampler, schedule, **(sampler_kwargs or {}))
        wkw = dict(weighting_kwargs or {})
        if weighting == "min_snr" and "target" not in wkw:
            wkw["target"] = self.target if self.target in ("eps", "x0", "v", "flow") else "x0"
        if weighting == "edm" and "sigma_data" not in wkw and self.precond is not None:
            wkw["sigma_data"] = self.precond.sigma_data
        if weighting is None and self.process == "fdm":
            self.weighting = PreconditioningWeight(schedule, self.precond, n=grid_size)
        else:
            self.weighting = make_weighting(weighting, schedule, **wkw)
        if warmup is None or isinstance(warmup, WeightWarmup):
            self.warmup = warmup
        else:
            self.warmup = WeightWarmup(warmup)
        self.network_time = network_time or default_network_time(schedule)
        # the warm-up cap as one tensor per device, refreshed by step(): no host->device copy per step, and
        # torch.compile reads it as a tensor (no recompilation as it grows)
        self._caps = None if self.warmup is None else PerDevice(
            lambda: torch.tensor(self.warmup.cap, dtype=torch.float64))
        self.last_t = self.last_weight = self.last_per_sample = self.last_mse = None
        self.prepare("cpu")

    def prepare(self, device) -> "DiffusionLoss":
        """Copy the tables that every step indexes to `device` now (they are copied on first use otherwise). Call
        it before `torch.compile` on a GPU, so that the compiled step only looks them up."""
        if isinstance(self.sampler, TableSampler):
            self.sampler.density.on(device)
            self.sampler.table_on(device)
        if self.cells.discrete or self.weighting.tabulated:
            self.weighting.table_on(device)
        if self.warmup is not None:
            self._caps.on(device)
        kernel_table(self.schedule.kernel_spec(), torch.device(device))  # the op's schedule table
        return self

    # ------------------------------------------------------------------------------------------------------
    def _noisy(self, x0, noise, t):
        """(network input, a, s, divisor d): x_in = (a x0 + s eps)/d is the denoiser's sigma-space input."""
        if self.fdm is not None:
            sig = self.schedule.edm_sigma(t)
            psd = self.precond.input_sigma_data() if self.fdm.on == "mean" else None
            _, net_in = noisy_sample(x0, noise, sig, self._sigma_space, precond_sigma_data=psd, fdm=self.fdm,
                                     write_input=True, check=self.check)
            a = self.fdm.factor(sig) if self.fdm.on == "mean" else torch.ones_like(sig)
            return net_in, a, sig, torch.ones_like(sig)
        psd = self.precond.input_sigma_data() if self.precond is not None else None
        xt, net_in = noisy_sample(x0, noise, t, self.schedule, precond_sigma_data=psd, write_input=psd is not None,
                                  check=self.check)
        if self.schedule.family == "vp":  # log alpha once (a table interpolation for DiscreteVP), sigma from it
            la = self.schedule.log_alpha(t)
            a, s = la.exp(), S._vp_log_sigma(la).exp()
        else:
            a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        return (net_in if psd is not None else xt), a, s, a

    def _target_coefficients(self, t, a, s, d):
        """Per-sample (A, C) with target = A x0 + C eps, and c^2 = |x0 error|^2 / |target error|^2."""
        if self.target == "eps":
            return None, None, (s / a) ** 2
        if self.target == "x0":
            return None, None, torch.ones_like(a)
        if self.target == "v":
            return -s, a, (s / (a * a + s * s)) ** 2
        if self.target == "flow":
            # |x0 error| / |u error| = sigma/(alpha sigma' - sigma alpha') = 1/|alpha lambda'|
            da, ds = self.schedule.d_alpha(t), self.schedule.d_sigma(t)
            return da, ds, 1.0 / (a * self.schedule.d_lambda(t)) ** 2
        sig = s / d
        c_skip, c_out = self.precond.c_skip(sig), self.precond.c_out(sig)
        return (1.0 - c_skip * a / d) / c_out, -c_skip * sig / c_out, c_out * c_out

    def _weights(self, t, scale2):
        w = self.weighting(t).to(scale2.dtype)
        if self.warmup is not None:
            w = torch.minimum(w, self._caps.on(w.device))
        if self.weighting.space == "x0":
            w = w * scale2
        if self.mode == "unbiased":
            w = w / self.sampler.relative_density(t).to(w.dtype)
        if self.check:
            ok = torch.isfinite(w).all() & (w >= 0).all()
            if w.device.type == "cpu":
                if not bool(ok):
                    raise ValueError(f"loss weights must be finite and non-negative; got {w.tolist()[:8]} at "
                                     f"t={t.tolist()[:8]} from weighting {self.weighting.config()}")
            else:  # no host sync: a device-side assert
                torch._assert_async(ok, "tdiff DiffusionLoss: loss weights must be finite and non-negative")
        return w

    # ------------------------------------------------------------------------------------------------------
    def sample_t(self, batch: int, device="cpu", generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(batch,) float64 training times from this loss's time-step sampler."""
        return self.sampler.sample(batch, generator=generator, device=device, dtype=torch.float64)

    def __call__(self, model: Callable, x0: torch.Tensor, *, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 **cond) -> torch.Tensor:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x, t_net, **cond), got {type(model).__name__}")
        if not torch.is_tensor(x0) or x0.dim() < 2 or x0.shape[0] == 0:
            raise ValueError("x0 must be a (B, ...) tensor with B >= 1")
        if not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor (e.g. images scaled to [-1, 1]), got {x0.dtype}")
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, x0.device, generator)
        else:
            if not torch.is_tensor(t) or t.shape != (b,):
                raise ValueError(f"t must be a tensor of shape ({b},), got "
                                 f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
            if self.check:  # caller-given times: one sync on a GPU
                self.schedule.check_t(t, "t")
            t = t.to(device=x0.device, dtype=torch.float64)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif not torch.is_tensor(noise) or noise.shape != x0.shape or noise.dtype != x0.dtype:
            raise ValueError(f"noise must be a tensor with x0's shape {tuple(x0.shape)} and dtype {x0.dtype}, got "
                             f"{(tuple(noise.shape), noise.dtype) if torch.is_tensor(noise) else type(noise).__name__}")
        with torch.no_grad():
            net_in, a, s, d = self._noisy(x0.detach(), noise, t)
            A, C, scale2 = self._target_coefficients(t, a, s, d)
            if A is None:
                target = noise if self.target == "eps" else x0.detach()
            else:
                shape = (-1,) + (1,) * (x0.dim() - 1)
                acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
                target = A.to(acc).view(shape) * x0.to(acc) + C.to(acc).view(shape) * noise.to(acc)
            w = self._weights(t, scale2)
        pred = network_output(model(net_in, self.network_time(t).float(), **cond))
        if pred.shape != x0.shape:
            raise ValueError(f"the model returned shape {tuple(pred.shape)}, expected x0's {tuple(x0.shape)}")
        per_sample, mse = weighted_mse_with_mse(pred, target.to(pred.dtype), w.float())
        self.last_t, self.last_weight = t, w
        self.last_per_sample, self.last_mse = per_sample.detach(), mse.detach()
        return per_sample.mean()

    # ------------------------------------------------------------------------------------------------------
    def mean_factor(self, sigma: torch.Tensor) -> torch.Tensor:
        """mu(sigma) in the sigma-space marginal x = mu x0 + sigma eps: FDM's factor in "mean" mode, else 1."""
        if self.fdm is not None and self.fdm.on == "mean":
            return self.fdm.factor(sigma)
        return torch.ones_like(sigma)

    def denoise(self, model: Callable, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The x0 prediction of a network trained with this loss, at sigma-space samples x = x_t / alpha(t)
        (x = mu x0 + sigma eps, sigma the EDM noise level): what a sampler needs, for every target and process."""
        t = t.to(device=x.device, dtype=torch.float64)
        shape = (-1,) + (1,) * (x.dim() - 1)
        sig = self.schedule.edm_sigma(t)  # exact between training steps too (samplers visit any t)
        nt = self.network_time(t).float()

        def per(v):
            return v.to(x.dtype).view(shape)

        def net(inp):
            return network_output(model(inp, nt, **cond)).to(x.dtype)

        if self.fdm is not None:
            scale = self.fdm.factor(sig) if self.fdm.on == "input" else self.precond.c_in(sig)
            return per(self.precond.c_skip(sig)) * x + per(self.precond.c_out(sig)) * net(per(scale) * x)
        a = self.schedule.alpha(t)
        xt = per(a) * x
        if self.target == "edm":
            # the input training wrote (tdiff.ops.noisy_sample): x_t itself without an input scaling, else
            # x_t / sqrt(s^2 + (sigma_data a)^2), which is the preconditioning's c_in(sigma) x
            inp = xt if self.precond.input_sigma_data() is None else per(self.precond.c_in(sig)) * x
            return per(self.precond.c_skip(sig)) * x + per(self.precond.c_out(sig)) * net(inp)
        return prediction_to_x0(net(xt), xt, t, self.schedule, self.target)

    def denoiser(self, model: Callable, clip_x0: Optional[float] = None) -> "TrainedDenoiser":
        """The x0-predicting denoiser D(x_t, t, **cond) of a network trained with this loss, for `tdiff.sample`."""
        if self.fdm is not None and self.fdm.on == "mean":
            raise ValueError("FDM's mean mode (paper Eq. 15) trains on the marginal f(sigma) x0 + sigma eps, which no "
                             "tdiff schedule describes, so tdiff's solvers cannot sample it; train with "
                             "fdm_on='input' (FDM's reference code) to sample with tdiff.sample")
        return TrainedDenoiser(self, model, clip_x0)

    # ------------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Call once per optimiser step (on every rank): advances the FDM weight warm-up."""
        if self.warmup is not None:
            self.warmup.step()
            for cap in self._caps.copies():
                cap.fill_(self.warmup.cap)

    def state_dict(self) -> dict:
        return {"warmup": None if self.warmup is None else self.warmup.state_dict(), "config": self.config()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the warm-up counter. Refuses a state saved by a loss of another configuration, naming the
        first field that differs."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict from DiffusionLoss.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("warmup", "config") if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; expected a dict from DiffusionLoss.state_dict()")
        if not isinstance(state["config"], dict):
            raise TypeError(f"state['config'] must be a dict from DiffusionLoss.config(), got "
                            f"{type(state['config']).__name__}")
        mine = json.loads(json.dumps(self.config()))
        try:
            theirs = json.loads(json.dumps(state["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"state['config'] is not a loss configuration: {e}") from e
        diff = _first_difference(theirs, mine)
        if diff is not None:
            path, a, b = diff
            raise ValueError(f"state was saved by a DiffusionLoss with {path}={a!r}, this loss has {path}={b!r}")
        if (state["warmup"] is None) != (self.warmup is None):
            raise ValueError("state['warmup'] presence does not match this loss (warmup=None on one side)")
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])
            for cap in self._caps.copies():
                cap.fill_(self.warmup.cap)

    def config(self) -> dict:
        fdm = None if self.fdm is None else {
            "m": self.fdm.m, "beta_min": self.fdm.beta_min, "beta_d": self.fdm.beta_d, "sigma_min": self.fdm.u_min,
            "sigma_max": self.fdm.u_max, "on": self.fdm.on}
        precond = None if self.precond is None else {"kind": self.precond.kind,
                                                     "sigma_data": self.precond.sigma_data}
        return {"schedule": self.schedule.config(), "sampler": self.sampler.config(),
                "weighting": self.weighting.config(), "process": self.process, "target": self.target,
                "mode": self.mode, "precond": precond, "fdm": fdm,
                "warmup": None if self.warmup is None else self.warmup.config()}


class TrainedDenoiser(nn.Module):
    """D(x_t, t, **cond) -> x0 for a network trained with a `DiffusionLoss`: x_t = alpha x0 + sigma eps in the
    schedule's own convention (what `tdiff.sample` passes), t a scalar or (B,) schedule times."""

    def __init__(self, loss: DiffusionLoss, model: Callable, clip_x0: Optional[float] = None):
        super().__init__()
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.loss, self.model, self.schedule = loss, model, loss.schedule
        self.clip_x0 = None if clip_x0 is None else checks.positive("clip_x0", clip_x0)

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        t = S.as_time(t).to(x.device, torch.float64)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        alpha = self.schedule.alpha(t).to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        x0 = self.loss.denoise(self.model, x / alpha, t, **cond)
        return x0 if self.clip_x0 is None else x0.clamp(-self.clip_x0, self.clip_x0)
