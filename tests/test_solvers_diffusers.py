"""tdiff solvers vs diffusers' schedulers: same eps model, same noise levels, float64, within 1e-5.

We drive each diffusers scheduler loop ourselves with float64 tensors (its sigmas / alphas_cumprod cast to
float64), and feed tdiff the same grid through `from_diffusers_timesteps`.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tdiff.schedules import DiscreteVP  # noqa: E402
from tdiff.solvers import from_diffusers_timesteps, sample, to_diffusers  # noqa: E402

STEPS = 10


def eps_model(x, timestep):
    """A small smooth nonlinear eps predictor of the integer diffusers timestep."""
    c = 0.2 * torch.cos(torch.as_tensor(timestep, dtype=x.dtype) / 137.0)
    return torch.tanh(0.7 * x + 0.3 * torch.sin(x.roll(1, dims=-1)) + c)


class EpsDenoiser:
    """x0 prediction from eps_model, fed the integer training index (as diffusers does)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, x, t):
        index = torch.round(self.schedule.index_from_t(t))
        eps = eps_model(x, index)
        return (x - self.schedule.sigma(t) * eps) / self.schedule.alpha(t)


def _ddpm_kwargs():
    return dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def _x_T():
    return torch.randn(2, 3, 4, 4, dtype=torch.float64)


def _float64_schedule(sched):
    """set_timesteps with the scheduler's sigmas in float64, and the tdiff schedule of the same betas."""
    sched.set_timesteps(STEPS)
    sched.sigmas = sched.sigmas.double()
    return DiscreteVP.from_diffusers(sched)


def _check_matches_diffusers(sched, solver, **opts):
    """tdiff on the scheduler's grid against the scheduler's own loop; returns (x_T, grid, schedule, ours)."""
    schedule = _float64_schedule(sched)
    x = _x_T()
    ref = _run_diffusers(sched, x.clone())
    grid = from_diffusers_timesteps(sched, schedule)
    ours = sample(EpsDenoiser(schedule), x, grid, solver=solver, **opts)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    return x, grid, schedule, ours


def _run_diffusers(scheduler, x, scale_input_by_sigma=False):
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t) if scale_input_by_sigma else x
        x = scheduler.step(eps_model(inp, t), t, x).prev_sample
    return x


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_dpmpp_multistep_matches_diffusers(order, final):
    sched = diffusers.DPMSolverMultistepScheduler(
        **_ddpm_kwargs(), algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type=final)
    _, grid, _, _ = _check_matches_diffusers(sched, "dpmpp", order=order)
    assert grid.final_sigmas_type == final


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(variant, order):
    # diffusers' bh1 returns NaN on a final step to sigma = 0 (B(h) = -inf times a zero residual), so bh1 is
    # compared on the sigma_min grid
    final = "zero" if variant == "bh2" else "sigma_min"
    sched = diffusers.UniPCMultistepScheduler(
        **_ddpm_kwargs(), solver_order=order, solver_type=variant, lower_order_final=True,
        final_sigmas_type=final, predict_x0=True)
    _check_matches_diffusers(sched, "unipc", order=order, variant=variant)


def test_unipc_sigma_min_final_matches_diffusers():
    sched = diffusers.UniPCMultistepScheduler(**_ddpm_kwargs(), solver_order=3, solver_type="bh2",
                                              lower_order_final=False, final_sigmas_type="sigma_min")
    _check_matches_diffusers(sched, "unipc", order=3, lower_order_final=False)


