"""tdiff.solvers: input validation, the API, differentiability, no host syncs in the loop, and solvers written
independently here (EDM Heun, iPNDM) for the ones diffusers does not ship."""
import math

import pytest
import torch

import tdiff
from tdiff.data.gaussian_mixture import GaussianMixture
from tdiff.schedules import EDM, VPLinear
from tdiff.solvers import build_program, sample
from tdiff.solvers.program import Update

SCHED = VPLinear()
MIX = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], [0.3, 0.5, 0.2], [1.0, 2.0, 1.5])


class MixtureDenoiser:
    """The exact mixture denoiser, with no validation (so it makes no host syncs) and a call log."""

    def __init__(self, schedule=SCHED):
        self.schedule = schedule
        self.times = []

    def __call__(self, x, t):
        self.times.append(t)
        return MIX.posterior_mean(x, t, self.schedule)


def _ts(n=6, hi=0.9, lo=0.05):
    return torch.linspace(hi, lo, n + 1, dtype=torch.float64)


ALL = [("dpmpp", 1), ("dpmpp", 2), ("dpmpp", 3), ("dpmpp_sde", 2), ("unipc", 1), ("unipc", 2), ("unipc", 3),
       ("ipndm", 1), ("ipndm", 4), ("euler", 1), ("ddim", 1), ("heun", 2)]


def test_package_exports_sample():
    assert tdiff.sample is sample
    assert tdiff.solvers.sample is sample


X5 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def fine_solutions():
    return {final: sample(MixtureDenoiser(), X5, _ts(40), solver="unipc", order=3, final_sigmas_type=final)
            for final in ("sigma_min", "zero")}


@pytest.mark.parametrize("solver,order", ALL)
@pytest.mark.parametrize("final", ["sigma_min", "zero"])
def test_every_solver_runs_and_is_close_to_a_fine_solve(fine_solutions, solver, order, final):
    gen = torch.Generator().manual_seed(0)
    out = sample(MixtureDenoiser(), X5, _ts(12), solver=solver, order=order, final_sigmas_type=final, generator=gen)
    assert out.shape == X5.shape and out.dtype == X5.dtype
    if solver != "dpmpp_sde":  # the SDE lands on a different sample path
        assert float((out - fine_solutions[final]).abs().max()) < (0.4 if order == 1 else 0.15)


@pytest.mark.parametrize("bad,match", [
    ([0.9, 0.5, 0.7, 0.1], "strictly decreasing"),
    ([0.9, 0.5, 0.5, 0.1], "duplicated"),
    ([0.9, math.nan, 0.1], "NaN"),
    ([1.5, 0.5, 0.1], "outside the domain"),
    ([0.9], "at least 2"),
    ([[0.9, 0.1]], "1-D"),
])
def test_bad_timesteps(bad, match):
    with pytest.raises(ValueError, match=match):
        sample(MixtureDenoiser(), torch.randn(2, 2, dtype=torch.float64), torch.tensor(bad, dtype=torch.float64))


def test_bad_options():
    x, ts = torch.randn(2, 2, dtype=torch.float64), _ts()
    with pytest.raises(ValueError, match="solver must be one of"):
        sample(MixtureDenoiser(), x, ts, solver="rk45")
    with pytest.raises(ValueError, match="order for solver 'dpmpp' must be one of"):
        sample(MixtureDenoiser(), x, ts, solver="dpmpp", order=4)
    with pytest.raises(ValueError, match="order for solver 'euler' must be 1"):
        sample(MixtureDenoiser(), x, ts, solver="euler", order=2)
    with pytest.raises(ValueError, match="final_sigmas_type"):
        sample(MixtureDenoiser(), x, ts, final_sigmas_type="one")
    with pytest.raises(ValueError, match="variant"):
        sample(MixtureDenoiser(), x, ts, solver="unipc", variant="bh3")
    with pytest.raises(ValueError, match="timesteps_cond must be a 1-D tensor of 6 or 7"):
        sample(MixtureDenoiser(), x, ts, timesteps_cond=ts[:3])
    with pytest.raises(ValueError, match="timesteps_cond .*outside the domain"):
        sample(MixtureDenoiser(), x, ts, timesteps_cond=ts + 0.5)
    with pytest.raises(ValueError, match="schedule"):
        sample(lambda x, t: x, x, ts)
    with pytest.raises(ValueError, match="guidance must be a number or a \\(2,\\) tensor"):
        sample(MixtureDenoiser(), x, ts, guidance=torch.ones(3))
    with pytest.raises(ValueError, match="s_churn"):
        sample(MixtureDenoiser(), x, ts, solver="heun", s_churn=-1.0)


