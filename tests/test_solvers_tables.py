"""The no-grad tables (the same formulas evaluated on numpy float64, arrays.py) against the differentiable torch
tables, for every solver and its options, on a discrete and a continuous schedule, both order rules and both
final sigma types; and the host path is taken only without gradients."""
import pytest
import torch

from tdiff.schedules import EDM, DiscreteVP
from tdiff.solvers import build_program
from tdiff.solvers.grid import make_grid

SCHEDULES = {"discrete": DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)), "edm": EDM()}
CONFIGS = [("dpmpp", 1, {}), ("dpmpp", 2, {}), ("dpmpp", 2, {"solver_type": "heun"}), ("dpmpp", 3, {}),
           ("dpmpp_ab", 3, {}), ("dpmpp_sde", 3, {}), ("dpmpp_sde", 2, {"solver_type": "heun"}),
           ("dpmsolver", 3, {}), ("dpmsolver_sde", 2, {}), ("unipc", 1, {}), ("unipc", 2, {}),
           ("unipc", 3, {"variant": "bh1"}), ("unipc", 3, {"final_corrector": True}), ("ipndm", 4, {}),
           ("ddim", 1, {"eta": 0.5}), ("ddpm", 1, {}), ("euler", 1, {}), ("heun", 2, {}),
           ("heun", 2, {"s_churn": 10.0, "s_min": 0.1, "s_max": 5.0})]
RULED = ("dpmpp", "dpmpp_ab", "dpmpp_sde", "dpmsolver", "dpmsolver_sde", "unipc", "ipndm", "heun")


