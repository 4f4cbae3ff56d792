"""Loss weights against their papers' formulas, zero-SNR safety, the FDM warm-up and its resume, bad input."""
import math

import pytest
import torch

from tdiff import schedules as S
from tdiff.training import (EDMWeight, MinSNRWeight, P2Weight, PreconditioningWeight, SpeedWeight, WeightWarmup,
                            make_weighting)

DDPM = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def test_speed_weight_is_speeds_formula():
    assert SpeedWeight(DDPM).tau == 699  # from the schedule (speed_areas); SpeeD's configs use 700
    w = SpeedWeight(DDPM, lam=0.6, tau=700)
    # SpeeD: w = gradient(1 - alpha_bar), min-max normalised into [1 - lam, lam] below tau, 1 from tau on
    one_minus = 1.0 - DDPM.alphas_cumprod
    g = torch.gradient(one_minus)[0]
    expected = 0.4 + 0.2 * (g - g.min()) / (g.max() - g.min())
    expected[700:] = 1.0
    idx = torch.arange(1000)
    torch.testing.assert_close(w(DDPM.t_from_index(idx)), expected)
    assert w.table()[:700].min() >= 0.4 - 1e-12 and w.table()[:700].max() <= 0.6 + 1e-12
    assert int(w.table()[:700].argmax()) == 219  # the acceleration/deceleration boundary weighs most
    # lam = 0.5 is flat
    torch.testing.assert_close(SpeedWeight(DDPM, lam=0.5).table()[:699], torch.full((699,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_min_snr_matches_paper(target):
    t = torch.linspace(0.01, 0.99, 57, dtype=torch.float64)
    sched = S.VPLinear()
    snr = sched.snr(t)
    expected = {"eps": torch.minimum(snr, torch.tensor(5.0)) / snr, "x0": torch.minimum(snr, torch.tensor(5.0)),
                "v": torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)}[target]
    torch.testing.assert_close(MinSNRWeight(sched, gamma=5.0, target=target)(t), expected)


@pytest.mark.parametrize("target", ["eps", "x0", "v", "flow"])
def test_min_snr_is_safe_at_zero_and_infinite_snr(target):
    flow = S.RectifiedFlow()
    t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)  # snr = inf, 1, 0
    w = MinSNRWeight(flow, gamma=5.0, target=target).formula(t)
    assert torch.isfinite(w).all() and bool((w >= 0).all()), w
    if target == "eps":
        assert w[2].item() == 1.0  # the limit of min(snr, g)/snr as snr -> 0


def test_min_snr_flow_is_the_x0_weight_in_velocity_space():
    flow = S.RectifiedFlow()
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    # x0 = x_t - t v, so |x0 error|^2 = t^2 |v error|^2
    torch.testing.assert_close(MinSNRWeight(flow, target="flow")(t), MinSNRWeight(flow, target="x0")(t) * t * t)


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_p2_matches_paper(gamma):
    t = DDPM.t_from_index(torch.arange(0, 1000, 37))
    torch.testing.assert_close(P2Weight(DDPM, k=1.0, gamma=gamma)(t), (1.0 + DDPM.snr(t)) ** (-gamma))


def test_edm_weight_matches_paper():
    sig = torch.tensor([0.002, 0.1, 0.5, 3.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(EDMWeight(S.EDM())(sig), (sig**2 + 0.25) / (sig * 0.5) ** 2)
    # sigma_data is the schedule's
    assert EDMWeight(S.EDM(sigma_data=1.0)).sigma_data == 1.0
    torch.testing.assert_close(EDMWeight(S.EDM(sigma_data=1.0))(sig), (sig**2 + 1.0) / sig**2)
    assert EDMWeight(S.VPLinear()).sigma_data == 0.5 and EDMWeight(S.VPLinear(), sigma_data=0.3).sigma_data == 0.3


def test_fdm_warmup_clamp_schedule_and_resume():
    w = WeightWarmup(warmup_steps=10, lambda_max=5.0, lambda_end=500.0)
    tau = 100 ** (1 / 10)
    lam = torch.tensor([1.0, 50.0, 1e4])
    for k in range(10):
        # lambda_hat = min(lambda, lambda_max tau^k)
        torch.testing.assert_close(w(lam), torch.clamp(lam, max=5.0 * tau**k))
        w.step()
    assert math.isinf(w.cap) and torch.equal(w(lam), lam)  # unclamped after warm-up
    # resume: a fresh object loaded from a checkpoint clamps exactly as the uninterrupted one
    a = WeightWarmup(10)
    for _ in range(4):
        a.step()
    b = WeightWarmup(10)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        assert a.cap == b.cap
        a.step()
        b.step()
    with pytest.raises(ValueError, match="warmup_steps"):
        WeightWarmup(20).load_state_dict(a.state_dict())


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, error, match", [
    (lambda: SpeedWeight(DDPM, lam=0.4), ValueError, "lam"),
    (lambda: SpeedWeight(DDPM, lam=5.0), ValueError, "lam"),  # SpeeD's constructor default, negative weights
    (lambda: SpeedWeight(DDPM, lam=NAN), ValueError, "lam"),
    (lambda: SpeedWeight(DDPM, lam="0.6"), TypeError, "lam"),
    (lambda: SpeedWeight(DDPM, tau=1000), ValueError, "tau"),
    (lambda: SpeedWeight(DDPM, tau=-3), ValueError, "tau"),
    (lambda: SpeedWeight(DDPM, tau=NAN), ValueError, "tau"),
    (lambda: SpeedWeight(DDPM, threshold=-1.0), ValueError, "threshold"),
    (lambda: MinSNRWeight(DDPM, gamma=0.0), ValueError, "gamma"),
    (lambda: MinSNRWeight(DDPM, gamma=INF), ValueError, "gamma"),
    (lambda: MinSNRWeight(DDPM, gamma=NAN), ValueError, "gamma"),
    (lambda: MinSNRWeight(DDPM, target="edm"), ValueError, "target"),
    (lambda: MinSNRWeight(DDPM, target=["eps"]), TypeError, "target"),
    (lambda: P2Weight(DDPM, k=0.0), ValueError, "k"),
    (lambda: P2Weight(DDPM, k=INF), ValueError, "k"),
    (lambda: P2Weight(DDPM, gamma=NAN), ValueError, "gamma"),
    (lambda: P2Weight(DDPM, gamma=-1.0), ValueError, "gamma"),
    (lambda: EDMWeight(S.EDM(), sigma_data=-1.0), ValueError, "sigma_data"),
    (lambda: EDMWeight(S.EDM(), sigma_data=INF), ValueError, "sigma_data"),
    (lambda: EDMWeight(S.EDM(sigma_data=1.0), sigma_data=0.5), ValueError, "contradicts the schedule"),
    (lambda: EDMWeight("edm"), TypeError, "schedule"),
    (lambda: PreconditioningWeight(S.EDM(), "edm"), TypeError, "precond"),
    (lambda: WeightWarmup(0), ValueError, "warmup_steps"),
    (lambda: WeightWarmup(2.5), ValueError, "warmup_steps"),
    (lambda: WeightWarmup(True), TypeError, "warmup_steps"),
    (lambda: WeightWarmup(5, lambda_max=10.0, lambda_end=5.0), ValueError, "lambda_end"),
    (lambda: WeightWarmup(5, lambda_max=INF), ValueError, "lambda_max"),
    (lambda: WeightWarmup(5, lambda_end=NAN), ValueError, "lambda_end"),
    (lambda: make_weighting("nope", DDPM), ValueError, "weighting must be one of"),
    (lambda: make_weighting(["speed"], DDPM), TypeError, "weighting must be a name"),
])
def test_bad_weight_input(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("state, error, match", [
    ({}, ValueError, "missing .*steps"),
    ({"steps": 2}, ValueError, "missing .*warmup_steps"),
    ({"steps": -1, "warmup_steps": 10, "lambda_max": 5.0, "lambda_end": 500.0}, ValueError, "steps"),
    ({"steps": 1.5, "warmup_steps": 10, "lambda_max": 5.0, "lambda_end": 500.0}, ValueError, "steps"),
    ({"steps": "1", "warmup_steps": 10, "lambda_max": 5.0, "lambda_end": 500.0}, TypeError, "steps"),
    ({"steps": 1, "warmup_steps": 10, "lambda_max": 5.0, "lambda_end": NAN}, ValueError, "lambda_end"),
    ({"steps": 1, "warmup_steps": 20, "lambda_max": 5.0, "lambda_end": 500.0}, ValueError, "warmup_steps"),
    ([1, 2], TypeError, "dict"),
])
def test_bad_warmup_state(state, error, match):
    w = WeightWarmup(10)
    with pytest.raises(error, match=match):
        w.load_state_dict(state)
    assert w.steps == 0
