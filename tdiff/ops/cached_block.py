"""Fused cached-block scatter: per-sample "fresh or cached" branch selection, gate and residual in one pass.

For one cacheable unit (a DiT attention or MLP branch) with per-sample masks, the rows that compute are gathered
and run through the unit (giving `fresh`, K rows); every other row reuses its cached pre-gate branch output.
This op then writes, for each sample b,

  branch[b] = fresh[source[b]] if source[b] >= 0 else cache[b]     (the refreshed cache)
  out[b]    = x[b] + gate[b] * branch[b]                           (gate broadcast over tokens)

so the selection, the gate multiply and the residual add are one read of x, gate, fresh, cache and one write of
out and branch, instead of an index_copy plus two elementwise passes.

Ops (schemas under tdiff::):
  cached_block(x (B,N,C), gate (B,C), fresh (K,N,C), cache (B,N,C), source (B,) int64) -> (out, branch)
  cached_block_backward(grad_out, grad_branch, gate, branch, source, computed) -> (gx, ggate, gfresh, gcache)
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from . import dispatch


# ---------------------------------------------------------------------------------------------------------------
# Reference (the test oracle and the fallback)
# ---------------------------------------------------------------------------------------------------------------
def cached_block_reference(x: Tensor, gate: Tensor, fresh: Tensor, cache: Tensor, source: Tensor):
    computed = (source >= 0).view(-1, 1, 1)
    if fresh.shape[0]:
        picked = fresh.index_select(0, source.clamp(min=0))
        branch = torch.where(computed, picked, cache)
    else:
        branch = cache.clone()
    acc = dispatch.coef_dtype(x)
    out = x.to(acc) + gate.to(acc).unsqueeze(1) * branch.to(acc)
    return out.to(x.dtype).contiguous(), branch.contiguous()


def cached_block_backward_reference(grad_out: Tensor, grad_branch: Tensor, gate: Tensor, branch: Tensor,
                                    source: Tensor, computed: int):
    acc = dispatch.coef_dtype(grad_out)
    total = grad_out.to(acc) * gate.to(acc).unsqueeze(1) + grad_branch.to(acc)  # d loss / d branch
    grad_gate = (grad_out.to(acc) * branch.to(acc)).sum(1)
    rows = (source >= 0).nonzero().squeeze(1)
    grad_fresh = total.new_zeros((computed,) + tuple(total.shape[1:]))
    grad_fresh.index_copy_(0, source.index_select(0, rows), total.index_select(0, rows))
    grad_cache = torch.where((source >= 0).view(-1, 1, 1), torch.zeros_like(total), total)
    dt = grad_out.dtype
    return (grad_out.clone(memory_format=torch.contiguous_format), grad_gate.to(dt).contiguous(),
            grad_fresh.to(dt).contiguous(), grad_cache.to(dt).contiguous())


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by every backend
# ---------------------------------------------------------------------------------------------------------------
def _validate(x: Tensor, gate: Tensor, fresh: Tensor, cache: Tensor, source: Tensor) -> None:
    for name, v in (("x", x), ("gate", gate), ("fresh", fresh), ("cache", cache), ("source", source)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    dispatch.check_float("x", x)
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"x must be (B, N, C) with B > 0, got shape {tuple(x.shape)}")
    b, n, c = x.shape
    dispatch.check_same("x", x, "cache", cache)
    dispatch.check_same("x", x, "gate", gate, shape=False)
    dispatch.check_same("x", x, "fresh", fresh, shape=False)
    if gate.shape != (b, c):
        raise ValueError(f"gate must have shape ({b}, {c}), got {tuple(gate.shape)}")
    if fresh.dim() != 3 or fresh.shape[1:] != (n, c) or fresh.shape[0] > b:
        raise ValueError(f"fresh must have shape (K, {n}, {c}) with K <= {b}, got {tuple(fresh.shape)}")
    if source.shape != (b,) or source.dtype != torch.int64 or source.device != x.device:
        raise ValueError(f"source must be an int64 tensor of shape ({b},) on {x.device}, got "
                         f"{source.dtype} {tuple(source.shape)} on {source.device}")


def _check_source_values(source: Tensor, rows: int) -> None:
    """Each source entry is -1 (reuse the cache) or a row of fresh, and the computing samples map one-to-one onto
    the fresh rows (each fresh row is read, and its gradient written, by exactly one sample). A host check on the
    CPU; a device-side assert elsewhere (no sync)."""
    dispatch.check_indices("source", source, -1, rows, "-1 (reuse the cache) or a row of fresh")
    if source.device.type == "meta" or isinstance(source, torch._subclasses.FakeTensor):
        return
    counts = torch.zeros(rows + 1, dtype=torch.int64, device=source.device)
    counts.index_add_(0, source.clamp(-1, rows - 1) + 1, torch.ones_like(source))
    one_to_one = (counts[1:] == 1).all()
    message = f"source must map the computing samples one-to-one onto the {rows} rows of fresh"
    if source.is_cpu:
        if not bool(one_to_one):
            raise ValueError(f"{message}; got {source.tolist()}")
    else:
        torch._assert_async(one_to_one, message)


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------
def _cached_block_forward(x: Tensor, gate: Tensor, fresh: Tensor, cache: Tensor, source: Tensor):
    _validate(x, gate, fresh, cache, source)
    _check_source_values(source, fresh.shape[0])
    return dispatch.route(x, "cached_block_cpu", "tdiff.kernels.cached_block:cached_block_triton",
                          cached_block_reference, x, gate, fresh, cache, source)


@torch.library.custom_op("tdiff::cached_block", mutates_args=())
def cached_block_op(x: Tensor, gate: Tensor, fresh: Tensor, cache: Tensor, source: Tensor) -> Tuple[Tensor, Tensor]:
    return _cached_block_forward(x, gate, fresh, cache, source)


@cached_block_op.register_fake
def _(x, gate, fresh, cache, source):
    _validate(x, gate, fresh, cache, source)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out)


@torch.library.custom_op("tdiff::cached_block_backward", mutates_args=())
def cached_block_backward_op(grad_out: Tensor, grad_branch: Tensor, gate: Tensor, branch: Tensor, source: Tensor,
                             computed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dispatch.check_same("grad_out", grad_out, "grad_branch", grad_branch)
    dispatch.check_same("grad_out", grad_out, "branch", branch)
    if grad_out.dim() != 3 or gate.shape != (grad_out.shape[0], grad_out.shape[2]):
        raise ValueError(f"grad_out must be (B, N, C) and gate (B, C), got {tuple(grad_out.shape)} and "
                         f"{tuple(gate.shape)}")
    if not 0 <= computed <= grad_out.shape[0]:
        raise ValueError(f"computed must be in [0, {grad_out.shape[0]}], got {computed}")
    dispatch.check_same("grad_out", grad_out, "gate", gate, shape=False)
    if source.shape != (grad_out.shape[0],) or source.dtype != torch.int64 or source.device != grad_out.device:
        raise ValueError(f"source must be an int64 tensor of shape ({grad_out.shape[0]},) on {grad_out.device}")
    _check_source_values(source, computed)
    return dispatch.route(grad_out, "cached_block_backward_cpu",
                          "tdiff.kernels.cached_block:cached_block_backward_triton", cached_block_backward_reference,
                          grad_out, grad_branch, gate, branch, source, computed)


@cached_block_backward_op.register_fake
def _(grad_out, grad_branch, gate, branch, source, computed):
    g = torch.empty_like(grad_out, memory_format=torch.contiguous_format)
    return (g, gate.new_empty(gate.shape), grad_out.new_empty((computed,) + tuple(grad_out.shape[1:])),
            torch.empty_like(g))


def _setup_context(ctx, inputs, output):
    x, gate, fresh, cache, source = inputs
    ctx.save_for_backward(gate, output[1], source)
    ctx.computed = fresh.shape[0]


def _backward(ctx, grad_out, grad_branch):
    gate, branch, source = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(branch)
    if grad_branch is None:
        grad_branch = torch.zeros_like(branch)
    gx, ggate, gfresh, gcache = torch.ops.tdiff.cached_block_backward(
        grad_out.contiguous(), grad_branch.contiguous(), gate, branch, source, ctx.computed)
    return gx, ggate, gfresh, gcache, None


cached_block_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def cached_block(x: Tensor, gate: Tensor, fresh: Tensor, cache: Tensor, source: Tensor) -> Tuple[Tensor, Tensor]:
    """(out, refreshed cache) for one unit with per-sample masks; see the module docstring."""
    if dispatch.fast_call(x, gate, fresh, cache):  # it runs once per unit per model call when serving
        kernel = dispatch.eager_kernel(x, "cached_block_cpu")
        if kernel is not None:
            try:
                return kernel(x, gate, fresh, cache, source)
            except (RuntimeError, TypeError, ValueError):
                _validate(x, gate, fresh, cache, source)
                raise
        return _cached_block_forward(x, gate, fresh, cache, source)
    return torch.ops.tdiff.cached_block(x, gate, fresh, cache, source)  # traced, or differentiated
