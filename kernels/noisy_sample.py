"""Triton kernels for tdiff::noisy_sample and its backward.

A grid-stride loop over the (sample, block) pairs: each block evaluates its sample's coefficients itself (a few
float64 scalar ops) instead of reading a host-prepared table; block 0 of each sample also writes them out (so a
sample of zero elements still gets its coefficients). The formulas follow
tdiff/schedules.py and csrc/schedule_coefficients.h; kind codes are schedules.KIND_*.
"""
import math

import torch
import triton
import triton.language as tl

from . import launch


@triton.jit
def _coefficients(t, table_ptr, p0, p1, p2, sigma_data, fm, fbmin, fbd, fumin, fumax, fsrc,
                  KIND: tl.constexpr, PRECOND: tl.constexpr, FDM_ON: tl.constexpr):
    t = t.to(tl.float64)
    if KIND == 0:  # VP linear
        la = -0.25 * t * t * (p1 - p0) - 0.5 * t * p0
        ls = 0.5 * tl.log(1.0 - tl.exp(2.0 * la))
    elif KIND == 1:  # VP cosine; p1 = log alpha(0)
        la = tl.log(tl.cos((t + p0) / (1.0 + p0) * (math.pi / 2.0))) - p1
        ls = 0.5 * tl.log(1.0 - tl.exp(2.0 * la))
    elif KIND == 2:  # discrete VP: piecewise-linear log alpha on the grid p0 + i p1, p2 entries
        x = (t - p0) / p1
        # the segment index, in range whatever t is (NaN and +-inf give non-finite coefficients, never a stray load)
        x_ok = tl.where(x == x, x, 0.0)
        i = tl.minimum(tl.maximum(tl.floor(x_ok), 0.0), p2 - 2.0)
        lo = tl.load(table_ptr + i.to(tl.int32))
        hi = tl.load(table_ptr + i.to(tl.int32) + 1)
        la = lo + (x - i) * (hi - lo)
        ls = 0.5 * tl.log(1.0 - tl.exp(2.0 * la))
    elif KIND == 3:  # VE: log sigma linear in t
        la = t * 0.0
        ls = p0 + t * (p1 - p0)
    elif KIND == 4:  # EDM
        la = t * 0.0
        ls = tl.log(t)
    else:  # rectified flow
        la = tl.log(1.0 - t)
        ls = tl.log(t)
    a = tl.exp(la)
    s = tl.exp(ls)
    if PRECOND:
        c = 1.0 / tl.sqrt(s * s + sigma_data * sigma_data * a * a)
    else:
        c = a * 0.0 + 1.0
    if FDM_ON != 0:
        u = tl.where(fsrc == 0.0, s / a, t)
        tp = (u - fumin) / (fumax - fumin)
        mb = fm * (fbmin * tp + 0.5 * fbd * tp * tp)
        f = tl.exp(-mb) * (1.0 + mb)
        if FDM_ON == 1:
            c = c * f
        else:
            a = a * f
    return a, s, c


