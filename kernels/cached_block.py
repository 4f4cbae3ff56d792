"""Triton kernels for tdiff::cached_block (see tdiff/ops/cached_block.py for the maths).

Forward: a grid-stride loop over the (sample, block) pairs of the (B, N*C) data; each block reads its sample's
source index once and loads from either the fresh rows or its own cache (two masked loads, only one of which
touches memory). Backward: parallel over (sample, token share, channel block); each program sums its tokens' share
of grad_gate in registers, and the shares are added per sample in a fixed order.

Both kernels mask every load and store through `source` by the valid range [-1, K): the op's validation refuses a
bad index (a host check on the CPU, a device-side assert on a GPU), and a launch with one can still never touch
memory outside its tensors.
"""
import torch
import triton
import triton.language as tl

from tdiff.ops import dispatch

from . import launch


@triton.autotune(configs=launch.block_configs(), key=["NC"])
@triton.jit
def _cached_block_fwd(x_ptr, gate_ptr, fresh_ptr, cache_ptr, source_ptr, out_ptr, branch_ptr, B, NC, C, K,
                      FP64: tl.constexpr, BLOCK: tl.constexpr):
    nblk = tl.maximum(tl.cdiv(NC, BLOCK), 1)
    for i in range(tl.program_id(0), B * nblk, tl.num_programs(0)):
        b = i // nblk
        src = tl.load(source_ptr + b)
        offs = (i % nblk) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < NC
        base = b.to(tl.int64) * NC
        # the per-sample choice broadcast to a vector, so it can join the bounds mask
        srcv = offs * 0 + src
        from_fresh = (srcv >= 0) & (srcv < K)
        fresh_base = tl.minimum(tl.maximum(src, 0), tl.maximum(K - 1, 0)).to(tl.int64) * NC
        f = tl.load(fresh_ptr + fresh_base + offs, mask=inside & from_fresh, other=0.0)
        c = tl.load(cache_ptr + base + offs, mask=inside & (srcv == -1), other=0.0)
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
    K = fresh.shape[0]
    # an empty fresh tensor still needs a valid pointer; no row reads it then
    fresh = fresh.contiguous() if fresh.numel() else cache
    B, N, C = x.shape
    out, branch = torch.empty_like(x), torch.empty_like(x)
    if N * C == 0:
        return out, branch
    grid = lambda meta: (launch.programs(B * max(1, triton.cdiv(N * C, meta["BLOCK"]))),)  # noqa: E731
    with launch.device_guard(x):
        _cached_block_fwd[grid](x, gate, fresh, cache, source, out, branch, B, N * C, C, K,
                                FP64=x.dtype == torch.float64)
    return out, branch


@triton.jit
def _cached_block_bwd(gout_ptr, gbr_ptr, gate_ptr, branch_ptr, source_ptr, gx_ptr, part_ptr, gfresh_ptr,
                      gcache_ptr, B, N, C, K, T, CB, BLOCK_C: tl.constexpr, FP64: tl.constexpr):
    acc_t = tl.float64 if FP64 else tl.float32
    for i in range(tl.program_id(0), B * T * CB, tl.num_programs(0)):
        b = i // (T * CB)
        share = (i // CB) % T  # this program's tokens: share, share + T, ...
        cols = (i % CB) * BLOCK_C + tl.arange(0, BLOCK_C)
        inside = cols < C
        src = tl.load(source_ptr + b)
        srcv = cols * 0 + src
        from_fresh = (srcv >= 0) & (srcv < K)
        to_cache = srcv == -1
        src_row = tl.minimum(tl.maximum(src, 0), tl.maximum(K - 1, 0)).to(tl.int64)
        g = tl.load(gate_ptr + b.to(tl.int64) * C + cols, mask=inside, other=0.0).to(acc_t)
        acc = tl.zeros([BLOCK_C], dtype=acc_t)
        for n in range(share, N, T):
            r = (b.to(tl.int64) * N + n) * C
            go = tl.load(gout_ptr + r + cols, mask=inside, other=0.0)
            gbr = tl.load(gbr_ptr + r + cols, mask=inside, other=0.0).to(acc_t)
            br = tl.load(branch_ptr + r + cols, mask=inside, other=0.0).to(acc_t)
            tl.store(gx_ptr + r + cols, go, mask=inside)
            go = go.to(acc_t)
            acc += go * br
            d = go * g + gbr
            fr = (src_row * N + n) * C
            tl.store(gfresh_ptr + fr + cols, d.to(gfresh_ptr.dtype.element_ty), mask=inside & from_fresh)
            tl.store(gcache_ptr + r + cols, tl.where(to_cache, d, 0.0).to(gcache_ptr.dtype.element_ty), mask=inside)
        tl.store(part_ptr + (b.to(tl.int64) * T + share) * C + cols, acc, mask=inside)


def cached_block_backward_triton(grad_out, grad_branch, gate, branch, source, computed):
    grad_out, grad_branch = grad_out.contiguous(), grad_branch.contiguous()
    gate, branch, source = gate.contiguous(), branch.contiguous(), source.contiguous()
    B, N, C = grad_out.shape
    gx, gcache = torch.empty_like(grad_out), torch.empty_like(grad_out)
    gfresh = grad_out.new_empty((computed, N, C))
    interpreting = dispatch.triton_interpreting()
    block_c = min(1024 if interpreting else 256, triton.next_power_of_2(max(C, 1)))
    cb = triton.cdiv(C, block_c)
    T = max(1, min(N, 2 if interpreting else 64))  # token shares per sample: the parallelism over tokens
    acc = dispatch.coef_dtype(grad_out)
    partial = torch.zeros((B, T, C), device=grad_out.device, dtype=acc)
    with launch.device_guard(grad_out):
        _cached_block_bwd[(launch.programs(B * T * cb),)](
            grad_out, grad_branch, gate, branch, source, gx, partial, gfresh if computed else gcache, gcache,
            B, N, C, computed, T, cb, BLOCK_C=block_c, FP64=grad_out.dtype == torch.float64)
    return gx, partial.sum(dim=1).to(grad_out.dtype), gfresh, gcache
