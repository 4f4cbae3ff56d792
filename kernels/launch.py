"""What every Triton launcher in this package shares: the device guard, the grid-size limit and the autotune space.

- Launches run under `torch.cuda.device(<the data's device>)`, so a tensor on cuda:1 is never launched on the
  current device (multi-GPU).
- Elementwise and reduction kernels are grid-stride loops over a 1-D grid of at most MAX_PROGRAMS programs (CUDA's
  limit on grid axis 0), so any sample size launches; tests patch MAX_PROGRAMS down to exercise the loop.
- On a GPU the block size is autotuned over a small space per problem size; under the interpreter there is one
  config (the interpreter cannot benchmark, and each program costs milliseconds there, so blocks are large).
"""
import contextlib

import torch
import triton

from tdiff.ops import dispatch

MAX_PROGRAMS = 2**31 - 1


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def programs(blocks: int) -> int:
    """Programs on the 1-D grid for `blocks` blocks of work (each program loops over its share)."""
    return max(1, min(int(blocks), MAX_PROGRAMS))


def block_configs(gpu_blocks=((1024, 4), (2048, 8), (4096, 8)), interpreter_block: int = 4096):
    """Autotune configs for the BLOCK meta-parameter: (BLOCK, num_warps) pairs on a GPU, one under the interpreter."""
    if dispatch.triton_interpreting():
        return [triton.Config({"BLOCK": interpreter_block}, num_warps=4)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b, w in gpu_blocks]


def reduction_programs(n: int) -> int:
    """Programs per sample for a per-sample reduction over n elements: its partial results have this many entries
    per sample whatever block size the autotuner picks."""
    per = 4096 if dispatch.triton_interpreting() else 1024
    return max(1, min(triton.cdiv(n, per), 64 if dispatch.triton_interpreting() else 256))
