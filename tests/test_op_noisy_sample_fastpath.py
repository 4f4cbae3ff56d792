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
