"""The C++ kernels' instruction-set tables (csrc/cpu_kernels.h): every table this machine can run (DEFAULT, AVX2,
AVX-512 as available) gives the reference's result for every op, in every dtype, at a size with a partial
vector step; and the table choice refuses what the machine lacks."""
import pytest
import torch

from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.cached_block import cached_block_backward_reference, cached_block_reference
from tdiff.ops.multistep_update import (multistep_update_backward_reference, multistep_update_convert_reference,
                                        multistep_update_reference)
from tdiff.ops.noisy_sample import noisy_sample_backward_reference, noisy_sample_reference
from tdiff.ops.weighted_mse import weighted_mse_backward_reference, weighted_mse_reference

ORDER = ["DEFAULT", "AVX2", "AVX512"]
dispatch.extension_loaded()  # registers tdiff::* C++ ops (CI builds the extension)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def _available():
    assert dispatch.cpp_has("cpu_capability")
    best = torch.ops.tdiff.cpu_capability()
    return ORDER[: ORDER.index(best) + 1]


@pytest.fixture
def restore_capability():
    before = torch.ops.tdiff.cpu_capability()
    yield
    torch.ops.tdiff.cpu_capability(before)


def test_the_table_in_use_is_the_one_aten_uses():
    expected = torch.backends.cpu.get_cpu_capability()
    assert torch.ops.tdiff.cpu_capability() == (expected if expected in ORDER else "DEFAULT")


def test_unknown_or_unavailable_capability_is_refused(restore_capability):
    with pytest.raises(ValueError, match="must be 'default', 'avx2' or 'avx512'"):
        torch.ops.tdiff.cpu_capability("sse9")
    if _available()[-1] != "AVX512":
        with pytest.raises(ValueError, match="not available"):
            torch.ops.tdiff.cpu_capability("avx512")


def _close(got, want, dtype, reduce_tol=False):
    as_list = lambda v: v if isinstance(v, (tuple, list)) else [v]  # noqa: E731
    for a, b in zip(as_list(got), as_list(want)):
        if isinstance(a, (list, tuple)):
            _close(a, b, dtype, reduce_tol)
        elif reduce_tol and (a.dim() == 1 or (a.dim() == 2 and a.shape[1] <= 3)):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-4)  # sums over ~1000 products, any order
        else:
            torch.testing.assert_close(a, b, **TOL.get(a.dtype, TOL[dtype]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_every_table_matches_the_reference(restore_capability, dtype):
    ops = torch.ops.tdiff
    acc = dispatch.coef_dtype(torch.empty(0, dtype=dtype))
    b, n = 3, 1037  # 1037 = a partial vector step for every vector width
    x, h0, h1, u, src = (torch.randn(b, n).to(dtype) for _ in range(5))
    c, w, pq = torch.randn(b, 3, dtype=acc), torch.rand(b, dtype=acc) + 1, torch.randn(b, 2, dtype=acc)
    sched = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 100))
    spec = sched.kernel_spec()
    ns_args = (x, h0, torch.rand(b, dtype=torch.float64), spec.kind, list(spec.params), spec.table.double(), 0.5,
               [], 0, True)
    coefs, weight, g = torch.rand(b, 3, dtype=acc), torch.rand(b), torch.randn(b)
    xb, cache, gate = (torch.randn(b, 7, 149).to(dtype) for _ in range(3))
    gate = gate[:, 0]
    fresh, source = torch.randn(2, 7, 149).to(dtype), torch.tensor([1, -1, 0])
    for isa in _available():
        ops.cpu_capability(isa)
        _close(ops.multistep_update_cpu(x, [h0, h1], c), multistep_update_reference(x, [h0, h1], c), dtype)
        _close(ops.multistep_update_convert_cpu(x, [h0, h1], c, u, w, src, pq),
               multistep_update_convert_reference(x, [h0, h1], c, u, w, src, pq), dtype)
        _close(ops.multistep_update_convert_cpu(x, [h0, h1], c, None, None, None, pq),
               multistep_update_convert_reference(x, [h0, h1], c, None, None, None, pq), dtype)
        _close(ops.multistep_update_backward_cpu(u, x, [h0, h1], c),
               multistep_update_backward_reference(u, x, [h0, h1], c), dtype, reduce_tol=True)
        _close(ops.noisy_sample_cpu(*ns_args), noisy_sample_reference(*ns_args), dtype)
        _close(ops.noisy_sample_backward_cpu(x, h0, coefs), noisy_sample_backward_reference(x, h0, coefs), dtype)
        _close(ops.weighted_mse_cpu(x, h0, weight), weighted_mse_reference(x, h0, weight), dtype, reduce_tol=True)
        _close(ops.weighted_mse_backward_cpu(g, x, h0, weight), weighted_mse_backward_reference(g, x, h0, weight),
               dtype)
        got = ops.cached_block_cpu(xb, gate, fresh, cache, source)
        _close(got, cached_block_reference(xb, gate, fresh, cache, source), dtype)
        bargs = (cache, xb, gate, got[1], source, 2)
        _close(ops.cached_block_backward_cpu(*bargs), cached_block_backward_reference(*bargs), dtype)


def test_direct_bindings_are_the_registered_ops():
    # tdiff._C binds the forward ops for the eager fast path: same results, same refusals as through torch.ops
    import tdiff._C as ext

    x, h, c = torch.randn(2, 3, 5), [torch.randn(2, 3, 5)], torch.randn(2, 2)
    pq = torch.randn(2)
    assert torch.equal(ext.multistep_update_cpu(x, h, c), torch.ops.tdiff.multistep_update_cpu(x, h, c))
    for a, b in zip(ext.multistep_update_convert_cpu(x, h, c, None, None, None, pq),
                    torch.ops.tdiff.multistep_update_convert_cpu(x, h, c, None, None, None, pq)):
        assert torch.equal(a, b)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64)
    args = (x, h[0], t, 0, [0.1, 20.0, 0.0, 0.0], None, 1.0, [], 0, True)
    for a, b in zip(ext.noisy_sample_cpu(*args), torch.ops.tdiff.noisy_sample_cpu(*args)):
        assert torch.equal(a, b)
    w = torch.rand(2)
    for a, b in zip(ext.weighted_mse_cpu(x, h[0], w), torch.ops.tdiff.weighted_mse_cpu(x, h[0], w)):
        assert torch.equal(a, b)
    src = torch.tensor([0, -1])
    block = (x, x[:, 0], x[:1], x, src)
    for a, b in zip(ext.cached_block_cpu(*block), torch.ops.tdiff.cached_block_cpu(*block)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"history\[0\] must have the shape"):
        ext.multistep_update_cpu(x, [torch.randn(1)], c)
    with pytest.raises(ValueError, match="source"):
        ext.cached_block_cpu(x, x[:, 0], x[:1], x, torch.tensor([0, 5]))
    with pytest.raises(TypeError):
        ext.multistep_update_cpu(x, [None], c)
