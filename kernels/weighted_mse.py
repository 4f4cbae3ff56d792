"""Triton kernels for tdiff::weighted_mse and its backward.

Forward: each program reduces its share of one sample's blocks to a partial sum of squares; the (B, P) partials
are summed by torch in a fixed order (deterministic; no atomics), P fixed per size whatever block the autotuner
picks. Backward: a grid-stride loop writing grad_pred = (2 w_b g_b / N)(pred - target) elementwise.
"""
import torch
import triton
import triton.language as tl

from tdiff.ops import dispatch

from . import launch


@triton.autotune(configs=launch.block_configs(), key=["N"])
@triton.jit
def _wmse_partial(p_ptr, q_ptr, part_ptr, B, N, P, BLOCK: tl.constexpr):
    acc_t = part_ptr.dtype.element_ty  # float64 for float64 data, float32 otherwise
    nblk = tl.cdiv(N, BLOCK)
    for i in range(tl.program_id(0), B * P, tl.num_programs(0)):
        base = (i // P).to(tl.int64) * N
        acc = tl.zeros([BLOCK], dtype=acc_t)
        for blk in range(i % P, nblk, P):
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            d = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(acc_t) - \
                tl.load(q_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
            acc += d * d
        tl.store(part_ptr + i, tl.sum(acc, axis=0))


@triton.autotune(configs=launch.block_configs(), key=["N"])
@triton.jit
def _wmse_bwd(p_ptr, q_ptr, scale_ptr, g_ptr, B, N, BLOCK: tl.constexpr):
    nblk = tl.maximum(tl.cdiv(N, BLOCK), 1)
    for i in range(tl.program_id(0), B * nblk, tl.num_programs(0)):
        b = i // nblk
        s = tl.load(scale_ptr + b)
        offs = (i % nblk) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = b.to(tl.int64) * N
        p = tl.load(p_ptr + base + offs, mask=mask).to(s.dtype)
        q = tl.load(q_ptr + base + offs, mask=mask).to(s.dtype)
        tl.store(g_ptr + base + offs, (s * (p - q)).to(g_ptr.dtype.element_ty), mask=mask)


def weighted_mse_triton(pred, target, weight):
    pred, target = pred.contiguous(), target.contiguous()
    B = pred.shape[0]
    N = pred.numel() // B
    P = launch.reduction_programs(N)
    acc = dispatch.coef_dtype(pred)
    partial = torch.empty((B, P), device=pred.device, dtype=acc)
    with launch.device_guard(pred):
        _wmse_partial[(launch.programs(B * P),)](pred, target, partial, B, N, P)
    mse = partial.sum(dim=1) / N
    return weight.to(acc) * mse, mse


def weighted_mse_backward_triton(grad_loss, pred, target, weight):
    pred, target = pred.contiguous(), target.contiguous()
    B = pred.shape[0]
    N = pred.numel() // B
    acc = dispatch.coef_dtype(pred)
    scale = (grad_loss.to(acc) * weight.to(acc) * (2.0 / N)).contiguous()
    grad = torch.empty_like(pred)
    grid = lambda meta: (launch.programs(B * max(1, triton.cdiv(N, meta["BLOCK"]))),)  # noqa: E731
    with launch.device_guard(pred):
        _wmse_bwd[grid](pred, target, scale, grad, B, N)
    return grad
