"""Triton kernel for tdiff::cached_block (see tdiff/ops/cached_block.py for the maths).

Grid = (B, cdiv(N*C, BLOCK)): one program per block of one sample, which reads that sample's source index once
and loads from either the fresh rows or its own cache (two masked loads, only one of which touches memory).
"""
import torch
import triton
import triton.language as tl

from tdiff.ops import dispatch



@triton.jit
def _cached_block_fwd(x_ptr, gate_ptr, fresh_ptr, cache_ptr, source_ptr, out_ptr, branch_ptr, NC, C,
                      FP64: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    blk = tl.program_id(1)
    src = tl.load(source_ptr + b)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < NC
    base = b.to(tl.int64) * NC
    # the per-sample choice broadcast to a vector, so it can join the bounds mask
    from_fresh = (offs * 0 + src) >= 0
    fresh_base = tl.maximum(src, 0).to(tl.int64) * NC
    f = tl.load(fresh_ptr + fresh_base + offs, mask=inside & from_fresh, other=0.0)
    c = tl.load(cache_ptr + base + offs, mask=inside & (from_fresh == 0), other=0.0)
    br = tl.where(from_fresh, f, c)
    g = tl.load(gate_ptr + b.to(tl.int64) * C + offs % C, mask=inside)
    x = tl.load(x_ptr + base + offs, mask=inside)
    if FP64:
        o = x + g * br
    else:
        o = x.to(tl.float32) + g.to(tl.float32) * br.to(tl.float32)
    tl.store(branch_ptr + base + offs, br, mask=inside)
    tl.store(out_ptr + base + offs, o.to(out_ptr.dtype.element_ty), mask=inside)


def cached_block_triton(x, gate, fresh, cache, source):
    x, gate, cache, source = x.contiguous(), gate.contiguous(), cache.contiguous(), source.contiguous()
    # an empty fresh tensor still needs a valid pointer; no row reads it then
    fresh = fresh.contiguous() if fresh.numel() else cache
    B, N, C = x.shape
    out, branch = torch.empty_like(x), torch.empty_like(x)
    block = dispatch.triton_block()
    _cached_block_fwd[(B, triton.cdiv(N * C, block))](
        x, gate, fresh, cache, source, out, branch, N * C, C, FP64=x.dtype == torch.float64, BLOCK=block)
    return out, branch


@triton.jit
def _cached_block_bwd(gout_ptr, gbr_ptr, gate_ptr, branch_ptr, source_ptr, gx_ptr, ggate_ptr, gfresh_ptr,
                      gcache_ptr, N, C, BLOCK_C: tl.constexpr):
    # one program per (sample, channel block), walking the tokens: the grad_gate reduction stays in registers
    b = tl.program_id(0)
    cb = tl.program_id(1)
    src = tl.load(source_ptr + b)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = cols < C
    from_fresh = (cols * 0 + src) >= 0
    g = tl.load(gate_ptr + b.to(tl.int64) * C + cols, mask=inside, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for n in range(N):
        r = (b.to(tl.int64) * N + n) * C
        go = tl.load(gout_ptr + r + cols, mask=inside, other=0.0)
        gbr = tl.load(gbr_ptr + r + cols, mask=inside, other=0.0).to(tl.float32)
        br = tl.load(branch_ptr + r + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(gx_ptr + r + cols, go, mask=inside)
        go = go.to(tl.float32)
        acc += go * br
        d = go * g + gbr
        fr = (tl.maximum(src, 0).to(tl.int64) * N + n) * C
        tl.store(gfresh_ptr + fr + cols, d.to(gfresh_ptr.dtype.element_ty), mask=inside & from_fresh)
        tl.store(gcache_ptr + r + cols, tl.where(from_fresh, 0.0, d).to(gcache_ptr.dtype.element_ty), mask=inside)
    tl.store(ggate_ptr + b.to(tl.int64) * C + cols, acc.to(ggate_ptr.dtype.element_ty), mask=inside)


def cached_block_backward_triton(grad_out, grad_branch, gate, branch, source, computed):
    if grad_out.dtype == torch.float64:
        # float64 gradients (gradcheck) would lose precision in the float32 accumulator: the reference does them
        from tdiff.ops.cached_block import cached_block_backward_reference

        return cached_block_backward_reference(grad_out, grad_branch, gate, branch, source, computed)
    grad_out, grad_branch = grad_out.contiguous(), grad_branch.contiguous()
    gate, branch, source = gate.contiguous(), branch.contiguous(), source.contiguous()
    B, N, C = grad_out.shape
    gx, gcache = torch.empty_like(grad_out), torch.empty_like(grad_out)
    ggate = grad_out.new_empty((B, C))
    gfresh = grad_out.new_empty((computed, N, C))
    block_c = min(1024, triton.next_power_of_2(C))
    _cached_block_bwd[(B, triton.cdiv(C, block_c))](
        grad_out, grad_branch, gate, branch, source, gx, ggate, gfresh if computed else gcache, gcache, N, C,
        BLOCK_C=block_c)
    return gx, ggate, gfresh, gcache
