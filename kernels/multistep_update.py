"""Triton kernels for tdiff::multistep_update (plain and convert forms) and its backward.

Forward: a grid-stride loop over the (sample, block) pairs; each block loads its sample's coefficient row (1+K
scalars) and, in the convert form, its guidance scale and [p, q] row. K (history count) and the form are
constexprs, so unused pointers are never touched. Backward: each program reduces its share of one sample's blocks
to partial dot products, summed per sample in a fixed order (deterministic).
"""
import torch
import triton
import triton.language as tl

from . import launch


@triton.autotune(configs=launch.block_configs(), key=["N"])
@triton.jit
def _fwd(x_ptr, h0_ptr, h1_ptr, h2_ptr, h3_ptr, u_ptr, src_ptr, c_ptr, w_ptr, pq_ptr, out_ptr, m_ptr, B, N,
         K: tl.constexpr, CFG: tl.constexpr, CONVERT: tl.constexpr, BLOCK: tl.constexpr):
    nblk = tl.maximum(tl.cdiv(N, BLOCK), 1)
    for i in range(tl.program_id(0), B * nblk, tl.num_programs(0)):
        b = i // nblk
        row = c_ptr + b * (K + 1)
        c_x = tl.load(row)
        acc_t = c_x.dtype
        offs = (i % nblk) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = b.to(tl.int64) * N
        m = tl.load(h0_ptr + base + offs, mask=mask).to(acc_t)
        if CFG:
            u = tl.load(u_ptr + base + offs, mask=mask).to(acc_t)
            m = u + tl.load(w_ptr + b) * (m - u)
        if CONVERT:
            s = tl.load(src_ptr + base + offs, mask=mask).to(acc_t)
            m = tl.load(pq_ptr + b * 2) * s + tl.load(pq_ptr + b * 2 + 1) * m
        if CFG or CONVERT:
            tl.store(m_ptr + base + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        acc = c_x * tl.load(x_ptr + base + offs, mask=mask).to(acc_t) + tl.load(row + 1) * m
        if K > 1:
            acc += tl.load(row + 2) * tl.load(h1_ptr + base + offs, mask=mask).to(acc_t)
        if K > 2:
            acc += tl.load(row + 3) * tl.load(h2_ptr + base + offs, mask=mask).to(acc_t)
        if K > 3:
            acc += tl.load(row + 4) * tl.load(h3_ptr + base + offs, mask=mask).to(acc_t)
        tl.store(out_ptr + base + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot_and_scale(g, c, h_ptr, gh_ptr, base, offs, mask, acc):
    h = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(g.dtype)
    tl.store(gh_ptr + base + offs, (c * g).to(gh_ptr.dtype.element_ty), mask=mask)
    return acc + g * h


@triton.autotune(configs=launch.block_configs(), key=["N"])
@triton.jit
def _bwd(g_ptr, x_ptr, h0_ptr, h1_ptr, h2_ptr, h3_ptr, c_ptr, gx_ptr, gh0_ptr, gh1_ptr, gh2_ptr, gh3_ptr,
         part_ptr, B, N, P, K: tl.constexpr, BLOCK: tl.constexpr):
    nblk = tl.cdiv(N, BLOCK)
    for i in range(tl.program_id(0), B * P, tl.num_programs(0)):
        b = i // P
        row = c_ptr + b * (K + 1)
        c_x = tl.load(row)
        acc_t = c_x.dtype
        base = b.to(tl.int64) * N
        # masked lanes load 0 so the sums ignore them (an undefined lane could hold a NaN pattern)
        d0 = tl.zeros([BLOCK], dtype=acc_t)
        d1 = tl.zeros([BLOCK], dtype=acc_t)
        d2 = tl.zeros([BLOCK], dtype=acc_t)
        d3 = tl.zeros([BLOCK], dtype=acc_t)
        d4 = tl.zeros([BLOCK], dtype=acc_t)
        for blk in range(i % P, nblk, P):
            offs = blk * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            g = tl.load(g_ptr + base + offs, mask=mask, other=0.0).to(acc_t)
            d0 = _dot_and_scale(g, c_x, x_ptr, gx_ptr, base, offs, mask, d0)
            d1 = _dot_and_scale(g, tl.load(row + 1), h0_ptr, gh0_ptr, base, offs, mask, d1)
            if K > 1:
                d2 = _dot_and_scale(g, tl.load(row + 2), h1_ptr, gh1_ptr, base, offs, mask, d2)
            if K > 2:
                d3 = _dot_and_scale(g, tl.load(row + 3), h2_ptr, gh2_ptr, base, offs, mask, d3)
            if K > 3:
                d4 = _dot_and_scale(g, tl.load(row + 4), h3_ptr, gh3_ptr, base, offs, mask, d4)
        part = part_ptr + i * (K + 1)
        tl.store(part, tl.sum(d0, axis=0))
        tl.store(part + 1, tl.sum(d1, axis=0))
        if K > 1:
            tl.store(part + 2, tl.sum(d2, axis=0))
        if K > 2:
            tl.store(part + 3, tl.sum(d3, axis=0))
        if K > 3:
            tl.store(part + 4, tl.sum(d4, axis=0))


def _padded(ts, fill):
    return list(ts) + [fill] * (4 - len(ts))


def _launch_fwd(x, history, coeffs, uncond, scale, src, convert):
    B = x.shape[0]
    N = x.numel() // B
    out = torch.empty_like(x)
    cfg, conv = uncond is not None, convert is not None
    m = torch.empty_like(x) if (cfg or conv) else out
    grid = lambda meta: (launch.programs(B * max(1, triton.cdiv(N, meta["BLOCK"]))),)  # noqa: E731
    with launch.device_guard(x):
        _fwd[grid](x, *_padded(history, x), uncond if cfg else x, (x if src is None else src) if conv else x,
                   coeffs, scale if cfg else coeffs, convert if conv else coeffs, out, m, B, N,
                   K=len(history), CFG=cfg, CONVERT=conv)
    return out, m


def multistep_update_triton(x, history, coeffs):
    return _launch_fwd(x, history, coeffs, None, None, None, None)[0]


def multistep_update_convert_triton(x, history, coeffs, uncond=None, scale=None, src=None, convert=None):
    out, m = _launch_fwd(x, history, coeffs, uncond, scale, src, convert)
    if uncond is None and convert is None:
        m = history[0].clone()  # h_0 = m: nothing formed
    return out, m


def multistep_update_backward_triton(grad, x, history, coeffs):
    B = x.shape[0]
    N = x.numel() // B
    K = len(history)
    P = launch.reduction_programs(N)
    grad_x = torch.empty_like(x)
    grad_h = [torch.empty_like(x) for _ in history]
    partial = torch.empty((B, P, K + 1), device=x.device, dtype=coeffs.dtype)
    with launch.device_guard(x):
        _bwd[(launch.programs(B * P),)](grad, x, *_padded(history, x), coeffs, grad_x, *_padded(grad_h, grad_x),
                                        partial, B, N, P, K=K)
    return grad_x, grad_h, partial.sum(dim=1)
