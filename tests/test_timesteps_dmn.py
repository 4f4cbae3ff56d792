"""DM-NonUniform: the surrogate objectives, their exact Jacobians, the optimiser, and the bad-input errors."""
import numpy as np
import pytest
import torch
from scipy.integrate import quad

from tdiff.schedules import EDM, DiscreteVP, RectifiedFlow, VE, VPCosine, VPLinear
from tdiff.solvers import build_program
from tdiff.timesteps import dm_nonuniform, logsnr_uniform
from tdiff.timesteps.dmn_objective import STARTS, SurrogateObjective, exp_moments, paper_orders
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


def test_exp_moments_match_quadrature():
    """int_0^h e^u u^q du on both sides of the series/recursion switch and for a negative h."""
    h = np.array([-0.3, 1e-4, 0.01, 0.3, 0.4999, 0.5001, 1.0, 3.0, 7.0])
    got = exp_moments(h, 4)
    for i, hi in enumerate(h):
        for q in range(4):
            want = quad(lambda u: np.exp(u) * u**q, 0.0, hi, epsabs=0, epsrel=1e-13)[0]
            np.testing.assert_allclose(got[i, q], want, rtol=1e-12, atol=0)


def _objective_by_quadrature(lam, order, p, warmup=3):
    """The paper's Eq. 35 with the Eq. 18 weights, evaluated independently: each weight by 40-point Gauss-Legendre
    quadrature of e^lambda against the explicit product form of the Lagrange basis, and J assembled step by step
    as the reference's sel_lambdas_lof_obj does (the first `warmup` steps and the last counted alone as a 2-norm,
    the others' weights summed per node before |.|), with eps = sigma^p/alpha of the variance-preserving lambda."""
    n_steps = lam.size - 1
    eps = (1 + np.exp(2 * lam)) ** (-p / 2) * np.sqrt(1 + np.exp(-2 * lam))
    x, wq = np.polynomial.legendre.leggauss(40)
    c, total = np.zeros(n_steps), 0.0
    for s in range(n_steps):
        nodes = [s - j for j in range(min(order, s + 1, n_steps - s))]
        a, b = lam[s], lam[s + 1]
        u = 0.5 * (b - a) * x + 0.5 * (a + b)
        terms = []
        for n in nodes:
            basis = np.prod([(u - lam[m]) / (lam[n] - lam[m]) for m in nodes if m != n], axis=0)
            terms.append((n, eps[n] * 0.5 * (b - a) * np.sum(wq * np.exp(u) * basis)))
        if s < warmup or s == n_steps - 1:
            total += np.sqrt(sum(v**2 for _, v in terms))
        else:
            for n, v in terms:
                c[n] += v
    return total + np.abs(c).sum()


@pytest.mark.parametrize("schedule", [DDPM, EDM(), RectifiedFlow(), VE()], ids=["DiscreteVP", "EDM", "flow", "VE"])
def test_lagrange_objective_matches_quadrature(schedule):
    rng = np.random.default_rng(0)
    for nfe in (2, 3, 4, 5, 7, 10):
        for order, p, warmup in ((3, 2.0, 3), (2, 1.0, 3), (1, 2.0, 3), (3, 1.0, 0)):
            obj = SurrogateObjective(schedule, nfe, order=order, p=p, warmup_steps=warmup)
            z = np.sort(rng.uniform(obj.lam_start, obj.lam_end, nfe - 1))
            want = _objective_by_quadrature(obj.full(z), order, p, warmup)
            np.testing.assert_allclose(obj.fun(z), want, rtol=1e-11)


def test_lagrange_objective_matches_the_reference_implementation():
    """Values of scxue/DM-NonUniform's sel_lambdas_lof_obj (run with its code on the DDPM linear schedule, T = 1,
    eps = 1e-3) at its own start "unif": torch.linspace in float32 between its lambda(T) and lambda(eps). Its
    lambda(eps) = log(alpha / sqrt(1 - alpha^2)) is 2.8e-8 off ours, hence rtol 1e-9."""
    for nfe, want in ((5, 242.31115668784136), (10, 29.265396464185905), (15, 13.841286566863563)):
        obj = SurrogateObjective(DDPM, nfe)
        z = torch.linspace(-5.058836591650515, 4.60512021196916, nfe + 1)[1:-1].double().numpy()
        np.testing.assert_allclose(obj.fun(z), want, rtol=1e-9)


