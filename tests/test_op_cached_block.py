"""tdiff::cached_block against its reference on every backend that runs here, plus opcheck, gradcheck, compile,
and per-sample masks in one batch equal to each sample run alone."""
import pytest
import torch

from tdiff.ops import dispatch
from tdiff.ops.cached_block import cached_block, cached_block_backward_reference, cached_block_reference

BACKENDS = ["torch", "triton", "cpp"]  # CI builds tdiff._C; a missing kernel must fail, not skip
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _inputs(shape, computed, dtype=torch.float32, requires_grad=False):
    b, n, c = shape
    x, cache = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    gate = torch.randn(b, c).to(dtype)
    idx = torch.tensor(computed, dtype=torch.long)
    fresh = torch.randn(len(computed), n, c).to(dtype)
    source = torch.full((b,), -1, dtype=torch.long)
    source[idx] = torch.arange(len(computed))
    ts = [x, gate, fresh, cache]
    if requires_grad:
        ts = [t.requires_grad_() for t in ts]
    return (*ts, source)


def test_extension_has_the_op():
    # CI builds the extension; if this fails the cpp backend silently drops out of every other test
    assert dispatch.cpp_has("cached_block_cpu") and dispatch.cpp_has("cached_block_backward_cpu"), \
        "tdiff._C was not built or lacks tdiff::cached_block_cpu / cached_block_backward_cpu (rebuild it)"



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,computed", [((4, 16, 32), [0, 2]), ((5, 7, 9), [4, 1, 3]), ((3, 5, 6), []),
                                             ((3, 5, 6), [0, 1, 2])])
def test_forward_matches_reference(monkeypatch, backend, dtype, shape, computed):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, gate, fresh, cache, source = _inputs(shape, computed, dtype)
    out, branch = cached_block(x, gate, fresh, cache, source)
    ref_out, ref_branch = cached_block_reference(x, gate, fresh, cache, source)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    assert torch.equal(branch, ref_branch)  # a pure copy, exact in every backend
    # and written out independently, in float64
    for b in range(shape[0]):
        src = fresh[computed.index(b)] if b in computed else cache[b]
        torch.testing.assert_close(out[b].double(), x[b].double() + gate[b].double() * src.double(), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x = torch.randn(3, 5, 8).transpose(1, 2)  # (3, 8, 5) non-contiguous
    cache, gate = torch.randn(3, 8, 5), torch.randn(5, 3).t()
    fresh, source = torch.randn(1, 8, 5), torch.tensor([-1, 0, -1])
    out, _ = cached_block(x, gate, fresh, cache, source)
    torch.testing.assert_close(out, cached_block_reference(x, gate, fresh, cache, source)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_autograd_of_reference(monkeypatch, backend, dtype):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, gate, fresh, cache, source = _inputs((4, 3, 5), [3, 0], dtype, requires_grad=True)
    wo, wb = torch.randn(4, 3, 5, dtype=dtype), torch.randn(4, 3, 5, dtype=dtype)
    out, branch = cached_block(x, gate, fresh, cache, source)
    got = torch.autograd.grad((out * wo).sum() + (branch * wb).sum(), (x, gate, fresh, cache))
    # autograd of the plain reference maths
    x2, g2, f2, c2 = (t.detach().clone().requires_grad_() for t in (x, gate, fresh, cache))
    picked = torch.where((source >= 0).view(-1, 1, 1), f2.index_select(0, source.clamp(min=0)), c2)
    o2 = x2 + g2.unsqueeze(1) * picked
    want = torch.autograd.grad((o2 * wo).sum() + (picked * wb).sum(), (x2, g2, f2, c2))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, gate, fresh, cache, source = _inputs((3, 2, 4), [2], torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: cached_block(*a, source), (x, gate, fresh, cache),
                                    fast_mode=backend == "triton")  # each interpreted launch costs ms


def test_torch_compile_smoke():
    args = _inputs((3, 4, 8), [0, 2])

    def f(x, gate, fresh, cache, source):
        out, branch = cached_block(x, gate, fresh, cache, source)
        return out * 2 + branch

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*args), f(*args))


def test_bad_input():
    x, gate, fresh, cache, source = _inputs((3, 4, 5), [1])
    with pytest.raises(ValueError, match="gate must have shape"):
        cached_block(x, gate[:, :4], fresh, cache, source)
    with pytest.raises(ValueError, match="fresh must have shape"):
        cached_block(x, gate, fresh[:, :3], cache, source)
    with pytest.raises(ValueError, match="source must be an int64"):
        cached_block(x, gate, fresh, cache, source.int())
    with pytest.raises(ValueError, match="cache must have the shape"):
        cached_block(x, gate, fresh, cache[:2], source)
    with pytest.raises(ValueError, match="x must be float"):
        cached_block(x.long(), gate.long(), fresh.long(), cache.long(), source)
    with pytest.raises(TypeError, match="fresh must be a tensor"):
        cached_block(x, gate, None, cache, source)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", [False, True])
