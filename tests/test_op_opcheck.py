"""torch.library.opcheck for every registered op (forwards and backwards) on every backend, with contiguous,
channels_last and non-contiguous inputs: the fakes must promise exactly the strides each backend returns, and the
autograd registrations must hold (issue 16 item 3)."""
import pytest
import torch

import tdiff.ops  # noqa: F401  (registers the tdiff:: ops)
from tdiff import schedules as S

BACKENDS = ["torch", "triton", "cpp"]
LAYOUTS = ["contiguous", "channels_last", "non_contiguous"]


def _data(shape, layout, requires_grad=False, dtype=torch.float32):
    """A tensor of `shape` stored in `layout`. For 3-D (B, N, C) data, "channels_last" stores the tokens fastest."""
    if layout == "contiguous":
        t = torch.randn(shape, dtype=dtype)
    elif layout == "channels_last":
        if len(shape) == 4:
            t = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
        else:
            t = torch.randn(shape[0], shape[2], shape[1], dtype=dtype).transpose(1, 2)
    else:  # every other element of a wider tensor: no dense layout at all
        t = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype)[..., ::2]
    assert tuple(t.shape) == tuple(shape) and (layout == "contiguous") == t.is_contiguous()
    return t.requires_grad_(requires_grad)


def _multistep(layout):
    x = _data((3, 4, 5, 6), layout, True)
    hist = [_data((3, 4, 5, 6), layout, True) for _ in range(2)]
    return torch.ops.tdiff.multistep_update.default, (x, hist, torch.randn(3, 3, requires_grad=True))


def _multistep_backward(layout):
    x, hist = _data((3, 4, 5, 6), layout), [_data((3, 4, 5, 6), layout) for _ in range(2)]
    return torch.ops.tdiff.multistep_update_backward.default, (_data((3, 4, 5, 6), layout), x, hist,
                                                               torch.randn(3, 3))


def _convert_args(layout, requires_grad):
    x = _data((3, 4, 5, 6), layout, requires_grad)
    hist = [_data((3, 4, 5, 6), layout, requires_grad) for _ in range(2)]
    coeffs = torch.randn(3, 3, requires_grad=requires_grad)
    uncond, src = _data((3, 4, 5, 6), layout, requires_grad), _data((3, 4, 5, 6), layout, requires_grad)
    scale, convert = torch.rand(3, requires_grad=requires_grad), torch.randn(3, 2, requires_grad=requires_grad)
    return x, hist, coeffs, uncond, scale, src, convert


def _multistep_convert(layout):
    return torch.ops.tdiff.multistep_update_convert.default, _convert_args(layout, True)


def _multistep_convert_backward(layout):
    return torch.ops.tdiff.multistep_update_convert_backward.default, (
        _data((3, 4, 5, 6), layout), _data((3, 4, 5, 6), layout), *_convert_args(layout, False))


def _noisy_sample(layout):
    spec = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 50)).kernel_spec()
    fdm = S.FDMMomentum(source="time", u_min=0.0, u_max=1.0).kernel_params()
    return torch.ops.tdiff.noisy_sample.default, (
        _data((3, 4, 5, 6), layout, True), _data((3, 4, 5, 6), layout, True), torch.tensor([0.1, 0.5, 0.9]),
        spec.kind, list(spec.params), spec.table.double(), 1.0, fdm, 1, True)


def _noisy_sample_backward(layout):
    return torch.ops.tdiff.noisy_sample_backward.default, (
        _data((3, 4, 5, 6), layout), _data((3, 4, 5, 6), layout), torch.rand(3, 3))


def _weighted_mse(layout):
    return torch.ops.tdiff.weighted_mse.default, (
        _data((3, 4, 5, 6), layout, True), _data((3, 4, 5, 6), layout), torch.rand(3, requires_grad=True))


def _weighted_mse_backward(layout):
    return torch.ops.tdiff.weighted_mse_backward.default, (
        torch.randn(3), _data((3, 4, 5, 6), layout), _data((3, 4, 5, 6), layout), torch.rand(3))


def _cached_block(layout):
    return torch.ops.tdiff.cached_block.default, (
        _data((3, 4, 5), layout, True), torch.randn(3, 5, requires_grad=True), _data((2, 4, 5), layout, True),
        _data((3, 4, 5), layout, True), torch.tensor([1, -1, 0]))


def _cached_block_backward(layout):
    return torch.ops.tdiff.cached_block_backward.default, (
        _data((3, 4, 5), layout), _data((3, 4, 5), layout), torch.randn(3, 5), _data((3, 4, 5), layout),
        torch.tensor([1, -1, 0]), 2)


CASES = {f.__name__[1:]: f for f in (_multistep, _multistep_backward, _multistep_convert,
                                     _multistep_convert_backward, _noisy_sample, _noisy_sample_backward,
                                     _weighted_mse, _weighted_mse_backward, _cached_block, _cached_block_backward)}


FAKE_AND_SCHEMA = ("test_schema", "test_autograd_registration", "test_faketensor")
ALL_UTILS = FAKE_AND_SCHEMA + ("test_aot_dispatch_dynamic",)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_opcheck_every_layout(monkeypatch, backend, case):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    for layout in LAYOUTS:
        op, args = CASES[case](layout)
        # test_faketensor holds the real strides to the fake's for every layout; the AOT-dispatch check (seconds
        # each) runs on contiguous inputs everywhere and on every layout for the reference backend, the one whose
        # layout contradicted its fakes (issue 16)
        utils = ALL_UTILS if layout == "contiguous" or backend == "torch" else FAKE_AND_SCHEMA
        torch.library.opcheck(op, args, test_utils=utils)
        # and the real outputs are laid out as the fakes promise: contiguous
        outs = op(*args)
        for out in outs if isinstance(outs, (tuple, list)) else [outs]:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                assert t.is_contiguous(), f"{case}/{layout}: an output of stride {t.stride()}"