def test_learned_schedule_like_object_and_decoupled_time():
    class Learned:
        timesteps = _ts()
        timesteps_cond = _ts() * 0.98

    den = MixtureDenoiser()
    out = sample(den, torch.randn(3, 2, dtype=torch.float64), Learned(), solver="unipc")
    assert out.shape == (3, 2)
    torch.testing.assert_close(torch.stack(den.times), Learned.timesteps_cond[:-1])
    # without timesteps_cond the denoiser sees the timesteps themselves
    den = MixtureDenoiser()
    sample(den, torch.randn(3, 2, dtype=torch.float64), _ts(), solver="dpmpp", order=3)
    torch.testing.assert_close(torch.stack(den.times), _ts()[:-1])


@pytest.mark.parametrize("solver,order", [("dpmpp", 3), ("unipc", 3), ("ipndm", 4), ("heun", 2), ("euler", 1)])
def test_gradients_reach_timesteps_x_T_and_model(solver, order):
    ts = _ts(5).requires_grad_(True)
    x = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    base = MixtureDenoiser()

    def den(xx, t):
        return w * base(xx, t)

    den.schedule = SCHED
    out = sample(den, x, ts, solver=solver, order=order)
    g_ts, g_x, g_w = torch.autograd.grad(out.square().sum(), (ts, x, w))
    for g in (g_ts, g_x, g_w):
        assert torch.isfinite(g).all()
    assert bool((g_ts[1:-1] != 0).all())  # interior times move the result through the coefficients


def test_gradcheck_timesteps_through_unipc_rks_solve():
    # order 3 with lower_order_final=False uses torch.linalg.solve for rho in both predictor and corrector
    x = torch.randn(2, 2, dtype=torch.float64)
    den = MixtureDenoiser()

    def f(ts):
        return sample(den, x, ts, solver="unipc", order=3, lower_order_final=False)

    assert torch.autograd.gradcheck(f, (_ts(5).requires_grad_(True),))


