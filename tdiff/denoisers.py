"""Denoiser wrappers: turn any network into D(x, t, **cond) -> the data (x0) prediction.

Solvers only ever see D. Everything about how a particular network was trained lives here: what it predicts
(eps, x0, v or flow velocity), what time it is fed, EDM preconditioning and classifier-free guidance.
All alpha/sigma maths comes from the schedule; `prediction_to_x0` is the one conversion used by every path.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

import contextlib
import contextvars

from .preconditioning import Preconditioning
from .schedules import EDM, DiscreteVP, NoiseSchedule, VPCosine, VPLinear, as_time

# Set by a caller that has validated its times once up front (the solvers' sampling loop), so the per-call
# domain check, a device sync on GPU, is not repeated at every model evaluation.
_TIMES_VALIDATED = contextvars.ContextVar("tdiff_times_validated", default=False)


@contextlib.contextmanager
def times_validated():
    """Within this block Denoiser calls skip their time-domain check (the caller has done it)."""
    token = _TIMES_VALIDATED.set(True)
    try:
        yield
    finally:
        _TIMES_VALIDATED.reset(token)

PREDICTIONS = ("eps", "x0", "v", "flow")
_DIFFUSERS_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_prediction": "flow"}


def _per_sample(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) coefficient -> (B, 1, ..., 1) in x's dtype, to broadcast over a sample."""
    return coef.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def prediction_to_x0(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                     prediction: str) -> torch.Tensor:
    """Convert a network output to the x0 prediction, for x = alpha x0 + sigma eps at (B,) times t.

    eps:  x0 = (x - sigma eps) / alpha
    v:    v = alpha eps - sigma x0  =>  x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)   (any family)
    flow: u = dx/dt = alpha' x0 + sigma' eps  =>  x0 = (sigma' x - sigma u) / (alpha sigma' - sigma alpha')
    """
    if prediction == "x0":
        return out
    a, s = _per_sample(schedule.alpha(t), x), _per_sample(schedule.sigma(t), x)
    if prediction == "eps":
        return (x - s * out) / a
    if prediction == "v":
        return (a * x - s * out) / (a * a + s * s)
    if prediction == "flow":
        da, ds = _per_sample(schedule.d_alpha(t), x), _per_sample(schedule.d_sigma(t), x)
        return (ds * x - s * out) / (a * ds - s * da)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def default_model_time(schedule: NoiseSchedule, precond: Optional[str] = None) -> Callable:
    """The time a network is fed for schedule time t. One convention for training (DiffusionLoss) and sampling
    (Denoiser), on the ~[0, 1000] scale that tdiff's networks' sinusoidal time embeddings expect:
    the diffusers index N t - 1 for DiscreteVP; 1000 c_noise = 250 ln(sigma) for EDM (schedule or
    preconditioning); 999 t for a continuous VP (DPM-Solver / score_sde); 1000 t otherwise (VE, flow)."""
    if isinstance(schedule, DiscreteVP):
        return schedule.index_from_t
    if precond == "edm" or isinstance(schedule, EDM):
        return lambda t: 250.0 * schedule.edm_sigma(t).log()
    if isinstance(schedule, (VPLinear, VPCosine)):
        return lambda t: 999.0 * t
    return lambda t: 1000.0 * t


def _tdiff_call(model, x, t_net, y=None, **cond):
    return model(x, t_net, y, **cond)


