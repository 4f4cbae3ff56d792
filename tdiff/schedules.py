"""Noise schedules: one (alpha, sigma, lambda) interface for VP, VE, EDM and flow.

A schedule maps a time t to the coefficients of the forward process x_t = alpha(t) x0 + sigma(t) eps.
lambda(t) = log(alpha/sigma) is the half log-SNR that the solvers step in. The "EDM sigma" sigma/alpha =
exp(-lambda) is the noise level diffusers' schedulers and k-diffusion denoisers use.

Every closed form lives here once. Derivatives are taken by autograd from those closed forms, so a schedule
only has to write log_alpha, log_sigma and the inverse of lambda.

The fused kernels cannot call Python, so each schedule also describes itself as a `KernelSpec`: a kind code
and up to four float parameters (plus a uniform-grid table for discrete schedules). csrc/ and kernels/ evaluate
exactly the same formulas from that spec; tests check them against these methods.
"""
from __future__ import annotations

import abc

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import torch

TimeLike = Union[float, Sequence[float], torch.Tensor]

# Kind codes shared with csrc/noisy_sample.cpp and kernels/noisy_sample.py. Keep the three in step.
KIND_VP_LINEAR = 0  # params: beta0, beta1
KIND_VP_COSINE = 1  # params: s, log_alpha0 (= log cos(s/(1+s) pi/2))
KIND_TABLE_VP = 2  # params: t0, dt, n; table = log_alpha on the grid t0 + i dt (piecewise-linear)
KIND_VE = 3  # params: log_sigma_min, log_sigma_max  (alpha = 1, sigma = exp(lerp(t)))
KIND_EDM = 4  # alpha = 1, sigma = t
KIND_FLOW = 5  # alpha = 1 - t, sigma = t


@dataclass(frozen=True)
class KernelSpec:
    kind: int
    params: tuple  # four floats, unused ones zero
    table: Optional[torch.Tensor] = None  # only for KIND_TABLE_VP


