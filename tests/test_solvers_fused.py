"""The prediction conversion fused into the update (issue 18.1, SPEC_multistep): the loop keeps a model's raw output
m, the sample it saw and its (p, q) row, and the next update forms D = p src + q m' (guidance included) in its own
pass. Checked against the unfused loop (convert, then update: `Sampler.fuse = False`) for every solver, every
prediction type and EDM preconditioning, with and without classifier-free guidance, in float64 to 1e-12; the
gradients in the timesteps (LD3's path, rematerialised or not), x_T and the network's weights; and that the fused
path makes no conversion pass of its own."""
import importlib
import itertools

import pytest
import torch

import tdiff
from tdiff.schedules import VPLinear
from tdiff.solvers import Sampler, build_program, sample
from tdiff.solvers.program import Update
from tdiff.timesteps.remat import sample_remat

sample_mod = importlib.import_module("tdiff.solvers.sample")
unipc_mod = importlib.import_module("tdiff.solvers.unipc")
ipndm_mod = importlib.import_module("tdiff.solvers.ipndm")
buffers_mod = importlib.import_module("tdiff.solvers.buffers")

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = VPLinear()
SOLVERS = [("dpmpp", 1, {}), ("dpmpp", 2, {}), ("dpmpp", 3, {}), ("dpmpp", 2, {"solver_type": "heun"}),
           ("dpmpp_ab", 2, {}), ("dpmpp_ab", 3, {}), ("dpmsolver", 1, {}), ("dpmsolver", 2, {}),
           ("dpmsolver", 3, {}), ("dpmpp_sde", 1, {}), ("dpmpp_sde", 2, {}), ("dpmpp_sde", 3, {}),
           ("dpmsolver_sde", 1, {}), ("dpmsolver_sde", 2, {}), ("unipc", 1, {}), ("unipc", 2, {}), ("unipc", 3, {}),
           ("unipc", 3, {"variant": "bh1"}), ("unipc", 2, {"final_corrector": True}), ("ipndm", 1, {}),
           ("ipndm", 2, {}), ("ipndm", 3, {}), ("ipndm", 4, {}), ("euler", 1, {}), ("ddim", 1, {}),
           ("ddim", 1, {"eta": 0.5}), ("ddpm", 1, {}), ("heun", 2, {}), ("heun", 2, {"order_rule": "diffusers"}),
           ("heun", 2, {"s_churn": 10.0})]
PREDICTIONS = [("eps", None), ("v", None), ("flow", None), ("x0", None), ("eps", "edm")]


class Net(torch.nn.Module):
    """A smooth nonlinear 'network' of (x, t_net)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3, dtype=torch.float64)
        torch.nn.init.normal_(self.lin.weight, std=0.4, generator=torch.Generator().manual_seed(0))

    def forward(self, x, t_net, y=None):
        return torch.tanh(self.lin(x) + 1e-3 * t_net.view(-1, 1))


class Guided:
    """A raw denoiser returning a (cond, uncond) pair, for the loop's fused classifier-free guidance."""

    def __init__(self, den):
        self.den, self.schedule = den, den.schedule
        self.prediction, self.precond, self.clip_x0 = den.prediction, den.precond, den.clip_x0

    def network_output(self, x, t):
        m = self.den.network_output(x, t)
        return m, 0.6 * m + 0.05 * torch.sin(x)

    def conversion(self, t, target="x0"):
        return self.den.conversion(t, target)

    def __call__(self, x, t):
        return self.den(x, t)


def _denoiser(prediction, precond, guided, net=None, **kw):
    den = tdiff.denoiser(net or Net(), SCHED, prediction=prediction, precond=precond, **kw)
    return Guided(den) if guided else den


