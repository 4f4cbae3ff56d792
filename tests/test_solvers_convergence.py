"""Orders of convergence on the analytic Gaussian mixture against scipy's solve_ivp (DOP853, rtol 1e-10), for every
deterministic solver and order:

  local: one step of size h (in lambda) from the exact state, with the exact history (every earlier model output
    evaluated on the exact trajectory), against the exact solution; the log-log slope over h = 0.1 .. 0.025 is the
    local order p + 1 of an order-p method (iPNDM on a grid uniform in sigma~, where its fixed Adams-Bashforth
    weights are exact);
  global: the whole solve from t = 0.9 to 0.1 on a grid uniform in lambda at NFE 40, 80, 160, against the exact end
    point; the slope is the global order p. iPNDM is order 2 there for p >= 2: its weights assume equal steps in
    sigma~, which a lambda-uniform grid has only up to O(h) (on sigma~-uniform grids the order shows only at several
    hundred NFE, where the last steps in lambda become small).
The reference is tighter than required (rtol 1e-12) so that 5th-order local errors near 1e-10 are measured.

DPM-Solver++ 3M (solver="dpmpp", order=3) is diffusers' and the paper's formula: its D2 term carries half the exact
quadratic integral, so it is second order (local 3, global 2). solver="dpmpp_ab" is the true third order.
UniPC-p is order p+1 with its corrector; its local test corrects the step with a final evaluation (final_corrector).
The stochastic solvers (ddpm, dpmpp_sde, dpmsolver_sde, ddim with eta > 0) have no pathwise order to test here.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from tdiff.data.gaussian_mixture import GaussianMixture  # noqa: E402
from tdiff.data.reference import reference_ode_solution  # noqa: E402
from tdiff.denoisers import convert  # noqa: E402
from tdiff.schedules import VPLinear  # noqa: E402
from tdiff.solvers import build_program, sample  # noqa: E402
from tdiff.solvers.program import Alias, Eval, Update  # noqa: E402
from tdiff.solvers.grid import condition_times, make_grid  # noqa: E402
from tdiff.solvers.sample import _conversion_table  # noqa: E402
from tdiff.solvers.unipc import build_unipc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = VPLinear()
MIX = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], [0.3, 0.5, 0.2], [1.0, 2.0, 1.5])
T0, T1 = 0.9, 0.1
X = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(11))


class Den:
    schedule = SCHED

    def __call__(self, x, t):
        return MIX.posterior_mean(x, t, SCHED)


DEN = Den()

# (solver, order, options, local order (p+1), global order p); "bound" marks a documented upper limit instead
CASES = [
    ("euler", 1, {}, 2, 1),
    ("ddim", 1, {}, 2, 1),
    ("dpmpp", 1, {}, 2, 1),
    ("dpmpp", 2, {}, 3, 2),
    ("dpmpp", 2, {"solver_type": "heun"}, 3, 2),
    ("dpmpp", 3, {}, 3, 2),  # diffusers' 3M: second order (see the module doc)
    ("dpmpp_ab", 2, {}, 3, 2),
    ("dpmpp_ab", 3, {}, 4, 3),
    ("dpmsolver", 1, {}, 2, 1),
    ("dpmsolver", 2, {}, 3, 2),
    ("dpmsolver", 3, {}, 3, 2),  # the same half-integral D2 term as 3M
    ("unipc", 1, {}, 3, 2),
    ("unipc", 2, {}, 4, 3),
    ("unipc", 3, {}, 5, 4),
    ("unipc", 2, {"variant": "bh1"}, 4, 3),
    ("heun", 2, {}, 3, 2),
    ("ipndm", 1, {}, 2, 1),
    ("ipndm", 2, {}, 3, 2),
    ("ipndm", 3, {}, 4, 2),
    ("ipndm", 4, {}, 5, 2),
]
MULTISTEP = ("dpmpp", "dpmpp_ab", "dpmsolver", "unipc", "ipndm")


@pytest.fixture(scope="module")
def exact():
    return exact_trajectory()


def exact_trajectory():
    """The exact trajectory y(lambda) = x/alpha as a dense DOP853 solution (rtol 1e-12), and its end point."""
    from scipy.integrate import solve_ivp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: the one_thread fixture is not active yet
    lam0, lam1 = float(SCHED.lambda_(torch.tensor(T0))), float(SCHED.lambda_(torch.tensor(T1)))
    shape = X.shape

    def rhs(lam, y):
        t = SCHED.t_from_lambda(torch.tensor(lam, dtype=torch.float64))
        yt = torch.from_numpy(y).reshape(shape)
        return (DEN(yt * SCHED.alpha(t), t) - yt).reshape(-1).numpy()

    y0 = (X / SCHED.alpha(torch.tensor(T0, dtype=torch.float64))).reshape(-1).numpy()
    sol = solve_ivp(rhs, (lam0 - 1.0, lam1), y0, method="DOP853", rtol=1e-12, atol=1e-14, dense_output=True,
                    t_eval=[lam0 - 1.0])  # start before lam0 so that history points exist for the local test
    assert sol.success

    def state(lam: float) -> torch.Tensor:
        t = SCHED.t_from_lambda(torch.tensor(lam, dtype=torch.float64))
        return torch.from_numpy(sol.sol(lam)).reshape(shape) * SCHED.alpha(t)

    # the exact solution from X at T0 (the dense solution above starts from X one unit of lambda earlier)
    end = reference_ode_solution(DEN, SCHED, X, T0, T1, rtol=1e-12, atol=1e-14)
    torch.set_num_threads(threads)
    return state, lam1, end


def _opts(solver, opts):
    return {"lower_order_final": False, **opts} if solver in MULTISTEP else dict(opts)


def _grid(solver, lam_end: float, h: float, steps: int) -> torch.Tensor:
    """steps+1 times ending at lam_end, uniform in lambda with step h (iPNDM: uniform in sigma~ = e^-lambda, with
    the same last step)."""
    if solver == "ipndm":
        s_end = np.exp(-lam_end)
        ds = np.exp(-(lam_end - h)) - s_end
        lam = -np.log(s_end + ds * np.arange(steps, -1, -1))
    else:
        lam = lam_end - h * np.arange(steps, -1, -1)
    return SCHED.t_from_lambda(torch.tensor(lam, dtype=torch.float64))


def _local_program(ts, solver, order, opts):
    """The program the local error is measured on. UniPC's sampling program folds the corrector into the next
    predictor (its state is the predicted sample); the local error from an exact *corrected* state needs the
    corrected sample as a buffer of its own: the unfolded form (equal to the folded one up to rounding,
    tests/test_solvers_fused.py)."""
    if solver != "unipc":
        return build_program(SCHED, ts, solver, order, **opts)
    ts = ts.to(torch.float64)
    return build_unipc(make_grid(SCHED, ts), condition_times(SCHED, ts, None), order, fold=False,
                       order_rule="stable", **opts)


def _one_step_from_exact(prog, ts, state) -> torch.Tensor:
    """Interpret the program, resetting the sample to the exact state at the start of every step (and UniPC's
    corrected state to the exact one a point earlier), so the last step sees the exact history."""
    table, plan = _conversion_table(DEN, SCHED, prog)
    lam = SCHED.lambda_(ts).tolist()
    buf = {}
    for i, step in enumerate(prog.steps):
        buf["x"] = state(lam[i])
        if i > 0:
            buf["xc"] = state(lam[i - 1])
        for ins in step:
            if isinstance(ins, Eval):
                src = buf[ins.src]
                out = DEN(src, prog.eval_times[ins.k])
                for name, _, r in plan[ins.k]:
                    buf[name] = out if r is None else convert(src, out, table[r, 0], table[r, 1])
            elif isinstance(ins, Update):
                row = prog.rows[ins.row]
                buf[ins.out] = row[0] * buf[ins.x] + sum(c * buf[h] for c, h in zip(row[1:], ins.hist))
            elif isinstance(ins, Alias):
                buf[ins.out] = buf[ins.src]
    return buf["x"]


def _slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


@pytest.mark.parametrize("solver,order,opts,local,glob", CASES,
                         ids=[f"{c[0]}{c[1]}{''.join(f'-{v}' for v in c[2].values())}" for c in CASES])
def test_local_and_global_order(exact, solver, order, opts, local, glob):
    (hs, local_err), (nfes, global_err) = measure_orders(exact, solver, order, opts)
    p_local, p_global = _slope(hs, local_err), _slope(nfes, global_err)
    print(f"{solver}-{order} {opts}: local slope {p_local:.2f} (expected {local}), global slope {-p_global:.2f} "
          f"(expected {glob}); local errors {[f'{e:.1e}' for e in local_err]}, global {[f'{e:.1e}' for e in global_err]}")
    assert abs(p_local - local) < 0.4, f"local slope {p_local:.2f}, expected {local}"
    # at these NFE the higher orders still approach their slope from above; a method of lower order fails
    assert glob - 0.3 < -p_global < glob + 0.6, f"global slope {-p_global:.2f}, expected {glob}"


def measure_orders(exact, solver, order, opts, hs=(0.1, 0.05, 0.025), nfes=(40, 80, 160)):
    """((h, local errors), (NFE, global errors)) of one solver (see the module doc)."""
    state, lam_end, end = exact
    # local: the last of 4 steps (so a 4-step method has its history), from the exact state and history
    local_opts = {**_opts(solver, opts), **({"final_corrector": True} if solver == "unipc" else {})}
    local_err = []
    for h in hs:
        ts = _grid(solver, lam_end, h, 4)
        prog = _local_program(ts, solver, order, local_opts)
        local_err.append(float((_one_step_from_exact(prog, ts, state) - state(lam_end)).abs().max()))
    # global: the whole solve at large NFE
    global_err = []
    lam0 = float(SCHED.lambda_(torch.tensor(T0)))
    for nfe in nfes:
        steps = nfe // 2 if solver == "heun" else nfe
        ts = SCHED.t_from_lambda(torch.linspace(lam0, lam_end, steps + 1, dtype=torch.float64))
        ts = torch.cat([torch.tensor([T0], dtype=torch.float64), ts[1:-1], torch.tensor([T1], dtype=torch.float64)])
        out = sample(DEN, X, ts, solver=solver, order=order, **_opts(solver, opts))
        global_err.append(float((out - end).abs().max()))
    return (list(hs), local_err), (list(nfes), global_err)
