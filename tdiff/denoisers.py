"""Denoiser wrappers: turn any network into D(x, t, **cond) -> the data (x0) prediction.

Solvers only ever see D. Everything about how a particular network was trained lives here: what it predicts
(eps, x0, v or flow velocity), what time it is fed, EDM preconditioning and classifier-free guidance.
All alpha/sigma maths comes from the schedule; `prediction_to_x0` is the one conversion used by every path.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .preconditioning import Preconditioning
from .recycled_views import RecycledViews
from .schedules import EDM, DiscreteVP, NoiseSchedule, RectifiedFlow, VPCosine, VPLinear, as_time

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


def conversion_coefficients(prediction: str, alpha, sigma, d_alpha=None, d_sigma=None, precond: Optional[str] = None,
                            sigma_data: float = 0.5) -> tuple:
    """(p, q) with x0 = p x + q m, for a network output m at a sample x = alpha x0 + sigma eps. The one place the
    conversion formulas live (SPEC_multistep): `prediction_to_x0`, `Denoiser` and the sampling loop all use it.

    eps:  x0 = (x - sigma eps)/alpha                   p = 1/alpha,                 q = -sigma/alpha
    v:    v = alpha eps - sigma x0                      p = alpha/(alpha^2+sigma^2), q = -sigma/(alpha^2+sigma^2)
    flow: u = dx/dt = alpha' x0 + sigma' eps            p = sigma'/(alpha sigma' - sigma alpha'),
                                                        q = -sigma/(alpha sigma' - sigma alpha')
    x0:   p = 0, q = 1
    precond="edm" (EDMPrecond on x^ = x/alpha at s = sigma/alpha; c_in and c_noise stay inside the network call):
          p = c_skip(s)/alpha, q = c_out(s)
    """
    if precond == "edm":
        s = sigma / alpha
        pc = Preconditioning("edm", sigma_data)
        return pc.c_skip(s) / alpha, pc.c_out(s)
    if prediction == "x0":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if prediction == "eps":
        return 1 / alpha, -sigma / alpha
    if prediction == "v":
        norm = alpha * alpha + sigma * sigma
        return alpha / norm, -sigma / norm
    if prediction == "flow":
        den = alpha * d_sigma - sigma * d_alpha
        return d_sigma / den, -sigma / den
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def eps_coefficients(p, q, alpha, sigma) -> tuple:
    """(p', q') of eps = p' x + q' m from the x0 row (p, q): eps = (x - alpha x0)/sigma."""
    return (1 - alpha * p) / sigma, -alpha * q / sigma


def schedule_conversion(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, precond: Optional[str] = None,
                        sigma_data: float = 0.5) -> tuple:
    """conversion_coefficients at schedule times t (the derivatives, for flow, by autograd of the schedule)."""
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    d_alpha = d_sigma = None
    if prediction == "flow" and precond is None:
        d_alpha, d_sigma = schedule.d_alpha(t), schedule.d_sigma(t)
    return conversion_coefficients(prediction, alpha, sigma, d_alpha, d_sigma, precond, sigma_data)


def convert(x: torch.Tensor, out: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p x + q out with per-sample (B,) or shared 0-dim p, q, accumulated in p's dtype, returned in x's dtype."""
    acc = p.dtype
    shape = (-1,) + (1,) * (x.dim() - 1)
    return (p.reshape(shape) * x.to(acc) + q.reshape(shape) * out.to(acc)).to(x.dtype)


def prediction_to_x0(out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule,
                     prediction: str) -> torch.Tensor:
    """Convert a network output to the x0 prediction, for x = alpha x0 + sigma eps at (B,) times t
    (`conversion_coefficients` at t)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if prediction == "x0":
        return out
    p, q = schedule_conversion(schedule, as_time(t).to(x.device), prediction)
    return convert(x, out, p.to(x.device), q.to(x.device))


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
        return _on_host(lambda t: 999.0 * t)
    return _on_host(lambda t: 1000.0 * t)


def _on_host(model_time: Callable) -> Callable:
    """Mark a model time as plain arithmetic that numpy float64 arrays go through as tensors do (`_host_times`)."""
    model_time.on_host = True
    return model_time


def _host_times(model_time: Callable, t: torch.Tensor) -> Optional[np.ndarray]:
    """model_time(t) evaluated on the host, as a numpy float64 array, where t is a plain CPU float64 tensor outside
    autograd and model_time one of `default_model_time`'s arithmetic ones (the same operations on numpy: the same
    values, at a fraction of torch's dispatch cost on ~40 times); else None."""
    host = getattr(model_time, "on_host", False) or getattr(model_time, "__func__", None) is DiscreteVP.index_from_t
    if not host or not t.is_cpu or t.dtype != torch.float64 or t.requires_grad or \
            torch._C._functorch.is_functorch_wrapped_tensor(t):
        return None
    return model_time(t.numpy())


