"""Time-step samplers and SpeeD's areas: SpeeD's published numbers, the distributions they claim, device-side
determinism, the density used by the unbiased mode, and bad input."""
import math

import pytest
import torch

from tdiff import schedules as S
from tdiff.training import (LogitNormalSampler, LogNormalSampler, SpeedSampler, UniformSampler, make_sampler,
                            speed_areas)

DDPM = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def _index(t):
    return torch.round(DDPM.index_from_t(t)).long()


def test_speed_areas_linear_ddpm_match_speed():
    areas = speed_areas(DDPM)
    assert areas.peak == 219  # peak of d(1 - alpha_bar)/dt
    assert areas.convergence == 642  # SpeeD's meaningful steps, argmax(grad sqrt(1-alpha_bar) < 1e-4) + 1
    assert areas.area_of(torch.tensor([0, 218, 219, 641, 642, 999])).tolist() == [0, 0, 1, 1, 2, 2]


def test_speed_areas_any_schedule():
    for sched in (S.VPLinear(), S.VPCosine(), S.EDM(), S.RectifiedFlow()):
        a = speed_areas(sched)
        assert 0 <= a.peak < a.convergence < a.n, sched
    # continuous VP-linear is the DDPM schedule's limit: the same boundaries within a few steps
    a = speed_areas(S.VPLinear())
    assert abs(a.peak - 219) <= 3 and abs(a.convergence - 642) <= 5