def as_time(t: TimeLike, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Turn a float / list / tensor into a floating tensor (float64 unless it already is floating)."""
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.to(torch.float64)
    if t is None or isinstance(t, (str, bytes)):
        raise TypeError(f"times must be a number, a sequence of numbers or a tensor, got {type(t).__name__} {t!r}")
    return torch.as_tensor(t, dtype=torch.float64, device=None if like is None else like.device)


class NoiseSchedule(abc.ABC):
    """Base class. Subclasses define log_alpha, log_sigma, t_from_lambda and the domain."""

    #: closed domain of valid t for validation
    domain: tuple = (0.0, 1.0)
    #: default sampling interval [t_min, t_max] (t_max is where sampling starts)
    t_min: float = 1e-3
    t_max: float = 1.0
    #: "vp" (alpha^2 + sigma^2 = 1), "ve" (alpha = 1) or "flow"
    family: str = "vp"

    # ----- closed forms (subclasses) -----
    @abc.abstractmethod
    def log_alpha(self, t: TimeLike) -> torch.Tensor:
        """Subclasses define this."""

    @abc.abstractmethod
    def log_sigma(self, t: TimeLike) -> torch.Tensor:
        """Subclasses define this."""

    @abc.abstractmethod
    def t_from_lambda(self, lam: TimeLike) -> torch.Tensor:
        """Subclasses define this."""

    @abc.abstractmethod
    def kernel_spec(self) -> KernelSpec:
        """Subclasses define this."""

    # ----- derived quantities -----
    def check_t(self, t: TimeLike, name: str = "t") -> torch.Tensor:
        t = as_time(t)
        lo, hi = self.domain
        if t.dim() == 0 and t.dtype == torch.float64 and t.device.type == "cpu":
            # one time (an interval's end): the same checks on its value, one read instead of four tensor
            # reductions and their bool()s (~25 us; DM-NonUniform validates its interval three times a call). float64
            # only: torch compares a float32 tensor with the domain's ends rounded to float32
            v = t.item()
            if math.isfinite(v) and lo <= v <= hi:
                return t
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf; expected finite times in [{self.domain[0]}, "
                             f"{self.domain[1]}]")
        if t.numel() and (bool((t < lo).any()) or bool((t > hi).any())):
            raise ValueError(
                f"{name} is outside the domain of {type(self).__name__}: got values in "
                f"[{t.min().item():.6g}, {t.max().item():.6g}], expected [{lo}, {hi}]"
            )
        return t

    def log_alpha_sigma(self, t: TimeLike) -> tuple:
        """(log alpha, log sigma) at t, the schedule evaluated once where sigma follows from alpha (the VP
        schedules' log_sigma; an interpolated table, DiscreteVP's, would otherwise be searched twice)."""
        log_alpha = self.log_alpha(t)
        if type(self).log_sigma is _log_sigma_vp:
            return log_alpha, _vp_log_sigma(log_alpha)
        return log_alpha, self.log_sigma(t)

    def log_alpha_sigma_host(self, t: np.ndarray) -> Optional[tuple]:
        """(log alpha, log sigma) at float64 times t as numpy arrays: the same closed forms evaluated on the host,
        for the tables of a no-grad sampling call (a schedule evaluation there is ~20 torch ops on ~20 values,
        each a few microseconds of dispatch). None where the schedule has no host evaluation (the caller then
        evaluates it in torch)."""
        cls = type(self)
        if cls.log_sigma is not _log_sigma_vp or not _hosts_own_log_alpha(cls):
            return None
        log_alpha = self._log_alpha_host(t)
        return None if log_alpha is None else (log_alpha, _vp_log_sigma(log_alpha))

    def _log_alpha_host(self, t: np.ndarray) -> Optional[np.ndarray]:
        """log alpha at numpy times t, where the schedule's formula runs on numpy arrays (the VP schedules)."""
        return None

    def t_from_lambda_host(self, lam: np.ndarray) -> Optional[np.ndarray]:
        """`t_from_lambda` at float64 lambdas as a numpy array, where the schedule's inverse runs on the host (an
        interpolated table's: DM-NonUniform maps its result back per call, where ~15 torch dispatches cost more than
        its whole Newton step); None elsewhere."""
        return None

    def lambda_host(self, t: np.ndarray) -> Optional[np.ndarray]:
        """`lambda_` at float64 times t as a numpy array, by `log_alpha_sigma_host` (the same formula on the host);
        None where the schedule has none."""
        logs = self.log_alpha_sigma_host(t)
        return None if logs is None else logs[0] - logs[1]

    def alpha(self, t: TimeLike) -> torch.Tensor:
        return self.log_alpha(t).exp()

    def sigma(self, t: TimeLike) -> torch.Tensor:
        return self.log_sigma(t).exp()

    def lambda_(self, t: TimeLike) -> torch.Tensor:
        """Half log-SNR, log(alpha/sigma)."""
        return self.log_alpha(t) - self.log_sigma(t)

    def log_alpha_from_lambda(self, lam: TimeLike) -> torch.Tensor:
        """log alpha as a function of lambda, in closed form per family (no detour through t): VP alpha^2 =
        sigmoid(2 lambda), VE alpha = 1, flow alpha = sigmoid(lambda). log sigma is then log alpha - lambda. A numpy
        array gives a numpy array (the same closed forms on the host: DM-NonUniform evaluates them per objective
        evaluation, where torch's dispatch cost more than the arithmetic)."""
        host = isinstance(lam, np.ndarray)
        lam = lam if host else as_time(lam)
        if self.family == "vp":
            return _vp_log_alpha_from_lambda(lam)
        if self.family == "ve":
            return 0.0 * lam
        return -np.logaddexp(0.0, -lam) if host else torch.nn.functional.logsigmoid(lam)

    def log_alpha_slope_from_lambda(self, lam: np.ndarray) -> np.ndarray:
        """d log alpha / d lambda of `log_alpha_from_lambda`'s closed forms, on host numpy arrays (DM-NonUniform's
        complex-step Jacobian needs it per evaluation; a torch autograd call cost ~15% of one): VP sigmoid(-2 lambda)
        = sigma^2, VE 0, flow sigmoid(-lambda) = sigma. Written as torch's backward computes them, so the Jacobians
        are bit-identical to autograd's."""
        if self.family == "vp":
            return 1.0 / (1.0 + np.exp(2.0 * lam))
        if self.family == "ve":
            return np.zeros_like(lam)
        z = np.exp(-np.abs(lam))  # flow, as torch's log_sigmoid_backward
        return np.where(lam < 0, 1.0 - z / (1.0 + z), z / (1.0 + z))

    def edm_sigma(self, t: TimeLike) -> torch.Tensor:
        """The noise level sigma/alpha (diffusers' `sigmas`, k-diffusion's sigma)."""
        return (-self.lambda_(t)).exp()

    def t_from_edm_sigma(self, s: TimeLike) -> torch.Tensor:
        s = as_time(s)
        if torch.isnan(s).any() or bool((s <= 0).any()):
            raise ValueError("sigma must be positive and not NaN")
        return self.t_from_lambda(-s.log())

    def snr(self, t: TimeLike) -> torch.Tensor:
        return (2 * self.lambda_(t)).exp()

    def lambda_range(self) -> tuple:
        return float(self.lambda_(self.t_max)), float(self.lambda_(self.t_min))

    # Derivatives by autograd from the closed forms: one formula, every derivative.
    def _derivative(self, fn, t: TimeLike) -> torch.Tensor:
        t = as_time(t)
        with torch.enable_grad():
            tt = t.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(tt).sum(), tt, create_graph=t.requires_grad)
        return g

    def d_log_alpha(self, t: TimeLike) -> torch.Tensor:
        return self._derivative(self.log_alpha, t)

    def d_log_sigma(self, t: TimeLike) -> torch.Tensor:
        return self._derivative(self.log_sigma, t)

    def d_lambda(self, t: TimeLike) -> torch.Tensor:
        return self._derivative(self.lambda_, t)

    def d_sigma(self, t: TimeLike) -> torch.Tensor:
        return self._derivative(self.sigma, t)

    def d_alpha(self, t: TimeLike) -> torch.Tensor:
        return self._derivative(self.alpha, t)

    def config(self) -> dict:
        """A JSON-able description, stored in saved artefacts to refuse mismatches."""
        return {"class": type(self).__name__}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "class")
        return f"{type(self).__name__}({args})"


