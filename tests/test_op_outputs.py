"""The C++ ops' fresh outputs (csrc/outputs.h): in-cache outputs reuse the blocks of the outputs freed last, and never
a block that a live tensor holds."""
import pytest
import torch

from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.multistep_update import multistep_update
from tdiff.ops.noisy_sample import noisy_sample

pytestmark = pytest.mark.skipif(not dispatch.cpp_has("multistep_update_cpu"), reason="needs the C++ extension")


def _convert(x, h, cf, pq):
    return multistep_update(x, h, cf, convert=pq, check=False)


def test_dropped_outputs_are_reused_and_live_ones_never():
    x, h = torch.randn(8, 4, 16, 16), [torch.randn(8, 4, 16, 16)]  # 32 KiB a tensor: recycled
    cf, pq = torch.randn(8, 2), torch.randn(8, 2)
    with torch.no_grad():
        buffers = set()
        for _ in range(20):  # a loop that drops its outputs: the same two blocks, still in cache
            out = _convert(x, h, cf, pq)
            buffers.update(t.data_ptr() for t in out)
            del out
        assert len(buffers) == 2
        kept = [_convert(x, h, cf, pq) for _ in range(3)]  # held outputs: every block distinct, values intact
        values = [tuple(t.clone() for t in pair) for pair in kept]
        for _ in range(5):
            fresh = _convert(2 * x, h, cf, pq)
            held = {t.data_ptr() for pair in kept for t in pair}
            assert not held & {t.data_ptr() for t in fresh}
        assert len(held) == 6
        for pair, want in zip(kept, values):
            assert all(torch.equal(a, b) for a, b in zip(pair, want))
        xt, net_in = noisy_sample(x, h[0], torch.rand(8), S.VPLinear(), write_input=True, check=False)
        assert {xt.data_ptr(), net_in.data_ptr()}.isdisjoint(held)


def test_recycled_outputs_behave_as_any_tensor(tmp_path):
    from tdiff.ops.multistep_update import multistep_update_reference

    x, h = torch.randn(4, 3, 8, 8), [torch.randn(4, 3, 8, 8)]
    cf = torch.randn(4, 2)
    with torch.no_grad():
        out = multistep_update(x, h, cf, check=False)
        want = out.clone()
        assert out.is_contiguous() and out.storage_offset() == 0 and out.untyped_storage().nbytes() == out.nbytes
        torch.save(out, tmp_path / "out.pt")
        assert torch.equal(torch.load(tmp_path / "out.pt"), want)
        out.resize_(4, 3, 64, 64)  # grown past the recycled sizes: the old values kept, the old block freed
        assert torch.equal(out.flatten()[:want.numel()], want.flatten())
        xb, hb, cfb = torch.randn(64, 4, 64, 64), [torch.randn(64, 4, 64, 64)], torch.randn(64, 2)
        big = multistep_update(xb, hb, cfb, check=False)  # 4 MiB: the default allocator
        torch.testing.assert_close(big, multistep_update_reference(xb, hb, cfb))