def _same(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, entries that are equal or both NaN/inf counting as 0."""
    same = (a == b) | (a.isnan() & b.isnan())
    return torch.where(same, 0.0, (a - b).abs()).max().item() if a.numel() else 0.0


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("rule", ["stable", "diffusers"])
def test_host_tables_equal_the_differentiable_ones(name, rule):
    schedule = SCHEDULES[name]
    built = 0
    for n in (4, 9, 20):  # long and short steps: the stable rule's plain, blended and lowered orders
        u = torch.linspace(0, 1, n + 1, dtype=torch.float64)
        ts = 0.98 - 0.96 * u**2
        for fst in ("sigma_min", "zero"):
            for solver, order, opts in CONFIGS:
                opts = dict(opts, **({"order_rule": rule} if solver in RULED else {}))
                try:
                    host = build_program(schedule, ts, solver, order, final_sigmas_type=fst, **opts)
                except ValueError:  # a noise-prediction solver to sigma = 0
                    continue
                grad = build_program(schedule, ts.clone().requires_grad_(), solver, order, final_sigmas_type=fst,
                                     **opts)
                assert host.steps == grad.steps
                assert all(type(r) is torch.Tensor and r.dtype == torch.float64 for r in host.rows)
                assert [r.shape for r in host.rows] == [r.shape for r in grad.rows]
                for a, b in zip(host.rows, grad.rows):
                    assert b.requires_grad
                    assert _same(a, b.detach()) <= 1e-12 * max(1.0, b.detach().abs().max().item())
                for a, b in ((host.eval_points, grad.eval_points.detach()), (host.eval_times, grad.eval_times.detach())):
                    if "s_churn" in opts:  # the raised noise levels come from sigma~ = sigma / alpha, by numpy's
                        # libm on the host and torch's here: on some CPUs (seen on an AMD EPYC) the last bit differs
                        assert _same(a, b) <= 4e-16 * b.abs().max()
                    else:
                        assert torch.equal(a, b)
                built += 1
    assert built >= 80


def test_grid_goes_to_the_host_only_without_gradients():
    ts = torch.linspace(0.9, 0.1, 5, dtype=torch.float64)
    g = make_grid(EDM(), ts)
    assert isinstance(g.on_host().lam, type(g.lam.numpy()))
    assert g.on_host().t is g.t  # the denoiser's times stay a tensor
    g = make_grid(EDM(), ts.clone().requires_grad_())
    assert g.on_host() is g
    assert make_grid(EDM(), ts.float()).on_host().lam.dtype == torch.float32  # another dtype keeps torch's maths


def test_no_grad_tables_cost_a_bounded_number_of_torch_ops():
    """The host path is taken by build_program: the tables of UniPC-3 (the costliest, ~500 torch ops when
    differentiable) then take a fixed few dozen torch ops (validation, the schedule, the sealing), whatever the
    number of steps."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[str(func)] += 1
            return func(*args, **(kwargs or {}))

    schedule = SCHEDULES["discrete"]
    counts = []
    for n in (10, 40):
        ts = torch.linspace(0.98, 0.02, n + 1, dtype=torch.float64)
        with Count() as c:
            build_program(schedule, ts, "unipc", 3, order_rule="stable")
        counts.append(sum(c.ops.values()))
    with Count() as c:
        build_program(schedule, ts.clone().requires_grad_(), "unipc", 3, order_rule="stable")
    assert counts[0] == counts[1] and counts[0] < 100 < sum(c.ops.values()), (counts, sum(c.ops.values()))


@pytest.mark.parametrize("prediction,precond", [("eps", None), ("v", None), ("x0", None), ("flow", None),
                                                ("eps", "edm")])
def test_conversion_from_the_grids_alpha_sigma_equals_the_schedules(prediction, precond):
    """Denoiser.conversion with the grid's host alpha, sigma (the no-grad tables) equals the one from t."""
    from tdiff import denoiser

    schedule = SCHEDULES["discrete"]
    den = denoiser(lambda x, t, y=None: x, schedule, prediction=prediction, precond=precond)
    ts = torch.linspace(0.98, 0.02, 9, dtype=torch.float64)
    alpha, sigma = make_grid(schedule, ts).on_host().points()
    for target in ("x0", "eps"):
        want = den.conversion(ts, target)
        got = den.conversion(ts, target, alpha=alpha, sigma=sigma)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-12 * want.abs().max().item()


@pytest.mark.parametrize("fst", ["sigma_min", "zero"])
def test_host_grid_equals_the_torch_grid(fst):
    """The schedule evaluated on the host (NoiseSchedule.log_alpha_sigma_host: the VP schedules' closed forms on
    numpy) gives the grid that make_grid computes in torch; schedules without a host evaluation (VPCosine, EDM, a
    zero-terminal-SNR table, a subclass that overrides log_alpha alone) fall back to it."""
    import numpy as np

    from tdiff.schedules import VPCosine, VPLinear
    from tdiff.solvers.grid import host_grid

    zero_snr = DiscreteVP(betas=torch.cat([torch.linspace(1e-4, 0.02, 999, dtype=torch.float64),
                                           torch.ones(1, dtype=torch.float64)]))
    class Steeper(VPLinear):  # overrides log_alpha alone: its own formula, evaluated in torch
        def log_alpha(self, t):
            return 1.5 * super().log_alpha(t)

    hosted = 0
    for schedule in (SCHEDULES["discrete"], VPLinear(), VPCosine(), EDM(), zero_snr, Steeper()):
        lo, hi = schedule.t_min, min(schedule.t_max, schedule.domain[1])
        for u in (torch.linspace(0, 1, 8, dtype=torch.float64), torch.linspace(0, 1, 21, dtype=torch.float64) ** 2):
            ts = hi + (lo - hi) * u
            want = make_grid(schedule, ts, fst).on_host()
            got = host_grid(schedule, ts, fst)
            hosted += schedule.log_alpha_sigma_host(ts.numpy()) is not None
            assert got.t is ts and got.final_zero == want.final_zero
            for name in ("alpha", "sigma", "lam"):
                a, b = getattr(got, name), getattr(want, name)
                assert type(a) is np.ndarray and a.dtype == np.float64
                np.testing.assert_allclose(a, b, rtol=4e-16, atol=4e-16, err_msg=f"{type(schedule).__name__} {name}")
    assert hosted == 4  # DiscreteVP and VPLinear on the host; VPCosine, EDM and the zero-SNR table in torch


def test_programs_of_one_structure_share_their_instructions():
    """The instructions (and buffer lifetimes) are cached by structure, never by the timesteps' values: two grids
    whose orders agree share one Structure, whose frees are the ones computed from its steps; a grid whose step
    sizes change the orders gets another. Rows sealed on the host become tensors only when read, equal to the
    matrices the sampling loop reads."""
    from tdiff.solvers.program import Program

    schedule = SCHEDULES["discrete"]
    u = torch.linspace(0, 1, 21, dtype=torch.float64)
    a = build_program(schedule, 0.98 - 0.96 * u, "dpmpp", 2, order_rule="diffusers")
    b = build_program(schedule, 0.97 - 0.9 * u**2, "dpmpp", 2, order_rule="diffusers")
    assert a.structure is not None and a.structure is b.structure and a.steps is b.steps
    assert [r.tolist() for r in a.rows] != [r.tolist() for r in b.rows]  # the rows are each grid's own
    plain = Program(steps=[list(step) for step in a.steps])
    assert plain.frees() == a.frees() and plain.evals() == a.evals()
    c = build_program(schedule, 0.98 - 0.96 * u, "dpmpp", 3, order_rule="diffusers")
    assert c.structure is not a.structure
    for idx, mat in b.row_groups():
        for r, row in zip(idx, mat):
            assert torch.equal(b.rows[r], torch.from_numpy(row))


def _exact_solve(nodes: list, b: list) -> list:
    """rho with sum_j rho_j nodes_j^i = b_i, in exact rational arithmetic from the float64 inputs."""
    from fractions import Fraction
    n = len(nodes)
    a = [[Fraction(r) ** i for r in nodes] + [Fraction(b[i])] for i in range(n)]
    for c in range(n):
        pivot = next(r for r in range(c, n) if a[r][c] != 0)
        a[c], a[pivot] = a[pivot], a[c]
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [x - f * y for x, y in zip(a[r], a[c])]
    return [a[i][n] / a[i][i] for i in range(n)]


@pytest.mark.parametrize("n", [2, 3])
def test_unipc_closed_form_rhos_are_at_least_as_close_to_the_exact_solve_as_lu(n):
    """UniPC's rho (the order conditions' Vandermonde solve) in closed form, on random step ratios 0.1-10 and step
    sizes 0.01-3 in lambda, against exact rationals: its worst and median relative error are no larger than those
    of an LU solve (numpy's) of the same float64 system, and within a few ulps."""
    from fractions import Fraction

    import numpy as np

    from tdiff.solvers.unipc import _phi_terms, _solve_rhos
    rng = np.random.default_rng(7)
    m = 150
    h = np.exp(rng.uniform(np.log(0.01), np.log(3.0), m))
    ratios = np.exp(rng.uniform(np.log(0.1), np.log(10.0), (m, n - 1)))  # (lambda_{i-k+1} - lambda_{i-k}) / h
    rks = [-np.cumsum(ratios, axis=1)[:, k] for k in range(n - 1)] + [np.ones(m)]
    b = _phi_terms(h, n, "bh2")[2]
    closed = np.stack(_solve_rhos(rks, b, n), axis=1)
    vander = np.stack([np.stack(rks, axis=1) ** i for i in range(n)], axis=1)  # (m, n, n)
    lu = np.linalg.solve(vander, b.T[..., None])[..., 0]
    err = {"closed": [], "lu": []}
    for s in range(m):
        exact = _exact_solve([float(r[s]) for r in rks], [float(v) for v in b[:, s]])
        for name, got in (("closed", closed), ("lu", lu)):
            err[name].append(max(float(abs((Fraction(float(got[s, j])) - exact[j]) / exact[j])) for j in range(n)))
    worst = {k: max(v) for k, v in err.items()}
    median = {k: float(np.median(v)) for k, v in err.items()}
    assert worst["closed"] <= worst["lu"] and median["closed"] <= median["lu"], (worst, median)
    assert worst["closed"] < 8 * np.finfo(np.float64).eps, worst


def test_unipc_rhos_give_an_infinitely_far_history_point_weight_zero():
    """A history output at lambda = -inf (alpha = 0: a flow-matching grid starting at t = 1) is a node at
    r = -inf: the two-node solve's limit gives it weight 0 and the other node all of b_0 (what LU gave there)."""
    import numpy as np

    from tdiff.solvers.unipc import _solve_rhos
    b = np.array([[0.4, 0.3], [0.2, 0.15]])
    with np.errstate(all="ignore"):
        rho = _solve_rhos([np.array([-np.inf, -2.0]), 1.0], b, 2)
    assert rho[0][0] == 0 and rho[1][0] == 0.4
    assert np.allclose([rho[0][1], rho[1][1]], np.linalg.solve([[1.0, 1.0], [-2.0, 1.0]], b[:, 1]), rtol=1e-15)


@pytest.mark.parametrize("solver, order, opts", [("dpmpp_sde", 1, {}), ("dpmpp_sde", 3, {}), ("ddpm", 1, {}),
                                                 ("ddim", 1, {"eta": 0.5}), ("ddim", 1, {"eta": 1.5})])
def test_stochastic_steps_to_clean_data_have_finite_time_gradients(solver, order, opts):
    """A final step to sigma = 0 (final_sigmas_type="zero") once gave a NaN gradient for its start time (the root
    of sigma_t^2 - s^2 at 0). Every time's gradient is finite and matches central differences (EDM: smooth in t)."""
    schedule = SCHEDULES["edm"]
    ts0 = 0.9 - 0.8 * torch.linspace(0, 1, 7, dtype=torch.float64) ** 1.5
    weights = torch.randn(40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def total(ts):
        rows = build_program(schedule, ts, solver, order, final_sigmas_type="zero", **opts).rows
        return sum((r.flatten() * weights[k, :r.numel()]).sum() for k, r in enumerate(rows))

    ts = ts0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(total(ts), ts)
    assert grad.isfinite().all(), grad
    eps = 1e-6
    fd = torch.stack([(total(ts0 + eps * e) - total(ts0 - eps * e)) / (2 * eps) for e in torch.eye(7).double()])
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-6)


def test_unipc_host_rows_equal_the_differentiable_ones_for_every_corrector_and_order_option():
    """UniPC's host builder (`_host_step_rows`: rows per order on slices, few-step orders in floats, blends over a
    span, the fold in place) against its differentiable one (one group per order) on the corrector and order
    options the grid above leaves out: skipped and missing corrections, a final one, explicit and unlowered
    orders, and warm-up steps inside and outside the blending span."""
    schedule = SCHEDULES["discrete"]
    gen = torch.Generator().manual_seed(0)
    built = 0
    for n in (5, 12):
        ts = torch.linspace(0.98, 0.02, n + 1, dtype=torch.float64)
        explicit = [min(int(v), i + 1) for i, v in enumerate(torch.randint(1, 4, (n,), generator=gen))]
        options = [{"disable_corrector": [1, 3]}, {"use_corrector": False}, {"final_corrector": True},
                   {"lower_order_final": False}, {"orders": explicit}]
        for fst in ("sigma_min", "zero"):
            for order in (2, 3):
                for rule in ("stable", "diffusers"):
                    for opts in options:
                        if fst == "zero" and ("final_corrector" in opts or "orders" in opts):
                            continue  # refused there (tested elsewhere)
                        opts = dict(opts, order_rule=rule)
                        host = build_program(schedule, ts, "unipc", order, final_sigmas_type=fst, **opts)
                        grad = build_program(schedule, ts.clone().requires_grad_(), "unipc", order,
                                             final_sigmas_type=fst, **opts)
                        assert host.steps == grad.steps
                        assert [r.shape for r in host.rows] == [r.shape for r in grad.rows]
                        for a, b in zip(host.rows, grad.rows):
                            assert _same(a, b.detach()) <= 1e-12 * max(1.0, b.detach().abs().max().item())
                        built += 1
    assert built == 2 * 2 * 2 * (5 + 3)


def test_complex_step_functions_are_numpys_to_rounding_and_fall_back_off_the_step():
    """arrays.expm1/exp of x + iy with |y| <= COMPLEX_STEP_BOUND (DM-NonUniform's complex-step columns) come from the
    real functions: the real part is the real function's bit for bit, the imaginary part y exp(x) is numpy's complex
    result to rounding; a larger imaginary part takes numpy's complex function itself. arrays.negative of a complex
    array is -v bit for bit."""
    import numpy as np

    from tdiff.solvers import arrays

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 50)) * 4
    step = x + 1j * rng.normal(size=x.shape) * 1e-30
    for fast, real, full in ((arrays.expm1, np.expm1, np.expm1), (arrays.exp, np.exp, np.exp)):
        got = fast(step)
        assert got.dtype == step.dtype and np.array_equal(got.real, real(x))
        np.testing.assert_allclose(got.imag, full(step).imag, rtol=1e-15, atol=0)
        wide = x + 1j * rng.normal(size=x.shape)  # not a complex step: numpy's own
        assert np.array_equal(fast(wide), full(wide))
    assert np.array_equal(arrays.negative(step).view(np.int64), (-step).view(np.int64))
    assert np.array_equal(arrays.negative(x), -x)


