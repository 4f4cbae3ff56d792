"""tdiff::multistep_update (plain and convert forms) against its reference on every backend that runs here, against
the formula written out in float64, plus gradcheck (every input), torch.compile and bad input. opcheck for every
layout is in test_op_opcheck.py."""
import math

import pytest
import torch

from tdiff.ops import dispatch
from tdiff.ops.multistep_update import (multistep_update, multistep_update_backward_reference,
                                        multistep_update_convert_backward_reference,
                                        multistep_update_convert_reference, multistep_update_reference)

BACKENDS = ["torch", "triton", "cpp"]  # CI builds tdiff._C; a missing kernel must fail, not skip
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FORMS = {"cfg": dict(cfg=True), "convert": dict(convert=True), "cfg+convert": dict(cfg=True, convert=True),
         "convert at x": dict(convert=True, src_is_x=True)}


def _inputs(shape, k, dtype, requires_grad=False):
    x = torch.randn(shape).to(dtype)
    hist = [torch.randn(shape).to(dtype) for _ in range(k)]
    coeffs = torch.randn(shape[0], 1 + k, dtype=dispatch.coef_dtype(x))
    if requires_grad:
        for t in [x, *hist, coeffs]:
            t.requires_grad_(True)
    return x, hist, coeffs


def _convert_kwargs(x, coeffs, cfg=False, convert=False, src_is_x=False, requires_grad=False):
    b, acc = x.shape[0], coeffs.dtype
    kw = {}
    if cfg:
        kw["uncond"] = torch.randn(x.shape).to(x.dtype)
        kw["scale"] = torch.linspace(1.0, 7.5, b, dtype=acc)
    if convert:
        kw["convert"] = torch.randn(b, 2, dtype=acc)
        if not src_is_x:
            kw["src"] = torch.randn(x.shape).to(x.dtype)
    if requires_grad:
        for t in kw.values():
            t.requires_grad_(True)
    return kw


