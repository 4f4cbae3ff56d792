"""Fused weighted per-sample MSE: loss_b = w_b * mean_j (pred_bj - target_bj)^2, the diffusion-loss reduction.

One pass reads pred and target once and writes only (B,) values, instead of eager PyTorch's chain
(sub -> pow -> mean over dims -> mul), which materialises two full-size temporaries. The backward is its own op
(one pass writing grad_pred = 2 w_b g_b (pred - target) / N), so it can be tested alone.

Ops (schemas under tdiff::):
  weighted_mse(pred, target, weight) -> (loss, mse)
      loss = weight * mse, mse the unweighted per-sample mean square; both (B,) in the accumulation dtype
      (float64 for float64 inputs, float32 otherwise). mse is what d loss / d weight needs, and what a trainer
      logs per time step.
  weighted_mse_backward(grad_loss, pred, target, weight) -> grad_pred

Weights are not checked for sign or NaN here: that would need a host sync on every step. tdiff.training checks
the weights it builds.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import dispatch


# ---------------------------------------------------------------------------------------------------------------
# Reference (the test oracle and the fallback)
# ---------------------------------------------------------------------------------------------------------------
def weighted_mse_reference(pred: Tensor, target: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    acc = dispatch.coef_dtype(pred)
    diff = pred.to(acc) - target.to(acc)
    mse = diff.pow(2).reshape(pred.shape[0], -1).mean(dim=1)
    return weight.to(acc) * mse, mse


def weighted_mse_backward_reference(grad_loss: Tensor, pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    acc = dispatch.coef_dtype(pred)
    n = pred[0].numel()
    scale = (2.0 / n) * weight.to(acc) * grad_loss.to(acc)
    scale = scale.reshape((-1,) + (1,) * (pred.dim() - 1))
    return (scale * (pred.to(acc) - target.to(acc))).to(pred.dtype).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by every backend
# ---------------------------------------------------------------------------------------------------------------
def _validate(pred: Tensor, target: Tensor, weight: Tensor) -> None:
    for name, v in (("pred", pred), ("target", target), ("weight", weight)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    dispatch.check_float("pred", pred)
    dispatch.check_same("pred", pred, "target", target)
    if pred.dim() < 1 or pred.shape[0] == 0 or pred.numel() == 0:
        raise ValueError(f"pred must have a non-empty batch dimension and data, got shape {tuple(pred.shape)}")
    if weight.dim() != 1 or weight.shape[0] != pred.shape[0]:
        raise ValueError(f"weight must have shape ({pred.shape[0]},) (one weight per sample), got "
                         f"{tuple(weight.shape)}")
    dispatch.check_float("weight", weight)
    if weight.device != pred.device:
        raise ValueError(f"weight must be on the device of pred ({pred.device}), got {weight.device}")


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------
@torch.library.custom_op("tdiff::weighted_mse", mutates_args=())
def weighted_mse_op(pred: Tensor, target: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    _validate(pred, target, weight)
    return dispatch.route(pred, "weighted_mse_cpu", "tdiff.kernels.weighted_mse:weighted_mse_triton",
                          weighted_mse_reference, pred, target, weight)


@weighted_mse_op.register_fake
def _(pred, target, weight):
    _validate(pred, target, weight)
    out = pred.new_empty((pred.shape[0],), dtype=dispatch.coef_dtype(pred))
    return out, torch.empty_like(out)


@torch.library.custom_op("tdiff::weighted_mse_backward", mutates_args=())
def weighted_mse_backward_op(grad_loss: Tensor, pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    _validate(pred, target, weight)
    if grad_loss.shape != (pred.shape[0],) or not grad_loss.is_floating_point() or grad_loss.device != pred.device:
        raise ValueError(f"grad_loss must be a floating ({pred.shape[0]},) tensor on {pred.device}, got "
                         f"{grad_loss.dtype} {tuple(grad_loss.shape)} on {grad_loss.device}")
    return dispatch.route(pred, "weighted_mse_backward_cpu", "tdiff.kernels.weighted_mse:weighted_mse_backward_triton",
                          weighted_mse_backward_reference, grad_loss, pred, target, weight)


@weighted_mse_backward_op.register_fake
def _(grad_loss, pred, target, weight):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, target, weight = inputs
    ctx.save_for_backward(pred, target, weight, output[1])


def _backward(ctx, grad_loss, grad_mse):
    pred, target, weight, mse = ctx.saved_tensors
    need_pred, need_target, need_weight = ctx.needs_input_grad
    acc = mse.dtype
    if grad_loss is None:
        grad_loss = torch.zeros_like(mse)
    # d mse/d pred is d loss/d pred with w = 1: fold a gradient through mse into the effective weight
    g_total_w = weight.to(acc)
    if grad_mse is not None:
        # loss = w mse, so dL/dpred = (g_loss w + g_mse) d mse/d pred; pass it as grad with unit weight
        grad_eff = grad_loss.to(acc) * g_total_w + grad_mse.to(acc)
        ones = torch.ones_like(g_total_w).to(weight.dtype)
        g_pred = torch.ops.tdiff.weighted_mse_backward(grad_eff.contiguous(), pred, target, ones) \
            if (need_pred or need_target) else None
    else:
        g_pred = torch.ops.tdiff.weighted_mse_backward(grad_loss.contiguous(), pred, target, weight) \
            if (need_pred or need_target) else None
    g_weight = (grad_loss.to(acc) * mse).to(weight.dtype) if need_weight else None
    return (g_pred if need_pred else None), (-g_pred if need_target else None), g_weight


weighted_mse_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def weighted_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """(B,) per-sample weight_b * mean((pred_b - target_b)^2), fused, differentiable in pred, target and weight."""
    return weighted_mse_with_mse(pred, target, weight)[0]


def weighted_mse_with_mse(pred: Tensor, target: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Like `weighted_mse`, also returning the unweighted per-sample MSE (for logging)."""
    if dispatch.fast_call(pred, target, weight):  # eager, no autograd: the C++ kernel directly when it runs
        kernel = dispatch.eager_kernel(pred, "weighted_mse_cpu")
        if kernel is not None:
            try:
                return kernel(pred, target, weight)
            except (RuntimeError, TypeError, ValueError):
                _validate(pred, target, weight)
                raise
        _validate(pred, target, weight)
        return dispatch.route(pred, "weighted_mse_cpu", "tdiff.kernels.weighted_mse:weighted_mse_triton",
                              weighted_mse_reference, pred, target, weight)
    return torch.ops.tdiff.weighted_mse(pred, target, weight)
