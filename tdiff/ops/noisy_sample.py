"""Fused noisy-sample construction: x_t = a(t) x0 + s(t) eps, and optionally the network input c x_t.

The per-sample coefficients are computed inside the kernel from a (B,) tensor of times and the schedule's
KernelSpec, so the training hot path is one pass over the data with no host-side coefficient tensors:

  a, s   = alpha(t), sigma(t) of the schedule                       (FDM "mean" mode: a *= momentum factor)
  c      = c_in = 1/sqrt(s^2 + sigma_data^2 a^2)  if preconditioned  (EDM's c_in when a = 1; 1 for VP, sigma_d = 1)
           else 1                                                     (FDM "input" mode: c *= momentum factor)

Ops (schemas under tdiff::):
  noisy_sample(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input)
      -> (x_t, net_in, coefs)       net_in is empty unless write_input; coefs is (B, 3) = [a, s, c]
  noisy_sample_backward(grad_xt, grad_in, coefs) -> (grad_x0, grad_eps)
"""
from __future__ import annotations

import importlib
import math
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import schedules as S
from . import dispatch

FDM_OFF, FDM_ON_INPUT, FDM_ON_MEAN = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------
# Reference (the test oracle and the fallback). Coefficients come from tdiff.schedules' own closed forms.
# ---------------------------------------------------------------------------------------------------------------
def coefficients_reference(t: Tensor, kind: int, params: List[float], table: Optional[Tensor],
                           precond_sigma_data: float, fdm: List[float], fdm_on: int) -> Tensor:
    """(B, 3) float64 [a, s, c] for each time in t."""
    sched = S.schedule_from_kernel_spec(kind, params, table)
    td = t.detach().to(torch.float64)
    a, s = sched.alpha(td), sched.sigma(td)
    c = torch.ones_like(a) if precond_sigma_data < 0 else torch.rsqrt(s * s + precond_sigma_data**2 * a * a)
    if fdm_on != FDM_OFF:
        m, bmin, bd, umin, umax, src = fdm
        factor = S.FDMMomentum(m, bmin, bd, umin, umax, "sigma" if src == 0 else "time").factor(
            s / a if src == 0 else td)
        if fdm_on == FDM_ON_INPUT:
            c = c * factor
        else:
            a = a * factor
    return torch.stack([a, s, c], dim=1)


def noisy_sample_reference(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input):
    coefs = coefficients_reference(t, kind, params, table, precond_sigma_data, fdm, fdm_on)
    acc = dispatch.coef_dtype(x0)
    cf = coefs.to(acc)
    a, s, c = (dispatch.per_sample(cf[:, i], x0) for i in range(3))
    xt = a * x0.to(acc) + s * eps.to(acc)
    net_in = (c * xt).to(x0.dtype) if write_input else x0.new_empty(0)
    return xt.to(x0.dtype).contiguous(), net_in.contiguous(), cf


