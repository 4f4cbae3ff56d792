"""LD3 on the analytic Gaussian mixture (exact denoiser), and the LearnedSchedule artefact."""
import json

import pytest
import torch

import tdiff
from tdiff.data import default_mixture_2d
from tdiff.schedules import DiscreteVP, VPLinear
from tdiff.timesteps import LD3DivergedError, LearnedSchedule, ld3_learn

DDPM = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
TINY = dict(solver="unipc", order=2, nfe=3, teacher_nfe=10, shape=(2,), n_train=6, n_val=4, epochs=2,
            phase1_epochs=1, dtype=torch.float64, progress=False)


@pytest.fixture(scope="module")
def learned():
    torch.set_num_threads(1)
    den = default_mixture_2d().denoiser(DDPM)
    return den, ld3_learn(den, **TINY)


def test_ld3_returns_a_usable_schedule_no_worse_than_its_start(learned):
    den, ls = learned
    meta = ls.metadata
    assert ls.timesteps.shape == (4,) and bool((ls.timesteps[1:] < ls.timesteps[:-1]).all())
    assert float(ls.timesteps[0]) == DDPM.t_max and float(ls.timesteps[-1]) == DDPM.t_min
    assert ls.timesteps_cond.shape == (4,)
    assert meta["best_val_loss"] <= meta["val_history"][0]
    assert meta["init"] in meta["init_val_losses"]
    assert meta["solver"] == "unipc" and meta["order"] == 2 and meta["nfe"] == 3
    x = torch.randn(5, 2, dtype=torch.float64)
    out = tdiff.sample(den, x, ls, solver="unipc", order=2)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_learned_schedule_round_trips_and_refuses_mismatches(learned, tmp_path):
    _, ls = learned
    path = tmp_path / "ld3.json"
    ls.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "tdiff-learned-schedule" and doc["format_version"] == 1
    back = LearnedSchedule.load(path, solver="unipc", schedule=DDPM)
    torch.testing.assert_close(back.timesteps, ls.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(back.timesteps_cond, ls.timesteps_cond, rtol=0, atol=0)
    with pytest.raises(ValueError, match="solver"):
        LearnedSchedule.load(path, solver="dpmpp")
    with pytest.raises(ValueError, match="schedule"):
        LearnedSchedule.load(path, schedule=VPLinear())
    # a model fingerprint mismatch
    net_a, net_b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    stamped = LearnedSchedule(ls.timesteps, None, dict(ls.metadata, model_fingerprint=tdiff.artefacts.
                                                       fingerprint_module(net_a)))
    stamped.save(path)
    LearnedSchedule.load(path, model=net_a)
    with pytest.raises(ValueError, match="another model"):
        LearnedSchedule.load(path, model=net_b)
    sig = ls.to_diffusers("sigmas")["sigmas"]
    assert len(sig) == 3 and sig == sorted(sig, reverse=True)
    assert len(ls.to_diffusers("timesteps")["timesteps"]) == 3


def test_ld3_rejects_bad_arguments():
    den = default_mixture_2d().denoiser(DDPM)
    kw = dict(TINY)
    with pytest.raises(ValueError, match="nfe"):
        ld3_learn(den, **dict(kw, nfe=1))
    with pytest.raises(ValueError, match="teacher_nfe"):
        ld3_learn(den, **dict(kw, teacher_nfe=3))
    with pytest.raises(ValueError, match="radius"):
        ld3_learn(den, **dict(kw, r_gamma=-1.0))
    with pytest.raises(ValueError, match="loss"):
        ld3_learn(den, **dict(kw, loss="lpips"))
    with pytest.raises(ValueError, match="shape"):
        ld3_learn(den, **dict(kw, shape=None))


def test_ld3_stops_on_nan_and_keeps_the_best_schedule():
    mixture = default_mixture_2d()
    exact = mixture.denoiser(DDPM)

    def flaky(x, t):  # fine for the teacher and validation (no grad), NaN inside a training step
        out = exact(x, t)
        return out * float("nan") if torch.is_grad_enabled() else out

    flaky.schedule = DDPM
    with pytest.raises(LD3DivergedError, match="not finite") as info:
        ld3_learn(flaky, **dict(TINY, remat=False, r=0.0))
    best = info.value.best
    assert isinstance(best, LearnedSchedule) and best.timesteps.shape == (4,)
    assert bool(torch.isfinite(best.timesteps).all())


@pytest.mark.parametrize("space", ["time", "lambda"])
def test_parameterisation_starts_uniform_and_inverts_heuristics(space):
    from tdiff.timesteps import edm_rho, logsnr_uniform, uniform_t
    from tdiff.timesteps.parameterisation import StepParameterisation

    hi, lo = torch.tensor(DDPM.t_max, dtype=torch.float64), torch.tensor(DDPM.t_min, dtype=torch.float64)
    p = StepParameterisation(DDPM, 5, hi, lo, space)
    start = p.timesteps(torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(start, (uniform_t if space == "time" else logsnr_uniform)(DDPM, 5))
    target = edm_rho(DDPM, 5)
    torch.testing.assert_close(p.timesteps(p.xi_from_timesteps(target)), target)
    # decoupled times move at most half the smallest gap and never at the ends
    tc = StepParameterisation.condition_times(target, torch.full((6,), 10.0, dtype=torch.float64))
    half = 0.5 * (target[:-1] - target[1:]).min()
    assert float(tc[0]) == float(target[0]) and float(tc[-1]) == float(target[-1])
    torch.testing.assert_close(tc[1:-1] - target[1:-1], half.expand(4))