TS = torch.linspace(0.95, 0.02, 7, dtype=torch.float64)
X = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class Counts:
    """Counts the loop's separate conversion passes and its fused converting updates."""

    def __init__(self, monkeypatch):
        self.converts = self.fused = 0
        convert, update = sample_mod.convert, sample_mod.multistep_update

        def counted_convert(*a, **k):
            self.converts += 1
            return convert(*a, **k)

        def counted_update(*a, **k):
            self.fused += k.get("convert") is not None or k.get("uncond") is not None
            return update(*a, **k)

        monkeypatch.setattr(sample_mod, "convert", counted_convert)
        monkeypatch.setattr(sample_mod, "multistep_update", counted_update)
        kernels = sample_mod._kernels

        def counted_kernels(x):  # the compiled eager loop calls the C++ kernels directly
            plain, fused = kernels(x)

            def counted_fused(*a):
                self.fused += a[3] is not None or a[6] is not None  # uncond, convert
                return fused(*a)

            return plain, None if fused is None else counted_fused

        monkeypatch.setattr(sample_mod, "_kernels", counted_kernels)
        counts, pool_class = self, sample_mod.BufferPool

        class CountedPool(pool_class):  # the compiled loop's out= updates (in place, or into pooled buffers)
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                for attr in ("kernel", "out_kernel"):
                    kernel = getattr(self, attr)
                    if kernel is not None:
                        setattr(self, attr, lambda *a, _kernel=kernel: counts.count_out(_kernel, a))

        monkeypatch.setattr(sample_mod, "BufferPool", CountedPool)

    def count_out(self, kernel, a):
        self.fused += a[3] is not None or a[6] is not None  # uncond, convert
        return kernel(*a)


def _run(den, solver, order, opts, fuse, guidance):
    s = Sampler(den, TS, solver=solver, order=order, guidance=guidance, **opts)
    s.fuse = fuse
    return s(X, generator=torch.Generator().manual_seed(3)), s.nfe


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("prediction,precond", PREDICTIONS, ids=[p + ("-edm" if c else "") for p, c in PREDICTIONS])
def test_fused_conversion_equals_the_unfused_loop_for_every_solver(monkeypatch, prediction, precond, guided):
    den = _denoiser(prediction, precond, guided)
    guidance = 2.5 if guided else None
    for solver, order, opts in SOLVERS:
        # an x0 network's output is the data prediction as is; dpmsolver's noise-prediction form and iPNDM's slopes
        # (the eps prediction) convert it to eps
        identity = prediction == "x0" and precond is None and not solver.startswith(("dpmsolver", "ipndm"))
        counts = Counts(monkeypatch)
        with torch.no_grad():
            fused, nfe = _run(den, solver, order, opts, True, guidance)
        # every model output is converted (and guided) inside the update that first reads it, and nowhere else
        assert counts.converts == 0, (solver, order, opts)
        assert counts.fused == (0 if identity and not guided else nfe), (solver, order, opts)
        unfused, _ = _run(den, solver, order, opts, False, guidance)
        assert counts.converts == (0 if identity else nfe * (2 if guided else 1)), (solver, order, opts)
        torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-12, msg=f"{solver}{order} {opts}")


def test_a_clamped_or_doubly_used_output_is_converted_unfused(monkeypatch):
    """clip_x0 is not affine, and diffusers' DDIM with use_clipped_model_output=False and a clamp reads the output
    as clamped x0 and as raw eps: both convert in a pass of their own, as before, and still equal the unfused loop.
    Without a clamp, that DDIM is built in its one-target form (the same step) and fuses."""
    den = _denoiser("eps", None, False, clip_x0=0.5)
    for opts, passes in (({}, 1), ({"use_clipped_model_output": False}, 2)):
        counts = Counts(monkeypatch)
        fused, nfe = _run(den, "ddim", 1, opts, True, None)
        assert counts.fused == 0 and counts.converts == nfe * passes
        torch.testing.assert_close(fused, _run(den, "ddim", 1, opts, False, None)[0], rtol=0, atol=0)
    den = _denoiser("eps", None, False)
    counts = Counts(monkeypatch)
    opts = {"use_clipped_model_output": False, "eta": 0.5}
    fused, nfe = _run(den, "ddim", 1, opts, True, None)
    assert counts.fused == nfe and counts.converts == 0
    # against the two-target program itself (eps from the raw output), run unfused
    two = Sampler(den, TS, solver="ddim", **opts)
    two.program = build_program(SCHED, TS, "ddim", **opts)
    two._conversion, two._plan = sample_mod._conversion_table(den, SCHED, two.program)
    assert any(e.extra for e in two.program.evals())
    two.fuse = False
    ref = two(X, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)
    den = _denoiser("v", None, False, clip_x0=0.5)
    fused = _run(den, "unipc", 3, {}, True, None)[0]
    torch.testing.assert_close(fused, _run(den, "unipc", 3, {}, False, None)[0], rtol=0, atol=0)


