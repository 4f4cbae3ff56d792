"""tdiff::noisy_sample against its reference on every backend that runs here, plus opcheck, gradcheck, compile."""
import math

import pytest
import torch

from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.noisy_sample import coefficients_reference, noisy_sample, noisy_sample_reference

BACKENDS = ["torch", "triton", "cpp"]  # CI builds tdiff._C; a missing kernel must fail, not skip
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}

SCHEDULES = {
    "vp_linear": S.VPLinear(),
    "vp_cosine": S.VPCosine(),
    "discrete": S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000)),
    "ve": S.VE(),
    "edm": S.EDM(),
    "flow": S.RectifiedFlow(),
}


def _times(name, b):
    sched = SCHEDULES[name]
    return sched.t_min + (sched.t_max - sched.t_min) * torch.rand(b, dtype=torch.float64)


def test_extension_is_built():
    # CI builds the extension; if this fails the cpp backend silently drops out of every other test.
    assert dispatch.cpp_has("noisy_sample_cpu"), "tdiff._C was not built or lacks tdiff::noisy_sample_cpu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sched_name", list(SCHEDULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (3, 5, 7, 9)])
def test_forward_matches_reference(monkeypatch, backend, sched_name, dtype, shape):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    sched = SCHEDULES[sched_name]
    x0 = torch.randn(shape).to(dtype)
    eps = torch.randn(shape).to(dtype)
    t = _times(sched_name, shape[0])
    xt, net_in = noisy_sample(x0, eps, t, sched, write_input=True, precond_sigma_data=0.5)
    spec = sched.kernel_spec()
    ref_xt, ref_in, _ = noisy_sample_reference(x0, eps, t, spec.kind, list(spec.params), spec.table, 0.5, [], 0, True)
    torch.testing.assert_close(xt, ref_xt, **TOL[dtype])
    torch.testing.assert_close(net_in, ref_in, **TOL[dtype])
    # and against the schedule's closed form directly, in float64
    a = sched.alpha(t).view(-1, 1, 1, 1)
    s = sched.sigma(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(xt.double(), a * x0.double() + s * eps.double(), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("on", ["input", "mean"])
@pytest.mark.parametrize("source", ["sigma", "time"])
def test_fdm_factor(monkeypatch, backend, on, source):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    sched = S.EDM()
    fdm = S.FDMMomentum(m=2.0, source=source, on=on, u_min=0.002, u_max=80.0)
    x0, eps = torch.randn(5, 2, 3, 3, dtype=torch.float64), torch.randn(5, 2, 3, 3, dtype=torch.float64)
    t = torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0], dtype=torch.float64)
    xt, net_in = noisy_sample(x0, eps, t, sched, fdm=fdm, write_input=True, precond_sigma_data=0.5)
    # the paper's formula, written out independently: f = e^{-mB}(1+mB), B(t') = b_min t' + b_d t'^2/2
    tp = (t - 0.002) / (80.0 - 0.002)
    mb = 2.0 * (0.1 * tp + 0.5 * 19.9 * tp * tp)
    f = (torch.exp(-mb) * (1 + mb)).view(-1, 1, 1, 1)
    sig = t.view(-1, 1, 1, 1)
    c_in = 1 / torch.sqrt(sig**2 + 0.25)
    if on == "input":
        exp_xt, exp_in = x0 + sig * eps, c_in * f * (x0 + sig * eps)
    else:
        exp_xt = f * x0 + sig * eps
        exp_in = c_in * exp_xt
    torch.testing.assert_close(xt, exp_xt)
    torch.testing.assert_close(net_in, exp_in)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    base = torch.randn(6, 8, 5, 3)
    x0 = base.permute(0, 3, 2, 1)  # non-contiguous view
    eps = torch.randn(6, 5, 3, 8).permute(0, 2, 1, 3)
    assert not x0.is_contiguous() and not eps.is_contiguous()
    t = torch.rand(6) * 0.9 + 0.05
    sched = S.VPLinear()
    xt, _ = noisy_sample(x0, eps, t, sched)
    exp = sched.alpha(t).float().view(-1, 1, 1, 1) * x0 + sched.sigma(t).float().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(xt, exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_matches_autograd_of_reference(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    sched = S.VPCosine()
    x0 = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    t = torch.rand(3, dtype=torch.float64) * 0.8 + 0.1
    xt, net_in = noisy_sample(x0, eps, t, sched, write_input=True, precond_sigma_data=1.0)
    w1, w2 = torch.randn_like(xt), torch.randn_like(xt)
    g = torch.autograd.grad((xt * w1).sum() + (net_in * w2).sum(), (x0, eps))
    a, s = sched.alpha(t).view(-1, 1, 1, 1), sched.sigma(t).view(-1, 1, 1, 1)
    c = 1 / torch.sqrt(s**2 + a**2)
    torch.testing.assert_close(g[0], a * (w1 + c * w2))
    torch.testing.assert_close(g[1], s * (w1 + c * w2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write_input", [False, True])
def test_gradcheck(monkeypatch, backend, write_input):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    sched = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000))
    spec = sched.kernel_spec()
    x0 = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.2, 0.7], dtype=torch.float64)

    def f(x0, eps):
        xt, net_in, _ = torch.ops.tdiff.noisy_sample(x0, eps, t, spec.kind, list(spec.params), spec.table, 0.5, [],
                                                     0, write_input)
        return (xt, net_in) if write_input else xt

    # fast_mode under the interpreter: each Triton launch costs milliseconds there
    assert torch.autograd.gradcheck(f, (x0, eps), fast_mode=backend == "triton")


