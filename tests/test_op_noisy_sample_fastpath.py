"""The public noisy_sample's eager fast path: the per-schedule kernel arguments it keeps (tdiff.ops.noisy_sample.
_SCHEDULE_ARGS) follow a schedule whose attributes change and die with it, and the cheap eager check refuses what
the full check refuses."""
import gc
import importlib
import math

import pytest
import torch

from tdiff import schedules as S
from tdiff.ops.noisy_sample import noisy_sample, noisy_sample_reference

ns = importlib.import_module("tdiff.ops.noisy_sample")  # the module (tdiff.ops re-exports the function by its name)
ORDER = ["DEFAULT", "AVX2", "AVX512"]  # the C++ instruction-set tables, lowest first


def _expected(x0, eps, t, sched):
    spec = sched.kernel_spec()
    return noisy_sample_reference(x0, eps, t, spec.kind, list(spec.params), spec.table, -1.0, [], 0, False)[0]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_reassigned_schedule_attributes_are_seen(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    sched = S.VPLinear()
    first, _ = noisy_sample(x0, eps, t, sched, check=False)
    torch.testing.assert_close(first, _expected(x0, eps, t, sched))
    sched.beta1 = 5.0  # a new float object: the kept arguments are stale
    second, _ = noisy_sample(x0, eps, t, sched, check=False)
    torch.testing.assert_close(second, _expected(x0, eps, t, sched))
    assert not torch.allclose(first, second)

    discrete = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 50))
    noisy_sample(x0, eps, t, discrete, check=False)
    discrete.log_alpha_table = discrete.log_alpha_table * 0.5  # a new table tensor (compared by identity)
    out, _ = noisy_sample(x0, eps, t, discrete, check=False)
    torch.testing.assert_close(out, _expected(x0, eps, t, discrete))


def test_kept_arguments_die_with_their_schedule():
    x0 = torch.randn(2, 3)
    sched = S.EDM()
    noisy_sample(x0, x0, torch.tensor([1.0, 2.0], dtype=torch.float64), sched, check=False)
    key = id(sched)
    assert key in ns._SCHEDULE_ARGS
    del sched
    gc.collect()
    assert key not in ns._SCHEDULE_ARGS
    with pytest.raises(TypeError, match="schedule must be a tdiff NoiseSchedule"):
        noisy_sample(x0, x0, torch.tensor([1.0, 2.0]), object(), check=False)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_cheap_check_refuses_what_the_full_check_refuses(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x0 = torch.randn(4, 3)
    sched = S.VPLinear()
    good = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=torch.float64)
    noisy_sample(x0, x0, good, sched)  # in the domain, ends included
    for bad in (1.5, -0.5, math.nan, math.inf):
        t = good.clone()
        t[2] = bad
        with pytest.raises(ValueError, match=r"inside the domain .* for samples \[2\]"):
            noisy_sample(x0, x0, t, sched)
    # in-domain times whose coefficients are not finite: FDM's sigma-driven factor at sigma/alpha = inf (t = 1 on
    # the flow schedule gives alpha = 0)
    flow = S.RectifiedFlow()
    fdm = S.FDMMomentum(source="sigma")
    t = torch.tensor([0.5, 0.5, 0.5, flow.domain[1]], dtype=torch.float64)
    coefs = ns.coefficients_reference(t, *_spec_args(flow), 1.0, fdm.kernel_params(), ns.FDM_ON_INPUT)
    assert not torch.isfinite(coefs).all()
    with pytest.raises(ValueError, match=r"finite coefficients for samples \[3\]"):
        noisy_sample(x0, x0, t, flow, fdm=fdm, precond_sigma_data=1.0)


def _spec_args(sched):
    spec = sched.kernel_spec()
    return spec.kind, list(spec.params), spec.table


def test_sampler_is_the_registered_op():
    # tdiff._C.NoisySampler (the eager fast path: schedule arguments resolved once) gives the registered op's
    # outputs bit for bit, makes net_in and the coefficients only when asked, and refuses what the op refuses
    import tdiff._C as ext

    sched = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 50))
    spec = sched.kernel_spec()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    fdm = S.FDMMomentum(source="time")
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        x0, eps = torch.randn(3, 5, 7).to(dtype), torch.randn(3, 5, 7).to(dtype)
        for write_input, fdm_args in ((False, ([], 0)), (True, (fdm.kernel_params(), ns.FDM_ON_MEAN))):
            schedule_args = (spec.kind, list(spec.params), spec.table.double(), 0.5, *fdm_args)
            want = torch.ops.tdiff.noisy_sample_cpu(x0, eps, t, *schedule_args, write_input)
            sampler = ext.NoisySampler(*schedule_args)
            xt, net_in, coefs = sampler(x0, eps, t, write_input, True)
            assert torch.equal(xt, want[0]) and torch.equal(coefs, want[2])
            assert net_in is None if not write_input else torch.equal(net_in, want[1])
            assert sampler(x0, eps, t, write_input, False)[2] is None
    with pytest.raises(ValueError, match="eps must have the shape of x0"):
        sampler(x0, eps[:, :2], t, False, False)
    with pytest.raises(ValueError, match="kind must be a schedule kind code"):
        ext.NoisySampler(9, [0.0] * 4, None, -1.0, [], 0)