def _with_builder(monkeypatch, solver, **fixed):
    """Sampler's spec of `solver` with builder keywords fixed (the forms the public options do not expose)."""
    spec = sample_mod.SPECS[solver]
    build = {"unipc": unipc_mod.build_unipc, "ipndm": ipndm_mod.build_ipndm}[solver]
    monkeypatch.setitem(sample_mod.SPECS, solver, sample_mod.SolverSpec(
        lambda g, cond, order, schedule, **o: build(g, cond, order, **{**o, **fixed}), spec.orders,
        spec.default_order, spec.options))


def test_unipc_folded_into_one_update_per_evaluation_equals_the_unfolded_program(monkeypatch):
    """The corrector folded into the next predictor (one fused update per model evaluation, the state being the
    predicted sample) equals the program with the corrected sample as a buffer of its own, in float64 to 1e-12,
    over orders, variants, order rules, final sigmas, disabled and final correctors."""
    den = _denoiser("eps", None, False)
    configs = [dict(order=o, order_rule=r, final_sigmas_type=f, **extra)
               for o in (1, 2, 3) for r in ("stable", "diffusers") for f in ("sigma_min", "zero")
               for extra in ({}, {"use_corrector": False}, {"disable_corrector": [1, 3]}, {"final_corrector": True},
                             {"variant": "bh1"}) if not (f == "zero" and extra.get("final_corrector"))]
    ts = torch.linspace(0.99, 0.001, 11, dtype=torch.float64)
    folded = []
    for fold in (True, False):
        _with_builder(monkeypatch, "unipc", fold=fold)
        folded.append([Sampler(den, ts, solver="unipc", **c) for c in configs])
    for c, a, b in zip(configs, *folded):
        updates = sum(isinstance(i, Update) for step in a.program.steps for i in step)
        assert updates == a.nfe, c
        torch.testing.assert_close(a(X), b(X), rtol=1e-12, atol=1e-12, msg=str(c))


def test_ipndm_slopes_are_the_eps_prediction(monkeypatch):
    """iPNDM's slope (x - alpha D)/sigma is the eps prediction: read off the raw output in the fused update (one
    per evaluation), it equals the slopes formed from D in an update of their own, for every prediction type. With a
    clamped x0 (clip_x0) the slopes come from the clamped D, so order 1 is exactly DDIM with the clamp."""
    for prediction, precond in PREDICTIONS:
        den = _denoiser(prediction, precond, False)
        for order in (1, 2, 3, 4):
            for rule in ("stable", "diffusers"):
                _with_builder(monkeypatch, "ipndm", slopes="eps")
                eps = Sampler(den, TS, solver="ipndm", order=order, order_rule=rule)
                assert all(e.target == "eps" for e in eps.program.evals())
                _with_builder(monkeypatch, "ipndm", slopes="x0")
                x0 = Sampler(den, TS, solver="ipndm", order=order, order_rule=rule)
                torch.testing.assert_close(eps(X), x0(X), rtol=1e-12, atol=1e-12, msg=f"{prediction} {order} {rule}")
    monkeypatch.undo()
    den = _denoiser("eps", None, False, clip_x0=0.2)
    clamped = Sampler(den, TS, solver="ipndm", order=1)
    assert all(e.target == "x0" for e in clamped.program.evals())
    ddim = Sampler(den, TS, solver="ddim")
    torch.testing.assert_close(clamped(X), ddim(X), rtol=1e-12, atol=1e-12)
    # the clamp binds here: the unclamped slopes would differ
    assert not torch.allclose(Sampler(_denoiser("eps", None, False), TS, solver="ipndm", order=1)(X), ddim(X))