def _tdiff_call(model, x, t_net, y=None, **cond):
    return model(x, t_net, y, **cond)


def _check_finite_number(name: str, value, positive: bool = False, allow_none: bool = True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or None' if allow_none else ''}, got {value!r}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


#: network_calls' per-time views, per (times, batch, dtype, device): see tdiff.recycled_views
_TIME_VIEWS = RecycledViews()


def _time_views(t_net, b: int) -> tuple:
    """The (E,) network times (a tensor, or a host array of `_host_times`) as one (B,) view per time (expanded:
    stride 0 over the batch): those of the last run of that layout, refilled, where `RecycledViews.take` allows,
    else fresh ones."""
    host = isinstance(t_net, np.ndarray)
    if t_net.ndim != 1 or torch.is_grad_enabled():  # differentiable: views of t_net itself
        return (torch.from_numpy(t_net) if host else t_net).unsqueeze(1).expand(-1, b).unbind(0)
    # inference mode makes inference tensors, which cannot be written outside it
    key = (t_net.shape[0], b, "host" if host else (t_net.dtype, t_net.device), torch.is_inference_mode_enabled())
    entry = _TIME_VIEWS.take(key)
    if entry is not None:
        table, (views,), users = entry
        if host:  # the table is the views' numpy array
            table[:] = t_net
        else:
            table.copy_(t_net)
    else:
        table, users = t_net.copy() if host else t_net.clone(), None
        views = (torch.from_numpy(table) if host else table).unsqueeze(1).expand(-1, b).unbind(0)
    del entry
    _TIME_VIEWS.keep(key, table, (views,), users)
    return views


class PreparedCalls(list):
    """Denoiser.network_calls' list of per-evaluation calls; checks_output: every call checks its own output (the
    sampling loop then reads one flag per run instead of one per call)."""

    checks_output = False


class Denoiser(nn.Module):
    """D(x, t, **cond) -> x0 prediction. t: scalar or (B,) schedule times; cond: e.g. y (class labels).

    `call(model, x, t_net, y=None, **cond)` is how the raw network is invoked; the default suits tdiff's DiT and
    UNet (`model(x, t, y)`). With `guidance=w` and labels y, conditional and unconditional inputs go through the
    network in one batch and are combined as uncond + w (cond - uncond) on the raw output.

    The sampling loop calls the two halves separately: `network_output(x, t_net)` (the raw, guided output at the
    network's time, with EDM's input scaling) and `conversion(t)` (the (p, q) rows at the *sample's* time), so a
    solver converts at its grid point even when the network is fed a rounded or decoupled time.
    """

    def __init__(self, model, schedule: NoiseSchedule, prediction: str = "eps", precond: Optional[str] = None,
                 model_time: Union[None, Callable] = None, guidance: Optional[float] = None,
                 null_label: Optional[int] = None, call: Optional[Callable] = None, validate: bool = True,
                 clip_x0: Optional[float] = None):
        super().__init__()
        if not callable(model):
            raise ValueError(f"model must be callable (a network), got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if precond not in (None, "edm"):
            raise ValueError(f"precond must be None or 'edm', got {precond!r}")
        if model_time is not None and not callable(model_time):
            raise ValueError("model_time must be None or a callable mapping schedule t to network time")
        if call is not None and not callable(call):
            raise ValueError("call must be None or a callable call(model, x, t_net, y=None, **cond)")
        if null_label is not None and (isinstance(null_label, bool) or not isinstance(null_label, int)
                                       or null_label < 0):
            raise ValueError(f"null_label must be None or a class index >= 0, got {null_label!r}")
        if not isinstance(validate, bool):
            raise ValueError(f"validate must be True or False, got {validate!r}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.precond = precond
        self.model_time = model_time or default_model_time(schedule, precond)
        self.guidance = _check_finite_number("guidance", guidance)
        self.null_label = null_label if null_label is not None else getattr(model, "null_label", None)
        self.call = call or _tdiff_call
        self.validate = validate
        # clamp D to [-clip_x0, clip_x0] (diffusers' clip_sample): a valid prior for images in [-1, 1] that
        # stops an undertrained eps-network's large x0 errors at high noise from ruining a sample
        self.clip_x0 = _check_finite_number("clip_x0", clip_x0, positive=True)
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
            if not torch.is_tensor(y) or y.shape != (b,):  # before the batch is doubled, so the error says b
                got = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
                raise ValueError(f"y must be a ({b},) tensor of class labels (one per sample), got {got}")
            y_null = torch.full_like(y, self.null_label)
            both = self.call(self.model, torch.cat([x, x]), torch.cat([t_net, t_net]), y=torch.cat([y, y_null]),
                             **{k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == (b,) else v
                                for k, v in cond.items()})
            out_c, out_u = both[:b], both[b:]
            out = out_u + self.guidance * (out_c - out_u)
        return self._output(out, x)

    @staticmethod
    def _output(out, x: torch.Tensor) -> torch.Tensor:
        """The network's output checked to be shaped like x (learned-sigma channels dropped)."""
        if not torch.is_tensor(out):
            raise ValueError(f"the network must return a tensor shaped like x {tuple(x.shape)}, got "
                             f"{type(out).__name__}")
        if out.dim() == x.dim() and out.shape[0] == x.shape[0] and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]  # learned-sigma channels: solvers only use the mean prediction
        if out.shape != x.shape:
            raise ValueError(f"the network returned shape {tuple(out.shape)}; expected {tuple(x.shape)} (the shape "
                             f"of x), or twice its channels for a learned-variance output")
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

    def network_output(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        """The raw network output m at network time model_time(t) (guided; with EDM preconditioning the network
        sees c_in x/alpha), in x's dtype. x0 = p x + q m with (p, q) = conversion(t') at the sample's time t'."""
        if not torch.is_tensor(x) or x.ndim < 2:
            raise ValueError("x must be a tensor of shape (B, ...)")
        return self._network(x, self.times(t, x), **cond)

    def _network(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        scale = self._input_scale(t)
        model_dtype = self._model_dtype(x.dtype)
        return self._call_at(self.model_time(t), None if scale is None else _per_sample(scale, x),
                             None if model_dtype == x.dtype else model_dtype, x, **cond)

    def _model_dtype(self, default: torch.dtype) -> torch.dtype:
        if isinstance(self.model, nn.Module):
            return next((p.dtype for p in self.model.parameters()), default)
        return default

    def _input_scale(self, t: torch.Tensor) -> Optional[torch.Tensor]:
        """EDM preconditioning's input scaling of x at schedule times t: the network sees c_in x/alpha."""
        if self.precond != "edm":
            return None
        return Preconditioning("edm", self.sigma_data).c_in(self.schedule.edm_sigma(t)) / self.schedule.alpha(t)

    def network_calls(self, t: torch.Tensor, like: torch.Tensor) -> list:
        """For each of the (E,) schedule times t (validated by the caller), a callable x -> `network_output(x, t_k)`
        for samples like `like` (batch, dtype, device). What depends only on the time (the network time
        model_time(t), EDM's input scaling) and the model's dtype is computed here, once, for all E times, so a
        sampling loop's model call does no tensor work besides the network's own and no validation. Differentiable
        in t (the network times are functions of it)."""
        t = as_time(t)
        t = t if t.device == like.device else t.to(like.device)  # a no-op .to costs a dispatch
        b, ones = like.shape[0], (1,) * (like.dim() - 1)
        t_host = _host_times(self.model_time, t)
        t_net = _time_views(self.model_time(t) if t_host is None else t_host, b)
        scale = self._input_scale(t)
        scales = [None] * t.numel() if scale is None else \
            scale.to(like.dtype).reshape(-1, 1, *ones).expand(-1, b, *ones).unbind(0)  # (B, 1, ..) per time
        model_dtype = self._model_dtype(like.dtype)
        cast = None if model_dtype == like.dtype else model_dtype
        plain = scale is None and cast is None and type(self).raw is Denoiser.raw and \
            type(self)._call_at is Denoiser._call_at
        calls = PreparedCalls(self._plain_calls(t_net) if plain else
                              (functools.partial(self._call_at, t_net[k], scales[k], cast) for k in range(t.numel())))
        calls.checks_output = plain
        return calls

    def _plain_calls(self, t_nets: Sequence[torch.Tensor]) -> list:
        """Per network time t_net, `_call_at(t_net, None, None, x)` (no input scaling, the model in x's dtype) as
        the sampling loop's per-step call: the network called directly, its output returned as is when it is
        already a tensor shaped and typed like x; anything else (conditioning, learned-sigma channels, another
        dtype, a bad output) takes `_call_at`, which converts or names the problem, so the loop need not check
        again (network_calls flags its list: no attribute per call, whose dict would cost a third of the call's
        making). The model and its call convention are bound now, once for all the
        calls (nn.Module's attribute look-ups cost as much as the closure), as the network times are."""
        model, call, call_at, output = self.model, self.call, self._call_at, self._output
        direct = call is _tdiff_call  # model(x, t_net, y): skip the convention's frame
        network, bind = self._plain_call(model, call, call_at, output, direct), functools.partial
        return [bind(network, t_net) for t_net in t_nets]  # a partial: a third of a closure's making

    @staticmethod
    def _plain_call(model, call, call_at, output, direct: bool) -> Callable:
        """`_plain_calls`' call network(t_net, x, **cond), its time bound per evaluation."""
        tensor = torch.Tensor

        def network(t_net: torch.Tensor, x: torch.Tensor, **cond) -> torch.Tensor:
            if cond:
                return call_at(t_net, None, None, x, **cond)
            out = model(x, t_net, None) if direct else call(model, x, t_net, y=None)
            if type(out) is tensor and out.shape == x.shape and out.dtype == x.dtype:
                return out
            out = output(out, x)  # the same output, not a second call
            return out if out.dtype == x.dtype else out.to(x.dtype)

        return network

    def _call_at(self, t_net: torch.Tensor, scale: Optional[torch.Tensor], cast: Optional[torch.dtype],
                 x: torch.Tensor, **cond) -> torch.Tensor:
        """The network's raw output at network times t_net for x scaled by `scale` (EDM's input scaling, or None),
        the model run in dtype `cast` (None: x's own), returned in x's dtype."""
        if scale is not None:
            x = x * scale
        if cast is None:
            out = self.raw(x, t_net, **cond)
            return out if out.dtype == x.dtype else out.to(x.dtype)  # a no-op .to costs a dispatch
        return self.raw(x.to(cast), t_net, **cond).to(x.dtype)

    def conversion(self, t, target: str = "x0", alpha=None, sigma=None) -> torch.Tensor:
        """(..., 2) rows [p, q]: target = p x + q m for a sample x at schedule time(s) t (target "x0" or "eps");
        differentiable in t. The clamp (clip_x0) is not part of it.

        alpha, sigma: the schedule's values at t as numpy float64 arrays, when the caller has them (a solver's
        no-grad tables, Grid.points): the eps and v conversions, plain arithmetic in alpha and sigma, are then
        evaluated on the host with the same formulas (no schedule evaluation, no gradient); the other
        predictions and preconditionings compute from t."""
        if target not in ("x0", "eps"):
            raise ValueError(f"target must be 'x0' or 'eps', got {target!r}")
        t = as_time(t)
        if isinstance(alpha, np.ndarray) and self.precond is None and self.prediction in ("eps", "v"):
            p, q = conversion_coefficients(self.prediction, alpha, sigma)
            if target == "eps":
                p, q = eps_coefficients(p, q, alpha, sigma)
            pq = torch.from_numpy(np.array([p, q]).T if p.ndim == 1 else np.stack([p, q], axis=-1))  # .T: a view,
            return pq if t.is_cpu else pq.to(t.device)  # np.stack's Python costs as much as the arithmetic
        p, q = schedule_conversion(self.schedule, t, self.prediction, self.precond, self.sigma_data)
        if target == "eps":
            p, q = eps_coefficients(p, q, self.schedule.alpha(t), self.schedule.sigma(t))
        return torch.stack([p, q], dim=-1)

    def forward(self, x: torch.Tensor, t, **cond) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim < 2:
            raise ValueError("x must be a tensor of shape (B, ...)")
        t = self.times(t, x)
        m = self._network(x, t, **cond)
        pq = self.conversion(t).to(x.device)
        x0 = convert(x, m, pq[:, 0], pq[:, 1])
        return x0 if self.clip_x0 is None else x0.clamp(-self.clip_x0, self.clip_x0)

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


def _ddpm_family(cls_name: str) -> bool:
    """Whether the diffusers scheduler class of that name is built on DDPM betas (its __init__ takes
    beta_schedule). Unknown names (not in diffusers) are not refused here."""
    import inspect

    import diffusers

    cls = getattr(diffusers, cls_name, None)
    return cls is None or "beta_schedule" in inspect.signature(cls.__init__).parameters


def from_diffusers(model, scheduler_or_config, **kw) -> Denoiser:
    """Wrap a diffusers model (DiTTransformer2DModel, UNet2DModel, or anything called as
    model(x, t, class_labels=y, return_dict=False)[0]) with its scheduler (or scheduler config).

    From the scheduler: the schedule (DiscreteVP.from_diffusers, zero-terminal-SNR rescaling included; RectifiedFlow
    for flow-matching schedulers, fed num_train_timesteps * t), the prediction type (prediction_type; "flow" for
    FlowMatchEulerDiscreteScheduler), and clip_sample/clip_sample_range as clip_x0. The network of a DDPM-family
    schedule is fed the (fractional) index N t - 1; learned-sigma channels are dropped. Keywords override. A
    config the wrapper cannot honour (thresholding=True) is refused."""
    config = getattr(scheduler_or_config, "config", scheduler_or_config)
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    cls_name = type(scheduler_or_config).__name__ if hasattr(scheduler_or_config, "config") else \
        get("_class_name", "")
    if get("thresholding", False):
        raise ValueError("a scheduler with thresholding=True cannot be reproduced: dynamic thresholding of x0 is "
                         "not implemented (clip_sample is)")
    flow = cls_name.startswith("FlowMatch") or bool(get("use_flow_sigmas", False))
    if not flow and cls_name and not _ddpm_family(cls_name):
        # a VE / EDM-sigma scheduler (ScoreSdeVe, EDMEuler, ...): it has no DDPM noise schedule, and the default
        # betas would stand in for it silently
        raise ValueError(f"scheduler {cls_name!r} has no DDPM noise schedule (its config takes no beta_schedule) "
                         f"and is not a flow-matching scheduler; "
                         f"build the Denoiser with tdiff.denoiser(model, schedule) and the matching tdiff schedule")
    if flow:
        schedule = RectifiedFlow()
        n_train = float(get("num_train_timesteps", 1000))
        kw.setdefault("model_time", lambda t: n_train * t)
        ptype = get("prediction_type", "flow_prediction") or "flow_prediction"
    else:
        schedule = DiscreteVP.from_diffusers(scheduler_or_config)
        ptype = get("prediction_type", "epsilon")
    if "prediction" not in kw:
        if ptype not in _DIFFUSERS_PREDICTIONS:
            raise ValueError(f"prediction_type {ptype!r} is not supported; expected {sorted(_DIFFUSERS_PREDICTIONS)}")
        kw["prediction"] = _DIFFUSERS_PREDICTIONS[ptype]
    if "clip_x0" not in kw and get("clip_sample", False):
        kw["clip_x0"] = float(get("clip_sample_range", 1.0))
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


__all__ = ["Denoiser", "denoiser", "from_diffusers", "prediction_to_x0", "conversion_coefficients", "convert",
           "default_model_time", "PREDICTIONS"]
