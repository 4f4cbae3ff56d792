"""Fused multistep solver update: x_next = c_x x + sum_k c_k h_k, per-sample coefficient rows.

Every multistep solver step (DDIM, DPM-Solver++ 2M/3M, UniPC predictor and corrector, iPNDM, Heun) is a linear
combination of the current sample and up to four history buffers (model outputs, or derived tensors). Doing it in
one pass reads each input once and writes the output once, instead of the 2K+1 passes of eager arithmetic.

  coeffs is (B, 1+K): row b = [c_x, c_0, ..., c_{K-1}] for sample b, so one batch may hold samples at different
  steps (serving). Coefficients are float64 for float64 data and float32 otherwise (dispatch.coef_dtype); the
  kernels accumulate in that type.

Optional classifier-free guidance in the same pass (multistep_update_cfg): history[0] is the conditional output and
h_0 = uncond + w (cond - uncond) with a per-sample scale w; the guided h_0 is written out as well, because a
multistep solver keeps it as history for later steps.

Ops (schemas under tdiff::):
  multistep_update(x, history[K], coeffs) -> x_next
  multistep_update_backward(grad, x, history[K], coeffs) -> (grad_x, grad_history[K], grad_coeffs)
  multistep_update_cfg(x, history[K], coeffs, uncond, scale) -> (x_next, guided)
  multistep_update_cfg_backward(grad, grad_guided, x, history[K], coeffs, uncond, scale)
      -> (grad_x, grad_history[K], grad_coeffs, grad_uncond, grad_scale)
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dispatch

MAX_HISTORY = 4


# ---------------------------------------------------------------------------------------------------------------
# Reference (the test oracle and the fallback)
# ---------------------------------------------------------------------------------------------------------------
def multistep_update_reference(x: Tensor, history: List[Tensor], coeffs: Tensor) -> Tensor:
    acc = coeffs.dtype
    out = dispatch.per_sample(coeffs[:, 0], x) * x.to(acc)
    for k, h in enumerate(history):
        out = out + dispatch.per_sample(coeffs[:, k + 1], x) * h.to(acc)
    return out.to(x.dtype)


def _per_sample_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    return (a.to(acc) * b.to(acc)).reshape(a.shape[0], -1).sum(dim=1)


def multistep_update_backward_reference(grad: Tensor, x: Tensor, history: List[Tensor],
                                        coeffs: Tensor) -> Tuple[Tensor, List[Tensor], Tensor]:
    acc = coeffs.dtype
    g = grad.to(acc)
    grad_x = (dispatch.per_sample(coeffs[:, 0], x) * g).to(x.dtype)
    grad_h = [(dispatch.per_sample(coeffs[:, k + 1], x) * g).to(x.dtype) for k in range(len(history))]
    grad_c = torch.stack([_per_sample_dot(grad, t, acc) for t in [x, *history]], dim=1)
    return grad_x, grad_h, grad_c


def _guided_acc(cond: Tensor, uncond: Tensor, scale: Tensor, acc: torch.dtype) -> Tensor:
    """uncond + w (cond - uncond) at accumulation precision: classifier-free guidance, the one formula."""
    u = uncond.to(acc)
    return u + dispatch.per_sample(scale, cond) * (cond.to(acc) - u)


def guided_reference(cond: Tensor, uncond: Tensor, scale: Tensor) -> Tensor:
    return _guided_acc(cond, uncond, scale, scale.dtype).to(cond.dtype)


def multistep_update_cfg_reference(x, history, coeffs, uncond, scale) -> Tuple[Tensor, Tensor]:
    guided = guided_reference(history[0], uncond, scale)
    # the combination reads the guided value at accumulation precision, like the fused kernels
    acc = coeffs.dtype
    g_acc = _guided_acc(history[0], uncond, scale, acc)
    out = dispatch.per_sample(coeffs[:, 0], x) * x.to(acc) + dispatch.per_sample(coeffs[:, 1], x) * g_acc
    for k, h in enumerate(history[1:], start=1):
        out = out + dispatch.per_sample(coeffs[:, k + 1], x) * h.to(acc)
    return out.to(x.dtype), guided


def multistep_update_cfg_backward_reference(grad, grad_guided, x, history, coeffs, uncond, scale):
    acc = coeffs.dtype
    g = grad.to(acc)
    # gradient reaching the guided h_0, from x_next and from the guided output itself
    g0 = dispatch.per_sample(coeffs[:, 1], x) * g + grad_guided.to(acc)
    w = dispatch.per_sample(scale, x)
    grad_x = (dispatch.per_sample(coeffs[:, 0], x) * g).to(x.dtype)
    grad_cond = (w * g0).to(x.dtype)
    grad_uncond = ((1 - w) * g0).to(x.dtype)
    grad_rest = [(dispatch.per_sample(coeffs[:, k + 1], x) * g).to(x.dtype) for k in range(1, len(history))]
    guided_acc = _guided_acc(history[0], uncond, scale, acc)
    grad_c = torch.stack([_per_sample_dot(g, t, acc) for t in [x, guided_acc, *history[1:]]], dim=1)
    grad_scale = _per_sample_dot(g0, history[0].to(acc) - uncond.to(acc), acc)
    return grad_x, [grad_cond, *grad_rest], grad_c, grad_uncond, grad_scale


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by every backend (no device syncs: the NaN check lives in the public wrapper)
# ---------------------------------------------------------------------------------------------------------------
def _validate(x: Tensor, history: Sequence[Tensor], coeffs: Tensor) -> None:
    dispatch.check_float("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not 1 <= len(history) <= MAX_HISTORY:
        raise ValueError(f"history must hold 1 to {MAX_HISTORY} tensors, got {len(history)}")
    for k, h in enumerate(history):
        dispatch.check_same("x", x, f"history[{k}]", h)
    want = (x.shape[0], 1 + len(history))
    if coeffs.dim() != 2 or tuple(coeffs.shape) != want:
        raise ValueError(f"coeffs must have shape {want} (one row [c_x, c_0..c_K-1] per sample), "
                         f"got {tuple(coeffs.shape)}")
    if coeffs.dtype != dispatch.coef_dtype(x):
        raise ValueError(f"coeffs must be {dispatch.coef_dtype(x)} for {x.dtype} data, got {coeffs.dtype}")
    if coeffs.device != x.device:
        raise ValueError(f"coeffs must be on the device of x ({x.device}), got {coeffs.device}")


def _validate_cfg(x: Tensor, history: Sequence[Tensor], coeffs: Tensor, uncond: Tensor, scale: Tensor) -> None:
    _validate(x, history, coeffs)
    dispatch.check_same("history[0] (cond)", history[0], "uncond", uncond)
    if scale.dim() != 1 or scale.shape[0] != x.shape[0]:
        raise ValueError(f"scale must have shape ({x.shape[0]},) (one guidance scale per sample), "
                         f"got {tuple(scale.shape)}")
    if scale.dtype != coeffs.dtype or scale.device != x.device:
        raise ValueError(f"scale must be {coeffs.dtype} on {x.device}, got {scale.dtype} on {scale.device}")


def _contiguous(ts: Sequence[Tensor]) -> List[Tensor]:
    return [t.contiguous() for t in ts]


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------
def _forward(x: Tensor, history: List[Tensor], coeffs: Tensor) -> Tensor:
    _validate(x, history, coeffs)
    x, history, coeffs = x.contiguous(), _contiguous(history), coeffs.contiguous()
    return dispatch.route(x, "multistep_update_cpu", "tdiff.kernels.multistep_update:multistep_update_triton",
                          multistep_update_reference, x, history, coeffs)


@torch.library.custom_op("tdiff::multistep_update", mutates_args=())
def multistep_update_op(x: Tensor, history: List[Tensor], coeffs: Tensor) -> Tensor:
    return _forward(x, history, coeffs)


@multistep_update_op.register_fake
def _(x, history, coeffs):
    _validate(x, history, coeffs)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("tdiff::multistep_update_backward", mutates_args=())
def multistep_update_backward_op(grad: Tensor, x: Tensor, history: List[Tensor],
                                 coeffs: Tensor) -> Tuple[Tensor, List[Tensor], Tensor]:
    _validate(x, history, coeffs)
    dispatch.check_same("x", x, "grad", grad)
    grad, x, history, coeffs = grad.contiguous(), x.contiguous(), _contiguous(history), coeffs.contiguous()
    return dispatch.route(x, "multistep_update_backward_cpu",
                          "tdiff.kernels.multistep_update:multistep_update_backward_triton",
                          multistep_update_backward_reference, grad, x, history, coeffs)


@multistep_update_backward_op.register_fake
def _(grad, x, history, coeffs):
    _validate(x, history, coeffs)
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(x), [like(h) for h in history], like(coeffs)


def _setup_context(ctx, inputs, output):
    x, history, coeffs = inputs
    ctx.save_for_backward(x, coeffs, *history)


def _backward(ctx, grad):
    x, coeffs, *history = ctx.saved_tensors
    grad_x, grad_h, grad_c = torch.ops.tdiff.multistep_update_backward(grad, x, history, coeffs)
    return grad_x, list(grad_h), grad_c


multistep_update_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_cfg(x: Tensor, history: List[Tensor], coeffs: Tensor, uncond: Tensor,
                 scale: Tensor) -> Tuple[Tensor, Tensor]:
    _validate_cfg(x, history, coeffs, uncond, scale)
    x, history, coeffs = x.contiguous(), _contiguous(history), coeffs.contiguous()
    uncond, scale = uncond.contiguous(), scale.contiguous()
    return dispatch.route(x, "multistep_update_cfg_cpu", "tdiff.kernels.multistep_update:multistep_update_cfg_triton",
                          multistep_update_cfg_reference, x, history, coeffs, uncond, scale)


@torch.library.custom_op("tdiff::multistep_update_cfg", mutates_args=())
def multistep_update_cfg_op(x: Tensor, history: List[Tensor], coeffs: Tensor, uncond: Tensor,
                            scale: Tensor) -> Tuple[Tensor, Tensor]:
    return _forward_cfg(x, history, coeffs, uncond, scale)


@multistep_update_cfg_op.register_fake
def _(x, history, coeffs, uncond, scale):
    _validate_cfg(x, history, coeffs, uncond, scale)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


@torch.library.custom_op("tdiff::multistep_update_cfg_backward", mutates_args=())
def multistep_update_cfg_backward_op(grad: Tensor, grad_guided: Tensor, x: Tensor, history: List[Tensor],
                                     coeffs: Tensor, uncond: Tensor, scale: Tensor
                                     ) -> Tuple[Tensor, List[Tensor], Tensor, Tensor, Tensor]:
    _validate_cfg(x, history, coeffs, uncond, scale)
    # The backward is only needed by autograd and runs on the reference everywhere: it is a handful of passes
    # and LD3-style training is dominated by the network's backward, not this.
    return multistep_update_cfg_backward_reference(grad.contiguous(), grad_guided.contiguous(), x, history, coeffs,
                                                   uncond, scale)


@multistep_update_cfg_backward_op.register_fake
def _(grad, grad_guided, x, history, coeffs, uncond, scale):
    like = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)  # noqa: E731
    return like(x), [like(h) for h in history], like(coeffs), like(uncond), like(scale)


def _setup_context_cfg(ctx, inputs, output):
    x, history, coeffs, uncond, scale = inputs
    ctx.save_for_backward(x, coeffs, uncond, scale, *history)


def _backward_cfg(ctx, grad, grad_guided):
    x, coeffs, uncond, scale, *history = ctx.saved_tensors
    if grad is None:
        grad = torch.zeros_like(x)
    if grad_guided is None:
        grad_guided = torch.zeros_like(x)
    gx, gh, gc, gu, gs = torch.ops.tdiff.multistep_update_cfg_backward(grad, grad_guided, x, history, coeffs,
                                                                         uncond, scale)
    return gx, list(gh), gc, gu, gs


multistep_update_cfg_op.register_autograd(_backward_cfg, setup_context=_setup_context_cfg)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def _check_finite(coeffs: Tensor) -> None:
    if not bool(torch.isfinite(coeffs).all()):
        bad = (~torch.isfinite(coeffs).all(dim=1)).nonzero().flatten()[:4].tolist()
        raise ValueError(f"coeffs must be finite; rows {bad} hold NaN or inf")


def multistep_update(x: Tensor, history: Sequence[Tensor], coeffs: Tensor, *, uncond: Optional[Tensor] = None,
                     scale: Optional[Tensor] = None, check: bool = True):
    """x_next = coeffs[:, 0] x + sum_k coeffs[:, k+1] history[k], fused, differentiable in every input.

    coeffs: (B, 1+K) rows, or one (1+K,) row shared by the batch (expanded, not copied).
    uncond, scale: classifier-free guidance; history[0] is then the conditional output, the update uses
        uncond + scale (history[0] - uncond) as h_0, and the call returns (x_next, guided h_0).
    check: raise if a coefficient is NaN/inf. That costs a device sync, so the solvers check their tables once up
        front and pass check=False in the sampling loop.
    """
    history = list(history)
    if coeffs.dim() == 1:
        coeffs = coeffs.unsqueeze(0).expand(x.shape[0] if x.dim() else 1, -1)
    if check:
        _check_finite(coeffs)
    if (uncond is None) != (scale is None):
        raise ValueError("uncond and scale must be given together (classifier-free guidance)")
    if uncond is None:
        if dispatch.plain_call(x, coeffs, *history):
            return _forward(x, history, coeffs)
        return torch.ops.tdiff.multistep_update(x, history, coeffs)
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=coeffs.dtype, device=x.device)
    if scale.dim() == 0:
        scale = scale.reshape(1).expand(x.shape[0])
    if check:
        _check_finite(scale.reshape(1, -1))
    if dispatch.plain_call(x, coeffs, uncond, scale, *history):
        return _forward_cfg(x, history, coeffs, uncond, scale)
    return torch.ops.tdiff.multistep_update_cfg(x, history, coeffs, uncond, scale)


__all__ = ["multistep_update", "multistep_update_reference", "multistep_update_backward_reference",
           "multistep_update_cfg_reference", "MAX_HISTORY"]