def test_loop_has_no_host_syncs_and_every_update_is_the_fused_op():
    from tdiff.solvers.sample import Execution, _prepare_rows, _run

    den = MixtureDenoiser()
    x = torch.randn(4, 2, dtype=torch.float64)
    prog = build_program(SCHED, _ts(8).requires_grad_(True), "unipc", 3)
    rows, _, eval_times = _prepare_rows(prog, x)
    n_updates = sum(isinstance(i, Update) for step in prog.steps for i in step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _run(Execution(prog, rows, eval_times, x), den, progress=False)
    names = [e.name for e in prof.events()]
    assert names.count("aten::item") == 0 and names.count("aten::_local_scalar_dense") == 0
    assert names.count("tdiff::multistep_update") == n_updates


def test_guidance_is_fused_and_equals_guiding_the_denoiser():
    den = MixtureDenoiser()

    def pair(x, t):  # "conditional" and "unconditional" predictions
        d = den(x, t)
        return d, 0.7 * d + 0.1

    pair.schedule = SCHED

    def guided(x, t):
        c, u = pair(x, t)
        return u + 3.0 * (c - u)

    guided.schedule = SCHED
    x = torch.randn(3, 2, dtype=torch.float64)
    for solver, order in [("unipc", 3), ("dpmpp", 2), ("heun", 2), ("ipndm", 3)]:
        ours = sample(pair, x, _ts(), solver=solver, order=order, guidance=3.0)
        torch.testing.assert_close(ours, sample(guided, x, _ts(), solver=solver, order=order))


def test_progress_bar_and_float32_batch():
    x = torch.randn(3, 2)
    den = lambda x, t: MIX.posterior_mean(x.double(), t, SCHED).float()  # noqa: E731
    den.schedule = SCHED
    out = sample(den, x, _ts(), solver="unipc", progress=True)
    assert out.dtype == torch.float32


def test_heun_matches_edm_algorithm():
    """EDM Algorithm 2 with churn off, written directly in sigma, against solver='heun' on the EDM schedule."""
    sched = EDM()
    sig = torch.tensor([5.0, 2.0, 0.8, 0.3, 0.1], dtype=torch.float64)
    den = MixtureDenoiser(sched)
    x = torch.randn(4, 2, dtype=torch.float64) * 5
    y = x.clone()
    for i in range(len(sig) - 1):
        d = (y - den(y, sig[i])) / sig[i]
        y_e = y + (sig[i + 1] - sig[i]) * d
        d2 = (y_e - den(y_e, sig[i + 1])) / sig[i + 1]
        y = y + (sig[i + 1] - sig[i]) * 0.5 * (d + d2)
    # EDM corrects every step (diffusers' rule); the stable rule would drop the correction of steps this long
    torch.testing.assert_close(sample(den, x, sig, solver="heun", order_rule="diffusers"), y)
    # to sigma = 0 the last step is plain Euler, i.e. it lands on D
    y0 = sample(den, x, sig, solver="heun", final_sigmas_type="zero", order_rule="diffusers")
    z = sample(den, x, sig[:-1], solver="heun", order_rule="diffusers")
    torch.testing.assert_close(y0, den(z, sig[-2]))


def test_heun_churn_is_reproducible_and_differs():
    sched = EDM()
    sig = torch.tensor([5.0, 2.0, 0.8, 0.3], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64) * 5
    a = sample(MixtureDenoiser(sched), x, sig, solver="heun", s_churn=10.0, generator=torch.Generator().manual_seed(1))
    b = sample(MixtureDenoiser(sched), x, sig, solver="heun", s_churn=10.0, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, sample(MixtureDenoiser(sched), x, sig, solver="heun"))


def test_ipndm_matches_adams_bashforth_in_sigma():
    sched = EDM()
    sig = torch.tensor([5.0, 3.0, 2.0, 1.2, 0.8, 0.5, 0.3], dtype=torch.float64)
    den = MixtureDenoiser(sched)
    x = torch.randn(4, 2, dtype=torch.float64) * 5
    coef = {1: [1.0], 2: [1.5, -0.5], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    y, ds = x.clone(), []
    for i in range(len(sig) - 1):
        ds.insert(0, (y - den(y, sig[i])) / sig[i])
        p = min(4, i + 1)
        y = y + (sig[i + 1] - sig[i]) * sum(c * d for c, d in zip(coef[p], ds))
    # diff-sampler's iPNDM: full order after warm-up (the count rule without lowering at the end)
    torch.testing.assert_close(sample(den, x, sig, solver="ipndm", order=4, order_rule="diffusers",
                                      lower_order_final=False), y)


def test_sde_is_reproducible_with_a_generator():
    x = torch.randn(4, 2, dtype=torch.float64)
    run = lambda s: sample(MixtureDenoiser(), x, _ts(), solver="dpmpp_sde",  # noqa: E731
                           generator=torch.Generator().manual_seed(s))
    torch.testing.assert_close(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_sampler_reuses_its_tables():
    from tdiff.solvers import Sampler

    x = torch.randn(3, 2, dtype=torch.float64)
    s = Sampler(MixtureDenoiser(), _ts(), solver="unipc", order=3)
    assert s.nfe == 6
    torch.testing.assert_close(s(x), sample(MixtureDenoiser(), x, _ts(), solver="unipc", order=3))
    torch.testing.assert_close(s(2 * x), sample(MixtureDenoiser(), 2 * x, _ts(), solver="unipc", order=3))
    assert len(s._rows) == 1
    assert Sampler(MixtureDenoiser(), _ts(4), solver="heun", order_rule="diffusers").nfe == 8


def _allocations(sampler, x) -> int:
    with torch.no_grad():
        sampler(x)  # builds and caches the rows
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            sampler(x)
    names = [e.name for e in prof.events()]
    assert names.count("aten::item") == 0 and names.count("aten::_local_scalar_dense") == 0
    # the leaf allocators, and the C++ ops' outputs (csrc/outputs.h: made without a dispatcher call)
    return sum(names.count(n) for n in ("aten::empty", "aten::empty_strided", "tdiff::new_output"))


LOOP_SOLVERS = [("unipc", 3), ("dpmpp", 3), ("ipndm", 4), ("heun", 2), ("ddim", 1)]


def test_loop_allocates_only_the_update_outputs(monkeypatch):
    """With the C++ kernel and a free model, the loop's only allocations are the fused updates' outputs (x_next,
    and D where the update converts the raw output), and UniPC and iPNDM make one update per evaluation; with
    buffer reuse (the default) fewer: from the second step x_next is written over x in place."""
    from tdiff.solvers import Sampler

    monkeypatch.setenv("TDIFF_BACKEND", "cpp")
    x, x0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    free_model = lambda x, t: x0  # noqa: E731
    free_model.schedule = SCHED
    for solver, order in LOOP_SOLVERS:
        sampler = Sampler(free_model, _ts(8), solver=solver, order=order)
        n_updates = sum(isinstance(i, Update) for step in sampler.program.steps for i in step)
        if solver != "heun":  # Heun: two evaluations per step, each with its own update
            assert n_updates == sampler.nfe, f"{solver}: {n_updates} updates for {sampler.nfe} evaluations"
        converted = sum(r is not None for entries in sampler._plan for _, _, r in entries)
        in_place = _allocations(sampler, x)
        sampler.reuse_buffers = False
        allocs = _allocations(sampler, x)
        assert allocs == n_updates + converted, f"{solver}: {allocs} allocations for {n_updates} updates"
        saved = len(sampler.program.steps) - 1  # at least x_next over x from the second step on
        assert in_place <= allocs - saved, f"{solver}: {in_place} allocations in place, {allocs} fresh"


def test_loop_reuses_its_buffers(monkeypatch):
    """Eager and without autograd, the updates write into buffers the loop no longer needs: a bounded number of
    allocations whatever the number of steps, the same result bit for bit, and nothing that someone else holds
    (x_T, a model output the model keeps, a tensor with a live view) is ever written."""
    import tdiff.solvers.buffers as buffers
    from tdiff.solvers import Sampler

    monkeypatch.setenv("TDIFF_BACKEND", "cpp")
    x, x0 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    kept = []

    def keeping_model(x, t):  # keeps its inputs, a view of one, and returns fresh outputs
        kept.append((x, x.clone(), x[:1]))
        return x0 * t + 0.1 * x

    keeping_model.schedule = SCHED
    for solver, order in LOOP_SOLVERS:
        fresh = Sampler(keeping_model, _ts(12), solver=solver, order=order)
        with torch.no_grad():
            want = fresh(x)
        monkeypatch.setattr(buffers, "MIN_BYTES", 0)
        kept.clear()
        x_before = x.clone()
        with torch.no_grad():
            got = Sampler(keeping_model, _ts(12), solver=solver, order=order)(x)
        assert torch.equal(got, want), solver
        assert torch.equal(x, x_before), f"{solver}: x_T was written"
        assert all(torch.equal(seen, copy) for seen, copy, _ in kept), f"{solver}: a sample the model kept changed"
        if solver in ("unipc", "ipndm", "heun"):  # the longest histories, and Heun's reused names
            free_model = lambda x, t: x0  # noqa: E731  (allocates nothing itself)
            free_model.schedule = SCHED
            few, many = (_allocations(Sampler(free_model, _ts(n), solver=solver, order=order), x) for n in (5, 10))
            assert many <= few <= 12, f"{solver}: {few} allocations at 5 steps, {many} at 10"
        monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 40)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_sampling_on_each_backend_matches_the_reference(monkeypatch, backend):
    x = torch.randn(3, 2, dtype=torch.float64)
    monkeypatch.setenv("TDIFF_BACKEND", "torch")
    ref = sample(MixtureDenoiser(), x, _ts(4), solver="unipc", order=3)
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    torch.testing.assert_close(sample(MixtureDenoiser(), x, _ts(4), solver="unipc", order=3), ref)


def test_heun_evaluates_its_last_corrector_at_the_given_final_condition_time():
    x, ts = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), _ts()
    kw = dict(solver="heun", order_rule="diffusers")  # every step corrected, the last one included
    plain = sample(MixtureDenoiser(), x, ts, **kw)
    # N condition times are completed with t_N: the same solve
    torch.testing.assert_close(sample(MixtureDenoiser(), x, ts, timesteps_cond=ts[:-1], **kw), plain)
    moved = ts.clone()
    moved[-1] = ts[-1] * 1.5
    assert not torch.allclose(sample(MixtureDenoiser(), x, ts, timesteps_cond=moved, **kw), plain)
    # the multistep solvers never evaluate at t_N, so the (N+1)-th condition time cannot matter to them
    torch.testing.assert_close(sample(MixtureDenoiser(), x, ts, solver="unipc", timesteps_cond=moved),
                               sample(MixtureDenoiser(), x, ts, solver="unipc"))


def test_the_network_output_is_converted_at_the_grid_point_not_at_the_network_time():
    """Issue 12.1: with a decoupled (or rounded) network time, D = p x + q m uses the sample's own alpha, sigma."""
    seen = []

    class EpsNet(torch.nn.Module):
        def forward(self, x, t_net, y=None):
            seen.append(t_net)
            return torch.tanh(x + 0.001 * t_net.view(-1, 1))

    den = tdiff.denoiser(EpsNet(), SCHED, prediction="eps", model_time=lambda t: t)
    ts = torch.tensor([0.8, 0.3], dtype=torch.float64)
    cond = torch.tensor([0.75, 0.3], dtype=torch.float64)
    x = torch.randn(4, 2, dtype=torch.float64)
    out = sample(den, x, ts, solver="ddim", timesteps_cond=cond)
    a, s = SCHED.alpha(ts), SCHED.sigma(ts)
    eps = torch.tanh(x + 0.001 * 0.75)
    d = (x - s[0] * eps) / a[0]  # at the grid point t = 0.8, although the network was fed 0.75
    torch.testing.assert_close(out, s[1] / s[0] * x + (a[1] - s[1] * a[0] / s[0]) * d)
    torch.testing.assert_close(seen[0], cond[:1].expand(4))
    # D(x, t) itself converts at the time it is given (the network's and the sample's are the same there)
    torch.testing.assert_close(den(x, 0.75), (x - SCHED.sigma(0.75) * eps) / SCHED.alpha(0.75))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "flow"])
