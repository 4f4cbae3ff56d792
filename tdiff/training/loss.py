"""The composable diffusion training loss.

    loss_fn = DiffusionLoss(schedule, sampler="speed", weighting="speed", process="standard", target="eps")
    loss = loss_fn(model, x0, y=labels)          # batch loss; per-sample values in loss_fn.last_per_sample
    loss.backward(); opt.step(); loss_fn.step()  # step() advances the FDM warm-up, if any

Hot path, per step: one time draw on the device (inverse CDF of a uniform), one fused pass building x_t and the
network input (tdiff::noisy_sample, which also returns the per-sample alpha, sigma), the network, and one fused
weighted per-sample MSE (tdiff::weighted_mse). No host syncs on GPU.

Targets: every regression target is a per-sample combination A x0 + C eps of the data and the noise:
  eps (0, 1), x0 (1, 0), v = alpha eps - sigma x0, flow = eps - x0, and for a preconditioned denoiser
  ("edm", and every FDM variant) F* = (x0 - c_skip x_in)/c_out.
Weights: a weighting says which error it weighs ("target" or "x0"); an x0-space weight is converted to the
target with c^2, where |x0 error|^2 = c^2 |target error|^2. Modes: "reweight" multiplies the sampled objective by
the weight (SpeeD: sampling *and* weighting change the objective); "unbiased" also divides by the sampler's
relative density, so the objective is the uniform-time objective with that weight whatever the sampler.
FDM (process="fdm"): the sigma-space sample x0 + sigma eps (sigma = sigma/alpha of the schedule) goes into the
network as factor * x ("input", FDM's code and Table 1) or x0 is scaled by the factor ("mean", Eq. 15), with VP,
VE or EDM preconditioning; the default weight is the preconditioning's own lambda(sigma), clamped by the
warm-up while it runs.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from .. import schedules as S
from ..ops.noisy_sample import fdm_code, kernel_table  # also registers tdiff::noisy_sample
from ..ops.weighted_mse import weighted_mse_with_mse
from ..denoisers import default_model_time
from ..preconditioning import Preconditioning
from .per_device import PerDevice
from .sampler_base import TimestepSampler
from .samplers import make_sampler
from .time_grid import TimeGrid
from .warmup import WeightWarmup
from .weight_edm import PreconditioningWeight
from .weighting_base import Weighting
from .weightings import make_weighting

PROCESSES = ("standard", "fdm")
TARGETS = ("eps", "x0", "v", "flow", "edm")
MODES = ("reweight", "unbiased")


def default_network_time(schedule: S.NoiseSchedule) -> Callable[[torch.Tensor], torch.Tensor]:
    """The time the network is given: the same convention the sampling-side Denoiser uses."""
    return default_model_time(schedule)


class DiffusionLoss:
    def __init__(self, schedule: S.NoiseSchedule, sampler: Union[str, TimestepSampler] = "uniform",
                 weighting: Union[None, str, Weighting] = None, process: str = "standard",
                 target: Optional[str] = None, mode: str = "reweight",
                 warmup: Union[None, int, WeightWarmup] = None, precond: Optional[str] = None,
                 fdm_multiplier: float = 2.0, fdm_on: str = "input", fdm_beta_min: float = 0.1,
                 fdm_beta_d: float = 19.9, sigma_data: float = 0.5,
                 network_time: Optional[Callable] = None, sampler_kwargs: Optional[dict] = None,
                 weighting_kwargs: Optional[dict] = None, grid_size: int = 1000, check_weights: bool = True):
        if not isinstance(schedule, S.NoiseSchedule):
            raise ValueError(f"schedule must be a tdiff.schedules.NoiseSchedule, got {type(schedule).__name__}")
        if process not in PROCESSES:
            raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.schedule, self.process, self.mode = schedule, process, mode
        self.grid = TimeGrid(schedule, grid_size)
        self.check_weights = check_weights

        if process == "fdm":
            if target not in (None, "edm"):
                raise ValueError(f"process='fdm' trains the preconditioned denoiser; target must be None, got "
                                 f"{target!r}")
            if fdm_on not in ("input", "mean"):
                raise ValueError(f"fdm_on must be 'input' or 'mean', got {fdm_on!r}")
            if not (float(fdm_multiplier) > 0):
                raise ValueError(f"fdm_multiplier must be > 0, got {fdm_multiplier}")
            self.precond = Preconditioning(precond or Preconditioning.default_for(schedule), sigma_data)
            self.target = "edm"  # the F target of the preconditioning
            lo, hi = float(schedule.edm_sigma(schedule.t_min)), float(schedule.edm_sigma(schedule.t_max))
            # the multiplier m applies in every variant (FDM's VE reference drops it)
            self.fdm = S.FDMMomentum(m=float(fdm_multiplier), beta_min=fdm_beta_min, beta_d=fdm_beta_d,
                                     u_min=lo, u_max=hi, source="sigma", on=fdm_on)
        else:
            target = target or "eps"
            if target not in TARGETS:
                raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
            self.target, self.fdm = target, None
            self.precond = Preconditioning(precond or "edm", sigma_data) if target == "edm" else None
            if precond is not None and target != "edm":
                raise ValueError("precond is only used with target='edm' or process='fdm'")

        self.sampler = make_sampler(sampler, schedule, **(sampler_kwargs or {}))
        wkw = dict(weighting_kwargs or {})
        if weighting == "min_snr" and "target" not in wkw:
            wkw["target"] = self.target if self.target in ("eps", "x0", "v", "flow") else "x0"
        if weighting is None and process == "fdm":
            self.weighting = PreconditioningWeight(schedule, self.precond, n=grid_size)
        else:
            self.weighting = make_weighting(weighting, schedule, **wkw)
        if isinstance(warmup, WeightWarmup) or warmup is None:
            self.warmup = warmup
        else:
            self.warmup = WeightWarmup(warmup)
        self.network_time = network_time or default_network_time(schedule)
        self._sigma_nodes = PerDevice(lambda: self.schedule.edm_sigma(self.grid.nodes))
        self.last_t = self.last_weight = self.last_per_sample = self.last_mse = None

    # ------------------------------------------------------------------------------------------------------
    def _edm_sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.grid.discrete:  # exact at the nodes, one gather instead of an interpolation
            return self._sigma_nodes.on(t.device)[self.grid.cell_of(t)]
        return self.schedule.edm_sigma(t.to(torch.float64))

    def _noisy(self, x0, noise, t):
        """(network input, a, s, divisor d): x_in = (a x0 + s eps)/d is the denoiser's sigma-space input."""
        if self.process == "fdm":
            sig = self._edm_sigma(t)
            psd = self.precond.input_sigma_data() if self.fdm.on == "mean" else None
            xt, net_in, coefs = torch.ops.tdiff.noisy_sample(
                x0, noise, sig, S.KIND_EDM, [0.0] * 4, None, -1.0 if psd is None else psd,
                self.fdm.kernel_params(), fdm_code(self.fdm), True)
            a, s = coefs[:, 0], coefs[:, 1]
            return net_in, a, s, torch.ones_like(a)
        spec = self.schedule.kernel_spec()
        table = kernel_table(spec, x0.device)
        psd = self.precond.input_sigma_data() if self.precond is not None else None
        xt, net_in, coefs = torch.ops.tdiff.noisy_sample(
            x0, noise, t, spec.kind, [float(p) for p in spec.params], table, -1.0 if psd is None else psd, [], 0,
            psd is not None)
        a, s = coefs[:, 0], coefs[:, 1]
        return (net_in if psd is not None else xt), a, s, a

    def _target_coefficients(self, a, s, d):
        """Per-sample (A, C) with target = A x0 + C eps, and c^2 = |x0 error|^2 / |target error|^2."""
        if self.target == "eps":
            return None, None, (s / a) ** 2
        if self.target == "x0":
            return None, None, torch.ones_like(a)
        if self.target == "v":
            return -s, a, (s / (a * a + s * s)) ** 2
        if self.target == "flow":
            return -torch.ones_like(a), torch.ones_like(a), (s / (a + s)) ** 2
        sig = s / d
        c_skip, c_out = self.precond.c_skip(sig), self.precond.c_out(sig)
        return (1.0 - c_skip * a / d) / c_out, -c_skip * sig / c_out, c_out * c_out

    def _weights(self, t, scale2):
        w = self.weighting(t).to(scale2.dtype)
        if self.warmup is not None:
            w = self.warmup(w)
        if self.weighting.space == "x0":
            w = w * scale2
        if self.mode == "unbiased":
            w = w / self.sampler.relative_density(t).to(w.dtype)
        if self.check_weights:
            ok = torch.isfinite(w).all() & (w >= 0).all()
            if w.device.type == "cpu":
                if not bool(ok):
                    raise ValueError(f"loss weights must be finite and non-negative; got {w.tolist()[:8]} at "
                                     f"t={t.tolist()[:8]} from weighting {self.weighting.config()}")
            else:  # no host sync: a device-side assert
                torch._assert_async(ok, "tdiff DiffusionLoss: loss weights must be finite and non-negative")
        return w

    # ------------------------------------------------------------------------------------------------------
    def sample_t(self, batch: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return self.sampler.sample(batch, generator=generator, device=device, dtype=torch.float64)

    def __call__(self, model: Callable, x0: torch.Tensor, *, t: Optional[torch.Tensor] = None,
                 noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                 **cond) -> torch.Tensor:
        if not isinstance(x0, torch.Tensor) or x0.dim() < 2 or x0.shape[0] == 0:
            raise ValueError("x0 must be a (B, ...) tensor with B >= 1")
        b = x0.shape[0]
        if t is None:
            t = self.sample_t(b, x0.device, generator)
        elif t.shape != (b,):
            raise ValueError(f"t must have shape ({b},), got {tuple(t.shape)}")
        elif t.device.type == "cpu":  # caller-given times: check the domain where that costs no device sync
            self.schedule.check_t(t, "t")
        t = t.to(device=x0.device, dtype=torch.float64)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        with torch.no_grad():
            net_in, a, s, d = self._noisy(x0.detach(), noise, t)
            A, C, scale2 = self._target_coefficients(a.double(), s.double(), d.double())
            if A is None:
                target = noise if self.target == "eps" else x0.detach()
            else:
                shape = (-1,) + (1,) * (x0.dim() - 1)
                acc = torch.float64 if x0.dtype == torch.float64 else torch.float32
                target = A.to(acc).view(shape) * x0.to(acc) + C.to(acc).view(shape) * noise.to(acc)
            w = self._weights(t, scale2)
        pred = model(net_in, self.network_time(t).float(), **cond)
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
        sig = self.schedule.edm_sigma(t)  # exact between grid nodes too (samplers visit any t)
        nt = self.network_time(t).float()

        def per(v):
            return v.to(x.dtype).view(shape)

        if self.process == "fdm":
            scale = self.fdm.factor(sig) if self.fdm.on == "input" else self.precond.c_in(sig)
            return per(self.precond.c_skip(sig)) * x + per(self.precond.c_out(sig)) * model(per(scale) * x, nt, **cond)
        a = torch.rsqrt(1.0 + sig * sig) if self.schedule.family == "vp" else self.schedule.alpha(t)
        s = a * sig
        xt = per(a) * x
        if self.target == "edm":
            # the input training wrote (tdiff::noisy_sample): x_t itself without an input scaling, else
            # x_t / sqrt(s^2 + (sigma_data a)^2), which is the preconditioning's c_in(sigma) x
            psd = self.precond.input_sigma_data()
            inp = xt if psd is None else per(self.precond.c_in(sig)) * x
            return per(self.precond.c_skip(sig)) * x + per(self.precond.c_out(sig)) * model(inp, nt, **cond)
        out = model(xt, nt, **cond)
        if self.target == "eps":
            return x - per(sig) * out
        if self.target == "x0":
            return out
        if self.target == "v":
            return (per(a) * xt - per(s) * out) / per(a * a + s * s)
        return (xt - per(s) * out) / per(a + s)  # flow

    # ------------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """Call once per optimiser step (on every rank): advances the FDM weight warm-up."""
        if self.warmup is not None:
            self.warmup.step()

    def state_dict(self) -> dict:
        return {"warmup": None if self.warmup is None else self.warmup.state_dict(), "config": self.config()}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("warmup") is None) != (self.warmup is None):
            raise ValueError("state_dict warm-up presence does not match this loss (warmup=None on one side)")
        if self.warmup is not None:
            self.warmup.load_state_dict(state["warmup"])

    def config(self) -> dict:
        return {"schedule": self.schedule.config(), "sampler": self.sampler.config(),
                "weighting": self.weighting.config(), "process": self.process, "target": self.target,
                "mode": self.mode, "precond": None if self.precond is None else self.precond.kind,
                "fdm": None if self.fdm is None else self.fdm.kernel_params() + [self.fdm.on]}
