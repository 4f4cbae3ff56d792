import pytest
import torch

from tdiff.schedules import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear
from tdiff.timesteps import HEURISTICS, edm_rho, interpolate_schedule, logsnr_uniform, quadratic_t, uniform_t

SCHEDULES = [VPLinear(), VPCosine(), DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)),
             VE(), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("name", list(HEURISTICS))
@pytest.mark.parametrize("nfe", [1, 7])
def test_heuristics_decrease_from_t_max_to_t_min(schedule, name, nfe):
    t = HEURISTICS[name](schedule, nfe)
    assert t.shape == (nfe + 1,) and t.dtype == torch.float64
    assert float(t[0]) == schedule.t_max and float(t[-1]) == schedule.t_min  # exactly
    assert bool((t[1:] < t[:-1]).all())


def test_heuristics_place_points_uniformly_in_their_coordinate():
    s = VPLinear()
    torch.testing.assert_close(uniform_t(s, 4), torch.linspace(1.0, 1e-3, 5, dtype=torch.float64))
    lam = s.lambda_(logsnr_uniform(s, 6))
    torch.testing.assert_close(lam[1:] - lam[:-1], (lam[1:] - lam[:-1]).mean().expand(6))
    q = quadratic_t(s, 4)
    expected = torch.tensor([1.0, 0.5625, 0.25, 0.0625, 0.0], dtype=torch.float64) * (1 - 1e-3) + 1e-3
    torch.testing.assert_close(q, expected)
    # EDM schedule: t is sigma, so edm_rho is exactly Karras et al.'s formula
    e = EDM()
    i = torch.arange(6, dtype=torch.float64) / 5
    karras = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(edm_rho(e, 5), karras)


def test_interpolate_schedule_is_loglinear_in_sigma_and_identity_at_same_length():
    s = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    ref = edm_rho(s, 10)
    torch.testing.assert_close(interpolate_schedule(s, ref, 10), ref)
    out = interpolate_schedule(s, ref, 20)
    assert out.shape == (21,) and bool((out[1:] < out[:-1]).all())
    # every other point of the stretched schedule is a reference point; midpoints are geometric means of sigma
    torch.testing.assert_close(out[::2], ref)
    mid = (s.edm_sigma(ref[:-1]) * s.edm_sigma(ref[1:])).sqrt()
    torch.testing.assert_close(s.edm_sigma(out[1::2]), mid)


def test_heuristics_reject_bad_arguments():
    s = VPLinear()
    with pytest.raises(ValueError, match="nfe"):
        uniform_t(s, 0)
    with pytest.raises(ValueError, match="nfe"):
        logsnr_uniform(s, 2.5)
    with pytest.raises(ValueError, match="t_min"):
        uniform_t(s, 3, t_max=0.1, t_min=0.5)
    with pytest.raises(ValueError, match="rho"):
        edm_rho(s, 3, rho=0)
    with pytest.raises(ValueError, match="reference"):
        interpolate_schedule(s, torch.tensor([0.1, 0.5]), 3)
    with pytest.raises(ValueError, match="schedule"):
        uniform_t("vp", 3)
