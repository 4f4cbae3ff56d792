"""Fused multistep solver update: x_next = c_x x + c_0 h_0 + sum_{k>=1} c_k h_k, per-sample coefficient rows, with
the prediction conversion (and classifier-free guidance) of the new model output folded into the same pass.

Every multistep solver step (DDIM, DPM-Solver++ 2M/3M, UniPC predictor and corrector, iPNDM, Heun) is a linear
combination of the current sample and up to four history buffers. Doing it in one pass reads each input once and
writes the output once, instead of the 2K+1 passes of eager arithmetic.

  coeffs is (B, 1+K): row b = [c_x, c_0, ..., c_{K-1}] for sample b, so one batch may hold samples at different
  steps (serving). Coefficients are float64 for float64 data and float32 otherwise (dispatch.coef_dtype); the
  kernels accumulate in that type (half and bfloat16 data in float32).

The convert form (issue 18; the contract is /work/wt/SPEC_multistep.md): history[0] is the *raw* network output m
at the sample src the network saw, and h_0 is formed in the same pass:

  m' = m                      or  m' = u + w (m - u)      (classifier-free guidance: m = cond, u = uncond)
  h_0 = D = p src + q m'      (convert rows [p, q]: the affine prediction -> data conversion; without convert,
                               h_0 = m')

  eps: p = 1/alpha, q = -sigma/alpha;  v: p = alpha/(alpha^2+sigma^2), q = -sigma/(alpha^2+sigma^2);  x0: p = 0,
  q = 1; flow and EDM preconditioning likewise (the solver layer builds the rows). h_0 is written out as well,
  because a multistep solver keeps it as history; the combination uses it at accumulation precision.

Ops (schemas under tdiff::):
  multistep_update(x, history[K], coeffs) -> x_next
  multistep_update_backward(grad, x, history[K], coeffs) -> (grad_x, grad_history[K], grad_coeffs)
  multistep_update_convert(x, history[K], coeffs, uncond?, scale?, src?, convert?) -> (x_next, h_0)
      src None with convert means src = x (the network saw the update's base).
  multistep_update_convert_backward(grad, grad_h0, x, history[K], coeffs, uncond?, scale?, src?, convert?)
      -> (grad_x, grad_history[K], grad_coeffs, grad_uncond, grad_scale, grad_src, grad_convert)
      an absent input's gradient is an empty tensor. It runs on the reference on every backend (a few passes,
      taken only under autograd, e.g. LD3, whose cost is the network's backward).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dispatch

MAX_HISTORY = 4


# ---------------------------------------------------------------------------------------------------------------
# Reference (the test oracle and the fallback)
# ---------------------------------------------------------------------------------------------------------------
def _c(coeffs: Tensor, i: int, like: Tensor) -> Tensor:
    return dispatch.per_sample(coeffs[:, i], like)


def _combine(x: Tensor, terms: Sequence[Tensor], coeffs: Tensor) -> Tensor:
    """c_x x + sum_k c_k terms[k] at accumulation precision, cast to x's dtype: the update, the one formula."""
    acc = coeffs.dtype
    out = _c(coeffs, 0, x) * x.to(acc)
    for k, h in enumerate(terms):
        out = out + _c(coeffs, k + 1, x) * h.to(acc)
    return out.to(x.dtype).contiguous()


def _guided(cond: Tensor, uncond: Tensor, scale: Tensor, acc: torch.dtype) -> Tensor:
    """uncond + w (cond - uncond) at accumulation precision: classifier-free guidance, the one formula."""
    u = uncond.to(acc)
    return u + dispatch.per_sample(scale, cond) * (cond.to(acc) - u)


def _converted(x: Tensor, m: Tensor, src: Optional[Tensor], convert: Tensor, acc: torch.dtype) -> Tensor:
    """p src + q m at accumulation precision (src None: the network saw x): the prediction conversion."""
    s = (x if src is None else src).to(acc)
    return dispatch.per_sample(convert[:, 0], x) * s + dispatch.per_sample(convert[:, 1], x) * m


def _h0(x, history, coeffs, uncond, scale, src, convert) -> Tuple[Tensor, Tensor]:
    """(m', h_0) at accumulation precision."""
    acc = coeffs.dtype
    m = history[0].to(acc) if uncond is None else _guided(history[0], uncond, scale, acc)
    return m, (m if convert is None else _converted(x, m, src, convert, acc))


