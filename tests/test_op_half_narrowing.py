"""multistep_update's half / bfloat16 outputs round exactly as a float32 computation rounded to the dtype, on every
instruction-set table here, in steps of random data and in steps holding subnormals, +-0, +-inf, overflow and NaN.
On a CPU with AVX512_BF16 the AVX-512 table narrows bfloat16 with the hardware instruction (csrc/loops/vec_io.h),
except in the steps that hold a subnormal or NaN, where it would differ: a missed check shows here as a flushed
subnormal or a NaN payload. (noisy_sample's are in test_op_noisy_sample_fastpath.py.)"""
import math

import pytest
import torch

from tdiff.ops import dispatch

ORDER = ["DEFAULT", "AVX2", "AVX512"]
dispatch.extension_loaded()


def _bits_match(got, want):
    # the same bits, NaN aside (the DEFAULT table's scalar conversion writes another NaN); NaN exactly where expected
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def _inputs(dtype, count, n):
    # random data with the special values in a few vector steps (the first, one in the middle, the partial last),
    # the other full steps clean; in the middle one every input has the same values there, so that the outputs are
    # subnormal, zero, infinite or NaN too (the first has them rolled: mixed with the others)
    finfo = torch.finfo(dtype)
    special = torch.tensor([finfo.tiny / 4, -finfo.tiny / 8, 0.0, -0.0, math.inf, -math.inf, math.nan, finfo.max,
                            -finfo.max, finfo.tiny, 3 * finfo.tiny / 2, finfo.eps / 2], dtype=torch.float32)
    out = []
    for i in range(count):
        t = torch.randn(4, n)
        for at in (0, 517, n - 12):
            t[:, at:at + 12] = special.roll(i) if at == 0 else special
        out.append(t.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_multistep_update_rounds_exactly_on_every_table(dtype):
    # Power-of-two coefficients of at most 1 in magnitude make every product exact (and never overflow), so a fused
    # multiply-add rounds as the float32 oracle's multiply then add, in the kernel's order
    # (csrc/loops/multistep_update.h).
    ops = torch.ops.tdiff
    n = 1037  # a partial vector step for every vector width
    x, h0, h1, h2, u, src, g = _inputs(dtype, 7, n)
    c = torch.tensor([[1.0, 0.5, -0.25, -1.0]] * 4)
    w, pq = torch.full((4,), 0.5), torch.tensor([[0.5, -1.0]] * 4)
    f = lambda t: t.float()  # noqa: E731
    want = (f(x) * 1.0 + f(h0) * 0.5 + f(h1) * -0.25 + f(h2) * -1.0).to(dtype)
    m = 0.5 * (f(h0) - f(u)) + f(u)
    m = 0.5 * f(src) + -1.0 * m
    want_cfg = ((f(x) * 1.0 + m * 0.5) + f(h1) * -0.25 + f(h2) * -1.0).to(dtype), m.to(dtype)
    want_back = (f(g) * 1.0).to(dtype), [(f(g) * k).to(dtype) for k in (0.5, -0.25, -1.0)]
    before = ops.cpu_capability()
    tried = []
    try:
        for isa in ORDER[: ORDER.index(before) + 1]:
            ops.cpu_capability(isa)
            tried.append(isa)
            _bits_match(ops.multistep_update_cpu(x, [h0, h1, h2], c), want)
            for got, exp in zip(ops.multistep_update_convert_cpu(x, [h0, h1, h2], c, u, w, src, pq), want_cfg):
                _bits_match(got, exp)
            gx, gh, _ = ops.multistep_update_backward_cpu(g, x, [h0, h1, h2], c)
            _bits_match(gx, want_back[0])
            for got, exp in zip(gh, want_back[1]):
                _bits_match(got, exp)
    finally:
        ops.cpu_capability(before)
    assert tried[-1] == before