def test_times_are_read_in_place_in_their_own_dtype():
    # The C++ op reads t where it lies, in its own dtype (no float64 copy), and reuses the coefficients of a time
    # equal to the one before: every sample's outputs are those of that sample alone with its time in float64, bit
    # for bit, for strided, broadcast, repeated and NaN times. The coefficients are computed in blocks of 16
    # samples: 40 samples, with runs of equal times across both block boundaries, for a variance-preserving
    # schedule (log sigma from log alpha) and one that is not
    base = torch.tensor([0.3, 0.3, 0.7, math.nan, math.nan, 0.3])
    g = torch.Generator().manual_seed(0)
    base = torch.cat([base, torch.rand(9, generator=g) * 0.9 + 0.05, torch.full((3,), 0.45),  # samples 15-17
                      torch.tensor([math.nan, 0.8]), torch.rand(11, generator=g) * 0.9 + 0.05,
                      torch.full((4,), 0.6), torch.tensor([0.2, 0.2, math.nan, 0.9])])  # 0.6: samples 31-34
    n = base.shape[0]
    x0, eps = torch.randn(n, 3, 5), torch.randn(n, 3, 5)
    for sched, sigma_data in ((S.VPLinear(), 0.5), (S.EDM(), 0.5)):
        spec = sched.kernel_spec()
        args = (spec.kind, list(spec.params), None, sigma_data, [], 0, True)
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            t = base.to(dtype)
            for times in (t, torch.stack([t, torch.zeros_like(t)], 1)[:, 0], t[2:3].expand(n)):
                _each_sample_alone(x0, eps, times, args)


def _each_sample_alone(x0, eps, times, args):
    got = torch.ops.tdiff.noisy_sample_cpu(x0, eps, times, *args)
    for b in range(times.shape[0]):
        alone = torch.ops.tdiff.noisy_sample_cpu(x0[b:b + 1], eps[b:b + 1], times[b:b + 1].double(), *args)
        for g, w in zip(got, alone):
            torch.testing.assert_close(g[b:b + 1], w, rtol=0, atol=0, equal_nan=True)


def _bits_match(got, want):
    # the same bits, NaN aside (NaN payloads differ between conversions); NaN exactly where expected
    nan = torch.isnan(want.float())
    assert torch.equal(torch.isnan(got.float()), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_conversions_are_exact_on_every_table(dtype):
    # The loops' half / bfloat16 loads and stores (csrc/loops/vec_io.h: direct conversions from and to memory, and
    # bfloat16's even/odd lane order on AVX-512) round exactly as a float32 computation rounded to the dtype, ties,
    # subnormals, overflow and NaN included, on every instruction-set table here. Power-of-two coefficients make
    # every product exact (or rounded alike), so the float32 oracle has the kernel's rounding (EDM: a = 1, s = t).
    ops = torch.ops.tdiff
    finfo = torch.finfo(dtype)
    n = 1037  # a partial vector step for every vector width
    x0, eps = torch.randn(4, n).to(dtype), torch.randn(4, n).to(dtype)
    special = torch.tensor([1.0, 2.0**-8, 3 * 2.0**-9, finfo.tiny / 4, -finfo.tiny / 8, finfo.max, finfo.max,
                            math.inf, -math.inf, math.nan, -0.0, finfo.eps / 2], dtype=torch.float32).to(dtype)
    x0[:, : special.numel()] = special
    eps[:, : special.numel()] = special.flip(0)
    # sums with a tie at every bit position, rounding down to an even last bit (1 + ...) and up from an odd one
    eps[:, 40:80] = 2.0 ** -(torch.arange(40, dtype=torch.float32) % 20).to(dtype)
    x0[:, 40:60], x0[:, 60:80] = 1.0, 1.0 + finfo.eps
    t = torch.tensor([1.0, 0.25, 2.0, 1.0], dtype=torch.float64)
    edm = S.EDM()
    spec = edm.kernel_spec()
    coefs = torch.tensor([[1.0, 0.25, 2.0]] * 4)
    g, gin = torch.randn(4, n).to(dtype), torch.randn(4, n).to(dtype)
    g[:, : special.numel()], gin[:, : special.numel()] = special, special.flip(0)
    s = t.float().view(-1, 1)
    want_xt = (x0.float() + s * eps.float()).to(dtype)  # a = 1: a x0 exact; s eps exact but in the subnormals
    gsum = g.float() + 2.0 * gin.float()
    want_back = (gsum.to(dtype), (0.25 * gsum).to(dtype))
    before = ops.cpu_capability()
    try:
        for isa in ORDER[: ORDER.index(before) + 1]:
            ops.cpu_capability(isa)
            xt, net_in, _ = ops.noisy_sample_cpu(x0, eps, t, spec.kind, list(spec.params), None, -1.0, [], 0, True)
            _bits_match(xt, want_xt)
            _bits_match(net_in, want_xt)  # c = 1 without preconditioning
            for got, want in zip(ops.noisy_sample_backward_cpu(g, gin, coefs), want_back):
                _bits_match(got, want)
    finally:
        ops.cpu_capability(before)

