"""Time-step samplers and SpeeD's areas: SpeeD's published numbers, the distributions they claim, device-side
determinism, the density used by the unbiased mode, and bad input."""
import math

import pytest
import torch

from tdiff import schedules as S
from tdiff.training import (LogitNormalSampler, LogNormalSampler, LogUniformSampler, SpeedSampler, SpeedWeight,
                            TableSampler, TimeCells, UniformSampler, make_sampler, speed_areas)

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


def test_speed_areas_and_tau_on_the_linear_schedule():
    areas = speed_areas(DDPM)
    # tau: the first step after the peak where the increment of 1 - alpha_bar is below 1e-4, plus one
    inc = torch.gradient(1.0 - DDPM.alphas_cumprod)[0]
    assert inc[areas.tau - 1] < 1e-4 <= inc[areas.tau - 2] and areas.tau == 699
    assert areas.convergence < areas.tau


@pytest.mark.parametrize("sched, expected", [
    (S.VPCosine(), (497, 964, 985)), (S.RectifiedFlow(), (499, 922, 957)), (S.EDM(), (6, 116, 146)),
    (S.VPLinear(), (217, 643, 700)), (S.VE(), (458, 720, 761)),
], ids=["cosine", "flow", "edm", "vplinear", "ve"])
def test_speed_areas_and_tau_follow_the_schedule(sched, expected):
    """One rule on every schedule's own 1000 cells (the module docstring), checked against a numpy evaluation."""
    import numpy as np

    a = speed_areas(sched)
    assert (a.peak, a.convergence, a.tau) == expected
    t = np.asarray(TimeCells(sched).nodes)
    omab = 1.0 / (1.0 + np.exp(2.0 * np.asarray(sched.lambda_(torch.from_numpy(t)))))
    inc, inc_sqrt = np.gradient(omab), np.gradient(np.sqrt(omab))
    peak = int(np.argmax(inc))
    assert peak == a.peak
    assert a.convergence == peak + 1 + int(np.argmax(inc_sqrt[peak + 1:] < 1e-4)) + 1
    assert a.tau == peak + 1 + int(np.argmax(inc[peak + 1:] < 1e-4)) + 1
    assert a.peak < a.convergence <= a.tau < a.n
    # the sampler and the weights take their defaults from the areas
    assert SpeedSampler(sched).tau == a.tau and SpeedSampler(sched).ms == a.convergence
    assert SpeedWeight(sched).tau == a.tau


def test_speed_sampler_defaults_and_speeds_config():
    s = SpeedSampler(DDPM)
    assert (s.k, s.tau, s.ms) == (2.0, 699, 642)
    s = SpeedSampler(DDPM, tau=700)  # SpeeD's configs
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
    # the integer steps for a diffusers loop are the same draws
    assert torch.equal(s.sample_indices(64, torch.Generator().manual_seed(1)),
                       _index(s.sample(64, torch.Generator().manual_seed(1))))
    with pytest.raises(ValueError, match="discrete"):
        SpeedSampler(S.VPLinear()).sample_indices(4)


def test_samplers_are_reproducible_and_on_device_generator():
    for name in ("uniform", "speed", "lognormal", "logitnormal", "loguniform"):
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


@pytest.mark.parametrize("name", ["lognormal", "logitnormal", "loguniform"])
@pytest.mark.parametrize("sched", [S.VPLinear(), S.RectifiedFlow(), S.EDM(sigma_min=1e-3, sigma_max=400.0)],
                         ids=["vp", "flow", "edm"])
def test_relative_density_is_the_sampled_density(name, sched):
    s = make_sampler(name, sched)
    g = s.cells
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