def check_param(cls: str, name: str, value, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = True,
                hi_open: bool = True) -> float:
    """A finite real constructor argument inside (lo, hi) (closed ends where *_open is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, torch.Tensor) and value.numel() == 1):
        raise ValueError(f"{cls} {name} must be a number, got {value!r}")
    v = float(value)
    inside = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not math.isfinite(v) or not inside:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{cls} {name} must be finite and in {lb}{lo}, {hi}{rb}, got {value!r}")
    return v


_HOSTS_OWN_LOG_ALPHA: dict = {}


def _hosts_own_log_alpha(cls) -> bool:
    """Whether cls's _log_alpha_host is defined with its log_alpha (a subclass that overrides log_alpha alone is
    evaluated in torch, with its own formula)."""
    if cls not in _HOSTS_OWN_LOG_ALPHA:
        owner = lambda name: next(c for c in cls.__mro__ if name in c.__dict__)  # noqa: E731
        _HOSTS_OWN_LOG_ALPHA[cls] = owner("_log_alpha_host") is owner("log_alpha")
    return _HOSTS_OWN_LOG_ALPHA[cls]


def _lerp(x, x0, y0, rise, run):
    """y0 + (x - x0) rise/run: the linear interpolation of the tabulated schedules (tensors or numpy arrays)."""
    return y0 + (x - x0) * rise / run


def _vp_log_sigma(log_alpha):
    # sigma = sqrt(1 - alpha^2), computed stably near alpha -> 1 (a tensor, or a numpy array on the host)
    if isinstance(log_alpha, np.ndarray):
        return 0.5 * np.log(-np.expm1(2.0 * log_alpha))
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _log_sigma_vp(self, t):
    """log sigma of a VP schedule (alpha^2 + sigma^2 = 1), from its log alpha: the VP classes' log_sigma."""
    return _vp_log_sigma(self.log_alpha(t))