def test_speed_sampler_defaults_reproduce_speed_config():
    s = SpeedSampler(DDPM)
    assert (s.k, s.tau, s.ms) == (2.0, 700, 642)
    assert torch.allclose(s.probs[:700] / s.probs[700:].mean(), torch.full((700,), 2.0, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    t = s.sample(60_001, g)
    idx = _index(t)
    torch.testing.assert_close(DDPM.t_from_index(idx).float(), t)  # discrete: exactly the training steps
    drawn, reflected = idx[:30_001], idx[30_001:]
    # the second half is the dual reflection |ms - i| of the first draws
    assert torch.equal(reflected, (642 - drawn[:30_000]).abs())
    # drawn steps follow p = [k]*tau + [1]*(T - tau), normalised: below tau with mass 2*700/(2*700+300)
    frac = (drawn < 700).double().mean().item()
    assert abs(frac - 1400 / 1700) < 0.01


def test_samplers_are_reproducible_and_on_device_generator():
    for name in ("uniform", "speed", "lognormal", "logitnormal"):
        for sched in (DDPM, S.VPLinear(), S.EDM(), S.RectifiedFlow()):
            s = make_sampler(name, sched)
            a = s.sample(64, torch.Generator().manual_seed(3))
            b = s.sample(64, torch.Generator().manual_seed(3))
            assert torch.equal(a, b) and a.dtype == torch.float32 and torch.isfinite(a).all()
            lo, hi = sched.domain
            assert bool((a >= lo).all()) and bool((a <= hi).all())


def test_edm_lognormal_and_sd3_logitnormal_distributions():
    g = torch.Generator().manual_seed(1)
    sig = LogNormalSampler(S.EDM()).sample(100_000, g, dtype=torch.float64)
    assert abs(sig.log().mean().item() + 1.2) < 0.02 and abs(sig.log().std().item() - 1.2) < 0.02
    t = LogitNormalSampler(S.RectifiedFlow(t_min=1e-6, t_max=1 - 1e-6)).sample(100_000, g, dtype=torch.float64)
    x = torch.logit(t)
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1.0) < 0.02
    # a log-normal on another schedule is the same law on its EDM sigma (inside the training interval)
    t = LogNormalSampler(S.VPLinear()).sample(100_000, g, dtype=torch.float64)
    ls = S.VPLinear().edm_sigma(t).log()
    assert abs(ls.median().item() + 1.2) < 0.03


def test_discrete_lognormal_is_the_normal_mass_per_step():
    s = LogNormalSampler(DDPM)
    edges = torch.arange(1, 1000, dtype=torch.float64) / 1000
    cdf = torch.special.ndtr((DDPM.edm_sigma(edges).log() + 1.2) / 1.2)
    expected = torch.diff(torch.cat([torch.zeros(1, dtype=torch.float64), cdf, torch.ones(1, dtype=torch.float64)]))
    torch.testing.assert_close(s._table.probs, expected / expected.sum())


@pytest.mark.parametrize("name", ["uniform", "speed"])
@pytest.mark.parametrize("sched", [DDPM, S.VPLinear()], ids=["ddpm", "vp"])
def test_relative_density_gives_unit_importance_weights(name, sched):
    # E_p[u/p] = 1: the unbiased mode's correction is an exact change of measure
    s = make_sampler(name, sched)
    t = s.sample(100_000, torch.Generator().manual_seed(2), dtype=torch.float64)
    iw = 1.0 / s.relative_density(t)
    assert abs(iw.double().mean().item() - 1.0) < 0.02


@pytest.mark.parametrize("name", ["lognormal", "logitnormal"])
@pytest.mark.parametrize("sched", [S.VPLinear(), S.RectifiedFlow(), S.EDM(sigma_min=1e-3, sigma_max=400.0)],
                         ids=["vp", "flow", "edm"])
def test_relative_density_is_the_sampled_density(name, sched):
    s = make_sampler(name, sched)
    g = s.grid
    # a density: integrates to (almost) 1 over the training interval
    tt = torch.linspace(g.t_lo, g.t_hi, 50_001, dtype=torch.float64)[1:-1]
    if isinstance(sched, S.EDM):  # EDM's time is sigma: integrate in log sigma
        tt = torch.exp(torch.linspace(math.log(g.t_lo), math.log(g.t_hi), 200_001, dtype=torch.float64))[1:-1]
    dens = s.relative_density(tt) / (g.t_hi - g.t_lo)
    assert abs(torch.trapezoid(dens, tt).item() - 1.0) < 0.01
    # and it is the law of the samples: compare bin masses
    t = s.sample(40_000, torch.Generator().manual_seed(2), dtype=torch.float64)
    q = torch.quantile(t[:20_000], torch.linspace(0.1, 0.9, 5, dtype=torch.float64))
    for lo, hi in zip(q[:-1], q[1:]):
        inside = (tt >= lo) & (tt <= hi)
        mass = torch.trapezoid(dens[inside], tt[inside]).item()
        frac = ((t >= lo) & (t <= hi)).double().mean().item()
        assert abs(mass - frac) < 0.015


def test_speed_marginal_density_matches_histogram():
    s = SpeedSampler(DDPM)
    idx = _index(s.sample(200_000, torch.Generator().manual_seed(4)))
    hist = torch.bincount(idx, minlength=1000).double() / idx.numel()
    # compare on coarse bins of 50 steps
    torch.testing.assert_close(hist.view(20, 50).sum(1), s.marginal.view(20, 50).sum(1), atol=6e-3, rtol=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(k=0), "k"), (dict(k=-1.0), "k"), (dict(tau=0), "tau"), (dict(tau=1000), "tau"), (dict(tau=12.5), "tau"),
])
def test_speed_sampler_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeedSampler(DDPM, **kwargs)


def test_bad_sampler_input():
    with pytest.raises(ValueError, match="sampler must be one of"):
        make_sampler("nope", DDPM)
    with pytest.raises(ValueError, match="std"):
        LogNormalSampler(S.EDM(), p_std=0.0)
    with pytest.raises(ValueError, match="batch"):
        UniformSampler(DDPM).sample(0)
    with pytest.raises(ValueError, match="threshold"):
        speed_areas(DDPM, threshold=0.0)


def test_grid_lookup_survives_float32_times():
    from tdiff.training import SpeedWeight, TimeGrid

    idx = torch.arange(1000)
    for sched in (DDPM, S.VPLinear()):
        grid = TimeGrid(sched)
        assert torch.equal(grid.cell_of(grid.nodes.float()), idx)
        assert torch.equal(grid.cell_of(grid.nodes), idx)
    w = SpeedWeight(DDPM)
    torch.testing.assert_close(w(DDPM.t_from_index(idx).float()).double(), w.table(), atol=1e-7, rtol=0)
