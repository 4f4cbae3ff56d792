"""tdiff::weighted_mse and its backward against the reference on every backend that runs here, plus opcheck,
gradcheck, compile and bad input."""
import pytest
import torch

from tdiff.ops import dispatch
from tdiff.ops.weighted_mse import (weighted_mse, weighted_mse_backward_reference, weighted_mse_reference,
                                    weighted_mse_with_mse)


BACKENDS = ["torch", "triton", "cpp"]  # CI builds tdiff._C; a missing kernel must fail, not skip
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def test_extension_has_op():
    assert dispatch.cpp_has("weighted_mse_cpu"), "tdiff._C lacks tdiff::weighted_mse_cpu (rebuild it)"


def _eager(pred, target, weight):
    # the plain PyTorch formula, written independently of the reference
    return weight.double() * ((pred.double() - target.double()) ** 2).flatten(1).mean(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 5, 7, 9), (2, 40001)])
def test_forward_matches_reference(monkeypatch, backend, dtype, shape):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    pred, target = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight = torch.rand(shape[0]) + 0.1
    loss, mse = weighted_mse_with_mse(pred, target, weight)
    ref_loss, ref_mse = weighted_mse_reference(pred, target, weight)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss, ref_loss, **TOL[torch.float32 if dtype == torch.bfloat16 else dtype])
    torch.testing.assert_close(mse, ref_mse, **TOL[torch.float32 if dtype == torch.bfloat16 else dtype])
    torch.testing.assert_close(loss.double(), _eager(pred, target, weight), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 5, 7, 9)])
def test_backward_op_matches_reference(monkeypatch, backend, dtype, shape):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    pred, target = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    weight, g = torch.rand(shape[0]), torch.randn(shape[0])
    got = torch.ops.tdiff.weighted_mse_backward(g, pred, target, weight)
    assert got.dtype == dtype and got.shape == pred.shape
    torch.testing.assert_close(got, weighted_mse_backward_reference(g, pred, target, weight), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_autograd(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    pred = torch.randn(5, 7, 6, 3).permute(0, 3, 2, 1).requires_grad_(True)
    target = torch.randn(5, 3, 7, 6).transpose(2, 3)
    assert not pred.is_contiguous() and not target.is_contiguous()
    weight = torch.rand(5, requires_grad=True)
    loss = weighted_mse(pred, target, weight)
    torch.testing.assert_close(loss.double(), _eager(pred.detach(), target, weight.detach()), **TOL[torch.float32])
    g = torch.randn(5)
    gp, gw = torch.autograd.grad((loss * g).sum(), (pred, weight))
    p, w = pred.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
    ep, ew = torch.autograd.grad((w * ((p - target) ** 2).flatten(1).mean(1) * g).sum(), (p, w))
    torch.testing.assert_close(gp, ep)
    torch.testing.assert_close(gw, ew)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    pred = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    weight = (torch.rand(3, dtype=torch.float64) + 0.1).requires_grad_(True)
    # both outputs, so the gradient through the unweighted mse is checked too
    assert torch.autograd.gradcheck(lambda p, t, w: torch.ops.tdiff.weighted_mse(p, t, w), (pred, target, weight),
                                    fast_mode=backend == "triton")


def test_torch_compile_smoke():
    def f(pred, target, weight):
        return weighted_mse(pred * 2, target, weight).sum()

    pred, target, weight = torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 3, 5), torch.rand(4)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(pred, target, weight)
    torch.testing.assert_close(out, f(pred, target, weight))
    out.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()


@pytest.mark.parametrize(
    "pred, target, weight, match",
    [
        (torch.randn(3, 4), torch.randn(3, 5), torch.rand(3), "target must have the shape"),
        (torch.randn(3, 4), torch.randn(3, 4).double(), torch.rand(3), "target must have the dtype"),
        (torch.randn(3, 4), torch.randn(3, 4), torch.rand(4), r"weight must have shape \(3,\)"),
        (torch.randn(3, 4), torch.randn(3, 4), torch.rand(3, 1), r"weight must have shape \(3,\)"),
        (torch.randn(3, 4), torch.randn(3, 4), torch.ones(3, dtype=torch.long), "weight must be float"),
        (torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), torch.rand(3), "pred must be float"),
        (torch.randn(0, 4), torch.randn(0, 4), torch.rand(0), "non-empty"),
        (torch.randn(3, 0), torch.randn(3, 0), torch.rand(3), "non-empty"),
    ],
)
@pytest.mark.parametrize("grad", [False, True])
def test_bad_input(pred, target, weight, match, grad):
    if grad and pred.is_floating_point():
        pred.requires_grad_(True)
    with pytest.raises(ValueError, match=match):
        weighted_mse(pred, target, weight)


def test_registered_cpu_ops_validate_their_inputs():
    p = torch.randn(3, 4)
    with pytest.raises(ValueError, match="target must have the shape"):
        torch.ops.tdiff.weighted_mse_cpu(p, torch.randn(1), torch.rand(3))
    with pytest.raises(ValueError, match=r"grad_loss must have shape \(3,\)"):
        torch.ops.tdiff.weighted_mse_backward_cpu(torch.randn(1), p, p, torch.rand(3))
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        torch.ops.tdiff.weighted_mse_backward_cpu(torch.randn(3), p, p, torch.rand(1))