def _vp_log_alpha_from_lambda(lam):
    # alpha^2 = 1 / (1 + exp(-2 lambda)) (a tensor, or a numpy array on the host)
    if isinstance(lam, np.ndarray):
        return -0.5 * np.logaddexp(0.0, -2.0 * lam)
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class VPLinear(NoiseSchedule):
    """Continuous VP with linear beta(t) (Song et al.): log alpha = -t^2 (b1-b0)/4 - t b0/2, t in [0, 1]."""

    family = "vp"

    def __init__(self, beta0: float = 0.1, beta1: float = 20.0, t_min: float = 1e-3):
        beta0 = check_param("VPLinear", "beta0", beta0, 0.0)
        beta1 = check_param("VPLinear", "beta1", beta1, beta0)
        self.beta0, self.beta1 = beta0, beta1
        self.t_min = check_param("VPLinear", "t_min", t_min, 0.0, 1.0, lo_open=False)

    def log_alpha(self, t):
        return self._log_alpha_host(as_time(t))

    def _log_alpha_host(self, t):  # plain arithmetic: the one formula for tensors and numpy arrays
        return -0.25 * t * t * (self.beta1 - self.beta0) - 0.5 * t * self.beta0

    log_sigma = _log_sigma_vp

    def t_from_lambda(self, lam):
        lam = as_time(lam)
        tmp = 2.0 * (self.beta1 - self.beta0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta0) / (self.beta1 - self.beta0)

    def kernel_spec(self):
        return KernelSpec(KIND_VP_LINEAR, (self.beta0, self.beta1, 0.0, 0.0))

    def config(self):
        return {"class": "VPLinear", "beta0": self.beta0, "beta1": self.beta1, "t_min": self.t_min}


class VPCosine(NoiseSchedule):
    """Continuous cosine VP (Nichol & Dhariwal), alpha(t) = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)."""

    family = "vp"

    def __init__(self, s: float = 0.008, t_min: float = 1e-3, t_max: float = 0.9946):
        # alpha reaches 0 at t = 1, where lambda is -inf: t_max must stay below it
        self.s = check_param("VPCosine", "s", s, 0.0)
        self.t_max = check_param("VPCosine", "t_max", t_max, 0.0, 1.0)
        self.t_min = check_param("VPCosine", "t_min", t_min, 0.0, self.t_max, lo_open=False)
        self.domain = (0.0, self.t_max)
        self._log_alpha0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t):
        t = as_time(t)
        return torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha0

    log_sigma = _log_sigma_vp

    def t_from_lambda(self, lam):
        log_alpha = _vp_log_alpha_from_lambda(as_time(lam))
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(log_alpha + self._log_alpha0)) - self.s

    def kernel_spec(self):
        return KernelSpec(KIND_VP_COSINE, (self.s, self._log_alpha0, 0.0, 0.0))

    def config(self):
        return {"class": "VPCosine", "s": self.s, "t_min": self.t_min, "t_max": self.t_max}


def betas_from_diffusers_config(config) -> torch.Tensor:
    """The betas a diffusers DDPM-family scheduler builds from its config (trained_betas, linear,
    scaled_linear, squaredcos_cap_v2), in float64."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    trained = get("trained_betas", None)
    n = int(get("num_train_timesteps", 1000))
    b0, b1 = float(get("beta_start", 1e-4)), float(get("beta_end", 0.02))
    kind = get("beta_schedule", "linear")
    if trained is not None:
        return torch.as_tensor(trained, dtype=torch.float64)
    if kind == "linear":
        return torch.linspace(b0, b1, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(b0**0.5, b1**0.5, n, dtype=torch.float64) ** 2
    if kind == "squaredcos_cap_v2":
        f = lambda x: math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(
        f"beta_schedule={kind!r} is not supported; expected 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
    )


#: diffusers' schedulers whose rescaled (zero-terminal-SNR) alphas_cumprod end at 2**-24 instead of 0
_ZERO_SNR_CLAMPED = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 (Algorithm 1), as diffusers' rescale_betas_zero_snr: shift and scale sqrt(alphas_cumprod)
    so that the last is 0 and the first unchanged; returns the betas (the last is 1)."""
    ab = torch.cumprod(1 - betas, 0).sqrt()
    a0, a_t = ab[0].clone(), ab[-1].clone()
    ab = (ab - a_t) * (a0 / (a0 - a_t))
    ac = ab**2
    return 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])