def test_source_out_of_range_or_not_one_to_one_is_refused(monkeypatch, backend, grad):
    # issue 17: the Triton kernels read and wrote at an unchecked index (a segfault); every backend refuses it
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, gate, fresh, cache, _ = _inputs((3, 4, 5), [0, 2], requires_grad=grad)
    for source in ([0, 10**6, 1], [0, -2, 1], [0, 0, 1], [0, -1, -1]):
        with pytest.raises(ValueError, match="source"):
            cached_block(x, gate, fresh, cache, torch.tensor(source))
    if grad:
        g = torch.randn(3, 4, 5)
        with pytest.raises(ValueError, match="source"):
            torch.ops.tdiff.cached_block_backward(g, g, gate.detach(), g, torch.tensor([0, 10**6, 1]), 2)


def test_registered_cpu_ops_validate_their_inputs():
    x, gate, fresh, cache, source = _inputs((4, 16, 64), [0, 1, 2, 3])
    ops = torch.ops.tdiff
    with pytest.raises(ValueError, match=r"source\[1\] = 1 is out of range"):  # issue 17: a 1-row fresh
        ops.cached_block_cpu(x, gate, torch.randn(1, 16, 64), cache, source)
    with pytest.raises(ValueError, match=r"fresh has 4 rows but source selects 3"):
        ops.cached_block_cpu(x, gate, fresh, cache, torch.tensor([0, 1, -1, 3]))
    with pytest.raises(ValueError, match=r"fresh must have shape \(K, 16, 64\)"):
        ops.cached_block_cpu(x, gate, torch.randn(1), cache, source)
    with pytest.raises(ValueError, match=r"source\[1\] = 9 is out of range"):
        ops.cached_block_cpu(x, gate, fresh, cache, torch.tensor([0, 9, 2, 3]))
    with pytest.raises(ValueError, match="gate must have shape"):
        ops.cached_block_backward_cpu(x, x, gate[:1], x, source, 4)
    with pytest.raises(ValueError, match=r"the number of fresh rows must be in \[0, 4\]"):
        ops.cached_block_backward_cpu(x, x, gate, x, source, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("computed", [[], [1], [0, 1, 2]])
def test_backward_op_alone_matches_reference(monkeypatch, backend, computed):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    source = torch.full((3,), -1, dtype=torch.long)
    source[computed] = torch.arange(len(computed))
    g, gb, br = torch.randn(3, 7, 9), torch.randn(3, 7, 9), torch.randn(3, 7, 9)
    gate = torch.randn(3, 9)
    got = torch.ops.tdiff.cached_block_backward(g, gb, gate, br, source, len(computed))
    want = cached_block_backward_reference(g, gb, gate, br, source, len(computed))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_backward_reference_alone():
    g, gb = torch.ones(2, 1, 2), torch.zeros(2, 1, 2)
    gate, branch = torch.tensor([[2.0, 3.0], [4.0, 5.0]]), torch.tensor([[[1.0, 1.0]], [[2.0, 2.0]]])
    gx, ggate, gfresh, gcache = cached_block_backward_reference(g, gb, gate, branch, torch.tensor([-1, 0]), 1)
    assert gx.tolist() == g.tolist() and ggate.tolist() == [[1.0, 1.0], [2.0, 2.0]]
    assert gfresh.tolist() == [[[4.0, 5.0]]] and gcache.tolist() == [[[2.0, 3.0]], [[0.0, 0.0]]]


# ---------------------------------------------------------------------------------------------------------------
# Per-sample masks in one batch (serving) == each sample run alone with its own mask
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_masks_equal_running_each_sample_alone(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    from tdiff.cache import cached_dit

    from test_cache_models import tiny_dit

    model = tiny_dit(depth=2)
    steps, batch = 4, 3
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(batch, steps, 4, generator=g) < 0.5
    masks[:, 0] = True
    masks[0, 2] = False  # at step 2 sample 0 skips everything, the others compute some units
    masks[:, 3] = False  # at step 3 the whole batch reuses: the no-gather path
    xs = [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(steps)]
    # samples at different times in one batch
    ts = [torch.tensor([900.0, 700.0, 500.0]) - 100 * i for i in range(steps)]
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        alone = []
        for b in range(batch):
            fast = cached_dit(model, masks[b], formulation="branch")  # the fused op serves the branch formulation
            alone.append([fast(xs[i][b:b + 1], ts[i][b:b + 1], y[b:b + 1]) for i in range(steps)])
            fast.remove()
        fast = cached_dit(model, torch.ones(steps, 4), formulation="branch")
        for i in range(steps):
            with fast.sample_rows(masks[:, i]):
                out = fast(xs[i], ts[i], y)
            for b in range(batch):
                torch.testing.assert_close(out[b:b + 1], alone[b][i], rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="rows"):
            with fast.sample_rows(torch.ones(batch, 3, dtype=torch.bool)):
                pass