def test_euler_matches_diffusers():
    sched = diffusers.EulerDiscreteScheduler(**_ddpm_kwargs())
    schedule = _float64_schedule(sched)
    grid = from_diffusers_timesteps(sched, schedule)
    x = _x_T()
    # diffusers' Euler works on x~ = x / alpha, starting from x~ = x_T / alpha_0 and ending at alpha = 1
    alpha0 = schedule.alpha(grid.timesteps[0])
    ref = _run_diffusers(sched, x.clone() / alpha0, scale_input_by_sigma=True)
    ours = sample(EpsDenoiser(schedule), x, grid, solver="euler")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_matches_diffusers(set_alpha_to_one):
    sched = diffusers.DDIMScheduler(**_ddpm_kwargs(), set_alpha_to_one=set_alpha_to_one, steps_offset=1,
                                    clip_sample=False)
    sched.set_timesteps(STEPS)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    schedule = DiscreteVP.from_diffusers(sched)
    x = _x_T()
    ref = _run_diffusers(sched, x.clone())
    ours = sample(EpsDenoiser(schedule), x, from_diffusers_timesteps(sched, schedule), solver="ddim")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_to_diffusers_round_trip():
    sched = diffusers.DPMSolverMultistepScheduler(**_ddpm_kwargs(), final_sigmas_type="sigma_min")
    sched.set_timesteps(STEPS)
    schedule = DiscreteVP.from_diffusers(sched)
    grid = from_diffusers_timesteps(sched, schedule)
    assert to_diffusers(grid, schedule, "timesteps")["timesteps"] == sched.timesteps.tolist()
    sigmas = to_diffusers(grid.timesteps, schedule, "sigmas")["sigmas"]
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), sched.sigmas[:-1].double())
    with pytest.raises(ValueError, match="kind"):
        to_diffusers(grid, schedule, "betas")


def test_flow_match_euler_matches_diffusers():
    from tdiff.schedules import RectifiedFlow

    def velocity(x, t):  # t = sigma in [0, 1]
        return torch.tanh(0.5 * x + 0.3 * torch.sin(x.roll(1, dims=-1)) + 0.2 * t)

    sched = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.set_timesteps(STEPS)
    sched.sigmas = sched.sigmas.double()
    x = _x_T()
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(velocity(ref, t / 1000), t, ref).prev_sample
    schedule = RectifiedFlow()

    def den(xx, t):  # x = (1-t) x0 + t eps, v = eps - x0  =>  x0 = x - t v
        return xx - t * velocity(xx, t)

    den.schedule = schedule
    grid = from_diffusers_timesteps(sched)
    torch.testing.assert_close(sample(den, x, grid, solver="euler"), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(to_diffusers(grid, schedule)["sigmas"], dtype=torch.float64),
                               sched.sigmas[:-1])


@pytest.mark.parametrize("final", ["zero", "sigma_min"])
def test_sde_dpmpp_2m_matches_diffusers_with_the_same_noise(final):
    sched = diffusers.DPMSolverMultistepScheduler(
        **_ddpm_kwargs(), algorithm_type="sde-dpmsolver++", solver_order=2, lower_order_final=True,
        final_sigmas_type=final)
    schedule = _float64_schedule(sched)
    x = _x_T()
    # tdiff draws float64 noise like x, one tensor per step; diffusers draws float32, so hand it ours
    gen = torch.Generator().manual_seed(7)
    ref = x.clone()
    for t in sched.timesteps:
        z = torch.randn(x.shape, dtype=x.dtype, generator=gen)
        ref = sched.step(eps_model(ref, t), t, ref, variance_noise=z).prev_sample
    ours = sample(EpsDenoiser(schedule), x, from_diffusers_timesteps(sched, schedule), solver="dpmpp_sde", order=2,
                  generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_unipc_disable_corrector_matches_diffusers():
    sched = diffusers.UniPCMultistepScheduler(**_ddpm_kwargs(), solver_order=3, solver_type="bh2",
                                              final_sigmas_type="zero", disable_corrector=[1, 4])
    x, grid, schedule, ours = _check_matches_diffusers(sched, "unipc", order=3, disable_corrector=[1, 4])
    with_corrector = sample(EpsDenoiser(schedule), x, grid, solver="unipc", order=3)
    assert not torch.allclose(ours, with_corrector)
