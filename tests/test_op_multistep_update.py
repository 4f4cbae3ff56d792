"""tdiff::multistep_update (+ CFG variant) against its reference on every backend that runs here, plus opcheck,
gradcheck, torch.compile and bad input."""
import math

import pytest
import torch

from tdiff.ops import dispatch
from tdiff.ops.multistep_update import (multistep_update, multistep_update_backward_reference,
                                        multistep_update_cfg_reference, multistep_update_reference)

BACKENDS = ["torch", "triton", "cpp"]  # CI builds tdiff._C; a missing kernel must fail, not skip
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(shape, k, dtype, requires_grad=False):
    x = torch.randn(shape).to(dtype)
    hist = [torch.randn(shape).to(dtype) for _ in range(k)]
    coeffs = torch.randn(shape[0], 1 + k, dtype=dispatch.coef_dtype(x))
    if requires_grad:
        for t in [x, *hist, coeffs]:
            t.requires_grad_(True)
    return x, hist, coeffs


def test_cpp_kernel_available():
    assert dispatch.cpp_has("multistep_update_cpu"), "tdiff._C lacks tdiff::multistep_update_cpu (rebuild it)"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 5, 7, 9)])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_forward_matches_reference(monkeypatch, backend, dtype, shape, k):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs(shape, k, dtype)
    out = multistep_update(x, hist, coeffs)
    torch.testing.assert_close(out, multistep_update_reference(x, hist, coeffs), **TOL[dtype])
    # and the formula written out in float64
    exp = coeffs[:, 0].double().view(-1, 1, 1, 1) * x.double()
    for j, h in enumerate(hist):
        exp = exp + coeffs[:, j + 1].double().view(-1, 1, 1, 1) * h.double()
    torch.testing.assert_close(out.double(), exp, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cfg_matches_reference(monkeypatch, backend, dtype):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((3, 5, 7, 9), 3, dtype)
    uncond = torch.randn_like(x.float()).to(dtype)
    scale = torch.tensor([1.0, 3.5, 7.5], dtype=coeffs.dtype)
    out, guided = multistep_update(x, hist, coeffs, uncond=uncond, scale=scale)
    ref_out, ref_guided = multistep_update_cfg_reference(x, hist, coeffs, uncond, scale)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(guided, ref_guided, **TOL[dtype])
    g = uncond.double() + scale.double().view(-1, 1, 1, 1) * (hist[0].double() - uncond.double())
    torch.testing.assert_close(guided.double(), g, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_shared_row(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x = torch.randn(6, 8, 5, 3).permute(0, 3, 2, 1)
    hist = [torch.randn(6, 5, 3, 8).permute(0, 2, 1, 3), torch.randn(6, 5, 3, 8).transpose(1, 2)]
    assert not x.is_contiguous() and not hist[0].is_contiguous()
    row = torch.tensor([0.5, -1.0, 2.0])  # one row for the batch, expanded (stride 0)
    out = multistep_update(x, hist, row)
    torch.testing.assert_close(out, 0.5 * x - hist[0] + 2.0 * hist[1])


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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 4])
def test_gradcheck(monkeypatch, backend, k):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((2, 3), k, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c, *h: multistep_update(x, h, c, check=False), (x, coeffs, *hist))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_cfg(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((2, 3), 2, torch.float64, requires_grad=True)
    uncond = torch.randn_like(x).requires_grad_(True)
    scale = torch.tensor([1.5, 4.0], dtype=torch.float64, requires_grad=True)

    def f(x, c, u, w, *h):
        return multistep_update(x, h, c, uncond=u, scale=w, check=False)

    assert torch.autograd.gradcheck(f, (x, coeffs, uncond, scale, *hist))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, hist, coeffs = _inputs((3, 4, 5), 3, torch.float32, requires_grad=True)
    torch.library.opcheck(torch.ops.tdiff.multistep_update.default, (x, hist, coeffs))
    grad = torch.randn(3, 4, 5)
    torch.library.opcheck(torch.ops.tdiff.multistep_update_backward.default,
                          (grad, x.detach(), [h.detach() for h in hist], coeffs.detach()))
    uncond, scale = torch.randn(3, 4, 5, requires_grad=True), torch.rand(3, requires_grad=True)
    torch.library.opcheck(torch.ops.tdiff.multistep_update_cfg.default, (x, hist, coeffs, uncond, scale))


def test_torch_compile_smoke():
    def step(x, h0, h1, c):
        return (multistep_update(x, [h0, h1], c, check=False) * 2).sum()

    x, h0, h1 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    c = torch.randn(4, 3)
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, h0, h1, c), step(x, h0, h1, c))
    compiled_inductor = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled_inductor(x, h0, h1, c), step(x, h0, h1, c))


def test_bad_input():
    x, hist, coeffs = _inputs((2, 3), 2, torch.float32)
    with pytest.raises(ValueError, match=r"history\[1\] must have the shape"):
        multistep_update(x, [hist[0], torch.randn(2, 4)], coeffs)
    with pytest.raises(ValueError, match=r"history\[0\] must have the dtype"):
        multistep_update(x, [hist[0].double(), hist[1]], coeffs)
    with pytest.raises(ValueError, match=r"history\[0\] must be on the device"):
        multistep_update(x, [torch.randn(2, 3, device="meta"), hist[1]], coeffs)
    with pytest.raises(ValueError, match=r"coeffs must have shape \(2, 3\)"):
        multistep_update(x, hist, torch.randn(2, 4))
    with pytest.raises(ValueError, match="coeffs must be torch.float32"):
        multistep_update(x, hist, coeffs.double())
    with pytest.raises(ValueError, match="history must hold 1 to 4"):
        multistep_update(x, [hist[0]] * 5, torch.randn(2, 6))
    with pytest.raises(ValueError, match="x must be float32"):
        multistep_update(x.long(), [h.long() for h in hist], coeffs)
    bad = coeffs.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"coeffs must be finite; rows \[1\]"):
        multistep_update(x, hist, bad)
    with pytest.raises(ValueError, match="uncond and scale"):
        multistep_update(x, hist, coeffs, uncond=x)
    with pytest.raises(ValueError, match=r"scale must have shape \(2,\)"):
        multistep_update(x, hist, coeffs, uncond=x, scale=torch.ones(3))