def test_raw_output_conversion_matches_the_denoiser_for_every_prediction(prediction):
    """The loop's (p, q) conversion of a Denoiser's raw output equals sampling with D(x, t) itself."""
    net = torch.nn.Linear(2, 2, dtype=torch.float64)
    den = tdiff.denoiser(lambda x, t, y=None: torch.tanh(net(x)), SCHED, prediction=prediction)

    def plain(x, t):
        return den(x, t)

    plain.schedule = SCHED
    x = torch.randn(3, 2, dtype=torch.float64)
    for solver, order in [("dpmpp", 3), ("unipc", 2), ("dpmsolver", 2), ("heun", 2), ("ipndm", 3)]:
        with torch.no_grad():
            torch.testing.assert_close(sample(den, x, _ts(), solver=solver, order=order),
                                       sample(plain, x, _ts(), solver=solver, order=order))


def test_new_solvers_are_differentiable_in_the_timesteps():
    den = tdiff.denoiser(lambda x, t, y=None: torch.tanh(x), SCHED, prediction="eps")
    x = torch.randn(3, 2, dtype=torch.float64)
    for solver, order, kw in [("dpmpp_ab", 3, {}), ("dpmsolver", 3, {}), ("unipc", 3, {"final_corrector": True}),
                              ("dpmpp", 3, {})]:
        ts = _ts(6).requires_grad_(True)
        out = sample(den, x, ts, solver=solver, order=order, **kw)
        (g,) = torch.autograd.grad(out.square().sum(), ts)
        assert torch.isfinite(g).all() and bool((g[1:-1] != 0).all()), solver


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_stable_rule_blends_unipc_predictor_and_corrector_rows_over_the_same_buffers(variant):
    """Where the stable rule blends order p with order 1, the row is w row_p + (1 - w) row_1, row_1 padded with
    zeros on the histories it does not read: the predictor's after (c_x, c_0), the corrector's after
    (c_x, c_new, c_0). Built directly from the row functions here, step by step, against the unfolded program
    (the sampling loop's folded rows equal it: tests/test_solvers_fused.py)."""
    from tdiff.solvers.grid import condition_times, make_grid
    from tdiff.solvers.program import stable_orders
    from tdiff.solvers.unipc import build_unipc, corrector_row, predictor_row
    from tdiff.timesteps import HEURISTICS

    ts = HEURISTICS["logsnr_uniform"](EDM(), 13).to(torch.float64)
    g = make_grid(EDM(), ts)
    prog = build_unipc(g, condition_times(EDM(), ts, None), 3, variant=variant, order_rule="stable", fold=False)
    plan = stable_orders(g.lam, 3, g.final_zero, "unipc")
    assert plan.blend is not None and sum(plan.blend) >= 2  # the grid exercises the blend
    updates = [[ins for ins in step if isinstance(ins, Update)] for step in prog.steps]
    for i in (i for i, b in enumerate(plan.blend) if b):
        p, w = plan.top[i], plan.weight[i]
        row_p = torch.stack(predictor_row(g, torch.tensor([i]), p, variant)).squeeze(1)
        row_1 = torch.stack(predictor_row(g, torch.tensor([i]), 1, variant)).squeeze(1)
        want = w * row_p + (1 - w) * torch.cat([row_1, row_1.new_zeros(p - 1)])
        torch.testing.assert_close(prog.rows[updates[i][-1].row], want, rtol=1e-14, atol=1e-14)
        if i + 1 == g.n_steps:  # no corrector after the last step
            continue
        row_p = torch.stack(corrector_row(g, torch.tensor([i]), p, variant)).squeeze(1)
        row_1 = torch.stack(corrector_row(g, torch.tensor([i]), 1, variant)).squeeze(1)
        want = w * row_p + (1 - w) * torch.cat([row_1, row_1.new_zeros(p - 1)])
        torch.testing.assert_close(prog.rows[updates[i + 1][0].row], want, rtol=1e-14, atol=1e-14)
