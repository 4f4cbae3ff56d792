"""DM-NonUniform: the surrogate objective, its analytic gradient, and the optimiser."""
import numpy as np
import pytest
import torch

from tdiff.schedules import EDM, DiscreteVP, VPLinear
from tdiff.solvers import build_program
from tdiff.timesteps import dm_nonuniform, logsnr_uniform
from tdiff.timesteps.dm_nonuniform import SurrogateObjective
from tdiff.timesteps.sensitivity import output_weights, step_output_weights

DDPM = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


@pytest.mark.parametrize("solver,order", [("dpmpp", 3), ("unipc", 3), ("ipndm", 3)])
def test_output_weights_match_the_solve_of_a_linear_denoiser(solver, order):
    """With D(x, t) = b_k at evaluation k (constant per step), x_N = a x_T + sum_k c_k b_k exactly."""
    s = VPLinear()
    ts = logsnr_uniform(s, 6)
    c = output_weights(build_program(s, ts, solver, order))
    b = torch.randn(6, 2, dtype=torch.float64)
    calls = []

    def den(x, t):
        calls.append(1)
        return b[len(calls) - 1].expand_as(x)

    den.schedule = s
    from tdiff.solvers import sample

    x0 = torch.zeros(1, 2, dtype=torch.float64)
    torch.testing.assert_close(sample(den, x0, ts, solver=solver, order=order)[0], (c[:, None] * b).sum(0))


@pytest.mark.parametrize("solver", ["dpmpp", "unipc", "ipndm"])
def test_output_weights_gradient_matches_autograd_checks(solver):
    """The numpy reverse sweep behind step_output_weights against torch's numerical Jacobian (float64)."""
    prog = build_program(VPLinear(), logsnr_uniform(VPLinear(), 5), solver, 3)
    flat = torch.cat([r.reshape(-1) for r in prog.rows]).detach().requires_grad_(True)
    sizes = [r.numel() for r in prog.rows]

    def weights(v):
        prog.rows = list(torch.split(v, sizes))
        return step_output_weights(prog)

    assert torch.autograd.gradcheck(weights, (flat,), eps=1e-6, atol=1e-7)


def test_grid_from_lambda_matches_make_grid():
    from tdiff.solvers.grid import grid_from_lambda, make_grid

    for schedule in (DDPM, VPLinear(), EDM()):
        t = logsnr_uniform(schedule, 5)
        a, b = make_grid(schedule, t), grid_from_lambda(schedule, schedule.lambda_(t))
        for name in ("alpha", "sigma", "lam", "sigma_tilde"):
            torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("schedule", [DDPM, EDM()], ids=["DiscreteVP", "EDM"])
@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_analytic_gradient_matches_finite_differences(schedule, solver):
    obj = SurrogateObjective(schedule, 6, solver, 3)
    z = obj.initial() + np.random.default_rng(0).normal(0, 0.05, 5)
    _, g = obj.fun_and_grad(z)
    h = 1e-6
    fd = np.array([(obj.fun(z + h * e) - obj.fun(z - h * e)) / (2 * h) for e in np.eye(5)])
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_analytic_solve_is_at_least_as_good_as_finite_differences(solver):
    obj = SurrogateObjective(DDPM, 6, solver, 3)
    t_a, res_a = dm_nonuniform(DDPM, 6, solver, maxiter=40, return_result=True)
    t_f, res_f = dm_nonuniform(DDPM, 6, solver, maxiter=40, gradient="finite-difference", return_result=True)
    start = obj.fun(obj.initial())
    assert res_a.fun < start
    # at equal settings (same start, method, tolerance), exact gradients reach at least the same objective (up to
    # the stopping tolerance), with far fewer objective calls
    assert res_a.fun <= res_f.fun + 1e-7
    assert res_a.nfev < res_f.nfev
    for t in (t_a, t_f):
        assert t.shape == (7,) and bool((t[1:] < t[:-1]).all())
        assert float(t[0]) == DDPM.t_max and float(t[-1]) == DDPM.t_min


def test_dm_nonuniform_beats_uniform_logsnr_on_the_exact_mixture():
    from tdiff.data import default_mixture_2d, reference_ode_solution
    from tdiff.solvers import sample

    den = default_mixture_2d().denoiser(DDPM)
    x = torch.randn(64, 2, dtype=torch.float64)
    ref = reference_ode_solution(den, DDPM, x, DDPM.t_max, DDPM.t_min, rtol=1e-7, atol=1e-7)

    def err(ts):
        # DM-NonUniform optimises for diffusers' order rule (its builders' default), so sample with that rule
        return float((sample(den, x, ts, solver="unipc", order=3, order_rule="diffusers") - ref).norm(dim=1).mean())

    assert err(dm_nonuniform(DDPM, 5, "unipc")) < 0.7 * err(logsnr_uniform(DDPM, 5))


def test_dm_nonuniform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="solver"):
        dm_nonuniform(DDPM, 5, solver="ipndm")
    with pytest.raises(ValueError, match="nfe"):
        dm_nonuniform(DDPM, 1)
    with pytest.raises(ValueError, match="method"):
        dm_nonuniform(DDPM, 5, method="BFGS")
    with pytest.raises(ValueError, match="p must"):
        dm_nonuniform(DDPM, 5, p=0)
