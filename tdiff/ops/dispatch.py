"""Backend choice for every fused op: by device and availability, overridable with TDIFF_BACKEND.

  cuda: Triton > reference        cpu: C++ (tdiff._C) > reference
  TDIFF_BACKEND=auto|cpp|triton|torch forces one (tests and benchmarks). Triton on a CPU tensor only runs
  under the interpreter (TRITON_INTERPRET=1), which the tests set.

If the compiled extension is missing, the library warns once and runs on the reference.
"""
from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("auto", "cpp", "triton", "torch")


@functools.lru_cache(maxsize=None)
def extension_loaded() -> bool:
    from .._extension import load  # imports tdiff._C, or warns once (naming TDIFF_NO_EXT) and returns False

    return load()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_block(gpu_block: int = 1024) -> int:
    """Elements per Triton program for the memory-bound kernels: gpu_block on a GPU (with 4 warps, a good default
    for one elementwise pass), 4096 under the interpreter, where each program costs milliseconds."""
    return 4096 if triton_interpreting() else gpu_block


def requested_backend() -> str:
    b = os.environ.get("TDIFF_BACKEND", "auto").strip().lower() or "auto"
    if b not in BACKENDS:
        raise ValueError(f"TDIFF_BACKEND={b!r} is not one of {BACKENDS}")
    return b


@functools.lru_cache(maxsize=None)  # per call it was a torch.ops attribute lookup, tens of microseconds
def cpp_has(op_name: str) -> bool:
    return extension_loaded() and hasattr(torch.ops.tdiff, op_name)


def backend_for(x: torch.Tensor, cpp_op: str) -> str:
    """The backend that runs an op on tensors like `x`. `cpp_op` is the name of its C++ kernel under tdiff::."""
    want = requested_backend()
    dev = x.device.type
    if want == "torch":
        return "torch"
    if want == "cpp":
        if dev != "cpu":
            raise ValueError(f"TDIFF_BACKEND=cpp runs on CPU tensors only, got a {dev} tensor")
        if not cpp_has(cpp_op):
            raise RuntimeError(f"TDIFF_BACKEND=cpp but the extension has no tdiff::{cpp_op} (rebuild tdiff._C)")
        return "cpp"
    if want == "triton":
        if not triton_available():
            raise RuntimeError("TDIFF_BACKEND=triton but triton is not installed")
        if dev == "cpu" and not triton_interpreting():
            raise ValueError("TDIFF_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 (the interpreter)")
        return "triton"
    # auto
    if dev == "cuda":
        return "triton" if triton_available() else "torch"
    if dev == "cpu" and cpp_has(cpp_op):
        return "cpp"
    return "torch"


def check_same(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, shape: bool = True) -> None:
    """Shared input validation: shape, dtype and device must agree."""
    if shape and a.shape != b.shape:
        raise ValueError(f"{name_b} must have the shape of {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise ValueError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_b} must be on the device of {name_a} ({a.device}), got {b.device}")


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {x.dtype}")


def coef_dtype(x: torch.Tensor) -> torch.dtype:
    """Per-sample coefficients are float64 for float64 data (gradcheck) and float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B,) per-sample value shaped (B, 1, ..., 1) to broadcast over a sample like `like`."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def plain_call(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph and no compiler trace is needed: then an op's public function skips the
    custom-op wrapper (tens of microseconds a call, often more than the kernel at small sizes) and runs the same
    body directly."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def route(x: torch.Tensor, cpp_op: str, triton_fn: str, reference, *args):
    """Run an op's implementation for the backend chosen for `x`: the C++ kernel torch.ops.tdiff.<cpp_op>, the
    Triton launcher "module:function" (imported lazily, so CPU-only installs never import triton), or the
    reference function. Every op's custom_op body is this one call."""
    backend = backend_for(x, cpp_op)
    if backend == "cpp":
        return getattr(torch.ops.tdiff, cpp_op)(*args)
    if backend == "triton":
        module, fn = triton_fn.split(":")
        return getattr(importlib.import_module(module), fn)(*args)
    return reference(*args)
