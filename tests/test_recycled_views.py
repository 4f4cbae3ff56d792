"""Row views recycled between sampling runs (tdiff.recycled_views): a later run never overwrites values that a
live Sampler, a kept model time or an autograd graph still reads, and recycled runs equal fresh ones exactly."""
import importlib

import torch

import tdiff
from tdiff.schedules import DiscreteVP

S = importlib.import_module("tdiff.solvers.sample")
SCHEDULE = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def _grid(end: float) -> torch.Tensor:
    return torch.linspace(1.0, end, 9, dtype=torch.float64)


def test_recycled_runs_leave_live_tables_alone_and_match_fresh_ones():
    g = torch.Generator().manual_seed(0)
    eps, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    kept = []  # a model that keeps every network time it was given

    def model(x_t, t, y=None):
        kept.append(t)
        return eps * (1 + 0.1 * x_t) + t.view(-1, 1, 1, 1) / 1000

    den = tdiff.denoiser(model, SCHEDULE, prediction="eps")
    with torch.no_grad():
        for solver in ("heun", "dpmpp", "ipndm"):
            a = S.Sampler(den, _grid(1e-3), solver=solver)
            first = a(x)
            rows = [r.clone() for r in a._rows[next(iter(a._rows))][0]]
            times = [t.clone() for t in kept]
            # same layout, other values: the live Sampler's views and the model's kept times must not change
            other = tdiff.sample(den, x, _grid(3e-2), solver=solver)
            assert all(torch.equal(r, s) for r, s in zip(rows, a._rows[next(iter(a._rows))][0]))
            assert all(torch.equal(t, s) for t, s in zip(times, kept[:len(times)]))
            assert torch.equal(a(x), first)
            kept.clear()
            del a
            # nothing holds the views now: runs recycle them and still equal runs on fresh ones
            recycled = [tdiff.sample(den, x, _grid(end), solver=solver) for end in (1e-3, 3e-2, 1e-3)]
            S._RECYCLED._entries.clear()
            tdiff.denoisers._TIME_VIEWS._entries.clear()
            fresh = tdiff.sample(den, x, _grid(3e-2), solver=solver)
            assert torch.equal(recycled[0], first) and torch.equal(recycled[2], first)
            assert torch.equal(recycled[1], fresh) and torch.equal(other, fresh)
            kept.clear()


def test_a_graph_is_not_overwritten_by_later_no_grad_runs():
    g = torch.Generator().manual_seed(1)
    eps, x = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    den = tdiff.denoiser(lambda x_t, t, y=None: eps * x_t, SCHEDULE, prediction="eps")
    x_a = x.clone().requires_grad_(True)
    out = tdiff.sample(den, x_a, _grid(1e-3), solver="heun")  # autograd on: its views are neither kept nor reused
    with torch.no_grad():
        tdiff.sample(den, x, _grid(3e-2), solver="heun")
    out.sum().backward()
    x_b = x.clone().requires_grad_(True)
    tdiff.sample(den, x_b, _grid(1e-3), solver="heun").sum().backward()
    assert torch.equal(x_a.grad, x_b.grad)


def test_inference_mode_and_no_grad_runs_alternate():
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    den = tdiff.denoiser(lambda x_t, t, y=None: 0.5 * x_t, SCHEDULE, prediction="eps")
    S._RECYCLED._entries.clear()
    tdiff.denoisers._TIME_VIEWS._entries.clear()
    outs = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode, torch.no_grad):
        with mode():
            outs.append(tdiff.sample(den, x, _grid(1e-3), solver="heun"))
    assert all(torch.equal(o, outs[0]) for o in outs)
