"""Triton kernels for tdiff::multistep_update (+ CFG variant) and its backward.

Grid = (B, cdiv(N, BLOCK)): each program handles one block of one sample and loads that sample's coefficient
row (1+K scalars). K (history count) is a constexpr, so unused history pointers are never touched. The backward
writes per-block partial dot products; they are summed per sample in a fixed order (deterministic).
"""
import torch
import triton
import triton.language as tl

from tdiff.ops import dispatch



@triton.jit
def _fwd(x_ptr, h0_ptr, h1_ptr, h2_ptr, h3_ptr, u_ptr, c_ptr, w_ptr, out_ptr, guided_ptr, N,
         K: tl.constexpr, CFG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    row = c_ptr + b * (K + 1)
    c_x = tl.load(row)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    acc_t = c_x.dtype
    h0 = tl.load(h0_ptr + base + offs, mask=mask).to(acc_t)
    if CFG:
        u = tl.load(u_ptr + base + offs, mask=mask).to(acc_t)
        h0 = u + tl.load(w_ptr + b) * (h0 - u)
        tl.store(guided_ptr + base + offs, h0.to(guided_ptr.dtype.element_ty), mask=mask)
    acc = c_x * tl.load(x_ptr + base + offs, mask=mask).to(acc_t) + tl.load(row + 1) * h0
    if K > 1:
        acc += tl.load(row + 2) * tl.load(h1_ptr + base + offs, mask=mask).to(acc_t)
    if K > 2:
        acc += tl.load(row + 3) * tl.load(h2_ptr + base + offs, mask=mask).to(acc_t)
    if K > 3:
        acc += tl.load(row + 4) * tl.load(h3_ptr + base + offs, mask=mask).to(acc_t)
    tl.store(out_ptr + base + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_one(g, row, k, h_ptr, gh_ptr, part_ptr, base, offs, mask):
    h = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(g.dtype)
    tl.store(gh_ptr + base + offs, (tl.load(row + k) * g).to(gh_ptr.dtype.element_ty), mask=mask)
    tl.store(part_ptr + k, tl.sum(g * h, axis=0))


@triton.jit
def _bwd(g_ptr, x_ptr, h0_ptr, h1_ptr, h2_ptr, h3_ptr, c_ptr, gx_ptr, gh0_ptr, gh1_ptr, gh2_ptr, gh3_ptr,
         part_ptr, N, NBLK, K: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    row = c_ptr + b * (K + 1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = b.to(tl.int64) * N
    part = part_ptr + (b * NBLK + blk) * (K + 1)
    c_x = tl.load(row)
    g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(c_x.dtype)
    # masked lanes load 0 so the partial sums ignore them (an undefined lane could hold a NaN pattern)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(c_x.dtype)
    tl.store(gx_ptr + base + offs, (c_x * g).to(gx_ptr.dtype.element_ty), mask=mask)
    tl.store(part, tl.sum(g * x, axis=0))
    _bwd_one(g, row, 1, h0_ptr, gh0_ptr, part, base, offs, mask)
    if K > 1:
        _bwd_one(g, row, 2, h1_ptr, gh1_ptr, part, base, offs, mask)
    if K > 2:
        _bwd_one(g, row, 3, h2_ptr, gh2_ptr, part, base, offs, mask)
    if K > 3:
        _bwd_one(g, row, 4, h3_ptr, gh3_ptr, part, base, offs, mask)


def _padded(ts, fill):
    return list(ts) + [fill] * (4 - len(ts))


def _launch_fwd(x, history, coeffs, uncond, scale):
    B = x.shape[0]
    N = x.numel() // B
    out = torch.empty_like(x)
    cfg = uncond is not None
    guided = torch.empty_like(x) if cfg else out
    block = dispatch.triton_block()
    h = _padded(history, x)
    _fwd[(B, triton.cdiv(N, block))](x, *h, uncond if cfg else x, coeffs, scale if cfg else coeffs, out, guided,
                                     N, K=len(history), CFG=cfg, BLOCK=block)
    return out, guided


def multistep_update_triton(x, history, coeffs):
    return _launch_fwd(x, history, coeffs, None, None)[0]


def multistep_update_cfg_triton(x, history, coeffs, uncond, scale):
    return _launch_fwd(x, history, coeffs, uncond, scale)


def multistep_update_backward_triton(grad, x, history, coeffs):
    B = x.shape[0]
    N = x.numel() // B
    K = len(history)
    block = dispatch.triton_block()
    nblk = triton.cdiv(N, block)
    grad_x = torch.empty_like(x)
    grad_h = [torch.empty_like(x) for _ in history]
    partial = torch.empty((B, nblk, K + 1), device=x.device, dtype=coeffs.dtype)
    _bwd[(B, nblk)](grad, x, *_padded(history, x), coeffs, grad_x, *_padded(grad_h, grad_x), partial, N, nblk,
                    K=K, BLOCK=block)
    return grad_x, grad_h, partial.sum(dim=1)