@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_torch_compile_fullgraph_every_schedule(sched_name):
    # the first call traces: kernel_table must not mutate module state, check=True must not branch on data
    torch._dynamo.reset()
    sched = SCHEDULES[sched_name]

    def step(x0, eps, t):
        xt, net_in = noisy_sample(x0, eps, t, sched, write_input=True, precond_sigma_data=1.0)
        return (xt * 2 + net_in).sum()

    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), _times(sched_name, 4)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x0, eps, t), step(x0, eps, t))
    with pytest.raises(RuntimeError, match="t must be finite and inside the domain"):
        compiled(x0, eps, torch.tensor([0.5, math.nan, 0.5, 0.5], dtype=torch.float64))


def test_torch_compile_inductor():
    sched = S.VPLinear()

    def step(x0, eps, t):
        xt, net_in = noisy_sample(x0, eps, t, sched, write_input=True, precond_sigma_data=1.0, check=False)
        return (xt * 2 + net_in).sum()

    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.rand(4) * 0.9 + 0.05
    torch.testing.assert_close(torch.compile(step, fullgraph=True)(x0, eps, t), step(x0, eps, t))


def test_coefficients_match_schedules_in_every_backend(monkeypatch):
    # The kernels re-express schedules.py's formulas; check the coefficient rows directly.
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    for name, sched in SCHEDULES.items():
        tt = t * (sched.t_max - sched.t_min) + sched.t_min if name == "edm" else t
        spec = sched.kernel_spec()
        ref = coefficients_reference(tt, spec.kind, list(spec.params), spec.table, -1.0, [], 0)
        for backend in BACKENDS:
            monkeypatch.setenv("TDIFF_BACKEND", backend)
            _, _, coefs = torch.ops.tdiff.noisy_sample(torch.zeros(3, 2, dtype=torch.float64),
                                                       torch.zeros(3, 2, dtype=torch.float64), tt, spec.kind,
                                                       list(spec.params), spec.table, -1.0, [], 0, False)
            torch.testing.assert_close(coefs, ref, msg=f"{name}/{backend}")
            torch.testing.assert_close(coefs[:, 0], sched.alpha(tt))
            torch.testing.assert_close(coefs[:, 1], sched.sigma(tt))


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
def test_bad_shapes_dtypes_devices_and_nan():
    sched = S.VPLinear()
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="eps must have the shape"):
        noisy_sample(x0, torch.randn(2, 4), torch.rand(2), sched)
    with pytest.raises(ValueError, match="eps must have the dtype"):
        noisy_sample(x0, torch.randn(2, 3, dtype=torch.float64), torch.rand(2), sched)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        noisy_sample(x0, torch.randn(2, 3), torch.rand(3), sched)
    with pytest.raises(ValueError, match="x0 must be float32"):
        noisy_sample(x0.long(), torch.randn(2, 3).long(), torch.rand(2), sched)
    with pytest.raises(ValueError, match=r"t must be finite and inside the domain .* for samples \[1\]"):
        noisy_sample(x0, torch.randn(2, 3), torch.tensor([0.5, math.nan]), sched)
    with pytest.raises(TypeError, match="eps must be a tensor"):
        noisy_sample(x0, None, torch.rand(2), sched)
    with pytest.raises(ValueError, match="device"):
        noisy_sample(x0, torch.randn(2, 3, device="meta"), torch.rand(2), sched)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sched_name", list(SCHEDULES))