def test_loguniform_is_uniform_in_log_sigma():
    edm = S.EDM(sigma_min=0.02, sigma_max=100.0)  # EDM's VELoss range; on VE() the law is uniform in t
    t = LogUniformSampler(edm).sample(100_000, torch.Generator().manual_seed(1), dtype=torch.float64)
    u = (t.log() - math.log(0.02)) / math.log(5000.0)
    torch.testing.assert_close(LogUniformSampler(S.VE()).relative_density(t / 100), torch.ones_like(t))
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert bool((u >= -1e-9).all()) and bool((u <= 1 + 1e-9).all())


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, error, match", [
    (lambda: SpeedSampler(DDPM, k=0), ValueError, "k"),
    (lambda: SpeedSampler(DDPM, k=-1.0), ValueError, "k"),
    (lambda: SpeedSampler(DDPM, k=INF), ValueError, "k .*finite"),
    (lambda: SpeedSampler(DDPM, k=NAN), ValueError, "k .*finite"),
    (lambda: SpeedSampler(DDPM, k="2"), TypeError, "k .*real number"),
    (lambda: SpeedSampler(DDPM, k=True), TypeError, "k .*real number"),
    (lambda: SpeedSampler(DDPM, tau=0), ValueError, "tau"),
    (lambda: SpeedSampler(DDPM, tau=1000), ValueError, "tau"),
    (lambda: SpeedSampler(DDPM, tau=12.5), ValueError, "tau"),
    (lambda: SpeedSampler(DDPM, tau=INF), ValueError, "tau"),
    (lambda: SpeedSampler(DDPM, reflect=1), TypeError, "reflect"),
    (lambda: SpeedSampler(DDPM, threshold=NAN), ValueError, "threshold"),
    (lambda: SpeedSampler(DDPM, threshold=0.0), ValueError, "threshold"),
    (lambda: SpeedSampler(DDPM, threshold=1e-12), ValueError, "larger threshold"),
    (lambda: SpeedSampler(S.VPLinear(), n=1), ValueError, "n "),
    (lambda: SpeedSampler(S.VPLinear(), n=10.5), ValueError, "n "),
    (lambda: SpeedSampler("ddpm"), TypeError, "schedule"),
    (lambda: make_sampler("nope", DDPM), ValueError, "sampler must be one of"),
    (lambda: make_sampler(["speed"], DDPM), TypeError, "sampler must be a name"),
    (lambda: make_sampler(SpeedSampler(DDPM), DDPM, k=3), ValueError, "already-built"),
    (lambda: LogNormalSampler(S.EDM(), p_std=0.0), ValueError, "p_std"),
    (lambda: LogNormalSampler(S.EDM(), p_std=INF), ValueError, "p_std"),
    (lambda: LogNormalSampler(S.EDM(), p_mean=NAN), ValueError, "p_mean"),
    (lambda: LogitNormalSampler(S.RectifiedFlow(), mean=INF), ValueError, "mean"),
    (lambda: LogitNormalSampler(S.RectifiedFlow(), std=-1.0), ValueError, "std"),
    (lambda: TableSampler(DDPM, torch.full((1000,), NAN)), ValueError, "probs"),
    (lambda: TableSampler(DDPM, torch.ones(10)), ValueError, "probs"),
    (lambda: UniformSampler(DDPM).sample(0), ValueError, "batch"),
    (lambda: UniformSampler(DDPM).sample(2.5), ValueError, "batch"),
    (lambda: UniformSampler(DDPM).sample(4, generator=3), TypeError, "generator"),
    (lambda: speed_areas(DDPM, threshold=0.0), ValueError, "threshold"),
    (lambda: speed_areas(DDPM, threshold=INF), ValueError, "threshold"),
])
def test_bad_sampler_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_grid_lookup_survives_float32_times():
    idx = torch.arange(1000)
    for sched in (DDPM, S.VPLinear()):
        grid = TimeCells(sched)
        assert torch.equal(grid.cell_of(grid.nodes.float()), idx)
        assert torch.equal(grid.cell_of(grid.nodes), idx)
    w = SpeedWeight(DDPM)
    torch.testing.assert_close(w(DDPM.t_from_index(idx).float()).double(), w.table(), atol=1e-7, rtol=0)
