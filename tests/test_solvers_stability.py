"""Stable final steps (issue 18): with the default order rule, no deterministic solver's error on the analytic
mixture grows with NFE, for NFE 4-40, on any heuristic grid: the error at each NFE is within GROWTH = 1.1 of the best
error at any smaller NFE. diffusers' count rule fails this badly (DPM++3 on uniform-t steps: 17x worse at NFE 15 than
at 12; Heun 8-59 at NFE 4-5; 23x on bench/solvers' curves), and is kept as order_rule="diffusers".

The rule (tdiff.solvers.program.stable_orders) blends each step's order-p update with the first-order one by the
step's size in lambda and its ratio to the earlier steps, with a smoothstep weight; its thresholds and the ramp's
shape were chosen on noise seed 0 (1024 samples; worst growth 1.03). This test uses seed 1 (worst 1.07, UniPC-2
on quadratic-t, whose error has a plateau at NFE 20-25), bench/solvers seed 2 (1.08 with 512 samples).

N_SAMPLES: the mean error over 64 samples is not the solver's error but that of a few samples whose errors happen
to cancel: with the earlier linear ramp, seed 1 gave 1.42 (iPNDM-4, logSNR) and 1.27 (UniPC-2, quadratic) at 64
samples and at most 1.08 at 1024; with the same 1024 samples seed 0 still showed the genuine rises (1.12, from the
linear ramp's kink) that the smoothstep removed. With the present rule seed 1 gives 1.19 at 256 samples (the
UniPC-2 plateau tilts), 1.07 at 512 (used: about 45 s of CPU for the whole file) and 1.05 at 1024.

The 2-D default mixture (narrow modes, so the low-NFE errors are large), VP linear from t = 1 to 1e-3 (the
heuristics' default interval). Solvers that are the same first-order method (euler, ddim, dpmpp/dpmsolver/ipndm
order 1) are run once.
"""
import numpy as np
import pytest
import torch

pytest.importorskip("scipy")

from tdiff.data.gaussian_mixture import default_mixture_2d  # noqa: E402
from tdiff.data.reference import reference_ode_solution  # noqa: E402
from tdiff.schedules import VPLinear  # noqa: E402
from tdiff.solvers import Sampler  # noqa: E402
from tdiff.timesteps import HEURISTICS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = VPLinear()
MIX = default_mixture_2d()
NFE = range(4, 41)
GROWTH = 1.1
N_SAMPLES = 512
SOLVERS = [("ddim", 1, {}), ("dpmpp", 2, {}), ("dpmpp", 2, {"solver_type": "heun"}), ("dpmpp", 3, {}),
           ("dpmpp_ab", 3, {}), ("dpmsolver", 2, {}), ("dpmsolver", 3, {}), ("unipc", 1, {}), ("unipc", 2, {}),
           ("unipc", 3, {}), ("unipc", 3, {"variant": "bh1"}), ("ipndm", 2, {}), ("ipndm", 3, {}), ("ipndm", 4, {}),
           ("heun", 2, {})]


class Den:
    schedule = SCHED

    def __call__(self, x, t):
        return MIX.posterior_mean(x, t, SCHED)


@pytest.fixture(scope="module")
def problem():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x = torch.randn(N_SAMPLES, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = reference_ode_solution(Den(), SCHED, x, SCHED.t_max, SCHED.t_min, rtol=1e-10, atol=1e-10)
    torch.set_num_threads(threads)
    return x, ref


def error_curve(x, ref, heuristic, solver, order, opts):
    """(NFE, mean L2 error) over NFE 4-40 (Heun: 2-20 steps, whatever NFE they take, from 4 up)."""
    nfes, errs = [], []
    for n in (range(2, 21) if solver == "heun" else NFE):
        sampler = Sampler(Den(), HEURISTICS[heuristic](SCHED, n), solver=solver, order=order, **opts)
        if sampler.nfe >= 4:
            nfes.append(sampler.nfe)
            errs.append(float((sampler(x) - ref).norm(dim=1).mean()))
    return nfes, np.array(errs)


def growth(errs: np.ndarray) -> np.ndarray:
    """err(n) / min over all smaller NFE of err."""
    return errs[1:] / np.minimum.accumulate(errs)[:-1]


@pytest.mark.parametrize("heuristic", list(HEURISTICS))
@pytest.mark.parametrize("solver,order,opts", SOLVERS,
                         ids=[f"{s}{o}{''.join(f'-{v}' for v in kw.values())}" for s, o, kw in SOLVERS])
def test_error_does_not_grow_with_nfe(problem, heuristic, solver, order, opts):
    x, ref = problem
    nfes, errs = error_curve(x, ref, heuristic, solver, order, opts)
    g = growth(errs)
    worst = int(np.argmax(g))
    assert g[worst] <= GROWTH, (f"{solver}-{order} on {heuristic}: error {errs[worst + 1]:.3g} at NFE {nfes[worst + 1]} is "
                             f"{g[worst]:.2f}x the best at smaller NFE; errors {np.array2string(errs, precision=3)}")


def test_the_diffusers_rule_is_kept_and_is_what_blew_up(problem):
    x, ref = problem

    def err(n, solver="dpmpp", order=3, grid="uniform_t", **kw):
        sampler = Sampler(Den(), HEURISTICS[grid](SCHED, n), solver, order, **kw)
        return float((sampler(x) - ref).norm(dim=1).mean()), sampler.nfe

    assert err(15, order_rule="diffusers")[0] > 5 * err(12, order_rule="diffusers")[0]  # the under-15-steps rule
    assert err(15)[0] < err(12)[0]
    # Heun corrected its last long step to sigma_min: errors 8-59 at NFE 4; now sane at NFE 4 on every grid
    assert err(2, "heun", 2, order_rule="diffusers")[0] > 5
    for grid in HEURISTICS:
        e, nfe = next(v for v in (err(n, "heun", 2, grid) for n in range(2, 6)) if v[1] >= 4)
        assert nfe <= 5 and e < 1, (grid, nfe, e)
