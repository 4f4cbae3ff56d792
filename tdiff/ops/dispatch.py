"""Backend choice for every fused op: by device and availability, overridable with TDIFF_BACKEND.

  cuda: Triton > reference        cpu: C++ (tdiff._C) > reference
  TDIFF_BACKEND=auto|cpp|triton|torch forces one (tests and benchmarks). Triton on a CPU tensor only runs
  under the interpreter (TRITON_INTERPRET=1), which the tests set.

If the compiled extension is missing, the library warns once and runs on the reference.

Every public op function has the same three paths: traced or differentiated calls go through the registered
custom op (fakes, autograd); an eager call without autograd on a CPU tensor calls the C++ kernel directly
(`eager_kernel`: no custom-op layer and no Python validation, since the C++ ops validate their inputs; a refusal is
re-explained by the Python validation, which names arguments as the public API does); any other eager call runs the
op's validated body (`route`) without the custom-op layer.
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


# os.environ.get of an unset variable raises and catches a KeyError inside: microseconds, on every op call. The
# environment's underlying dict answers the same question in tens of nanoseconds (CPython keeps it in
# os.environ._data, with encodekey/decodevalue); elsewhere, the plain lookup.
_ENV_DATA = getattr(os.environ, "_data", None)
_BACKEND_KEY = os.environ.encodekey("TDIFF_BACKEND") if hasattr(os.environ, "encodekey") else None
_FAST_ENV = _ENV_DATA is not None and _BACKEND_KEY is not None


def _backend_env() -> str:
    if _ENV_DATA is not None and _BACKEND_KEY is not None:
        raw = _ENV_DATA.get(_BACKEND_KEY)
        return "auto" if raw is None else os.environ.decodevalue(raw)
    return os.environ.get("TDIFF_BACKEND", "auto")


def requested_backend() -> str:
    b = _backend_env().strip().lower() or "auto"
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


def eager_kernel(x: torch.Tensor, cpp_op: str):
    """The C++ kernel torch.ops.tdiff.<cpp_op> when it is the backend for a CPU tensor `x`, else None: what a
    public function's eager no-grad fast path calls directly (no custom-op layer, no Python validation: the
    registered C++ ops validate their own inputs). TDIFF_BACKEND other than auto/cpp, and any other device, take
    the general path."""
    if not (isinstance(x, torch.Tensor) and x.is_cpu):
        return None
    # TDIFF_BACKEND unset (the usual case) is one dict lookup; set, the full test
    if not _FAST_ENV or _ENV_DATA.get(_BACKEND_KEY) is not None:
        if _backend_env().strip().lower() not in ("auto", "cpp", ""):
            return None
    return _cpp_kernel(cpp_op)


@functools.lru_cache(maxsize=None)
def _cpp_kernel(cpp_op: str):
    if not cpp_has(cpp_op):
        return None
    # tdiff._C binds the forward ops' C++ entry points directly (csrc/module.cpp): the very function the
    # dispatcher runs, without its several microseconds from Python. Positional arguments only.
    direct = getattr(importlib.import_module("tdiff._C"), cpp_op, None)
    if direct is not None:
        return direct
    overload = getattr(torch.ops.tdiff, cpp_op).default
    return getattr(overload, "_op", overload)  # the overload's dispatcher entry, without OpOverload.__call__


def fast_call(*tensors) -> bool:
    """True for an eager call without autograd: the case a public function's fast path serves."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return False
    return not torch.compiler.is_compiling()


def assert_true(cond: torch.Tensor, message) -> None:
    """Raise ValueError(message()) unless the bool tensor `cond` holds. Eagerly that is one host sync; while
    torch.compile traces, it becomes torch._assert_async (no data-dependent branch, so no graph break; it fails at
    run time with the same text)."""
    if torch.compiler.is_compiling():
        torch._assert_async(cond, message(compiling=True))
    elif not bool(cond):
        raise ValueError(message(compiling=False))


def check_indices(name: str, idx: torch.Tensor, lo: int, hi: int, what: str) -> None:
    """Every value of the integer tensor `idx` in [lo, hi). On the CPU a host check (cheap); elsewhere a
    device-side assert (torch._assert_async: no host sync, the launch fails instead). Meta and fake tensors hold no
    values and pass."""
    if idx.numel() == 0 or idx.device.type == "meta" or isinstance(idx, torch._subclasses.FakeTensor):
        return
    ok = ((idx >= lo) & (idx < hi)).all()
    if idx.is_cpu:
        if not bool(ok):
            bad = ((idx < lo) | (idx >= hi)).nonzero().flatten()[:4].tolist()
            raise ValueError(f"{name} is out of range at {bad} (values {idx.flatten()[bad].tolist()}): expected "
                             f"{what} in [{lo}, {hi})")
    else:
        torch._assert_async(ok, f"{name} out of range: expected {what} in [{lo}, {hi})")


def plain_call(*tensors: torch.Tensor) -> bool:
    """True when no autograd graph and no compiler trace is needed: then an op's public function skips the
    custom-op wrapper (tens of microseconds a call, often more than the kernel at small sizes) and runs the same
    body directly."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


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
