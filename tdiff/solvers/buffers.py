"""Recycled update outputs for the eager no-grad sampling loop.

At 16x4x128x128 (4 MiB per tensor) a fresh output is a fresh mmap: about a thousand page faults per step, which
cost more than the update itself (4.2 ms against 1.2 ms per step measured with the allocator's mmap threshold
raised). The loop instead hands a buffer it no longer needs (the previous sample, a history entry nobody reads any
more) back to the pool, and the next update writes into it through the op's out= form
(tdiff::multistep_update_out_cpu).

A buffer is recycled only when nothing else can see it: the pool pops it from the loop's buffers itself and keeps
it only if that was the last Python reference (so not x_T, not a model output the model keeps, not a sample a
diffusers pipeline still holds), no other tensor shares its storage (no view of it is alive), and it does not
require grad. The compiled loop (Execution.compile) knows which of its buffers it wrote itself from the pool, and
hands those back with `recycle`, which checks only the two things that can change outside it (another reference,
a view). The op's functional form (autograd, torch.compile, other backends) is untouched: the pool serves only
eager calls without autograd on the C++ backend.

The compiled loop also updates in place, at every size: x_next over x, and the new history entry over the oldest
one the update reads last, when the loop wrote them itself and nothing else holds them (`writable`). The out= kernel
reads every input's element j before it writes element j, so this is exact; it keeps a multistep step's working set
at the tensors it reads (UniPC-3 and iPNDM-4 at 16x4x32x32: 5 of 256 KiB instead of 7, which no longer fit this
CPU's 2 MiB L2 beside the rest), and the outputs' lines are already in L1 when the kernel writes them (no
read-for-ownership).
"""
from __future__ import annotations

import functools
import sys
from typing import Optional

import torch
from torch import Tensor

from ..ops import dispatch
from ..recycled_views import storage_users

#: below this many bytes a fresh allocation comes from the allocator's free lists (no page faults), and the
#: bookkeeping would cost more than it saves. Measured again with the compiled loop's two-check `recycle`
#: (2026-12-01, in one process, interleaved, CPU time, dpmpp1/2 and unipc3): reuse was 3-20% slower than fresh
#: outputs from 128 to 512 KiB, even at 1 MiB (0.86-1.01x), and 1.0-1.28x faster from 2 MiB (unipc3 at 4 MiB: 1.39x)
MIN_BYTES = 1 << 20


_ALONE: Optional[int] = None


def _alone() -> int:
    """The storage use count of a tensor that nothing else shares (the storage wrapper itself counts)."""
    global _ALONE
    if _ALONE is None:
        _ALONE = storage_users(torch.empty(1))
    return _ALONE


def _sole_reference_count() -> int:
    """What sys.getrefcount reports for an object held only by a local popped from a dict, in code shaped like
    `release`. CPython 3.11-3.13 say 2 (the local and the call's argument); 3.14 may borrow the argument's
    reference and say 1, and a hard-coded 2 would then take a buffer somebody else still holds for a free one."""
    store = {"t": object()}
    t = store.pop("t", None)
    return sys.getrefcount(t)


_SOLE = _sole_reference_count()


def _callee_count(t) -> int:
    return sys.getrefcount(t)


#: what sys.getrefcount reports inside a function shaped like `writable` for an object nothing else holds (a
#: temporary: its argument and getrefcount's own; 3.14 may borrow either, so it is measured, not assumed)
_CALLEE_BASE = _callee_count({"t": object()}["t"])


def writable(t: Tensor, holders: int) -> bool:
    """True when the `holders` references the caller knows of (dict entries and its own locals) are all that hold t
    and no other tensor shares its storage (no view of it is alive): the loop may then overwrite t in place."""
    return sys.getrefcount(t) == holders + _CALLEE_BASE and storage_users(t) == _alone()


@functools.lru_cache(maxsize=None)
def _updates_in_place(kernel) -> bool:
    """Whether this build of the out= kernel accepts an output that is one of its inputs (an extension built
    before it did refuses any overlap: the loop then writes fresh or pooled buffers as before)."""
    x = torch.ones(1, 1)
    try:
        kernel(x, [x.clone()], torch.ones(1, 2), None, None, None, torch.ones(1, 2), x, torch.empty(1, 1))
    except ValueError:
        return False
    return bool(x.item() == 3.0)  # 1 * 1 + 1 * (1 * 1 + 1 * 1)


class BufferPool:
    """Free buffers shaped like the solver state x; `kernel` is the out= update (None: the pool is off),
    `out_kernel` the same for updates in place (None: reuse is off, or no C++ backend serves x)."""

    def __init__(self, like: Tensor, min_bytes: Optional[int] = None, enabled: bool = True):
        big = like.numel() * like.element_size() >= (MIN_BYTES if min_bytes is None else min_bytes)
        # the out= update: the compiled loop's in-place updates at any size, the pool's from min_bytes
        # (torch.compile traces the registered op: no kernel is looked up, and the compiled loop is not used)
        enabled = enabled and not torch.compiler.is_compiling()
        kernel = dispatch.eager_kernel(like, "multistep_update_out_cpu") if enabled else None
        self.out_kernel = kernel if kernel is not None and _updates_in_place(kernel) else None
        self.kernel = kernel if big else None
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.free: list = []

    @property
    def enabled(self) -> bool:
        return self.kernel is not None

    def take(self) -> Tensor:
        return self.free.pop() if self.free else torch.empty(self.shape, dtype=self.dtype, device=self.device)

    def release(self, buf: dict, name: str) -> None:
        """Pop buf[name] and keep it for reuse if nothing else refers to it."""
        t = buf.pop(name, None)
        # held by `t` alone (see _sole_reference_count)
        if (self.kernel is not None and type(t) is Tensor and sys.getrefcount(t) == _SOLE and not t.requires_grad
                and t.shape == self.shape and t.dtype == self.dtype and t.device == self.device
                and t.is_contiguous() and t._base is None and storage_users(t) == _alone()):
            self.free.append(t)

    def recycle(self, buf: dict, name: str) -> None:
        """`release` for a buffer this pool handed out (`take`) and the loop wrote with its kernel: its shape, dtype,
        device, layout and grad flag are the pool's by construction, so only what can change outside the loop is
        checked: another reference (a model that kept its input) or a view of it. The caller knows statically
        which names hold such buffers (Execution.compile)."""
        t = buf.pop(name, None)
        if t is not None and sys.getrefcount(t) == _SOLE and storage_users(t) == _alone():
            self.free.append(t)

    def update(self, x: Tensor, history: list, row: Tensor, uncond=None, scale=None, src=None, convert=None):
        """The fused update into recycled buffers: x_next, or (x_next, h_0) with guidance or a conversion (the
        multistep_update contract)."""
        out = self.take()
        if uncond is None and convert is None:
            self.kernel(x, history, row, None, None, None, None, out, None)
            return out
        h0 = self.take()
        self.kernel(x, history, row, uncond, scale, src, convert, out, h0)
        return out, h0