class DiscreteVP(NoiseSchedule):
    """A discrete DDPM schedule (betas over N training steps), made continuous as in DPM-Solver:
    t_i = (i+1)/N for training index i, log alpha piecewise-linear in t between the nodes.

    Zero terminal SNR (Lin et al. 2024; diffusers' rescale_betas_zero_snr): alphas_cumprod may end at exactly 0
    (the last beta is 1). log alpha is then -inf at t = 1 (lambda = -inf: pure noise), and on the last segment
    alpha, not log alpha, is interpolated linearly, so every node is still exact and the curve stays finite
    inside. The fused kernels (noisy_sample) do not take such a table."""

    family = "vp"
    DOMAIN_SLACK = 1e-6

    def __init__(self, betas=None, alphas_cumprod=None):
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVP needs exactly one of betas or alphas_cumprod")
        if betas is not None:
            betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
            if betas.numel() < 2 or not bool(torch.isfinite(betas).all()) or bool((betas <= 0).any()) \
                    or bool((betas[:-1] >= 1).any()) or bool((betas[-1:] > 1).any()):
                raise ValueError("betas must hold at least 2 finite values, each in (0, 1) (the last may be 1: "
                                 "zero terminal SNR)")
            ac = torch.cumprod(1 - betas, 0)
        else:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            if ac.numel() < 2 or not bool(torch.isfinite(ac).all()) or bool((ac[:-1] <= 0).any()) \
                    or bool((ac[-1:] < 0).any()) or bool((ac >= 1).any()):
                raise ValueError("alphas_cumprod must hold at least 2 finite values, each in (0, 1) (the last may be "
                                 "0: zero terminal SNR)")
            if bool((ac[1:] >= ac[:-1]).any()):
                i = int((ac[1:] >= ac[:-1]).nonzero()[0]) + 1
                raise ValueError(f"alphas_cumprod must be strictly decreasing; alphas_cumprod[{i}]={float(ac[i]):.6g} >= "
                                 f"alphas_cumprod[{i - 1}]={float(ac[i - 1]):.6g} (diffusers' rescale_betas_zero_snr "
                                 f"clamps the last value to 2**-24, above the one before it for some beta schedules: "
                                 f"the noise level is then not monotone, which tdiff does not reproduce)")
        log_alpha = 0.5 * ac.log()
        self.n = log_alpha.numel()
        self.zero_terminal_snr = bool(ac[-1] == 0)
        self.log_alpha_table = log_alpha
        self.t_table = torch.linspace(0.0, 1.0, self.n + 1, dtype=torch.float64)[1:]
        self.t_min, self.t_max = 1.0 / self.n, 1.0
        # diffusers' schedulers round their sigmas to float32, which can put the largest one up to ~1e-7 (relative)
        # above this table's last noise level: times that far beyond t = 1 are accepted (linear extrapolation)
        self.domain = (0.0, 1.0 + self.DOMAIN_SLACK)
        self._tables_like: dict = {}

    @classmethod
    def from_diffusers(cls, scheduler_or_config) -> "DiscreteVP":
        """From a diffusers scheduler (its alphas_cumprod) or a scheduler config dict (rescale_betas_zero_snr
        included: the last alphas_cumprod is 0, or 2**-24 for the schedulers that clamp it)."""
        ac = getattr(scheduler_or_config, "alphas_cumprod", None)
        if ac is not None:
            return cls(alphas_cumprod=torch.as_tensor(ac).detach().to(torch.float64))
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        betas = betas_from_diffusers_config(config)
        if not get("rescale_betas_zero_snr", False):
            return cls(betas=betas)
        ac = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
        if get("_class_name", None) in _ZERO_SNR_CLAMPED:
            ac[-1] = 2.0**-24
        return cls(alphas_cumprod=ac)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return (2 * self.log_alpha_table).exp()

    def _tables(self, like: torch.Tensor) -> tuple:
        """(t, log alpha, log alpha reversed, t reversed) in like's dtype and device, made once per pair (a copy,
        and on a GPU a sync, at every schedule evaluation otherwise). With zero terminal SNR the -inf node is
        replaced by a finite stand-in (the last segment is evaluated separately), so no inf enters a gradient."""
        key = (like.dtype, like.device)
        if not torch.compiler.is_compiling():  # (a traced graph holds its tables as constants: no version there)
            self._tables_like = self._of_tables("_tables_like_of", dict)  # emptied if a table changed
        if key not in self._tables_like:
            la = self.log_alpha_table
            if self.zero_terminal_snr:
                la = torch.cat([la[:-1], la[-2:-1] - 1.0])
            t, la = self.t_table.to(like), la.to(like)
            self._tables_like[key] = (t, la, la.flip(0), t.flip(0))
        return self._tables_like[key]

    @staticmethod
    def _interp(x, xp, fp):
        # piecewise-linear with linear extrapolation at both ends (DPM-Solver's interpolate_fn); tensors, or numpy
        # arrays on the host (the same formula)
        if isinstance(x, np.ndarray):
            idx = np.minimum(np.maximum(np.searchsorted(xp, x), 1), len(xp) - 1)
        else:
            idx = torch.searchsorted(xp, x.detach().contiguous()).clamp(1, xp.numel() - 1)
        x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
        return _lerp(x, x0, y0, y1 - y0, x1 - x0)

    def _host_segments(self) -> tuple:
        """(t_table, segments) as numpy arrays: per searchsorted position i in [0, N] of a time in t_table, the
        segment `_interp` uses there (the first or last one outside the table) as four tables t0, log alpha 0, its
        rise and its run, made once per table, so a host evaluation is one search, four gathers (`take`: a fifth
        of fancy indexing's cost) and four operations (`_interp` is 14 on ~20 values, each ~1 us of numpy's call
        overhead). The same values as `_interp`'s: the differences of the same nodes."""
        def make():
            xp, fp = self.t_table.numpy(), self.log_alpha_table.numpy()
            j = np.minimum(np.maximum(np.arange(len(xp) + 1), 1), len(xp) - 1)
            return xp, (xp[j - 1], fp[j - 1], fp[j] - fp[j - 1], xp[j] - xp[j - 1])

        return self._of_tables("_segments_of", make)

    def _of_tables(self, name: str, make):
        """make(), made once per state of the tables: kept as self.<name> with the tables it was made from and their
        versions, and remade if either table is replaced or written in place."""
        t_table, la_table = self.t_table, self.log_alpha_table
        versions = (t_table._version, la_table._version)
        held = self.__dict__.get(name)
        if held is None or held[0] is not t_table or held[1] is not la_table or held[2] != versions:
            held = (t_table, la_table, versions, make())
            self.__dict__[name] = held
        return held[3]

    def log_alpha(self, t):
        t = as_time(t)
        t_table, log_alpha_table, _, _ = self._tables(t)
        out = self._interp(t, t_table, log_alpha_table)
        if self.zero_terminal_snr:  # alpha linear in t on the last segment, down to alpha = 0 at t = 1
            t0, t1, y0 = t_table[-2], t_table[-1], log_alpha_table[-2]
            w = ((t - t0) / (t1 - t0)).clamp(max=1.0)
            out = torch.where(t > t0, y0 + torch.log1p(-w.clamp(min=0.0)), out)
        return out

    def _log_alpha_host(self, t):
        if self.zero_terminal_snr:
            return None  # its last segment is the torch path's alone
        xp, segments = self._host_segments()
        at = xp.searchsorted(t)
        return _lerp(t, *(table.take(at) for table in segments))

    log_sigma = _log_sigma_vp

    def t_from_lambda(self, lam):
        log_alpha = _vp_log_alpha_from_lambda(as_time(lam))
        t_table, la_table, log_alpha_reversed, t_reversed = self._tables(log_alpha)
        out = self._interp(log_alpha, log_alpha_reversed, t_reversed)
        if self.zero_terminal_snr:
            t0, t1, y0 = t_table[-2], t_table[-1], la_table[-2]
            w = -torch.expm1((log_alpha - y0).clamp(max=0.0))  # 1 - alpha/alpha_0
            out = torch.where(log_alpha < y0, t0 + w * (t1 - t0), out)
        return out

    def t_from_lambda_host(self, lam: np.ndarray) -> Optional[np.ndarray]:
        if self.zero_terminal_snr or self.t_table.device.type != "cpu" or self.t_table.dtype != torch.float64:
            return None  # the last segment with zero terminal SNR is the torch path's alone
        _, _, log_alpha_reversed, t_reversed = self._tables(self.t_table)
        return self._interp(_vp_log_alpha_from_lambda(lam), log_alpha_reversed.numpy(), t_reversed.numpy())

    def t_from_index(self, i: TimeLike) -> torch.Tensor:
        """Training index i in [0, N-1] (diffusers' timestep) -> continuous t = (i+1)/N."""
        return (as_time(i) + 1.0) / self.n

    def index_from_t(self, t: TimeLike) -> torch.Tensor:
        """Continuous t -> (fractional) diffusers timestep N t - 1 (a numpy array stays one: the sampling loop's
        no-grad network times, denoisers._host_times)."""
        return (t if isinstance(t, np.ndarray) else as_time(t)) * self.n - 1.0

    def kernel_spec(self):
        if self.zero_terminal_snr:
            raise ValueError("the fused kernels do not support a zero-terminal-SNR DiscreteVP (alpha = 0 at t = 1)")
        return KernelSpec(KIND_TABLE_VP, (1.0 / self.n, 1.0 / self.n, float(self.n), 0.0), self.log_alpha_table)

    def config(self):
        # a short fingerprint of the table rather than all N values
        if self.zero_terminal_snr:
            return {"class": "DiscreteVP", "n": self.n, "zero_terminal_snr": True,
                    "log_alpha_sum": round(float(self.log_alpha_table[:-1].sum()), 9)}
        return {"class": "DiscreteVP", "n": self.n, "log_alpha_sum": round(float(self.log_alpha_table.sum()), 9)}


