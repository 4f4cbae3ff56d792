"""Triton kernels for tdiff::weighted_mse and its backward.

Forward grid = (B, cdiv(N, BLOCK)): each program reduces one block of one sample to a partial sum of squares;
the (B, blocks) partials are summed by torch in a fixed order (deterministic; no atomics). Backward grid is the
same shape and writes grad_pred = (2 w_b g_b / N)(pred - target) elementwise.
"""
import torch
import triton
import triton.language as tl

from tdiff.ops import dispatch



@triton.jit
def _wmse_partial(p_ptr, q_ptr, part_ptr, N, NBLK, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    acc = part_ptr.dtype.element_ty  # float64 for float64 data, float32 otherwise
    p = tl.load(p_ptr + base + offs, mask=mask, other=0.0).to(acc)
    q = tl.load(q_ptr + base + offs, mask=mask, other=0.0).to(acc)
    d = p - q
    tl.store(part_ptr + b * NBLK + blk, tl.sum(d * d, axis=0))


@triton.jit
def _wmse_bwd(p_ptr, q_ptr, scale_ptr, g_ptr, N, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    s = tl.load(scale_ptr + b)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    p = tl.load(p_ptr + base + offs, mask=mask).to(s.dtype)
    q = tl.load(q_ptr + base + offs, mask=mask).to(s.dtype)
    tl.store(g_ptr + base + offs, (s * (p - q)).to(g_ptr.dtype.element_ty), mask=mask)


def weighted_mse_triton(pred, target, weight):
    pred, target = pred.contiguous(), target.contiguous()
    B = pred.shape[0]
    N = pred.numel() // B
    block = dispatch.triton_block(2048)
    nblk = triton.cdiv(N, block)
    acc = dispatch.coef_dtype(pred)
    partial = torch.empty((B, nblk), device=pred.device, dtype=acc)
    _wmse_partial[(B, nblk)](pred, target, partial, N, nblk, BLOCK=block)
    mse = partial.sum(dim=1) / N
    return weight.to(acc) * mse, mse


def weighted_mse_backward_triton(grad_loss, pred, target, weight):
    pred, target = pred.contiguous(), target.contiguous()
    B = pred.shape[0]
    N = pred.numel() // B
    acc = dispatch.coef_dtype(pred)
    scale = (grad_loss.to(acc) * weight.to(acc) * (2.0 / N)).contiguous()
    grad = torch.empty_like(pred)
    block = dispatch.triton_block(2048)
    _wmse_bwd[(B, triton.cdiv(N, block))](pred, target, scale, grad, N, BLOCK=block)
    return grad