GRAD_SOLVERS = [("dpmpp", 3, {}), ("dpmsolver", 2, {}), ("unipc", 3, {}), ("ipndm", 4, {}), ("heun", 2, {}),
                ("ddim", 1, {})]


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("prediction,precond", [("eps", None), ("v", None), ("eps", "edm")])
def test_fused_gradients_equal_the_unfused_loop(monkeypatch, prediction, precond, guided):
    """d/d timesteps (every coefficient and (p, q) row), d/d x_T and d/d the network's weights."""
    net = Net()
    den = _denoiser(prediction, precond, guided, net=net)
    w = torch.randn(X.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for solver, order, opts in GRAD_SOLVERS:
        grads = []
        for fuse in (True, False):
            monkeypatch.setattr(Sampler, "fuse", fuse)
            ts, x = TS.clone().requires_grad_(True), X.clone().requires_grad_(True)
            out = sample(den, x, ts, solver=solver, order=order, guidance=2.5 if guided else None, **opts)
            grads.append(torch.autograd.grad((out * w).sum(), [ts, x, *net.parameters()]))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"{solver}{order}")


def test_ld3_rematerialised_gradients_equal_the_unfused_loop(monkeypatch):
    """LD3's objective differentiates the timesteps and the decoupled network times through sample_remat."""
    den = _denoiser("eps", None, False)
    cond = TS[:-1] * 0.97
    grads = []
    for fuse in (True, False):
        monkeypatch.setattr(Sampler, "fuse", fuse)
        ts, tc = TS.clone().requires_grad_(True), cond.clone().requires_grad_(True)
        out = sample_remat(den, X, ts, solver="unipc", order=2, timesteps_cond=tc)
        grads.append(torch.autograd.grad(out.square().sum(), [ts, tc]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_timesteps_through_the_fused_conversion():
    den = _denoiser("v", None, True)
    x = X[:2]

    def f(ts):
        return sample(den, x, ts, solver="dpmpp", order=2, guidance=1.5)

    assert torch.autograd.gradcheck(f, (torch.linspace(0.9, 0.1, 4, dtype=torch.float64).requires_grad_(True),))


def test_prepared_network_calls_equal_the_denoisers_own(monkeypatch):
    """A tdiff Denoiser's network times, EDM input scaling and model-dtype cast are prepared once per run
    (Denoiser.network_calls); the loop then calls them directly. Same outputs and same network times as the
    per-call path (network_output, which a denoiser without network_calls takes), on a DiscreteVP schedule (index
    times) with a float32 network fed float64 samples."""
    from tdiff.schedules import DiscreteVP

    sched = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    seen = []

    class Net32(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, t_net, y=None):
            assert x.dtype == torch.float32
            seen.append(t_net.clone())
            return torch.tanh(self.lin(x) + 1e-3 * t_net.view(-1, 1).float())

    ts = torch.linspace(0.95, 0.05, 6, dtype=torch.float64)
    for precond in (None, "edm"):
        den = tdiff.denoiser(Net32(), sched, prediction="eps", precond=precond)
        calls = Sampler(den, ts, solver="unipc", order=2)
        with torch.no_grad():
            direct = calls(X)
            times, seen[:] = list(seen), []
            monkeypatch.setattr(type(den), "network_calls", None, raising=True)
            plain = Sampler(den, ts, solver="unipc", order=2)(X)
            monkeypatch.undo()
        torch.testing.assert_close(direct, plain, rtol=0, atol=0)
        assert len(times) == len(seen) == calls.nfe
        for a, b in zip(times, seen):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        seen.clear()


def test_sample_compiles_into_one_graph_with_the_registered_op():
    """torch.compile of a Sampler's run (tables prepared): one graph (fullgraph), the fused op in it."""
    den = _denoiser("eps", None, False)
    sampler = Sampler(den, TS[::2], solver="dpmpp", order=2)
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    with torch.no_grad():
        ref = sampler(X)
        out = torch.compile(sampler, fullgraph=True, backend=backend)(X)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert any("multistep_update_convert" in name for name in seen), sorted(seen)


@pytest.mark.parametrize("backend", ["triton", "cpp"])
def test_fused_loop_on_each_backend_matches_the_reference(monkeypatch, backend):
    """The converting update on every backend, through the loop (eps and v, with and without guidance)."""
    for prediction, guided in (("eps", False), ("v", True)):
        den = _denoiser(prediction, None, guided)
        guidance = 2.5 if guided else None
        monkeypatch.setenv("TDIFF_BACKEND", "torch")
        ref = _run(den, "unipc", 3, {}, True, guidance)[0]
        monkeypatch.setenv("TDIFF_BACKEND", backend)
        counts = Counts(monkeypatch)
        out, nfe = _run(den, "unipc", 3, {}, True, guidance)
        assert counts.fused == nfe and counts.converts == 0
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _both_loops(den, solver, order, opts, guidance, x):
    """(compiled loop, interpreted loop) outputs under no_grad, and whether the compiled closures were used."""
    out = []
    for compiled in (True, False):
        s = Sampler(den, TS, solver=solver, order=order, guidance=guidance, **opts)
        s.compiled_loop = compiled
        with torch.no_grad():
            out.append(s(x, generator=torch.Generator().manual_seed(3)))
        if compiled:
            used = bool(s._compiled)
    return out[0], out[1], used


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("variant", ["plain", "cfg", "clip"])
def test_compiled_loop_is_bit_identical_to_the_interpreter(prediction, variant):
    """Execution.compile (eager, no grad: closures calling the C++ kernels) against the instruction interpreter,
    for every solver; a clamp (clip_x0) mixes interpreted evaluations with compiled updates."""
    den = _denoiser(prediction, None, variant == "cfg", clip_x0=1.0 if variant == "clip" else None)
    for solver, order, opts in SOLVERS:
        fast, slow, used = _both_loops(den, solver, order, opts, 2.0 if variant == "cfg" else None, X)
        assert used, (solver, order, opts)
        assert torch.equal(fast, slow), (solver, order, opts, (fast - slow).abs().max())


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_compiled_loop_with_recycled_buffers_is_bit_identical(guided):
    """From buffers.MIN_BYTES the compiled updates write into the BufferPool's recycled buffers."""
    x = torch.randn(45000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert x.numel() * x.element_size() >= buffers_mod.MIN_BYTES
    den = _denoiser("eps", None, guided)
    for solver, order, opts in [("dpmpp", 2, {}), ("dpmpp_sde", 2, {}), ("unipc", 3, {}), ("ipndm", 4, {}),
                                ("heun", 2, {"order_rule": "diffusers"})]:
        fast, slow, used = _both_loops(den, solver, order, opts, 1.5 if guided else None, x)
        assert used and torch.equal(fast, slow), (solver, order)


def test_prepared_call_checks_each_output_once_and_calls_the_model_once():
    """A tdiff Denoiser's prepared call (Denoiser.network_calls) returns a tensor shaped and typed like x as is and
    fixes anything else from the same output (learned-sigma channels dropped, the dtype cast): one model call per
    evaluation, bit-identical to the interpreter; a wrong shape is an error naming it, in the compiled loop too."""
    calls = []

    def model(x, t_net, y=None):
        calls.append(1)
        out = torch.tanh(x + 1e-3 * t_net.view(-1, 1))
        if mode == "learned-sigma":
            return torch.cat([out, 7 * out], dim=1)
        if mode == "float32":
            return out.float()
        return out[:, :2] if mode == "bad" else out

    for mode in ("plain", "learned-sigma", "float32"):
        den = tdiff.denoiser(model, SCHED, prediction="eps")
        outs, used = [], []
        for compiled in (True, False):
            s = Sampler(den, TS, solver="unipc", order=3)
            s.compiled_loop = compiled
            calls.clear()
            with torch.no_grad():
                outs.append(s(X))
            assert len(calls) == s.nfe, (mode, compiled, len(calls))
            used.append(bool(s._compiled))
        assert used == [True, False] and torch.equal(outs[0], outs[1]), mode
    mode = "bad"
    with torch.no_grad(), pytest.raises(ValueError, match=r"returned shape \(4, 2\)"):
        Sampler(tdiff.denoiser(model, SCHED, prediction="eps"), TS, solver="dpmpp", order=2)(X)


def test_recycled_buffers_never_overwrite_what_the_model_keeps(monkeypatch):
    """The compiled loop's evaluation + update closures hand the buffers they wrote back to the pool with two
    checks only (BufferPool.recycle): a model (behind a tdiff Denoiser, so the fused conversion runs) that keeps its
    inputs, or only views of them, must still see them unchanged, and the result equals the loop without
    recycling."""
    x = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kept = []

    def keeping(x, t_net, y=None):
        kept.append((x, x.clone()) if views is False else (x[1:], x[1:].clone()))
        return torch.tanh(x + 1e-3 * t_net.view(-1, 1))

    den = tdiff.denoiser(keeping, SCHED, prediction="eps")
    for (solver, order, opts), views in itertools.product(
            [("dpmpp", 3, {}), ("unipc", 3, {}), ("ipndm", 4, {}), ("heun", 2, {})], (False, True)):
        monkeypatch.setattr(buffers_mod, "MIN_BYTES", 1 << 40)
        with torch.no_grad():
            want = Sampler(den, TS, solver=solver, order=order, **opts)(x)
        monkeypatch.setattr(buffers_mod, "MIN_BYTES", 0)
        kept.clear()
        with torch.no_grad():
            got = Sampler(den, TS, solver=solver, order=order, **opts)(x)
        assert torch.equal(got, want), solver
        assert all(torch.equal(seen, copy) for seen, copy in kept), f"{solver} (views {views}): a kept sample changed"


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "cfg"])
def test_compiled_closures_are_shared_by_a_structure_and_keep_nothing_of_a_run(guided):
    """Execution.compile caches its closures on the program's Structure: two Samplers of the same structure with
    other time steps, schedules and models (one state large enough for the BufferPool) use the same list, each
    bit-identical to the interpreter; the cache keeps no model, row or tensor of a run alive."""
    import gc
    import weakref

    from tdiff.schedules import VPCosine

    big = torch.randn(45000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    runs = [(VPLinear(), torch.linspace(0.95, 0.02, 7, dtype=torch.float64), X, 0.4),
            (VPCosine(), torch.linspace(0.9, 0.05, 7, dtype=torch.float64), X, 0.7),
            (SCHED, torch.linspace(0.97, 0.03, 7, dtype=torch.float64), big, 0.2),  # pooled buffers
            (VPCosine(), torch.linspace(0.93, 0.04, 7, dtype=torch.float64), big, 0.5)]
    for solver, order, opts in [("dpmpp", 2, {"order_rule": "diffusers"}), ("unipc", 3, {"order_rule": "diffusers"}),
                                ("heun", 2, {"order_rule": "diffusers"})]:
        lists, refs, structs = [], [], set()
        for schedule, ts, x, std in runs:
            net = Net()
            torch.nn.init.normal_(net.lin.weight, std=std, generator=torch.Generator().manual_seed(1))
            den = tdiff.denoiser(net, schedule, prediction="eps")
            den = Guided(den) if guided else den
            out = []
            for compiled in (True, False):
                s = Sampler(den, ts, solver=solver, order=order, guidance=1.5 if guided else None, **opts)
                s.compiled_loop = compiled
                with torch.no_grad():
                    out.append(s(x))
                if compiled:
                    assert len(s._compiled) == 1, (solver, s._compiled)
                    lists.append(next(iter(s._compiled.values()))[-1])
                    structs.add(id(s.program.structure))
                    rows = next(iter(s._rows.values()))
                    refs += [weakref.ref(net), weakref.ref(rows[0][0]), weakref.ref(out[0])]
            assert torch.equal(out[0], out[1]), (solver, schedule, (out[0] - out[1]).abs().max())
            del s, den, net, rows, out
        # one structure; one list per key (the pool's buffers or not), built once and shared
        assert len(structs) == 1 and lists[1] is lists[0] and lists[3] is lists[2] and lists[2] is not lists[0], solver
        gc.collect()
        assert all(r() is None for r in refs), solver  # the cached closures hold nothing of the runs