def test_dpmpp3_host_rows_on_complex_steps_equal_the_real_rows_and_their_derivative():
    """DPM-Solver++ 3's rows on complex-step columns (the solver-row objective's Jacobian): the real part equals the
    rows on the real lambdas to rounding (numpy's complex products and quotients round their real parts apart from
    the real operations' by an ulp at most), the imaginary part / h a central difference of the real rows."""
    import numpy as np

    from tdiff.solvers.dpmpp import build_dpmpp
    from tdiff.solvers.grid import grid_from_log_alpha

    schedule = SCHEDULES["discrete"]
    lam = np.linspace(-4.0, 3.0, 9)[:, None]  # (N+1, 1): one column
    h = 1e-30
    tangent = np.zeros((9, 1))
    tangent[4] = 1.0  # lambda_4's derivative

    def rows(lam_col, log_alpha):
        prog = build_dpmpp(grid_from_log_alpha(log_alpha, lam_col), None, order=3)
        return np.concatenate([np.asarray(r).reshape(-1) for r in prog.rows])

    log_alpha = schedule.log_alpha_from_lambda(lam)
    slope = schedule.log_alpha_slope_from_lambda(lam)
    complex_rows = rows(lam + 1j * h * tangent, log_alpha + 1j * h * slope * tangent)
    np.testing.assert_allclose(complex_rows.real, rows(lam, log_alpha), rtol=4e-16, atol=1e-18)
    d = 1e-6
    plus = rows(lam + d * tangent, schedule.log_alpha_from_lambda(lam + d * tangent))
    minus = rows(lam - d * tangent, schedule.log_alpha_from_lambda(lam - d * tangent))
    np.testing.assert_allclose(complex_rows.imag / h, (plus - minus) / (2 * d), rtol=1e-6, atol=1e-8)