@pytest.mark.parametrize("objective,solver,schedule", [("lagrange", "dpmpp", DDPM), ("lagrange", "dpmpp", EDM()),
                                                       ("solver", "dpmpp", DDPM), ("solver", "unipc", EDM())])
def test_jacobian_matches_finite_differences(objective, solver, schedule):
    """The smooth part's gradient and the per-node sums' Jacobian (what the SQP uses) against central differences."""
    obj = SurrogateObjective(schedule, 7, solver, 3, objective=objective)
    z = obj.initial("edm_rho") + np.random.default_rng(1).normal(0, 0.05, 6)
    _, d_smooth, _, dc = obj.parts(z)
    h, eye = 1e-6, np.eye(6)
    fd_smooth = np.array([(obj.parts(z + h * e, False)[0] - obj.parts(z - h * e, False)[0]) / (2 * h) for e in eye])
    fd_c = np.stack([(obj.parts(z + h * e, False)[2] - obj.parts(z - h * e, False)[2]) / (2 * h) for e in eye], 1)
    assert dc.shape == fd_c.shape and dc.shape[0] >= 3
    np.testing.assert_allclose(d_smooth, fd_smooth, rtol=1e-6, atol=1e-9 * np.abs(fd_smooth).max())
    np.testing.assert_allclose(dc, fd_c, rtol=1e-6, atol=1e-8 * np.abs(fd_c).max())
    _, g = obj.fun_and_grad(z)  # away from kinks, the gradient of J
    fd = np.array([(obj.fun(z + h * e) - obj.fun(z - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9 * np.abs(fd).max())


@pytest.mark.filterwarnings("ignore:delta_grad == 0.0")  # trust-constr's BFGS update on the kinks
@pytest.mark.parametrize("objective,nfe,maxiter", [("lagrange", 6, 1000), ("lagrange", 8, 1000),
                                                   ("solver", 5, 200)])
def test_sqp_reaches_at_least_the_finite_difference_trust_constr_optimum(objective, nfe, maxiter):
    """Against the reference's optimiser on the same objective (finite-difference trust-constr from uniform
    logSNR with margin 0, its default iteration limit; capped at 200 for the slower solver-row objective)."""
    t, res = dm_nonuniform(DDPM, nfe, objective=objective, return_result=True)
    _, ref = dm_nonuniform(DDPM, nfe, objective=objective, method="trust-constr", gradient="finite-difference",
                           margin=0.0, maxiter=maxiter, return_result=True)
    obj = SurrogateObjective(DDPM, nfe, objective=objective)
    assert res.fun <= ref.fun * (1 + 1e-9)
    assert res.fun == pytest.approx(obj.fun(res.x), rel=1e-12)
    assert all(res.fun <= j * (1 + 1e-12) for j in res.per_start.values())
    assert res.fun < 0.5 * obj.fun(obj.initial("logsnr_uniform"))
    assert t.shape == (nfe + 1,) and bool((t[1:] < t[:-1]).all())
    assert float(t[0]) == DDPM.t_max and float(t[-1]) == DDPM.t_min


@pytest.mark.parametrize("schedule", [VPCosine(), VE(), EDM(), RectifiedFlow()], ids=["cosine", "VE", "EDM", "flow"])
def test_every_schedule_family_gets_valid_optimised_steps(schedule):
    """The objective depends on lambda alone: each family's steps are its own lambda range, optimised."""
    t, res = dm_nonuniform(schedule, 6, return_result=True)
    obj = SurrogateObjective(schedule, 6)
    assert bool((t[1:] < t[:-1]).all()) and float(t[0]) == schedule.t_max and float(t[-1]) == schedule.t_min
    torch.testing.assert_close(schedule.lambda_(t[1:-1]), torch.from_numpy(res.x), rtol=1e-9, atol=1e-9)
    assert all(res.fun < obj.fun(obj.initial(s)) for s in STARTS)


def test_dm_nonuniform_beats_uniform_logsnr_on_the_exact_mixture():
    from tdiff.data import default_mixture_2d, reference_ode_solution
    from tdiff.solvers import sample

    den = default_mixture_2d().denoiser(DDPM)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = reference_ode_solution(den, DDPM, x, DDPM.t_max, DDPM.t_min, rtol=1e-6, atol=1e-6)

    def err(ts):
        # sample with the order rule the objective assumes (1 and 2 at the ends, 3 elsewhere)
        return float((sample(den, x, ts, solver="dpmpp", order=3, orders=paper_orders(5, 3)) - ref)
                     .norm(dim=1).mean())

    assert err(dm_nonuniform(DDPM, 5)) < 0.6 * err(logsnr_uniform(DDPM, 5))


def test_dm_nonuniform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="nfe"):
        dm_nonuniform(DDPM, 1)
    with pytest.raises(ValueError, match="objective"):
        dm_nonuniform(DDPM, 5, objective="paper")
    with pytest.raises(ValueError, match="solver"):
        dm_nonuniform(DDPM, 5, solver="ipndm")
    with pytest.raises(ValueError, match="method"):
        dm_nonuniform(DDPM, 5, method="SLSQP")
    with pytest.raises(ValueError, match="gradient"):
        dm_nonuniform(DDPM, 5, gradient="exact")
    with pytest.raises(ValueError, match="finite-difference.*trust-constr"):
        dm_nonuniform(DDPM, 5, gradient="finite-difference")
    with pytest.raises(ValueError, match="starts"):
        dm_nonuniform(DDPM, 5, starts=("lagrange",))  # a start of the solver-row objective only
    with pytest.raises(ValueError, match="p must"):
        dm_nonuniform(DDPM, 5, p=0)
    with pytest.raises(ValueError, match="order"):
        dm_nonuniform(DDPM, 5, order=0)
    with pytest.raises(ValueError, match="objective='solver' only"):
        dm_nonuniform(DDPM, 5, variant="bh1")
    with pytest.raises(ValueError, match="margin"):
        dm_nonuniform(DDPM, 5, margin=5.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        dm_nonuniform(DDPM, 5, warmup_steps=-1)


def test_dm_nonuniform_rejects_schedules_without_the_needed_quantities():
    with pytest.raises(ValueError, match="NoiseSchedule"):
        dm_nonuniform(object(), 5)
    # flow matching has lambda = -inf at t = 1: the interval must stay inside
    with pytest.raises(ValueError, match="lambda .* must be finite at t_max"):
        dm_nonuniform(RectifiedFlow(), 5, t_max=1.0)


def test_sampling_options_give_the_order_plan_the_objective_assumed():
    from tdiff.timesteps import sampling_options

    assert sampling_options(6, 3) == {"orders": [1, 2, 3, 3, 2, 1]}
    assert sampling_options(6, 3, "solver") == {"order_rule": "diffusers"}
    with pytest.raises(ValueError, match="objective"):
        sampling_options(6, 3, "lagrangian")


def test_tdiff_scheduler_samples_dm_nonuniform_steps_with_their_order_plan():
    from diffusers import DDPMScheduler

    from tdiff.schedulers import TdiffScheduler

    sched = TdiffScheduler.from_config(DDPMScheduler().config, timesteps="dm_nonuniform", solver="dpmpp", order=3)
    assert sched._recipe(6, None, None, None)["options"]["orders"] == [1, 2, 3, 3, 2, 1]
    given = TdiffScheduler.from_config(DDPMScheduler().config, timesteps="dm_nonuniform", solver="dpmpp", order=3,
                                       solver_options={"orders": [1, 2, 2, 2, 2, 1]})
    assert given._recipe(6, None, None, None)["options"]["orders"] == [1, 2, 2, 2, 2, 1]


@pytest.mark.parametrize("objective", ["lagrange", "solver"])
def test_batched_evaluation_matches_point_by_point(objective):
    """parts_batch (the Newton Hessian's one-pass columns) against parts at each point of the batch."""
    obj = SurrogateObjective(EDM(), 5, objective=objective)
    zs = obj.initial("edm_rho") + np.random.default_rng(2).normal(0, 0.05, (2, 4))
    batch = obj.parts_batch(zs)
    for i, z in enumerate(zs):
        for got, want in zip(batch, obj.parts(z)):
            np.testing.assert_allclose(got[i], want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("schedule,order,p,nfe", [(VPCosine(), 2, 1.0, 16), (RectifiedFlow(), 3, 2.0, 12),
                                                   (VPCosine(), 3, 1.0, 7), (EDM(), 2, 2.0, 9)],
                         ids=["cosine-o2-16", "flow-o3-12", "cosine-o3-7", "edm-o2-9"])
def test_screened_starts_reach_the_unscreened_optimum(monkeypatch, schedule, order, p, nfe):
    """Screening (a short burst per start above NFE 10, the starts' own J up to it; then only the leader continues)
    against every start run to the end, on settings other than the bench's (DDPM, order 3, p = 2), where the optimum
    has kinks (at NFE 5-6 Newton certifies it from the first start: no SLSQP iteration either way)."""
    module = __import__("sys").modules["tdiff.timesteps.dm_nonuniform"]
    _, screened = dm_nonuniform(schedule, nfe, order=order, p=p, return_result=True)
    monkeypatch.setattr(module, "_BURST", 10**6)
    monkeypatch.setattr(module, "_RANK_STARTS_UP_TO", 0)
    _, full = dm_nonuniform(schedule, nfe, order=order, p=p, return_result=True)
    assert screened.nit < full.nit
    assert screened.fun <= full.fun * (1 + 1e-9)


@pytest.mark.parametrize("nfe", [5, 6])
def test_newton_from_the_leading_start_reaches_the_sqp_optimum(monkeypatch, nfe):
    """Where the optimum has no kink (DDPM, order 3, NFE 5 and 6), full Newton from the best start certifies it
    before any SQP iteration; the same point as the SQP followed by Newton on the active set it settles on (or the
    chord Newton at its end), with the start try refused."""
    module = __import__("sys").modules["tdiff.timesteps.dm_nonuniform"]
    _, direct = dm_nonuniform(DDPM, nfe, return_result=True)
    newton = module._active_set_newton
    tried = []

    def no_start_try(*args, full_newton=False, **kwargs):
        from_start = full_newton and kwargs.get("kinks") is None  # not from an SQP iterate's active set
        tried.append(from_start)
        return None if from_start else newton(*args, full_newton=full_newton, **kwargs)

    monkeypatch.setattr(module, "_active_set_newton", no_start_try)
    _, sqp = dm_nonuniform(DDPM, nfe, return_result=True)
    assert direct.nit == 0 and direct.nfev == 0 and sqp.nit > 0
    assert tried[0] and not any(tried[1:])  # the start try first, then the tries from the SQP's points
    assert direct.fun == pytest.approx(sqp.fun, rel=1e-12)
    np.testing.assert_allclose(direct.x, sqp.x, rtol=1e-9)


@pytest.mark.parametrize("nfe", [6, 12])
def test_screening_continues_the_next_starts_while_no_end_is_certified(monkeypatch, nfe):
    """An uncertified end may be a stall: the leader alone ends the run only where Newton certifies its end; with
    Newton never certifying, every start runs to the end after its burst (above NFE 10) or from its start."""
    module = __import__("sys").modules["tdiff.timesteps.dm_nonuniform"]
    runs, slack_sqp = [], module._slack_sqp
    burst = module._BURST if nfe > module._RANK_STARTS_UP_TO else 0

    def counted(obj, z0, margin, maxiter, tol, **kwargs):
        runs.append(maxiter)
        return slack_sqp(obj, z0, margin, maxiter, tol, **kwargs)

    monkeypatch.setattr(module, "_slack_sqp", counted)
    _, certified = dm_nonuniform(EDM(), nfe, return_result=True)
    assert runs == [burst] * 4 * (burst > 0) + [300 - burst]  # four bursts (or none), then the leader alone
    runs.clear()
    monkeypatch.setattr(module, "_active_set_newton", lambda *args, **kwargs: None)
    _, uncertified = dm_nonuniform(EDM(), nfe, return_result=True)
    assert runs == [burst] * 4 * (burst > 0) + [300 - burst] * 4
    assert uncertified.fun <= certified.fun * (1 + 1e-6)  # SLSQP alone, to its tolerance


@pytest.mark.parametrize("order,warmup_steps", [(1, 3), (2, 0), (3, 3), (3, 1)])
def test_sparse_jacobian_matches_the_dense_one(order, warmup_steps):
    """parts_batch contracts the paper's Jacobian from its nonzero entries: against the dense dP/dlambda of
    lagrange_step_weights contracted by hand, d weighted = dP eps + P eps' on the diagonal."""
    from tdiff.timesteps.dmn_objective import error_proxy, lagrange_step_weights
    for nfe in (2, 5, 9):
        obj = SurrogateObjective(DDPM, nfe, order=order, warmup_steps=warmup_steps)
        zs = obj.initial("edm_rho") + np.random.default_rng(nfe).normal(0, 0.05, (3, nfe - 1))
        smooth, d_smooth, c, dc = obj.parts_batch(zs)
        lam = np.stack([obj.full(z) for z in zs])
        weights, jac = lagrange_step_weights(lam, paper_orders(nfe, order))
        eps, deps = error_proxy(lam[:, :-1], 2.0)
        dweighted = jac * eps[:, None, :, None]
        dweighted[:, :, np.arange(nfe), np.arange(nfe)] += weights * deps[:, None, :]
        rows = (weights * eps[:, None, :])[:, obj.alone]
        unit = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
        want_smooth = np.einsum("bsn,bsnm->bm", unit, dweighted[:, obj.alone])[:, 1:-1]
        want_c = dweighted[:, ~obj.alone].sum(1)[:, obj.coupled, 1:-1]
        assert dc.shape == want_c.shape and d_smooth.shape == want_smooth.shape
        np.testing.assert_allclose(d_smooth, want_smooth, rtol=1e-13, atol=1e-14 * np.abs(want_smooth).max())
        np.testing.assert_allclose(dc, want_c, rtol=1e-13, atol=1e-14 * np.abs(want_c).max(initial=1.0))


# ----- the solver rows' objective on column batches (complex-step Jacobian) and Newton's kink release -----
@pytest.mark.parametrize("solver", ["dpmpp", "unipc", "ipndm"])
def test_step_output_weight_columns_match_the_interpreter(solver):
    """The batched reverse sweep (a cumulative product for chain programs, the general sweep for UniPC's corrector
    and iPNDM's slope buffers) against the forward interpreter behind step_output_weights: two grids' rows as the
    two columns of one program."""
    from tdiff.timesteps.sensitivity import step_output_weight_columns

    ts = logsnr_uniform(VPLinear(), 7)
    progs = [build_program(VPLinear(), t, solver, 3) for t in (ts, ts * torch.linspace(1, 0.97, 8).double())]
    assert progs[0].steps == progs[1].steps  # the same program, other rows
    want = [step_output_weights(prog).numpy() for prog in progs]
    rows = [[r.detach().numpy() for r in prog.rows] for prog in progs]
    prog = progs[0]
    prog.rows = [np.stack(pair, axis=1) for pair in zip(*rows)]
    got = step_output_weight_columns(prog)
    assert got.shape == (2, *want[0].shape) and not np.allclose(want[0], want[1], rtol=1e-6, atol=0)
    for column in range(2):
        np.testing.assert_allclose(got[column], want[column], rtol=1e-13, atol=1e-15)
    with pytest.raises(ValueError, match="columns"):
        prog.rows = rows[0]
        step_output_weight_columns(prog)


@pytest.mark.parametrize("schedule", [DDPM, EDM(), RectifiedFlow(), VPCosine()])
@pytest.mark.parametrize("nfe,order,opts", [(5, 3, {}), (9, 2, {"solver_type": "heun"}),
                                            (7, 3, {"lower_order_final": False})])
def test_solver_rows_by_columns_match_the_torch_path(schedule, nfe, order, opts):
    """DPM-Solver++'s rows built on complex-step columns: P, dP/dlambda and the objective's parts at a batch of
    points equal the torch path's (reverse-mode Jacobian of the rows, point by point) to rounding."""
    obj = SurrogateObjective(schedule, nfe, "dpmpp", order, objective="solver", **opts)
    assert obj._columns and obj.cheap_jacobian
    zs = np.stack([obj.initial(start) for start in ("logsnr_uniform", "edm_rho", "uniform_t")])
    lam = np.stack([obj.full(z) for z in zs])
    fast = obj.step_weights(lam), obj.step_weights(lam[1]), obj.step_weights(lam, jacobian=False)[0]
    parts = obj.parts_batch(zs)
    obj._columns = False
    (w, jac), (w1, jac1) = obj.step_weights(lam), obj.step_weights(lam[1])
    for got, want in [(fast[0][0], w), (fast[0][1], jac), (fast[1][0], w1), (fast[1][1], jac1), (fast[2], w)]:
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-14 * np.abs(want).max())
    for got, want in zip(parts, obj.parts_batch(zs)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * np.abs(want).max())


def test_newton_releases_a_kink_whose_multiplier_exceeds_one(monkeypatch):
    """Flow schedule, NFE 10, order 2: the first Newton try takes one kink too many and converges with |mu| > 1 there;
    released on its multiplier's side, the retry certifies a minimum at 20 SLSQP iterations instead of 47, at the same
    J as without the release. On SLSQP's path (UniPC's rows, or where the exact-Hessian SQP's QP fails): the exact SQP
    finds this kink set without the release."""
    module = __import__("sys").modules["tdiff.timesteps.dm_nonuniform"]
    monkeypatch.setattr(module, "_EXACT_SQP", ())
    newton, released = module._active_set_newton, []

    def watched(*args, **kwargs):
        out = newton(*args, **kwargs)
        if kwargs.get("release"):
            released.append(out is not None)
        return out

    monkeypatch.setattr(module, "_active_set_newton", watched)
    _, with_release = dm_nonuniform(RectifiedFlow(), 10, order=2, objective="solver", return_result=True)
    assert released == [True]
    monkeypatch.setitem(module._RELEASE_ROUNDS, "solver", 0)
    _, without = dm_nonuniform(RectifiedFlow(), 10, order=2, objective="solver", return_result=True)
    assert with_release.nit < without.nit
    assert with_release.fun <= without.fun * (1 + 1e-12)


def test_solver_objective_newton_from_a_heuristic_start_skips_the_lagrange_start(monkeypatch):
    """DDPM, order 3, NFE 5: full Newton from the heuristic start of lowest J (of the four, ranked in one batched
    evaluation: quadratic t here) certifies the solver rows' optimum, so the "lagrange" start (the paper's objective
    optimised first) is never computed; the same point as with that try refused."""
    module = __import__("sys").modules["tdiff.timesteps.dm_nonuniform"]
    lagrange_optimum, computed = module._lagrange_optimum, []

    def watched(*args, **kwargs):
        computed.append(1)
        return lagrange_optimum(*args, **kwargs)

    monkeypatch.setattr(module, "_lagrange_optimum", watched)
    _, direct = dm_nonuniform(DDPM, 5, objective="solver", return_result=True)
    assert not computed and direct.nit == 0 and direct.start == "quadratic_t"
    assert sorted(direct.per_start) == sorted(STARTS)
    ranked = {start: j for start, j in direct.per_start.items() if start != direct.start}
    obj = SurrogateObjective(DDPM, 5, objective="solver")
    assert min(ranked.values()) > obj.fun(obj.initial("quadratic_t"))  # the start of lowest J was taken
    monkeypatch.setattr(module, "_heuristic_start_try", lambda *args, **kwargs: None)
    _, full = dm_nonuniform(DDPM, 5, objective="solver", return_result=True)
    assert computed and full.start == "lagrange"
    assert direct.fun == pytest.approx(full.fun, rel=1e-12)
    # Newton stops at a 1e-8 gradient where nothing is active (`_SMOOTH_NEWTON_TOL`): J equal, the points to ~1e-8
    np.testing.assert_allclose(direct.x, full.x, rtol=1e-7)


@pytest.mark.parametrize("schedule", [DDPM, VE(), RectifiedFlow()])
def test_log_alpha_slope_matches_autograd(schedule):
    """The host d log alpha / d lambda behind the complex-step columns equals torch's derivative of the schedule's
    log_alpha_from_lambda, for every family."""
    lam = torch.linspace(-12.0, 12.0, 97, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(schedule.log_alpha_from_lambda(lam).sum(), lam)
    np.testing.assert_allclose(schedule.log_alpha_slope_from_lambda(lam.detach().numpy()), want.numpy(), rtol=1e-15,
                               atol=1e-300)


def test_column_structure_is_checked_once_per_option_set(monkeypatch):
    """The solver rows' program structure (steps, coupled nodes) is found by one check build per (solver, order, nfe,
    warm-up, options) and reused: a second construction builds nothing and has the same structure; a bad option is
    refused every time (nothing was stored for it)."""
    module = __import__("sys").modules["tdiff.timesteps.dmn_objective"]
    monkeypatch.setattr(module, "_COLUMN_STRUCTURE", {})
    built = []
    build = SurrogateObjective._build
    monkeypatch.setattr(SurrogateObjective, "_build", lambda self, grid: built.append(1) or build(self, grid))
    first = SurrogateObjective(EDM(), 7, objective="solver", lower_order_final=False)
    assert built == [1]
    again = SurrogateObjective(DDPM, 7, objective="solver", lower_order_final=False)  # another schedule: same program
    assert built == [1] and np.array_equal(again.coupled, first.coupled) and np.array_equal(again.alone, first.alone)
    SurrogateObjective(DDPM, 7, objective="solver")  # other options (lower_order_final on): checked afresh
    SurrogateObjective(DDPM, 8, objective="solver", lower_order_final=False)  # another nfe: checked afresh
    assert built == [1, 1, 1]
    for _ in range(2):
        with pytest.raises(ValueError, match="solver_type"):
            SurrogateObjective(DDPM, 7, objective="solver", solver_type="nope")


@pytest.mark.parametrize("objective,schedule,nfe", [("lagrange", EDM(), 16), ("solver", VPCosine(), 12)],
                         ids=["lagrange-edm-16", "solver-cosine-12"])
def test_exact_hessian_sqp_reaches_slsqps_optimum_in_fewer_iterations(monkeypatch, objective, schedule, nfe):
    """The slack SQP with the exact Hessian and DAQP's QPs reaches SLSQP's optimum (kinks active at both) in fewer
    iterations; where DAQP returns no step, SLSQP continues from there and reaches it too."""
    module = __import__("sys").modules["tdiff.timesteps.dm_nonuniform"]
    _, exact = dm_nonuniform(schedule, nfe, objective=objective, return_result=True)
    monkeypatch.setattr(module, "_EXACT_SQP", ())
    _, slsqp = dm_nonuniform(schedule, nfe, objective=objective, return_result=True)
    obj = SurrogateObjective(schedule, nfe, objective=objective)
    assert (np.abs(obj.parts(exact.x)[2]) < 1e-9 * np.abs(obj.parts(exact.x)[2]).max()).any()  # a kink is active
    assert exact.fun <= slsqp.fun * (1 + 1e-9) and exact.nit < slsqp.nit
    monkeypatch.setattr(module, "_EXACT_SQP", ("lagrange", "solver"))
    failed = []

    def no_step(*args, **kwargs):
        failed.append(1)
        return np.zeros(args[0].shape[0]), 0.0, -4, {"lam": np.zeros(len(args[3]))}

    monkeypatch.setattr(module.daqp, "solve", no_step)
    _, fallback = dm_nonuniform(schedule, nfe, objective=objective, return_result=True)
    assert failed and fallback.fun <= slsqp.fun * (1 + 1e-9)
