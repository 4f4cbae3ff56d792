"""tdiff::multistep_update_out_cpu, the out= form of the fused update (the eager sampling loop's buffer reuse,
tdiff/solvers/buffers.py): it writes exactly what the functional op returns, in place too (an output that is one of
the inputs exactly), and refuses output buffers that are misshapen, strided, partly overlap an input or each other."""
import pytest
import torch

import tdiff.ops  # noqa: F401  (registers the tdiff:: ops)
from tdiff.ops import dispatch

pytestmark = pytest.mark.skipif(not dispatch.cpp_has("multistep_update_out_cpu"),
                                reason="the C++ extension is not built")


def _args(dtype, k=3):
    g = torch.Generator().manual_seed(0)
    shape = (3, 4, 5, 6)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(shape, generator=g).to(dtype)
    hist = [torch.randn(shape, generator=g).to(dtype) for _ in range(k)]
    coeffs = torch.randn(3, k + 1, generator=g, dtype=acc)
    uncond, src = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    scale, pq = torch.rand(3, generator=g, dtype=acc), torch.randn(3, 2, generator=g, dtype=acc)
    return x, hist, coeffs, uncond, scale, src, pq


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entry", ["direct", "dispatcher"])
def test_out_form_writes_what_the_functional_op_returns(dtype, entry):
    import tdiff._C as ext

    op = ext.multistep_update_out_cpu if entry == "direct" else torch.ops.tdiff.multistep_update_out_cpu
    x, hist, coeffs, uncond, scale, src, pq = _args(dtype)
    for extra in ((uncond, scale, src, pq), (None, None, src, pq), (None, None, None, pq), (uncond, scale, None, None)):
        out, h0 = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        op(x, hist, coeffs, *extra, out, h0)
        want_out, want_h0 = torch.ops.tdiff.multistep_update_convert_cpu(x, hist, coeffs, *extra)
        assert torch.equal(out, want_out) and torch.equal(h0, want_h0)
    out = torch.full_like(x, float("nan"))
    op(x, hist, coeffs, None, None, None, None, out, None)
    assert torch.equal(out, torch.ops.tdiff.multistep_update_cpu(x, hist, coeffs))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_out_form_in_place_writes_what_the_functional_op_returns(dtype):
    """The sampling loop's update in place (x_next over x, h_0 over the oldest history entry) and other exact
    aliases (an output over uncond or src): every input's element j is read before element j of an output is
    written, so it is bit-identical to the functional op."""
    import tdiff._C as ext

    for guided, converts in ((True, True), (False, True), (True, False)):
        for out_at, h0_at in (("x", "h3"), ("h1", "x"), ("x", "uncond"), ("src", "h0")):
            if (not guided and "uncond" in (out_at, h0_at)) or (not converts and "src" in (out_at, h0_at)):
                continue
            x, hist, coeffs, uncond, scale, src, pq = _args(dtype, k=4)
            opt = (uncond, scale) if guided else (None, None)
            opt += (src, pq) if converts else (None, None)
            want_out, want_h0 = torch.ops.tdiff.multistep_update_convert_cpu(x, hist, coeffs, *opt)
            named = {"x": x, "uncond": uncond, "src": src, **{f"h{i}": h for i, h in enumerate(hist)}}
            out, h0 = named[out_at], named[h0_at]
            ext.multistep_update_out_cpu(x, hist, coeffs, *opt, out, h0)
            assert torch.equal(out, want_out) and torch.equal(h0, want_h0), (guided, converts, out_at, h0_at)


def test_out_form_refuses_bad_buffers():
    x, hist, coeffs, uncond, scale, src, pq = _args(torch.float32)
    op = torch.ops.tdiff.multistep_update_out_cpu
    out, h0 = torch.empty_like(x), torch.empty_like(x)
    # outputs one element off an input: a partial overlap (x itself, and history[1], are such views here)
    flat_x, flat_h = torch.randn(x.numel() + 1), torch.randn(x.numel() + 1)
    x, hist[1] = flat_x[:-1].view_as(x), flat_h[:-1].view_as(x)
    bad = {
        "out must not share memory with an input unless it is that input exactly": (flat_x[1:].view_as(x), h0),
        "h0 must not share memory with an input unless": (out, flat_h[1:].view_as(x)),
        "h0 must not share memory with out": (out, out),
        "out must have the shape": (torch.empty(3, 4, 5, 7), h0),
        "out must have the dtype": (torch.empty_like(x, dtype=torch.float64), h0),
        "out must be contiguous": (torch.empty(3, 4, 5, 12)[..., ::2], h0),
    }
    for message, (o, h) in bad.items():
        with pytest.raises(ValueError, match=message):
            op(x, hist, coeffs, None, None, src, pq, o, h)
    with pytest.raises(ValueError, match="h0 must be given exactly when"):
        op(x, hist, coeffs, None, None, src, pq, out, None)
    with pytest.raises(ValueError, match="h0 must be given exactly when"):
        op(x, hist, coeffs, None, None, None, None, out, h0)
    with pytest.raises(ValueError, match="coeffs"):
        op(x, hist, coeffs[:, :2], None, None, src, pq, out, h0)