def test_times_outside_the_domain_are_refused(monkeypatch, backend, sched_name):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    sched = SCHEDULES[sched_name]
    x0, eps = torch.randn(2, 3), torch.randn(2, 3)
    for bad in (2.0, -1.0, math.inf, -math.inf, math.nan) if sched_name != "edm" else (-1.0, math.inf, math.nan):
        t = torch.tensor([0.5 * (sched.t_min + sched.t_max), bad], dtype=torch.float64)
        with pytest.raises(ValueError, match=r"inside the domain .* for samples \[1\]"):
            noisy_sample(x0, eps, t, sched)
    noisy_sample(x0, eps, torch.tensor([sched.t_min, sched.t_max], dtype=torch.float64), sched)  # the ends pass


def test_registered_cpu_ops_validate_their_inputs():
    ops = torch.ops.tdiff
    spec = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 50)).kernel_spec()
    x0 = torch.randn(2, 3)
    with pytest.raises(ValueError, match="coefs must have shape"):
        ops.noisy_sample_backward_cpu(torch.randn(4, 4096), torch.empty(0), torch.rand(1, 3))
    with pytest.raises(ValueError, match="grad_in must have the shape"):
        ops.noisy_sample_backward_cpu(torch.randn(2, 3), torch.randn(2, 2), torch.rand(2, 3))
    with pytest.raises(ValueError, match="table"):
        ops.noisy_sample_cpu(x0, x0, torch.rand(2), spec.kind, list(spec.params), spec.table[:10].double(), -1.0,
                             [], 0, False)
    with pytest.raises(ValueError, match="t must have shape"):
        ops.noisy_sample_cpu(x0, x0, torch.rand(3), 0, [0.1, 20.0, 0.0, 0.0], None, -1.0, [], 0, False)
    with pytest.raises(ValueError, match="kind must be"):
        ops.noisy_sample_cpu(x0, x0, torch.rand(2), 9, [0.1, 20.0, 0.0, 0.0], None, -1.0, [], 0, False)
    with pytest.raises(ValueError, match="fdm must hold 6"):
        ops.noisy_sample_cpu(x0, x0, torch.rand(2), 0, [0.1, 20.0, 0.0, 0.0], None, -1.0, [1.0], 1, False)


def test_backend_override_errors(monkeypatch):
    monkeypatch.setenv("TDIFF_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="TDIFF_BACKEND"):
        noisy_sample(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2), S.VPLinear())
    monkeypatch.setenv("TDIFF_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        noisy_sample(torch.randn(2, 3), torch.randn(2, 3), torch.rand(2), S.VPLinear())


def test_missing_extension_warns_once_and_falls_back(monkeypatch):
    import subprocess
    import sys

    code = (
        "import warnings, torch\n"
        "from tdiff.ops.noisy_sample import noisy_sample\n"
        "from tdiff import schedules as S\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): noisy_sample(torch.randn(2,3), torch.randn(2,3), torch.rand(2), S.VPLinear())\n"
        "n = sum('compiled extension' in str(x.message) for x in w)\n"
        "print(n)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TDIFF_NO_EXT": "1",
                                                             "TDIFF_BACKEND": "auto"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_kernel_table_is_made_once_per_table_and_device():
    from tdiff.ops.noisy_sample import kernel_table

    sched = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 50).float())
    first = kernel_table(sched.kernel_spec(), torch.device("cpu"))
    assert first.dtype == torch.float64 and torch.equal(first, sched.kernel_spec().table.double())
    assert kernel_table(sched.kernel_spec(), torch.device("cpu")) is first
    assert kernel_table(S.VPLinear().kernel_spec(), torch.device("cpu")) is None
