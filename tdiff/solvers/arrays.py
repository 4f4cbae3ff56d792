"""The few array functions the coefficient formulas use, for torch tensors and numpy float64 arrays alike.

Every solver's coefficient formula is written once, over these functions and the arithmetic operators, and runs on
either kind of array:
  - torch tensors (differentiable in the time steps: LD3, DM-NonUniform, any caller that builds a Grid itself);
  - numpy float64 arrays, when no gradient is asked for (`Grid.on_host`): the tables of a no-grad `tdiff.sample`
    are a few hundred element-wise operations on arrays of ~20 entries, where each torch op costs a few
    microseconds of dispatch and a numpy op a fraction of that; the finished rows become torch tensors in one
    conversion per row width (`Program.seal_rows`).
The functions pick the implementation from their first array argument's type. Index arrays are numpy int64 arrays
on both paths (torch indexes with them too).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

HOST = (np.ndarray, np.generic)


def on_host(v) -> bool:
    return isinstance(v, HOST)


def readable_on_host(t) -> bool:
    """A plain CPU float64 tensor outside autograd and torch.func, whose values numpy can read without a copy."""
    return (t.device.type == "cpu" and t.dtype == torch.float64 and not t.requires_grad
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


def indices(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def expm1(v):
    if isinstance(v, HOST):
        return _complex_step(np.expm1, v) if v.dtype.kind == "c" else np.expm1(v)
    return torch.expm1(v)


def exp(v):
    if isinstance(v, HOST):
        return _complex_step(np.exp, v) if v.dtype.kind == "c" else np.exp(v)
    return torch.exp(v)


def negative(v):
    """-v. A numpy complex array is multiplied by -1 instead (the same bits: negation and a product with -1 are
    both exact), since numpy's complex negation costs 5x that product (DM-NonUniform's complex-step columns)."""
    return v * -1.0 if isinstance(v, HOST) and v.dtype.kind == "c" else -v


#: `_complex_step`'s bound on |imaginary part|: its square is then far below the rounding of any value it touches
COMPLEX_STEP_BOUND = 1e-20


def _complex_step(f, v: np.ndarray) -> np.ndarray:
    """f(x + i y) for f = expm1 or exp (both of derivative exp) at a complex step, |y| <= COMPLEX_STEP_BOUND
    (DM-NonUniform's Jacobian columns, y ~ 1e-30): f(x) + i y exp(x), exact to rounding there (the terms dropped
    are O(y^2)), from real functions: numpy's complex expm1 costs 10x this (35 ns an element), its exp 3x. Other
    complex arrays take numpy's own."""
    x, y = v.real, v.imag
    if not np.abs(y).max(initial=0.0) <= COMPLEX_STEP_BOUND:
        return f(v)
    e = np.exp(x)
    out = np.empty(v.shape, dtype=v.dtype)
    out.real = e if f is np.exp else np.expm1(x)
    out.imag = y * e
    return out


def sqrt(v):
    return np.sqrt(v) if isinstance(v, HOST) else v.sqrt()


def sqrt_pos(v):
    """sqrt(max(v, 0)) (a variance that rounding may push just below 0)."""
    return np.sqrt(np.maximum(v, 0.0)) if isinstance(v, HOST) else v.clamp_min(0).sqrt()


def clamp(v, lo: float, hi: float):
    """v clamped to [lo, hi]: a tensor, a numpy array or a Python float (np.clip is twice as slow as this on
    small arrays)."""
    if isinstance(v, float):  # comparisons, not min/max calls: the same result (NaN and -0.0 kept) at a third
        return lo if v < lo else hi if v > hi else v
    return np.minimum(np.maximum(v, lo), hi) if isinstance(v, HOST) else v.clamp(lo, hi)


def full_like(v, value: float):
    return np.full_like(v, value) if isinstance(v, HOST) else torch.full_like(v, value)


def ones_like(v):
    return np.ones_like(v) if isinstance(v, HOST) else torch.ones_like(v)


def zeros_like(v):
    return np.zeros_like(v) if isinstance(v, HOST) else torch.zeros_like(v)


def zeros(like, shape: tuple):
    return np.zeros(shape) if isinstance(like, HOST) else like.new_zeros(shape)


def tensor(like, values: Sequence):
    """An array of `values` of like's kind and dtype."""
    return np.asarray(values, dtype=np.float64) if isinstance(like, HOST) else torch.tensor(values, dtype=like.dtype)


def stack(vs: Sequence, dim: int = 0):
    if not isinstance(vs[0], HOST):
        return torch.stack(list(vs), dim=dim)
    nd = vs[0].ndim
    if nd <= 2 and -nd - 1 <= dim <= nd:  # without np.stack's Python overhead: one array, then a transposed view
        out = np.array(vs)  # (len(vs), *shape); complex stays complex (DM-NonUniform's complex-step columns)
        if out.dtype.kind not in "fc":
            out = out.astype(np.float64)
        dim = dim % (nd + 1)
        if dim == 0:
            return out
        axes = list(range(1, nd + 1))
        axes.insert(dim, 0)
        return out.transpose(axes)
    return np.stack(vs, axis=dim)


def cat(vs: Sequence, dim: int = 0):
    return np.concatenate(vs, axis=dim) if isinstance(vs[0], HOST) else torch.cat(list(vs), dim=dim)


def unbind(v, dim: int = 0) -> list:
    if isinstance(v, HOST):
        return list(v if dim == 0 else v.T if v.ndim == 2 else np.moveaxis(v, dim, 0))
    return list(v.unbind(dim))


def rows(columns: Sequence) -> list:
    """The rows of the matrix whose columns are `columns` (equal-length 1-D arrays): per position, one row."""
    return unbind(stack(columns, dim=1), 0)


def where(cond, a, b):
    """cond (a numpy bool array or a bool tensor) ? a : b."""
    if isinstance(a, HOST):
        return np.where(cond, a, b)
    return torch.where(torch.as_tensor(cond, device=a.device), a, b)


def amax(v, dim: int):
    return v.max(axis=dim) if isinstance(v, HOST) else v.amax(dim)


def put(v, idx: np.ndarray, values):
    """A copy of v with v[idx] = values (out of place: differentiable on the torch path)."""
    if isinstance(v, HOST):
        out = np.array(v, dtype=np.float64)
        out[idx] = values
        return out
    return v.index_put((torch.as_tensor(idx, device=v.device),), torch.as_tensor(values, dtype=v.dtype))


def solve_vectors(a, b):
    """x with a[m] x[m] = b[m]: a (M, n, n), b (M, n)."""
    if isinstance(a, HOST):
        return np.linalg.solve(a, b[..., None])[..., 0]
    return torch.linalg.solve(a, b)


def tolist(v) -> list:
    return v.tolist() if isinstance(v, HOST) else v.detach().tolist()


def as_torch(v):
    """A torch float64 tensor of a host array (torch tensors pass through)."""
    return torch.from_numpy(np.asarray(v, dtype=np.float64)) if isinstance(v, HOST) else v


def as_like(v, like):
    """v (a torch tensor) on like's side: a numpy array when like is one, else v itself."""
    return v.detach().cpu().numpy().astype(np.float64) if isinstance(like, HOST) else v
