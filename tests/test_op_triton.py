"""The Triton launchers' GPU readiness, checked under the interpreter (issue 16 item 5): the grid-size limit
(patched down so the grid-stride loops run), samples of zero elements, and the token-parallel cached_block
backward, each against the reference."""
import pytest
import torch

from tdiff import schedules as S
from tdiff.ops.cached_block import cached_block_backward_reference, cached_block_reference
from tdiff.ops.multistep_update import (multistep_update, multistep_update_backward_reference,
                                        multistep_update_convert_reference, multistep_update_reference)
from tdiff.ops.noisy_sample import noisy_sample_backward_reference, noisy_sample_reference
from tdiff.ops.weighted_mse import weighted_mse_backward_reference, weighted_mse_reference


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("TDIFF_BACKEND", "triton")


@pytest.fixture
def three_programs(monkeypatch, triton_backend):
    from tdiff.kernels import launch

    monkeypatch.setattr(launch, "MAX_PROGRAMS", 3)


def _close(got, want):
    as_list = lambda v: v if isinstance(v, (tuple, list)) else [v]  # noqa: E731
    for a, b in zip(as_list(got), as_list(want)):
        if isinstance(a, (list, tuple)):
            _close(a, b)
        else:  # float32 sums over 4099 products in another order: a relative 1e-4
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_every_op_with_fewer_programs_than_blocks(three_programs):
    # 4 samples of 4096 + 3 elements: 8 blocks of 4096 (the interpreter's block) on a 3-program grid
    b, n = 4, 4096 + 3
    x, h0, h1, u, src = (torch.randn(b, n) for _ in range(5))
    c, w, pq = torch.randn(b, 3), torch.rand(b) + 1, torch.randn(b, 2)
    _close(multistep_update(x, [h0, h1], c), multistep_update_reference(x, [h0, h1], c))
    _close(multistep_update(x, [h0, h1], c, uncond=u, scale=w, src=src, convert=pq),
           multistep_update_convert_reference(x, [h0, h1], c, u, w, src, pq))
    _close(torch.ops.tdiff.multistep_update_backward(u, x, [h0, h1], c),
           multistep_update_backward_reference(u, x, [h0, h1], c))

    sched = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 100))
    spec = sched.kernel_spec()
    t = torch.rand(b, dtype=torch.float64)
    args = (x, h0, t, spec.kind, list(spec.params), spec.table.double(), 0.5, [], 0, True)
    _close(torch.ops.tdiff.noisy_sample(*args), noisy_sample_reference(*args))
    coefs = torch.rand(b, 3)
    _close(torch.ops.tdiff.noisy_sample_backward(x, h0, coefs), noisy_sample_backward_reference(x, h0, coefs))

    weight, g = torch.rand(b), torch.randn(b)
    _close(torch.ops.tdiff.weighted_mse(x, h0, weight), weighted_mse_reference(x, h0, weight))
    _close(torch.ops.tdiff.weighted_mse_backward(g, x, h0, weight), weighted_mse_backward_reference(g, x, h0, weight))

    xb, cache, gb = torch.randn(b, 3, 1500), torch.randn(b, 3, 1500), torch.randn(b, 1500)
    fresh, source = torch.randn(2, 3, 1500), torch.tensor([-1, 1, 0, -1])
    _close(torch.ops.tdiff.cached_block(xb, gb, fresh, cache, source),
           cached_block_reference(xb, gb, fresh, cache, source))
    bargs = (cache, xb, gb, fresh.new_ones(b, 3, 1500), source, 2)
    _close(torch.ops.tdiff.cached_block_backward(*bargs), cached_block_backward_reference(*bargs))


def test_samples_of_zero_elements(triton_backend):
    # issue 16: N = 0 left noisy_sample's coefficients unwritten
    for shape in [(3, 0), (3, 2, 0)]:
        x = torch.randn(shape)
        c = torch.randn(3, 2)
        assert multistep_update(x, [x], c).shape == shape
        gx, gh, gc = torch.ops.tdiff.multistep_update_backward(x, x, [x], c)
        assert gx.shape == shape and torch.equal(gc, torch.zeros(3, 2))
        sched = S.VPCosine()
        spec = sched.kernel_spec()
        t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        args = (x, x, t, spec.kind, list(spec.params), None, -1.0, [], 0, True)
        xt, net_in, coefs = torch.ops.tdiff.noisy_sample(*args)
        assert xt.shape == net_in.shape == shape
        torch.testing.assert_close(coefs, noisy_sample_reference(*args)[2])
    for n, ch in [(0, 4), (3, 0)]:
        x = torch.randn(2, n, ch)
        out, branch = torch.ops.tdiff.cached_block(x, torch.randn(2, ch), torch.randn(1, n, ch), x,
                                                   torch.tensor([0, -1]))
        assert out.shape == branch.shape == (2, n, ch)
        gx, ggate, gfresh, gcache = torch.ops.tdiff.cached_block_backward(x, x, torch.randn(2, ch), x,
                                                                          torch.tensor([0, -1]), 1)
        assert torch.equal(ggate, torch.zeros(2, ch)) and gfresh.shape == (1, n, ch)


def test_launches_are_guarded_on_the_data_device():
    # multi-GPU: a launch for a tensor on cuda:1 must run under torch.cuda.device(cuda:1), whatever is current
    from tdiff.kernels import launch

    class OnSecondGpu:
        is_cuda = True
        device = torch.device("cuda", 1)

    guard = launch.device_guard(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with launch.device_guard(torch.empty(1)):  # CPU (the interpreter): nothing to guard
        pass