@triton.autotune(configs=launch.block_configs(), key=["N"])
@triton.jit
def _noisy_sample_fwd(x0_ptr, eps_ptr, t_ptr, xt_ptr, in_ptr, coef_ptr, table_ptr, B, N,
                      p0, p1, p2, sigma_data, fm, fbmin, fbd, fumin, fumax, fsrc,
                      KIND: tl.constexpr, PRECOND: tl.constexpr, FDM_ON: tl.constexpr,
                      WRITE_INPUT: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    nblk = tl.maximum(tl.cdiv(N, BLOCK), 1)
    for i in range(tl.program_id(0), B * nblk, tl.num_programs(0)):
        b = i // nblk
        blk = i % nblk
        a, s, c = _coefficients(tl.load(t_ptr + b), table_ptr, p0, p1, p2, sigma_data, fm, fbmin, fbd, fumin,
                                fumax, fsrc, KIND, PRECOND, FDM_ON)
        if blk == 0:
            tl.store(coef_ptr + b * 3, a)
            tl.store(coef_ptr + b * 3 + 1, s)
            tl.store(coef_ptr + b * 3 + 2, c)
        if not FP64:
            a = a.to(tl.float32)
            s = s.to(tl.float32)
            c = c.to(tl.float32)
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = b.to(tl.int64) * N
        x = tl.load(x0_ptr + base + offs, mask=mask).to(a.dtype)
        e = tl.load(eps_ptr + base + offs, mask=mask).to(a.dtype)
        v = a * x + s * e
        tl.store(xt_ptr + base + offs, v.to(xt_ptr.dtype.element_ty), mask=mask)
        if WRITE_INPUT:
            tl.store(in_ptr + base + offs, (c * v).to(in_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=launch.block_configs(), key=["N"])
@triton.jit
def _noisy_sample_bwd(gxt_ptr, gin_ptr, coef_ptr, gx0_ptr, geps_ptr, B, N,
                      HAS_IN: tl.constexpr, BLOCK: tl.constexpr):
    nblk = tl.maximum(tl.cdiv(N, BLOCK), 1)
    for i in range(tl.program_id(0), B * nblk, tl.num_programs(0)):
        b = i // nblk
        a = tl.load(coef_ptr + b * 3)
        s = tl.load(coef_ptr + b * 3 + 1)
        c = tl.load(coef_ptr + b * 3 + 2)
        offs = (i % nblk) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        base = b.to(tl.int64) * N
        g = tl.load(gxt_ptr + base + offs, mask=mask).to(a.dtype)
        if HAS_IN:
            g += c * tl.load(gin_ptr + base + offs, mask=mask).to(a.dtype)
        tl.store(gx0_ptr + base + offs, (a * g).to(gx0_ptr.dtype.element_ty), mask=mask)
        tl.store(geps_ptr + base + offs, (s * g).to(geps_ptr.dtype.element_ty), mask=mask)


def _grid(B, N):
    return lambda meta: (launch.programs(B * max(1, triton.cdiv(N, meta["BLOCK"]))),)


def noisy_sample_triton(x0, eps, t, kind, params, table, precond_sigma_data, fdm, fdm_on, write_input):
    x0, eps = x0.contiguous(), eps.contiguous()
    B = x0.shape[0]
    N = x0.numel() // B
    xt = torch.empty_like(x0)
    net_in = torch.empty_like(x0) if write_input else x0.new_empty(0)
    fp64 = x0.dtype == torch.float64
    coefs64 = torch.empty((B, 3), device=x0.device, dtype=torch.float64)
    tab = table if table is not None else coefs64  # any valid pointer when unused
    f = list(fdm) if fdm_on else [0.0] * 6
    with launch.device_guard(x0):
        _noisy_sample_fwd[_grid(B, N)](
            x0, eps, t.contiguous(), xt, net_in if write_input else xt, coefs64, tab, B, N,
            float(params[0]), float(params[1]), float(params[2]), float(precond_sigma_data), *map(float, f),
            KIND=int(kind), PRECOND=precond_sigma_data >= 0, FDM_ON=int(fdm_on), WRITE_INPUT=bool(write_input),
            FP64=fp64)
    return xt, net_in, coefs64.to(torch.float64 if fp64 else torch.float32)


def noisy_sample_backward_triton(grad_xt, grad_in, coefs):
    grad_xt = grad_xt.contiguous()
    has_in = grad_in.numel() > 0
    grad_in = grad_in.contiguous() if has_in else grad_xt
    B = grad_xt.shape[0]
    N = grad_xt.numel() // B
    gx0, geps = torch.empty_like(grad_xt), torch.empty_like(grad_xt)
    with launch.device_guard(grad_xt):
        _noisy_sample_bwd[_grid(B, N)](grad_xt, grad_in, coefs.contiguous(), gx0, geps, B, N, HAS_IN=has_in)
    return gx0, geps