def noisy_sample_backward_reference(grad_xt, grad_in, coefs):
    acc = coefs.dtype
    a, s, c = (dispatch.per_sample(coefs[:, i], grad_xt) for i in range(3))
    g = grad_xt.to(acc)
    if grad_in.numel():
        g = g + c * grad_in.to(acc)
    return (a * g).to(grad_xt.dtype).contiguous(), (s * g).to(grad_xt.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by every backend
# ---------------------------------------------------------------------------------------------------------------
def _validate(x0: Tensor, eps: Tensor, t: Tensor, kind: int, params: List[float], table: Optional[Tensor],
              fdm: List[float], fdm_on: int) -> None:
    for name, v in (("x0", x0), ("eps", eps), ("t", t)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    dispatch.check_float("x0", x0)
    dispatch.check_same("x0", x0, "eps", eps)
    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must have a non-empty batch dimension, got shape {tuple(x0.shape)}")
    if t.dim() != 1 or t.shape[0] != x0.shape[0]:
        raise ValueError(f"t must have shape ({x0.shape[0]},) (one time per sample), got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"t must be a floating tensor, got {t.dtype}")
    if t.device != x0.device:
        raise ValueError(f"t must be on the device of x0 ({x0.device}), got {t.device}")
    if not 0 <= kind <= 5:
        raise ValueError(f"kind must be a schedule kind code 0..5, got {kind}")
    if len(params) != 4:
        raise ValueError(f"params must hold 4 floats, got {len(params)}")
    if kind == S.KIND_TABLE_VP:
        if (table is None or table.dim() != 1 or table.numel() < 2 or table.numel() != params[2]
                or table.dtype != torch.float64):
            raise ValueError("a discrete schedule needs a float64 table of log-alpha with params[2] >= 2 entries")
        if table.device != x0.device:
            raise ValueError(f"table must be on the device of x0 ({x0.device}), got {table.device}")
        if not (math.isfinite(params[1]) and params[1] > 0):
            raise ValueError(f"a discrete schedule's grid step params[1] must be finite and positive, got {params[1]}")
    elif table is not None:
        raise ValueError(f"table is only for a discrete schedule (kind {S.KIND_TABLE_VP}), got kind {kind}")
    if fdm_on not in (FDM_OFF, FDM_ON_INPUT, FDM_ON_MEAN):
        raise ValueError(f"fdm_on must be 0 (off), 1 (input) or 2 (mean), got {fdm_on}")
    if fdm_on != FDM_OFF and len(fdm) != 6:
        raise ValueError(f"fdm must hold 6 floats [m, beta_min, beta_d, u_min, u_max, source], got {len(fdm)}")


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------
def _forward_impl(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input):
    _validate(x0, eps, t, kind, params, table, fdm, fdm_on)
    return dispatch.route(x0, "noisy_sample_cpu", "tdiff.kernels.noisy_sample:noisy_sample_triton",
                          noisy_sample_reference, x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on,
                          write_input)


@torch.library.custom_op("tdiff::noisy_sample", mutates_args=())
def noisy_sample_op(x0: Tensor, eps: Tensor, t: Tensor, kind: int, params: List[float], table: Optional[Tensor],
                    precond_sigma_data: float, fdm: List[float], fdm_on: int,
                    write_input: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input)


@noisy_sample_op.register_fake
def _(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input):
    _validate(x0, eps, t, kind, params, table, fdm, fdm_on)
    net_in = torch.empty_like(x0, memory_format=torch.contiguous_format) if write_input else x0.new_empty(0)
    coefs = x0.new_empty((x0.shape[0], 3), dtype=dispatch.coef_dtype(x0))
    return torch.empty_like(x0, memory_format=torch.contiguous_format), net_in, coefs


def _backward_impl(grad_xt, grad_in, coefs):
    if grad_in.numel():
        dispatch.check_same("grad_xt", grad_xt, "grad_in", grad_in)
    if coefs.dim() != 2 or coefs.shape != (grad_xt.shape[0], 3):
        raise ValueError(f"coefs must have shape ({grad_xt.shape[0]}, 3), got {tuple(coefs.shape)}")
    return dispatch.route(grad_xt, "noisy_sample_backward_cpu",
                          "tdiff.kernels.noisy_sample:noisy_sample_backward_triton",
                          noisy_sample_backward_reference, grad_xt, grad_in, coefs)


@torch.library.custom_op("tdiff::noisy_sample_backward", mutates_args=())
def noisy_sample_backward_op(grad_xt: Tensor, grad_in: Tensor, coefs: Tensor) -> Tuple[Tensor, Tensor]:
    return _backward_impl(grad_xt, grad_in, coefs)


@noisy_sample_backward_op.register_fake
def _(grad_xt, grad_in, coefs):
    out = torch.empty_like(grad_xt, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[2])
    ctx.write_input = inputs[-1]


def _input_grads(ctx, grad_xt, grad_in, backward):
    (coefs,) = ctx.saved_tensors
    if grad_xt is None:
        grad_xt = torch.zeros_like(grad_in)
    if grad_in is None or not ctx.write_input:
        grad_in = grad_xt.new_empty(0)
    g_x0, g_eps = backward(grad_xt.contiguous(), grad_in.contiguous(), coefs)
    return g_x0, g_eps, None, None, None, None, None, None, None, None


def _backward(ctx, grad_xt, grad_in, _grad_coefs):
    return _input_grads(ctx, grad_xt, grad_in, torch.ops.tdiff.noisy_sample_backward)


noisy_sample_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerNoisySample(torch.autograd.Function):
    """The same forward/backward as the registered op, without the custom-op dispatch layer (tens of microseconds
    per call in eager mode). torch.compile traces the registered op instead."""

    @staticmethod
    def forward(*args):
        return _forward_impl(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup_context(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_xt, grad_in, _grad_coefs):
        return _input_grads(ctx, grad_xt, grad_in, _backward_impl)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
# id(table) -> {device: float64 copy}; an entry lives as long as its table (tensors compare elementwise, so they
# cannot be WeakKeyDictionary keys)
_TABLES_ON_DEVICE: dict = {}


def kernel_table(spec: S.KernelSpec, device: torch.device) -> Optional[Tensor]:
    """The spec's schedule table in float64 on `device`, copied there once per table and device (a copy, and on a
    GPU a host sync, on every call otherwise)."""
    if spec.table is None:
        return None
    if torch.compiler.is_compiling():
        # traced: a graph-local copy (the cache below is module state, which a trace must not mutate)
        return spec.table.to(device=device, dtype=torch.float64)
    per_device = _TABLES_ON_DEVICE.get(id(spec.table))
    if per_device is None:
        per_device = _TABLES_ON_DEVICE[id(spec.table)] = {}
        weakref.finalize(spec.table, _TABLES_ON_DEVICE.pop, id(spec.table), None)
    if device not in per_device:
        per_device[device] = spec.table.to(device=device, dtype=torch.float64)
    return per_device[device]


def fdm_code(fdm: Optional[S.FDMMomentum]) -> int:
    """The kernels' code for where FDM's factor goes: off, on the network input, or on the mean."""
    return FDM_OFF if fdm is None else (FDM_ON_INPUT if fdm.on == "input" else FDM_ON_MEAN)


def _spec_args(schedule: S.NoiseSchedule) -> tuple:
    """(kind, params, spec) of a schedule for the kernels (the table goes through kernel_table, per device)."""
    if not isinstance(schedule, S.NoiseSchedule):
        raise TypeError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
    spec = schedule.kernel_spec()
    return spec.kind, [float(p) for p in spec.params], spec


# id(schedule) -> (snapshot of its attributes, kind, params, spec, samplers): what the kernels need from a schedule,
# made once per schedule. Building it (kernel_spec(), the params list) costs more than an in-cache data pass's share
# of a small op. The snapshot holds the attribute objects themselves, so reassigning an attribute (a new float, a
# new tensor) misses and rebuilds the entry; an entry lives as long as its schedule. samplers:
# (precond_sigma_data, FDM arguments) -> tdiff._C.NoisySampler, the C++ op with these arguments resolved (the eager
# CPU fast path).
_SCHEDULE_ARGS: dict = {}
_MAX_SAMPLERS = 16  # per schedule; a caller cycling through more precond/FDM settings rebuilds them


def _schedule_entry(schedule: S.NoiseSchedule) -> tuple:
    """The schedule's _SCHEDULE_ARGS entry, rebuilt when stale."""
    state = getattr(schedule, "__dict__", None)
    entry = _SCHEDULE_ARGS.get(id(schedule))
    if entry is not None:
        try:
            if entry[0] == state:  # by identity first: the same objects compare equal without a tensor op
                return entry
        except RuntimeError:  # a reassigned many-element tensor compares elementwise: ambiguous, so not current
            pass
    kind, params, spec = _spec_args(schedule)
    fresh = (None if state is None else dict(state), kind, params, spec, {})
    if state is not None:
        if entry is None:
            weakref.finalize(schedule, _SCHEDULE_ARGS.pop, id(schedule), None)
        _SCHEDULE_ARGS[id(schedule)] = fresh
    return fresh


def _schedule_args(schedule: S.NoiseSchedule, x0: Tensor) -> tuple:
    """(kind, params, table on x0's device) of a schedule, for the kernels; from _SCHEDULE_ARGS when current."""
    _, kind, params, spec, _ = _schedule_entry(schedule)
    return kind, params, kernel_table(spec, x0.device)  # kernel_table keeps each table's copy per device


def _cpu_sampler(entry: tuple, precond_sigma_data: float, fdm_params: list, fdm_on: int):
    """The schedule entry's tdiff._C.NoisySampler for these arguments (made on first use; it checks them)."""
    samplers = entry[4]
    sampler = samplers.get(precond_sigma_data if fdm_on == FDM_OFF else
                           (precond_sigma_data, tuple(fdm_params), fdm_on))
    if sampler is None:
        key = precond_sigma_data if fdm_on == FDM_OFF else (precond_sigma_data, tuple(fdm_params), fdm_on)
        if len(samplers) >= _MAX_SAMPLERS:
            samplers.clear()
        _, kind, params, spec, _ = entry
        sampler = importlib.import_module("tdiff._C").NoisySampler(
            kind, params, kernel_table(spec, torch.device("cpu")), precond_sigma_data, fdm_params, fdm_on)
        samplers[key] = sampler
    return sampler


def noisy_sample(x0: Tensor, eps: Tensor, t: Tensor, schedule: S.NoiseSchedule, *,
                 precond_sigma_data: Optional[float] = None, fdm: Optional[S.FDMMomentum] = None,
                 write_input: bool = False, check: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """x_t = alpha(t) x0 + sigma(t) eps in one fused pass; with write_input, also the network input c_in x_t.

    t: (B,) times, or one float for the batch.
    precond_sigma_data: write c_in = 1/sqrt(sigma^2 + sigma_data^2 alpha^2) into the input (EDM preconditioning).
    fdm: an FDMMomentum to apply FDM's factor to the input or to the mean.
    check: raise if a time lies outside the schedule's domain or a coefficient is NaN/inf (one host sync; under
        torch.compile an asynchronous assert instead). check=False trusts the caller.
    """
    # The eager no-grad CPU call is the hot path (a training step's noise, in-cache sizes where a microsecond is a
    # tenth of the call): its tests come first and cost one attribute or lookup each.
    if not isinstance(x0, Tensor):
        raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
    if precond_sigma_data is None:
        sigma_data = -1.0
    elif (isinstance(precond_sigma_data, bool) or not isinstance(precond_sigma_data, (int, float))
          or not 0 < precond_sigma_data < math.inf):
        raise ValueError(f"precond_sigma_data must be None or a finite number > 0, got {precond_sigma_data!r}")
    else:
        sigma_data = float(precond_sigma_data)
    if isinstance(t, (int, float)):
        t = torch.full((x0.shape[0],), float(t), device=x0.device, dtype=torch.float64)
    if fdm is None:
        fdm_params, fdm_on = [], FDM_OFF
    else:
        fdm_params, fdm_on = fdm.kernel_params(), fdm_code(fdm)
    compiling = torch.compiler.is_compiling()
    grad = torch.is_grad_enabled() and (x0.requires_grad or getattr(eps, "requires_grad", False))
    if not (compiling or grad) and dispatch.eager_kernel(x0, "noisy_sample_cpu") is not None:
        # eager, no autograd, the C++ kernel the backend: the schedule's prepared sampler (it validates its inputs;
        # a refusal is re-explained by the Python validation, which names arguments as the public API does). It
        # makes the coefficients only for the check, and net_in only when asked. The current entry's sampler
        # without FDM is looked up inline (two function calls fewer: ~0.2 us of a ~10 us in-cache call).
        entry = _SCHEDULE_ARGS.get(id(schedule))
        sampler = None
        if entry is not None and fdm_on == FDM_OFF and entry[0] is not None:
            try:
                if entry[0] == schedule.__dict__:
                    sampler = entry[4].get(sigma_data)
            except RuntimeError:  # a reassigned tensor attribute: _schedule_entry rebuilds the entry
                pass
        if sampler is None:
            entry = _schedule_entry(schedule)
            sampler = _cpu_sampler(entry, sigma_data, fdm_params, fdm_on)
        try:
            xt, net_in, coefs = sampler(x0, eps, t, write_input, check)
        except (RuntimeError, TypeError, ValueError):
            _validate(x0, eps, t, entry[1], entry[2], kernel_table(entry[3], x0.device), fdm_params, fdm_on)
            raise
        if not check:
            return xt, net_in
    elif compiling:  # traced: no module state (the cache above) may be read or written
        kind, params, spec = _spec_args(schedule)
        args = (x0, eps, t, kind, params, kernel_table(spec, x0.device), sigma_data, fdm_params, fdm_on, write_input)
        xt, net_in, coefs = torch.ops.tdiff.noisy_sample(*args)  # traced through its fake and autograd registrations
    else:
        kind, params, table = _schedule_args(schedule, x0)
        args = (x0, eps, t, kind, params, table, sigma_data, fdm_params, fdm_on, write_input)
        if grad:
            xt, net_in, coefs = _EagerNoisySample.apply(*args)
        else:
            xt, net_in, coefs = _forward_impl(*args)
    if check:
        _check_times(t, coefs, schedule)
    return xt, (net_in if write_input else None)


def _check_times(t: Tensor, coefs: Tensor, schedule: S.NoiseSchedule) -> None:
    lo, hi = schedule.domain
    if t.is_cpu and not torch.compiler.is_compiling():
        # eager on the CPU: two reductions, since min and max propagate NaN (a NaN time or coefficient makes a
        # bound NaN and fails the test) and an inf is a bound itself. The masks below, which name the bad samples,
        # run only when this fails: they cost several tensor ops (isfinite alone is a few), 30-40 us at any size.
        t_lo, t_hi = torch.aminmax(t)
        c_lo, c_hi = torch.aminmax(coefs)
        if lo <= float(t_lo) and float(t_hi) <= hi and math.isfinite(float(c_lo)) and math.isfinite(float(c_hi)):
            return
    bad = ~torch.isfinite(coefs).all(dim=1) | ~(t >= lo) | ~(t <= hi)  # ~(t >= lo) also catches NaN

    def message(compiling: bool) -> str:
        where = "" if compiling else f" for samples {bad.nonzero().flatten()[:4].tolist()} (t={t[bad][:4].tolist()})"
        return (f"noisy_sample: t must be finite and inside the domain [{lo}, {hi}] of {type(schedule).__name__}, "
                f"with finite coefficients{where}")

    dispatch.assert_true(~bad.any(), message)