class Denoiser(nn.Module):
    """D(x, t, **cond) -> x0 prediction. t: scalar or (B,) schedule times; cond: e.g. y (class labels).

    `call(model, x, t_net, y=None, **cond)` is how the raw network is invoked; the default suits tdiff's DiT and
    UNet (`model(x, t, y)`). With `guidance=w` and labels y, conditional and unconditional inputs go through the
    network in one batch and are combined as uncond + w (cond - uncond) on the raw output.
    """

    def __init__(self, model, schedule: NoiseSchedule, prediction: str = "eps", precond: Optional[str] = None,
                 model_time: Union[None, Callable] = None, guidance: Optional[float] = None,
                 null_label: Optional[int] = None, call: Optional[Callable] = None, validate: bool = True,
                 clip_x0: Optional[float] = None):
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if precond not in (None, "edm"):
            raise ValueError(f"precond must be None or 'edm', got {precond!r}")
        if model_time is not None and not callable(model_time):
            raise ValueError("model_time must be None or a callable mapping schedule t to network time")
        if guidance is not None and not isinstance(guidance, (int, float)):
            raise ValueError(f"guidance must be a number or None, got {guidance!r}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.precond = precond
        self.model_time = model_time or default_model_time(schedule, precond)
        self.guidance = None if guidance is None else float(guidance)
        self.null_label = null_label if null_label is not None else getattr(model, "null_label", None)
        self.call = call or _tdiff_call
        self.validate = validate
        if clip_x0 is not None and not clip_x0 > 0:
            raise ValueError(f"clip_x0 must be None or a positive bound, got {clip_x0!r}")
        # clamp D to [-clip_x0, clip_x0] (diffusers' clip_sample): a valid prior for images in [-1, 1] that
        # stops an undertrained eps-network's large x0 errors at high noise from ruining a sample
        self.clip_x0 = clip_x0
        # EDM preconditioning's sigma_data: the schedule's when it has one (EDM), else EDM's default 0.5
        self.sigma_data = float(getattr(schedule, "sigma_data", 0.5))

    # ----- the raw network, with classifier-free guidance -----
    def raw(self, x: torch.Tensor, t_net: torch.Tensor, y: Optional[torch.Tensor] = None, **cond) -> torch.Tensor:
        if self.guidance is None or y is None:
            out = self.call(self.model, x, t_net, y=y, **cond)
        else:
            if self.null_label is None:
                raise ValueError("guidance needs null_label (the unconditional class index); pass null_label=")
            b = x.shape[0]
            y_null = torch.full_like(y, self.null_label)
            both = self.call(self.model, torch.cat([x, x]), torch.cat([t_net, t_net]), y=torch.cat([y, y_null]),
                             **{k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (b,) else v
                                for k, v in cond.items()})
            out_c, out_u = both[:b], both[b:]
            out = out_u + self.guidance * (out_c - out_u)
        if out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-sigma channels: solvers only use the mean prediction
        return out

    def times(self, t, x: torch.Tensor) -> torch.Tensor:
        t = as_time(t).to(x.device)
        if self.validate and not _TIMES_VALIDATED.get():
            self.schedule.check_t(t)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(t.shape)}")
        return t

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        x0 = self._x0(x, t, **cond)
        return x0 if self.clip_x0 is None else x0.clamp(-self.clip_x0, self.clip_x0)

    def _x0(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim < 2:
            raise ValueError("x must be a tensor of shape (B, ...)")
        t = self.times(t, x)
        dtype = x.dtype
        model_dtype = next((p.dtype for p in self.model.parameters()), dtype) if isinstance(self.model, nn.Module) \
            else dtype
        if self.precond == "edm":
            # EDMPrecond on the scaled sample x/alpha with noise level sigma/alpha (alpha = 1 for EDM)
            x_hat = x / _per_sample(self.schedule.alpha(t), x)
            s = _per_sample(self.schedule.edm_sigma(t), x)
            pc = Preconditioning("edm", self.sigma_data)
            c_skip, c_out, c_in = pc.c_skip(s), pc.c_out(s), pc.c_in(s)
            f = self.raw((c_in * x_hat).to(model_dtype), self.model_time(t), **cond).to(dtype)
            return c_skip * x_hat + c_out * f
        out = self.raw(x.to(model_dtype), self.model_time(t), **cond).to(dtype)
        return prediction_to_x0(out, x, t, self.schedule, self.prediction)

    def edm_call(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """k-diffusion convention: x = x_t / alpha at noise level sigma = sigma_t / alpha_t; returns x0."""
        sigma = as_time(sigma).to(x.device)
        t = self.schedule.t_from_edm_sigma(sigma)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return self(x * _per_sample(self.schedule.alpha(t), x), t, **cond)

    def eps(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """The noise prediction implied by D: eps = (x - alpha D) / sigma."""
        t = self.times(t, x)
        x0 = self(x, t, **cond)
        return (x - _per_sample(self.schedule.alpha(t), x) * x0) / _per_sample(self.schedule.sigma(t), x)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, prediction={self.prediction}, precond={self.precond}, " \
               f"guidance={self.guidance}, clip_x0={self.clip_x0}"


def denoiser(model, schedule: NoiseSchedule, prediction: str = "eps", precond: Optional[str] = None,
             model_time: Optional[Callable] = None, guidance: Optional[float] = None,
             null_label: Optional[int] = None, clip_x0: Optional[float] = None, **kw) -> Denoiser:
    """Wrap `model` (called as model(x, t_net, y)) into an x0-predicting Denoiser. See `Denoiser`."""
    return Denoiser(model, schedule, prediction=prediction, precond=precond, model_time=model_time,
                    guidance=guidance, null_label=null_label, clip_x0=clip_x0, **kw)


def _diffusers_call(model, x, t_net, y=None, **cond):
    return model(x, t_net, class_labels=y, return_dict=False, **cond)[0]


def from_diffusers(model, scheduler_or_config, **kw) -> Denoiser:
    """Wrap a diffusers DiTTransformer2DModel or UNet2DModel with its scheduler (or scheduler config).

    The schedule is DiscreteVP.from_diffusers, the network is fed the (fractional) index N t - 1, the prediction
    comes from the config's prediction_type, and learned-sigma channels are dropped. Keywords override.
    """
    schedule = DiscreteVP.from_diffusers(scheduler_or_config)
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    ptype = get("prediction_type", "epsilon")
    if "prediction" not in kw:
        if ptype not in _DIFFUSERS_PREDICTIONS:
            raise ValueError(f"prediction_type {ptype!r} is not supported; expected {sorted(_DIFFUSERS_PREDICTIONS)}")
        kw["prediction"] = _DIFFUSERS_PREDICTIONS[ptype]
    mcfg = getattr(model, "config", {})
    mget = mcfg.get if isinstance(mcfg, dict) else (lambda k, d=None: getattr(mcfg, k, d))
    if "null_label" not in kw:
        # DiT's label table has one extra row, index num_embeds_ada_norm, for the dropped (null) class
        kw["null_label"] = mget("num_embeds_ada_norm", None) if "Transformer" in type(model).__name__ else None
    call = kw.pop("call", None)
    if call is None:
        if "Transformer" in type(model).__name__:
            null = kw["null_label"]

            def call(m, x, t_net, y=None, **cond):
                # diffusers' DiT always needs class labels; no label means the null class
                if y is None and null is not None:
                    y = torch.full((x.shape[0],), null, dtype=torch.long, device=x.device)
                return _diffusers_call(m, x, t_net, y=y, **cond)
        else:
            call = _diffusers_call
    return Denoiser(model, schedule, call=call, **kw)


__all__ = ["Denoiser", "denoiser", "from_diffusers", "prediction_to_x0", "default_model_time", "PREDICTIONS"]