def multistep_update_reference(x: Tensor, history: List[Tensor], coeffs: Tensor) -> Tensor:
    return _combine(x, history, coeffs)


def multistep_update_convert_reference(x: Tensor, history: List[Tensor], coeffs: Tensor,
                                       uncond: Optional[Tensor] = None, scale: Optional[Tensor] = None,
                                       src: Optional[Tensor] = None,
                                       convert: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    _, h0 = _h0(x, history, coeffs, uncond, scale, src, convert)
    return _combine(x, [h0, *history[1:]], coeffs), h0.to(x.dtype).contiguous()


def _per_sample_dot(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    return (a.to(acc) * b.to(acc)).reshape(a.shape[0], -1).sum(dim=1)


def multistep_update_backward_reference(grad: Tensor, x: Tensor, history: List[Tensor],
                                        coeffs: Tensor) -> Tuple[Tensor, List[Tensor], Tensor]:
    acc = coeffs.dtype
    g = grad.to(acc)
    grad_x = (_c(coeffs, 0, x) * g).to(x.dtype).contiguous()
    grad_h = [(_c(coeffs, k + 1, x) * g).to(x.dtype).contiguous() for k in range(len(history))]
    grad_c = torch.stack([_per_sample_dot(grad, t, acc) for t in [x, *history]], dim=1)
    return grad_x, grad_h, grad_c


def multistep_update_convert_backward_reference(grad, grad_h0, x, history, coeffs, uncond=None, scale=None,
                                                src=None, convert=None):
    acc = coeffs.dtype
    dt = x.dtype
    g = grad.to(acc)
    m, h0 = _h0(x, history, coeffs, uncond, scale, src, convert)
    g_h0 = _c(coeffs, 1, x) * g + grad_h0.to(acc)  # what reaches h_0: through x_next and as an output
    empty = lambda dtype=dt: x.new_empty(0, dtype=dtype)  # noqa: E731  (a fresh one each: outputs may not alias)
    if convert is None:
        g_m, g_src, g_conv = g_h0, empty(), empty(acc)
    else:
        s = (x if src is None else src).to(acc)
        g_m = dispatch.per_sample(convert[:, 1], x) * g_h0
        g_src = (dispatch.per_sample(convert[:, 0], x) * g_h0).to(dt).contiguous()
        g_conv = torch.stack([_per_sample_dot(g_h0, s, acc), _per_sample_dot(g_h0, m, acc)], dim=1)
    if uncond is None:
        g_cond, g_u, g_w = g_m, empty(), empty(acc)
    else:
        w = dispatch.per_sample(scale, x)
        g_cond = w * g_m
        g_u = ((1 - w) * g_m).to(dt).contiguous()
        g_w = _per_sample_dot(g_m, history[0].to(acc) - uncond.to(acc), acc)
    grad_x = (_c(coeffs, 0, x) * g).to(dt).contiguous()
    grad_h = [g_cond.to(dt).contiguous()] + [(_c(coeffs, k + 1, x) * g).to(dt).contiguous()
                                              for k in range(1, len(history))]
    grad_c = torch.stack([_per_sample_dot(g, t, acc) for t in [x, h0, *history[1:]]], dim=1)
    return grad_x, grad_h, grad_c, g_u, g_w, g_src, g_conv


# ---------------------------------------------------------------------------------------------------------------
# Validation shared by every backend (no device syncs: the NaN check lives in the public wrapper)
# ---------------------------------------------------------------------------------------------------------------
def _validate(x: Tensor, history: Sequence[Tensor], coeffs: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    dispatch.check_float("x", x)
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not isinstance(history, (list, tuple)):
        raise TypeError(f"history must be a list of 1 to {MAX_HISTORY} tensors, got {type(history).__name__}")
    if not 1 <= len(history) <= MAX_HISTORY:
        raise ValueError(f"history must hold 1 to {MAX_HISTORY} tensors, got {len(history)}")
    for k, h in enumerate(history):
        if not isinstance(h, Tensor):
            raise TypeError(f"history[{k}] must be a tensor like x, got {type(h).__name__}")
        dispatch.check_same("x", x, f"history[{k}]", h)
    _check_rows("coeffs", coeffs, x, 1 + len(history), "one row [c_x, c_0..c_K-1] per sample")


def _check_rows(name: str, rows: Tensor, x: Tensor, width: int, what: str) -> None:
    if not isinstance(rows, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(rows).__name__}")
    want = (x.shape[0], width)
    if rows.dim() != 2 or tuple(rows.shape) != want:
        raise ValueError(f"{name} must have shape {want} ({what}), got {tuple(rows.shape)}")
    if rows.dtype != dispatch.coef_dtype(x):
        raise ValueError(f"{name} must be {dispatch.coef_dtype(x)} for {x.dtype} data, got {rows.dtype}")
    if rows.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}), got {rows.device}")


def _validate_convert(x, history, coeffs, uncond, scale, src, convert) -> None:
    _validate(x, history, coeffs)
    if (uncond is None) != (scale is None):
        raise ValueError("uncond and scale must be given together (classifier-free guidance)")
    if src is not None and convert is None:
        raise ValueError("src is the sample the network saw; it needs convert rows [p, q]")
    if uncond is not None:
        if not isinstance(uncond, Tensor):
            raise TypeError(f"uncond must be a tensor like history[0], got {type(uncond).__name__}")
        dispatch.check_same("history[0] (cond)", history[0], "uncond", uncond)
        if not isinstance(scale, Tensor):
            raise TypeError(f"scale must be a tensor of one guidance scale per sample, got {type(scale).__name__}")
        if scale.dim() != 1 or scale.shape[0] != x.shape[0]:
            raise ValueError(f"scale must have shape ({x.shape[0]},) (one guidance scale per sample), "
                             f"got {tuple(scale.shape)}")
        if scale.dtype != coeffs.dtype or scale.device != x.device:
            raise ValueError(f"scale must be {coeffs.dtype} on {x.device}, got {scale.dtype} on {scale.device}")
    if convert is not None:
        _check_rows("convert", convert, x, 2, "one row [p, q] per sample")
        if src is not None:
            if not isinstance(src, Tensor):
                raise TypeError(f"src must be a tensor like x, got {type(src).__name__}")
            dispatch.check_same("x", x, "src", src)


def _contiguous(ts: Sequence[Tensor]) -> List[Tensor]:
    return [t.contiguous() for t in ts]


def _maybe_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


# ---------------------------------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------------------------------
def _forward(x: Tensor, history: List[Tensor], coeffs: Tensor) -> Tensor:
    _validate(x, history, coeffs)
    x, history, coeffs = x.contiguous(), _contiguous(history), coeffs.contiguous()
    return dispatch.route(x, "multistep_update_cpu", "tdiff.kernels.multistep_update:multistep_update_triton",
                          multistep_update_reference, x, history, coeffs)


@torch.library.custom_op("tdiff::multistep_update", mutates_args=())
def multistep_update_op(x: Tensor, history: List[Tensor], coeffs: Tensor) -> Tensor:
    return _forward(x, history, coeffs)


def _like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


@multistep_update_op.register_fake
def _(x, history, coeffs):
    _validate(x, history, coeffs)
    return _like(x)


@torch.library.custom_op("tdiff::multistep_update_backward", mutates_args=())
def multistep_update_backward_op(grad: Tensor, x: Tensor, history: List[Tensor],
                                 coeffs: Tensor) -> Tuple[Tensor, List[Tensor], Tensor]:
    _validate(x, history, coeffs)
    dispatch.check_same("x", x, "grad", grad)
    grad, x, history, coeffs = grad.contiguous(), x.contiguous(), _contiguous(history), coeffs.contiguous()
    return dispatch.route(x, "multistep_update_backward_cpu",
                          "tdiff.kernels.multistep_update:multistep_update_backward_triton",
                          multistep_update_backward_reference, grad, x, history, coeffs)


@multistep_update_backward_op.register_fake
def _(grad, x, history, coeffs):
    _validate(x, history, coeffs)
    return _like(x), [_like(h) for h in history], _like(coeffs)


def _setup_context(ctx, inputs, output):
    x, history, coeffs = inputs
    ctx.save_for_backward(x, coeffs, *history)


def _backward(ctx, grad):
    x, coeffs, *history = ctx.saved_tensors
    grad_x, grad_h, grad_c = torch.ops.tdiff.multistep_update_backward(grad, x, history, coeffs)
    return grad_x, list(grad_h), grad_c


multistep_update_op.register_autograd(_backward, setup_context=_setup_context)


def _forward_convert(x, history, coeffs, uncond, scale, src, convert) -> Tuple[Tensor, Tensor]:
    _validate_convert(x, history, coeffs, uncond, scale, src, convert)
    args = (x.contiguous(), _contiguous(history), coeffs.contiguous(), _maybe_contiguous(uncond),
            _maybe_contiguous(scale), _maybe_contiguous(src), _maybe_contiguous(convert))
    return dispatch.route(x, "multistep_update_convert_cpu",
                          "tdiff.kernels.multistep_update:multistep_update_convert_triton",
                          multistep_update_convert_reference, *args)


@torch.library.custom_op("tdiff::multistep_update_convert", mutates_args=())
def multistep_update_convert_op(x: Tensor, history: List[Tensor], coeffs: Tensor, uncond: Optional[Tensor],
                                scale: Optional[Tensor], src: Optional[Tensor],
                                convert: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _forward_convert(x, history, coeffs, uncond, scale, src, convert)


@multistep_update_convert_op.register_fake
def _(x, history, coeffs, uncond, scale, src, convert):
    _validate_convert(x, history, coeffs, uncond, scale, src, convert)
    return _like(x), _like(x)


@torch.library.custom_op("tdiff::multistep_update_convert_backward", mutates_args=())
def multistep_update_convert_backward_op(grad: Tensor, grad_h0: Tensor, x: Tensor, history: List[Tensor],
                                         coeffs: Tensor, uncond: Optional[Tensor], scale: Optional[Tensor],
                                         src: Optional[Tensor], convert: Optional[Tensor]
                                         ) -> Tuple[Tensor, List[Tensor], Tensor, Tensor, Tensor, Tensor, Tensor]:
    _validate_convert(x, history, coeffs, uncond, scale, src, convert)
    dispatch.check_same("x", x, "grad", grad)
    dispatch.check_same("x", x, "grad_h0", grad_h0)
    return multistep_update_convert_backward_reference(grad.contiguous(), grad_h0.contiguous(), x, history, coeffs,
                                                       uncond, scale, src, convert)


@multistep_update_convert_backward_op.register_fake
def _(grad, grad_h0, x, history, coeffs, uncond, scale, src, convert):
    _validate_convert(x, history, coeffs, uncond, scale, src, convert)
    opt = lambda t, dtype=None: x.new_empty(0, dtype=dtype or x.dtype) if t is None else _like(t)  # noqa: E731
    return (_like(x), [_like(h) for h in history], _like(coeffs), opt(uncond), opt(scale, coeffs.dtype),
            opt(None) if convert is None else _like(x), opt(convert, coeffs.dtype))


def _setup_context_convert(ctx, inputs, output):
    x, history, coeffs, uncond, scale, src, convert = inputs
    ctx.k = len(history)
    ctx.save_for_backward(x, coeffs, uncond, scale, src, convert, *history)


def _backward_convert(ctx, grad, grad_h0):
    x, coeffs, uncond, scale, src, convert, *history = ctx.saved_tensors
    grad = torch.zeros_like(x) if grad is None else grad
    grad_h0 = torch.zeros_like(x) if grad_h0 is None else grad_h0
    gx, gh, gc, gu, gs, gsrc, gconv = torch.ops.tdiff.multistep_update_convert_backward(
        grad, grad_h0, x, history, coeffs, uncond, scale, src, convert)
    if convert is not None and src is None:
        gx = gx + gsrc  # the network saw x itself
    return (gx, list(gh), gc, None if uncond is None else gu, None if scale is None else gs,
            None if src is None else gsrc, None if convert is None else gconv)


multistep_update_convert_op.register_autograd(_backward_convert, setup_context=_setup_context_convert)


# ---------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------
def _rows(rows: Tensor, x: Tensor) -> Tensor:
    """One shared row expanded over the batch (a view, no copy); (B, width) rows as given."""
    if isinstance(rows, Tensor) and rows.dim() == 1 and isinstance(x, Tensor) and x.dim() >= 1:
        return rows.unsqueeze(0).expand(x.shape[0], -1)
    return rows


def _scale(scale, x: Tensor, coeffs: Tensor):
    if scale is None or not isinstance(x, Tensor) or not isinstance(coeffs, Tensor):
        return scale
    if not isinstance(scale, Tensor):
        scale = torch.tensor(float(scale), dtype=coeffs.dtype, device=x.device)
    if scale.dim() == 0 and x.dim() >= 1:
        scale = scale.reshape(1).expand(x.shape[0])
    return scale


def _check_finite(name: str, rows: Tensor) -> None:
    def message(compiling: bool) -> str:
        if compiling:
            return f"{name} must be finite"
        bad = (~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1)).nonzero().flatten()[:4].tolist()
        return f"{name} must be finite; rows {bad} hold NaN or inf"

    dispatch.assert_true(torch.isfinite(rows).all(), message)


def multistep_update(x: Tensor, history: Sequence[Tensor], coeffs: Tensor, *, uncond: Optional[Tensor] = None,
                     scale=None, src: Optional[Tensor] = None, convert: Optional[Tensor] = None,
                     check: bool = True):
    """x_next = coeffs[:, 0] x + coeffs[:, 1] h_0 + sum_{k>=1} coeffs[:, k+1] history[k], fused, differentiable in
    every tensor input (x, history, coeffs, uncond, scale, src, convert).

    coeffs: (B, 1+K) rows, or one (1+K,) row shared by the batch (expanded, not copied).
    h_0 is history[0], unless guidance or conversion form it from the raw network output history[0]:
    uncond, scale: classifier-free guidance, m' = uncond + scale (history[0] - uncond); scale (B,), a scalar or a
        float.
    convert: (B, 2) rows [p, q] (or one (2,) row): h_0 = p src + q m', the prediction -> data conversion.
    src: the sample the network saw (default: x itself).
    Returns x_next, or (x_next, h_0) when guidance or convert is given (h_0 in x's dtype, to keep as history).
    check: raise if a coefficient is NaN/inf. That costs a device sync, so the solvers check their tables once up
        front and pass check=False in the sampling loop. Under torch.compile it becomes an asynchronous assert.
    """
    converted = uncond is not None or scale is not None or convert is not None or src is not None
    if not check and isinstance(history, (list, tuple)) and not torch.compiler.is_compiling() and (
            not torch.is_grad_enabled() or dispatch.fast_call(x, coeffs, uncond, scale, src, convert, *history)):
        # eager, no autograd: straight to the C++ kernel, which validates its inputs and takes shared rows,
        # non-contiguous tensors and scalar scales itself (the wrapper's overhead is a few microseconds). Under
        # no_grad (the sampling loop) the tests are inline: fast_call's frame and argument tuple cost ~0.2 us.
        kernel = dispatch.eager_kernel(x, "multistep_update_convert_cpu" if converted else "multistep_update_cpu")
        if kernel is not None:
            try:
                if not converted:
                    return kernel(x, history, coeffs)
                if scale is not None and not isinstance(scale, Tensor):
                    scale = torch.tensor(float(scale), dtype=dispatch.coef_dtype(x))
                return kernel(x, history, coeffs, uncond, scale, src, convert)
            except (RuntimeError, TypeError, ValueError):
                _explain(x, history, coeffs, uncond, scale, src, convert, converted)
                raise
    history = list(history) if isinstance(history, (list, tuple)) else history
    coeffs, convert = _rows(coeffs, x), _rows(convert, x)
    scale = _scale(scale, x, coeffs)
    if check:
        _validate_convert(x, history, coeffs, uncond, scale, src, convert)
        _check_finite("coeffs", coeffs)
        if scale is not None:
            _check_finite("scale", scale.reshape(-1, 1))
        if convert is not None:
            _check_finite("convert", convert)
    if not converted:
        if dispatch.plain_call(x, coeffs, *history):
            return _forward(x, history, coeffs)
        return torch.ops.tdiff.multistep_update(x, history, coeffs)
    if convert is not None and src is None and isinstance(x, Tensor):
        src = x  # autograd then adds the gradient through the conversion to x's
    if dispatch.plain_call(x, coeffs, uncond, scale, src, convert, *history):
        return _forward_convert(x, history, coeffs, uncond, scale, src, convert)
    return torch.ops.tdiff.multistep_update_convert(x, history, coeffs, uncond, scale, src, convert)


def _explain(x, history, coeffs, uncond, scale, src, convert, converted) -> None:
    """After the C++ kernel refused an input: raise the Python validation's error, which names the argument as the
    public API does. If that finds nothing, the caller re-raises the kernel's own error."""
    history = list(history) if isinstance(history, (list, tuple)) else history
    coeffs, convert = _rows(coeffs, x), _rows(convert, x)
    scale = _scale(scale, x, coeffs)
    if converted:
        _validate_convert(x, history, coeffs, uncond, scale, src, convert)
    else:
        _validate(x, history, coeffs)


__all__ = ["multistep_update", "multistep_update_reference", "multistep_update_backward_reference",
           "multistep_update_convert_reference", "multistep_update_convert_backward_reference", "MAX_HISTORY"]