def _expected(x, hist, coeffs, uncond=None, scale=None, src=None, convert=None):
    """The maths of SPEC_multistep.md written out in float64: (x_next, h_0)."""
    d = lambda t: t.double()  # noqa: E731
    col = lambda v: d(v).view(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    m = d(hist[0])
    if uncond is not None:
        m = d(uncond) + col(scale) * (m - d(uncond))
    if convert is not None:
        m = col(convert[:, 0]) * d(x if src is None else src) + col(convert[:, 1]) * m
    out = col(coeffs[:, 0]) * d(x) + col(coeffs[:, 1]) * m
    for j, h in enumerate(hist[1:], start=2):
        out = out + col(coeffs[:, j]) * d(h)
    return out, m


def test_cpp_kernel_available():
    for op in ("multistep_update_cpu", "multistep_update_convert_cpu", "multistep_update_backward_cpu"):
        assert dispatch.cpp_has(op), f"tdiff._C lacks tdiff::{op} (rebuild it)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 5, 7, 9)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_forward_matches_reference(monkeypatch, backend, dtype, shape, k):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs(shape, k, dtype)
    out = multistep_update(x, hist, coeffs)
    torch.testing.assert_close(out, multistep_update_reference(x, hist, coeffs), **TOL[dtype])
    torch.testing.assert_close(out.double(), _expected(x, hist, coeffs)[0], **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("k", [1, 3])
def test_convert_matches_reference(monkeypatch, backend, dtype, form, k):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((3, 5, 7, 9), k, dtype)
    kw = _convert_kwargs(x, coeffs, **FORMS[form])
    out, h0 = multistep_update(x, hist, coeffs, **kw)
    ref_out, ref_h0 = multistep_update_convert_reference(x, hist, coeffs, **kw)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(h0, ref_h0, **TOL[dtype])
    exp_out, exp_h0 = _expected(x, hist, coeffs, **kw)
    torch.testing.assert_close(out.double(), exp_out, **TOL[dtype])
    torch.testing.assert_close(h0.double(), exp_h0, **TOL[dtype])
    assert out.dtype == h0.dtype == dtype and out.is_contiguous() and h0.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_convert_at_x_is_the_general_conversion_bit_for_bit(dtype):
    # the C++ span loop reuses x's vector when src is x (no second load): it must give exactly what the general
    # loop gives with a separate src holding the same values, at every history length, with and without
    # guidance, over a span whose length crosses every unrolled and tail step of each vector width
    x, hist, coeffs = _inputs((3, 1, 1, 203), 4, dtype)
    for k in (1, 2, 3, 4):
        for cfg in (False, True):
            kw = _convert_kwargs(x, coeffs[:, :k + 1], cfg=cfg, convert=True, src_is_x=True)
            at_x = torch.ops.tdiff.multistep_update_convert_cpu(x, hist[:k], coeffs[:, :k + 1], kw.get("uncond"),
                                                                 kw.get("scale"), None, kw["convert"])
            apart = torch.ops.tdiff.multistep_update_convert_cpu(x, hist[:k], coeffs[:, :k + 1], kw.get("uncond"),
                                                                  kw.get("scale"), x.clone(), kw["convert"])
            assert torch.equal(at_x[0], apart[0]) and torch.equal(at_x[1], apart[1]), (k, cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_rows_of_every_prediction_type(monkeypatch, backend):
    # x0 prediction (p = 0, q = 1) is the plain update with h_0 = m; eps rows give D = (x - sigma eps) / alpha
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((2, 3, 4), 2, torch.float64)
    out, h0 = multistep_update(x, hist, coeffs, convert=torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(out, multistep_update_reference(x, hist, coeffs))
    torch.testing.assert_close(h0, hist[0])
    alpha, sigma = 0.6, 0.8
    _, d = multistep_update(x, hist, coeffs, convert=torch.tensor([1 / alpha, -sigma / alpha], dtype=torch.float64))
    torch.testing.assert_close(d, (x - sigma * hist[0]) / alpha)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_shared_rows(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x = torch.randn(6, 8, 5, 3).permute(0, 3, 2, 1)
    hist = [torch.randn(6, 5, 3, 8).permute(0, 2, 1, 3), torch.randn(6, 5, 3, 8).transpose(1, 2)]
    assert not x.is_contiguous() and not hist[0].is_contiguous()
    row = torch.tensor([0.5, -1.0, 2.0])  # one row for the batch, expanded (stride 0)
    out = multistep_update(x, hist, row)
    torch.testing.assert_close(out, 0.5 * x - hist[0] + 2.0 * hist[1])
    for check in (True, False):  # the eager fast path takes shared rows and a float scale as they are
        out, h0 = multistep_update(x, hist, row, uncond=hist[1], scale=2.0, convert=torch.tensor([0.5, 2.0]),
                                   check=check)
        m = 0.5 * x + 2.0 * (hist[1] + 2.0 * (hist[0] - hist[1]))
        torch.testing.assert_close(h0, m)
        torch.testing.assert_close(out, 0.5 * x - m + 2.0 * hist[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_backward_matches_reference(monkeypatch, backend, dtype):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((3, 5, 7, 9), 4, dtype)
    grad = torch.randn_like(x.float()).to(dtype)
    gx, gh, gc = torch.ops.tdiff.multistep_update_backward(grad, x, hist, coeffs)
    rx, rh, rc = multistep_update_backward_reference(grad, x, hist, coeffs)
    torch.testing.assert_close(gx, rx, **TOL[dtype])
    for a, b in zip(gh, rh):
        torch.testing.assert_close(a, b, **TOL[dtype])
    tol = dict(atol=1e-3, rtol=1e-4) if dtype != torch.float64 else TOL[dtype]  # sums over 315 products
    torch.testing.assert_close(gc, rc, **tol)


def test_convert_backward_matches_autograd_of_the_formula():
    x, hist, coeffs = _inputs((2, 3, 4), 2, torch.float64, requires_grad=True)
    kw = _convert_kwargs(x, coeffs, cfg=True, convert=True, requires_grad=True)
    g, g_h0 = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    got = multistep_update_convert_backward_reference(g, g_h0, x, hist, coeffs, **kw)
    exp_out, exp_h0 = _expected(x, hist, coeffs, **kw)
    inputs = [x, *hist, coeffs, kw["uncond"], kw["scale"], kw["src"], kw["convert"]]
    want = torch.autograd.grad((exp_out * g).sum() + (exp_h0 * g_h0).sum(), inputs)
    flat = [got[0], *got[1], got[2], *got[3:]]
    for a, b in zip(flat, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4])
def test_gradcheck(monkeypatch, backend, k):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((2, 3), k, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, *h: multistep_update(x, h, c, check=False), (x, coeffs, *hist),
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["cfg+convert", "convert at x"])
def test_gradcheck_convert(monkeypatch, backend, form):
    # every input, the conversion rows and src included (LD3 differentiates the time steps through them)
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((2, 3), 2, torch.float64, requires_grad=True)
    kw = _convert_kwargs(x, coeffs, **FORMS[form], requires_grad=True)
    names = list(kw)

    def f(x, c, *rest):
        h, extra = rest[:2], dict(zip(names, rest[2:]))
        return multistep_update(x, h, c, check=False, **extra)

    assert torch.autograd.gradcheck(f, (x, coeffs, *hist, *kw.values()), fast_mode=backend == "triton")


@pytest.mark.parametrize("check", [True, False])
def test_torch_compile_fullgraph(check):
    def step(x, h0, h1, c, u, w, pq):
        plain = multistep_update(x, [h0, h1], c, check=check)
        out, d = multistep_update(x, [h0, h1], c, uncond=u, scale=w, convert=pq, check=check)
        return (plain * 2 + out - d).sum()

    x, h0, h1, u = (torch.randn(4, 3, 8, 8) for _ in range(4))
    c, w, pq = torch.randn(4, 3), torch.rand(4) + 1, torch.randn(4, 2)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, h0, h1, c, u, w, pq), step(x, h0, h1, c, u, w, pq))
    if check:  # the asynchronous assert still refuses a NaN coefficient
        with pytest.raises(RuntimeError, match="coeffs must be finite"):
            compiled(x, h0, h1, torch.full((4, 3), math.nan), u, w, pq)


@pytest.mark.parametrize("check", [True, False])
def test_bad_input(check):
    x, hist, coeffs = _inputs((2, 3), 2, torch.float32)
    run = lambda *a, **kw: multistep_update(*a, check=check, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"history\[1\] must have the shape"):
        run(x, [hist[0], torch.randn(2, 4)], coeffs)
    with pytest.raises(ValueError, match=r"history\[0\] must have the dtype"):
        run(x, [hist[0].double(), hist[1]], coeffs)
    with pytest.raises(ValueError, match=r"history\[0\] must be on the device"):
        run(x, [torch.randn(2, 3, device="meta"), hist[1]], coeffs)
    with pytest.raises(TypeError, match=r"history\[0\] must be a tensor"):
        run(x, [None], torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"coeffs must have shape \(2, 3\)"):
        run(x, hist, torch.randn(2, 4))
    with pytest.raises(ValueError, match="coeffs must be torch.float32"):
        run(x, hist, coeffs.double())
    with pytest.raises(ValueError, match="history must hold 1 to 4"):
        run(x, [hist[0]] * 5, torch.randn(2, 6))
    with pytest.raises(ValueError, match="x must be float32"):
        run(x.long(), [h.long() for h in hist], coeffs)
    with pytest.raises(ValueError, match="uncond and scale"):
        run(x, hist, coeffs, uncond=x)
    with pytest.raises(ValueError, match=r"scale must have shape \(2,\)"):
        run(x, hist, coeffs, uncond=x, scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"convert must have shape \(2, 2\)"):
        run(x, hist, coeffs, convert=torch.ones(2, 3))
    with pytest.raises(ValueError, match="src .* needs convert"):
        run(x, hist, coeffs, src=x)
    with pytest.raises(ValueError, match="src must have the shape"):
        run(x, hist, coeffs, src=torch.randn(2, 4), convert=torch.ones(2, 2))
    if check:
        bad = coeffs.clone()
        bad[1, 2] = math.nan
        with pytest.raises(ValueError, match=r"coeffs must be finite; rows \[1\]"):
            run(x, hist, bad)
        with pytest.raises(ValueError, match=r"convert must be finite; rows \[0\]"):
            run(x, hist, coeffs, convert=torch.tensor([[math.inf, 0.0], [1.0, 1.0]]))


def test_registered_cpu_ops_validate_their_inputs():
    # tdiff::*_cpu are public through torch.ops: they must refuse what would read out of bounds
    x, hist, coeffs = _inputs((2, 3), 2, torch.float32)
    ops = torch.ops.tdiff
    with pytest.raises(ValueError, match=r"history\[1\] must have the shape"):
        ops.multistep_update_cpu(x, [hist[0], torch.randn(1)], coeffs)
    with pytest.raises(ValueError, match="coeffs must have shape"):
        ops.multistep_update_cpu(x, hist, torch.randn(1, 3))
    with pytest.raises(ValueError, match="uncond must have the shape"):
        ops.multistep_update_convert_cpu(x, hist, coeffs, torch.randn(1), torch.ones(2))
    with pytest.raises(ValueError, match="convert must have shape"):
        ops.multistep_update_convert_cpu(x, hist, coeffs, None, None, None, torch.ones(3, 2))
    with pytest.raises(ValueError, match="grad must have the shape"):
        ops.multistep_update_backward_cpu(torch.randn(1), x, hist, coeffs)
    with pytest.raises(ValueError, match=r"coeffs must have shape \(2, 3\), got"):
        ops.multistep_update_backward_cpu(x, x, hist, coeffs[0])  # the backward takes full rows only