class VE(NoiseSchedule):
    """Variance exploding (SMLD): alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^t, t in [0, 1]."""

    family = "ve"

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0, t_min: float = 0.0):
        sigma_min = check_param("VE", "sigma_min", sigma_min, 0.0)
        sigma_max = check_param("VE", "sigma_max", sigma_max, sigma_min)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min = check_param("VE", "t_min", t_min, 0.0, 1.0, lo_open=False)
        self._lmin, self._lmax = math.log(sigma_min), math.log(sigma_max)

    def log_alpha(self, t):
        return 0.0 * as_time(t)  # keeps the graph, so derivatives (zero) exist

    def log_sigma(self, t):
        t = as_time(t)
        return self._lmin + t * (self._lmax - self._lmin)

    def t_from_lambda(self, lam):
        return (-as_time(lam) - self._lmin) / (self._lmax - self._lmin)

    def kernel_spec(self):
        return KernelSpec(KIND_VE, (self._lmin, self._lmax, 0.0, 0.0))

    def config(self):
        return {"class": "VE", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class EDM(NoiseSchedule):
    """Karras et al.: alpha = 1, sigma = t. Any t > 0 is valid; sampling runs over [sigma_min, sigma_max]."""

    family = "ve"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        self.t_min = check_param("EDM", "sigma_min", sigma_min, 0.0)
        self.t_max = check_param("EDM", "sigma_max", sigma_max, self.t_min)
        self.sigma_data = check_param("EDM", "sigma_data", sigma_data, 0.0)
        self.domain = (0.0, math.inf)

    def check_t(self, t, name="t"):
        t = super().check_t(t, name)
        if bool((t <= 0).any()):
            raise ValueError(f"{name} must be positive for EDM (t is sigma)")
        return t

    def log_alpha(self, t):
        return 0.0 * as_time(t)  # keeps the graph, so derivatives (zero) exist

    def log_sigma(self, t):
        return torch.log(as_time(t))

    def t_from_lambda(self, lam):
        return torch.exp(-as_time(lam))

    def kernel_spec(self):
        return KernelSpec(KIND_EDM, (0.0, 0.0, 0.0, 0.0))

    def config(self):
        return {"class": "EDM", "sigma_min": self.t_min, "sigma_max": self.t_max, "sigma_data": self.sigma_data}


class RectifiedFlow(NoiseSchedule):
    """Flow matching / rectified flow: alpha = 1 - t, sigma = t, t in [0, 1].
    lambda is infinite at both ends, so the default sampling interval stays just inside them."""

    family = "flow"

    def __init__(self, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3):
        # lambda is infinite at both ends of [0, 1]: the default sampling interval stays inside
        self.t_max = check_param("RectifiedFlow", "t_max", t_max, 0.0, 1.0)
        self.t_min = check_param("RectifiedFlow", "t_min", t_min, 0.0, self.t_max)

    def log_alpha(self, t):
        return torch.log1p(-as_time(t))

    def log_sigma(self, t):
        return torch.log(as_time(t))

    # the closed forms themselves (exact, and with finite derivatives at t = 0 and 1, where a log is infinite)
    def alpha(self, t):
        return 1.0 - as_time(t)

    def sigma(self, t):
        return 1.0 * as_time(t)

    def t_from_lambda(self, lam):
        return torch.sigmoid(-as_time(lam))  # t = 1/(1+e^lambda)

    def kernel_spec(self):
        return KernelSpec(KIND_FLOW, (0.0, 0.0, 0.0, 0.0))

    def config(self):
        return {"class": "RectifiedFlow", "t_min": self.t_min, "t_max": self.t_max}


@dataclass(frozen=True)
class FDMMomentum:
    """FDM's momentum factor e^{-mB(t')}(1 + mB(t')), B(t') = beta_min t' + beta_d t'^2 / 2 (paper Eq. 13/15).

    t' = (u - u_min)/(u_max - u_min) where u is the EDM sigma (source="sigma", FDM's EDM/VE/VP preconditioners)
    or the schedule time (source="time"). `on` says where the factor goes: "input" scales the network input
    (FDM's reference code and Table 1), "mean" scales x0 in the forward process (paper Eq. 15).
    """

    m: float = 2.0
    beta_min: float = 0.1
    beta_d: float = 19.9
    u_min: float = 0.002
    u_max: float = 80.0
    source: str = "sigma"
    on: str = "input"

    def __post_init__(self):
        check_param("FDMMomentum", "m", self.m, 0.0, lo_open=False)
        check_param("FDMMomentum", "beta_min", self.beta_min, 0.0, lo_open=False)
        check_param("FDMMomentum", "beta_d", self.beta_d, 0.0, lo_open=False)
        check_param("FDMMomentum", "u_min", self.u_min)
        check_param("FDMMomentum", "u_max", self.u_max, self.u_min)
        if self.source not in ("sigma", "time"):
            raise ValueError(f"FDMMomentum.source must be 'sigma' or 'time', got {self.source!r}")
        if self.on not in ("input", "mean"):
            raise ValueError(f"FDMMomentum.on must be 'input' or 'mean', got {self.on!r}")
        if not (self.u_max > self.u_min) or self.m < 0:
            raise ValueError(f"FDMMomentum needs u_max > u_min and m >= 0, got {self}")

    def factor(self, u: torch.Tensor) -> torch.Tensor:
        tp = (u - self.u_min) / (self.u_max - self.u_min)
        mb = self.m * (self.beta_min * tp + 0.5 * self.beta_d * tp * tp)
        return torch.exp(-mb) * (1.0 + mb)

    def kernel_params(self) -> list:
        """[m, beta_min, beta_d, u_min, u_max, source(0 sigma / 1 time)] for the fused kernels."""
        return [self.m, self.beta_min, self.beta_d, self.u_min, self.u_max, 0.0 if self.source == "sigma" else 1.0]


def schedule_from_kernel_spec(kind: int, params, table: Optional[torch.Tensor] = None) -> NoiseSchedule:
    """Rebuild the schedule a kernel spec describes, so the pure-PyTorch reference ops evaluate the very same
    closed forms as this module (the kernels re-express them in C++/Triton and are tested against these)."""
    p = list(params) + [0.0] * 4
    if kind == KIND_VP_LINEAR:
        return VPLinear(p[0], p[1])
    if kind == KIND_VP_COSINE:
        return VPCosine(p[0])
    if kind == KIND_TABLE_VP:
        if table is None:
            raise ValueError("a discrete (table) schedule spec needs its log-alpha table")
        return DiscreteVP(alphas_cumprod=(2 * table.double()).exp())
    if kind == KIND_VE:
        return VE(math.exp(p[0]), math.exp(p[1]))
    if kind == KIND_EDM:
        return EDM()
    if kind == KIND_FLOW:
        return RectifiedFlow()
    raise ValueError(f"unknown schedule kind {kind}; expected 0..5")


_REGISTRY = {c.__name__: c for c in (VPLinear, VPCosine, VE, EDM, RectifiedFlow)}


def from_config(config: dict) -> NoiseSchedule:
    """Rebuild a continuous schedule from `config()` (DiscreteVP needs its betas and is not rebuilt here)."""
    cfg = dict(config)
    cls = _REGISTRY.get(cfg.pop("class", None))
    if cls is None:
        raise ValueError(f"cannot rebuild schedule from {config!r}; known: {sorted(_REGISTRY)}")
    return cls(**cfg)


__all__ = [
    "NoiseSchedule", "VPLinear", "VPCosine", "DiscreteVP", "VE", "EDM", "RectifiedFlow", "KernelSpec",
    "betas_from_diffusers_config", "from_config", "as_time", "FDMMomentum", "schedule_from_kernel_spec",
]
