"""DiffusionLoss against hand-written forward processes, targets, preconditionings and weights."""
import pytest
import torch

from tdiff import schedules as S
from tdiff.training import default_network_time, DiffusionLoss, Weighting

DDPM = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


class Recorder(torch.nn.Module):
    """A linear 'network' that remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, y=None):
        self.x, self.t, self.y = x.detach(), t.detach(), y
        return self.scale * x + 1e-3 * t.view(-1, *([1] * (x.dim() - 1)))


def _data(b=5):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 4, 4, generator=g, dtype=torch.float64), torch.randn(b, 1, 4, 4, generator=g,
                                                                              dtype=torch.float64)


def _per_sample_mse(a, b):
    return ((a - b) ** 2).flatten(1).mean(1)


def _recorded_output(net):
    """What the Recorder returned for its recorded input, written out (F in EDM's notation)."""
    return 0.7 * net.x + 1e-3 * net.t.double().view(-1, 1, 1, 1)


def _edm_denoised(x, sig, F, sd=0.5):
    """EDM's D = c_skip x + c_out F, written out as the oracle."""
    return sd**2 / (sig**2 + sd**2) * x + sig * sd / torch.sqrt(sig**2 + sd**2) * F


@pytest.mark.parametrize("target", ["eps", "x0", "v", "flow"])
@pytest.mark.parametrize("sched", [DDPM, S.VPLinear(), S.RectifiedFlow()], ids=["ddpm", "vp", "flow"])
def test_standard_targets(target, sched):
    x0, eps = _data()
    net = Recorder().double()
    loss_fn = DiffusionLoss(sched, sampler="uniform", target=target)
    t = loss_fn.sample_t(5, "cpu", torch.Generator().manual_seed(1))
    loss = loss_fn(net, x0, t=t, noise=eps, y=torch.arange(5))
    a, s = sched.alpha(t).view(-1, 1, 1, 1), sched.sigma(t).view(-1, 1, 1, 1)
    xt = a * x0 + s * eps
    torch.testing.assert_close(net.x, xt)
    assert torch.equal(net.y, torch.arange(5))
    # flow: the velocity d x_t/dt = alpha' x0 + sigma' eps (eps - x0 on rectified flow)
    da, ds = sched.d_alpha(t).view(-1, 1, 1, 1), sched.d_sigma(t).view(-1, 1, 1, 1)
    want = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": da * x0 + ds * eps}[target]
    if isinstance(sched, S.RectifiedFlow):
        torch.testing.assert_close(want if target == "flow" else eps - x0, eps - x0)
    per = _per_sample_mse(0.7 * xt + 1e-3 * net.t.double().view(-1, 1, 1, 1), want)
    torch.testing.assert_close(loss_fn.last_per_sample, per)
    torch.testing.assert_close(loss, per.mean())
    if isinstance(sched, S.DiscreteVP):  # the network time is the training index
        torch.testing.assert_close(net.t.double(), torch.round(sched.index_from_t(t)), atol=1e-3, rtol=0)


def test_edm_preconditioned_target_equals_denoiser_loss():
    sched = S.EDM()
    x0, eps = _data()
    net = Recorder().double()
    loss_fn = DiffusionLoss(sched, sampler="lognormal", weighting="edm", target="edm")
    t = loss_fn.sample_t(5, "cpu", torch.Generator().manual_seed(1))
    loss_fn(net, x0, t=t, noise=eps)
    sig, sd = t.view(-1, 1, 1, 1), 0.5
    x = x0 + sig * eps
    torch.testing.assert_close(net.x, x / torch.sqrt(sig**2 + sd**2))  # c_in x
    D = _edm_denoised(x, sig, _recorded_output(net), sd)
    lam = (t**2 + sd**2) / (t * sd) ** 2
    torch.testing.assert_close(loss_fn.last_per_sample, lam * _per_sample_mse(D, x0))
    torch.testing.assert_close(net.t.double(), 250 * torch.log(t))  # 1000 x EDM's c_noise


def _fdm_factor(sig, lo, hi, m):
    tp = (sig - lo) / (hi - lo)
    b = 0.1 * tp + 0.5 * 19.9 * tp * tp
    return torch.exp(-m * b) * (1 + m * b)


@pytest.mark.parametrize("kind, sched", [("vp", S.VPLinear()), ("ve", S.VE()), ("edm", S.EDM())])
@pytest.mark.parametrize("m", [2.0, 1.0])
def test_fdm_input_mode_is_table_1(kind, sched, m):
    x0, eps = _data()
    net = Recorder().double()
    loss_fn = DiffusionLoss(sched, sampler="uniform", process="fdm", fdm_multiplier=m)
    assert loss_fn.precond.kind == kind
    t = loss_fn.sample_t(5, "cpu", torch.Generator().manual_seed(1))
    loss_fn(net, x0, t=t, noise=eps)
    sig = sched.edm_sigma(t).view(-1, 1, 1, 1)
    lo, hi = float(sched.edm_sigma(sched.t_min)), float(sched.edm_sigma(sched.t_max))
    x = x0 + sig * eps
    # the network input is e^{-mB(t')}(1+mB(t')) x with t' = (sigma - sigma_min)/(sigma_max - sigma_min): the
    # multiplier m is used by every variant, VE included
    torch.testing.assert_close(net.x, _fdm_factor(sig, lo, hi, m) * x)
    F = _recorded_output(net)
    if kind == "edm":
        sd = 0.5
        D = _edm_denoised(x, sig, F, sd)
        lam = (sig**2 + sd**2) / (sig * sd) ** 2
    else:
        D = x + (-sig if kind == "vp" else sig) * F
        lam = 1 / sig**2
    torch.testing.assert_close(loss_fn.last_per_sample, lam.flatten() * _per_sample_mse(D, x0))


def test_fdm_mean_mode_is_eq_15():
    sched = S.EDM()
    x0, eps = _data()
    net = Recorder().double()
    loss_fn = DiffusionLoss(sched, sampler="lognormal", process="fdm", fdm_on="mean")
    t = loss_fn.sample_t(5, "cpu", torch.Generator().manual_seed(1))
    loss_fn(net, x0, t=t, noise=eps)
    sig = t.view(-1, 1, 1, 1)
    xt = _fdm_factor(sig, 0.002, 80.0, 2.0) * x0 + sig * eps  # x_t = e^{-B}(1+B) x0 + sigma eps
    torch.testing.assert_close(net.x, xt / torch.sqrt(sig**2 + 0.25))


def test_fdm_warmup_clamps_and_resumes_through_loss_state_dict():
    sched = S.EDM()
    x0, eps = _data()
    a = DiffusionLoss(sched, sampler="lognormal", process="fdm", warmup=4)
    t = torch.tensor([0.01, 0.05, 0.3, 1.0, 5.0], dtype=torch.float64)
    a(Recorder().double(), x0, t=t, noise=eps)
    sd, c_out2 = 0.5, (t * 0.5) ** 2 / (t**2 + 0.25)
    lam = (t**2 + sd**2) / (t * sd) ** 2
    torch.testing.assert_close(a.last_weight, torch.clamp(lam, max=5.0) * c_out2)
    a.step()
    a.step()
    b = DiffusionLoss(sched, sampler="lognormal", process="fdm", warmup=4)
    b.load_state_dict(a.state_dict())
    b(Recorder().double(), x0, t=t, noise=eps)
    torch.testing.assert_close(b.last_weight, torch.clamp(lam, max=5.0 * 100 ** (2 / 4)) * c_out2)


def test_speed_reweight_and_unbiased_modes():
    x0, eps = _data(8)
    net = Recorder().double()
    rw = DiffusionLoss(DDPM, sampler="speed", weighting="speed")
    ub = DiffusionLoss(DDPM, sampler="speed", weighting="speed", mode="unbiased")
    t = rw.sample_t(8, "cpu", torch.Generator().manual_seed(5))
    rw(net, x0, t=t, noise=eps)
    ub(net, x0, t=t, noise=eps)
    torch.testing.assert_close(ub.last_weight, rw.last_weight / rw.sampler.relative_density(t))
    torch.testing.assert_close(ub.last_mse, rw.last_mse)


def test_min_snr_follows_the_loss_target():
    loss_fn = DiffusionLoss(DDPM, weighting="min_snr", target="v")
    assert loss_fn.weighting.target == "v"


def test_gradients_flow_and_match_eager():
    sched = S.VPLinear()
    x0, eps = _data()
    net = Recorder().double()
    loss_fn = DiffusionLoss(sched, weighting="p2")
    t = loss_fn.sample_t(5, "cpu", torch.Generator().manual_seed(1))
    loss = loss_fn(net, x0, t=t, noise=eps)
    (g,) = torch.autograd.grad(loss, net.scale)
    scale = net.scale.detach().clone().requires_grad_(True)
    xt = sched.alpha(t).view(-1, 1, 1, 1) * x0 + sched.sigma(t).view(-1, 1, 1, 1) * eps
    pred = scale * xt + 1e-3 * default_network_time(sched)(t).float().double().view(-1, 1, 1, 1)
    ref = ((1 + sched.snr(t)) ** -1 * _per_sample_mse(pred, eps)).mean()
    (g_ref,) = torch.autograd.grad(ref, scale)
    torch.testing.assert_close(g, g_ref)


class _Negative(Weighting):
    name = "negative"

    def formula(self, t):
        return -torch.ones_like(t)


class _NaN(Weighting):
    name = "nan"

    def formula(self, t):
        return torch.full_like(t, float("nan"))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make, error, match", [
    (lambda: DiffusionLoss(DDPM, process="nope"), ValueError, "process"),
    (lambda: DiffusionLoss(DDPM, process=None), TypeError, "process"),
    (lambda: DiffusionLoss(DDPM, target="score"), ValueError, "target"),
    (lambda: DiffusionLoss(DDPM, mode="biased"), ValueError, "mode"),
    (lambda: DiffusionLoss(DDPM, process="fdm", target="eps"), ValueError, "target"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier=0.0), ValueError, "fdm_multiplier"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier=INF), ValueError, "fdm_multiplier .*finite"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier=NAN), ValueError, "fdm_multiplier"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier="2"), TypeError, "fdm_multiplier"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_on="output"), ValueError, "fdm_on"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_beta_min=-1.0), ValueError, "fdm_beta_min"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_beta_d=INF), ValueError, "fdm_beta_d"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_sigma_range=(80.0, 0.002)), ValueError, "fdm_sigma_range"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_sigma_range=(0.0, 80.0)), ValueError, "fdm_sigma_range"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_sigma_range=0.5), TypeError, "fdm_sigma_range"),
    (lambda: DiffusionLoss(S.EDM(), fdm_multiplier=3.0), ValueError, "fdm_multiplier only applies"),
    (lambda: DiffusionLoss(S.EDM(), fdm_on="mean"), ValueError, "fdm_on only applies"),
    (lambda: DiffusionLoss(S.EDM(), fdm_sigma_range=(1.0, 2.0)), ValueError, "fdm_sigma_range only applies"),
    (lambda: DiffusionLoss(DDPM, precond="vp"), ValueError, "precond is only used"),
    (lambda: DiffusionLoss(DDPM, target="edm", precond="karras"), ValueError, "precond"),
    (lambda: DiffusionLoss(DDPM, sigma_data=0.5), ValueError, "sigma_data is only used"),
    (lambda: DiffusionLoss(S.EDM(sigma_data=1.0), target="edm", sigma_data=0.5), ValueError, "contradicts"),
    (lambda: DiffusionLoss(S.EDM(), target="edm", sigma_data=NAN), ValueError, "sigma_data"),
    (lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(k=0)), ValueError, "k"),
    (lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(k=INF)), ValueError, "k"),
    (lambda: DiffusionLoss(DDPM, sampler=["speed"]), TypeError, "sampler must be a name"),
    (lambda: DiffusionLoss(DDPM, weighting={"speed"}), TypeError, "weighting must be a name"),
    (lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(kk=2)), TypeError, "kk"),
    (lambda: DiffusionLoss(DDPM, sampler_kwargs=[("k", 2)]), TypeError, "sampler_kwargs"),
    (lambda: DiffusionLoss(DDPM, weighting="speed", weighting_kwargs=dict(lam=1.5)), ValueError, "lam"),
    (lambda: DiffusionLoss(DDPM, warmup=0), ValueError, "warmup_steps"),
    (lambda: DiffusionLoss(DDPM, warmup=NAN), ValueError, "warmup_steps"),
    (lambda: DiffusionLoss(DDPM, check="yes"), TypeError, "check"),
    (lambda: DiffusionLoss(S.VPLinear(), grid_size=1), ValueError, "cells"),
    (lambda: DiffusionLoss(DDPM, network_time=3), TypeError, "network_time"),
    (lambda: DiffusionLoss("ddpm"), TypeError, "schedule"),
])
def test_bad_loss_config(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_bad_call_input():
    loss_fn = DiffusionLoss(DDPM)
    x0, eps = _data()
    net = Recorder().double()
    with pytest.raises(ValueError, match="t must be a tensor of shape"):
        loss_fn(net, x0, t=torch.rand(3))
    with pytest.raises(ValueError, match="t must be a tensor of shape"):
        loss_fn(net, x0, t=0.5)
    with pytest.raises(ValueError, match="outside the domain"):
        loss_fn(net, x0, t=torch.full((5,), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN"):
        loss_fn(net, x0, t=torch.full((5,), NAN, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise must be a tensor with x0's shape"):
        loss_fn(net, x0, noise=eps[:2])
    with pytest.raises(ValueError, match="noise must be a tensor with x0's shape .* and dtype"):
        loss_fn(net, x0, noise=eps.float())
    with pytest.raises(TypeError, match="x0 must be a floating-point tensor"):
        loss_fn(net, torch.zeros(5, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x0 must be a"):
        loss_fn(net, x0[0, 0, 0])
    with pytest.raises(ValueError, match="x0 must be a"):
        loss_fn(net, x0.numpy())
    with pytest.raises(TypeError, match="model must be callable"):
        loss_fn("unet", x0)
    with pytest.raises(TypeError, match="must return a tensor"):
        loss_fn(lambda x, t: {"out": x}, x0)
    with pytest.raises(ValueError, match="the model returned shape"):
        loss_fn(lambda x, t: x[:, :, :2], x0)
    with pytest.raises(TypeError, match="generator"):
        loss_fn(net, x0, generator=5)


@pytest.mark.parametrize("state, error, match", [
    ({"warmup": {}}, ValueError, "missing \\['config'\\]"),
    ({"config": {}}, ValueError, "missing \\['warmup'\\]"),
    ("warmup", TypeError, "dict"),
    ({"warmup": {}, "config": None}, TypeError, "config"),
])
def test_load_state_dict_bad_input(state, error, match):
    loss_fn = DiffusionLoss(S.EDM(), process="fdm", warmup=4)
    with pytest.raises(error, match=match):
        loss_fn.load_state_dict(state)


def test_load_state_dict_refuses_another_config_naming_the_field():
    a = DiffusionLoss(S.EDM(), process="fdm", warmup=4, fdm_multiplier=2.0)
    b = DiffusionLoss(S.EDM(), process="fdm", warmup=4, fdm_multiplier=1.0)
    with pytest.raises(ValueError, match="fdm.m=2.0, this loss has fdm.m=1.0"):
        b.load_state_dict(a.state_dict())
    c = DiffusionLoss(S.EDM(), process="fdm", warmup=8)
    with pytest.raises(ValueError, match="warmup.warmup_steps=4, this loss has warmup.warmup_steps=8"):
        c.load_state_dict(a.state_dict())
    d = DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(k=3))
    with pytest.raises(ValueError, match="sampler.k=2.0, this loss has sampler.k=3.0"):
        d.load_state_dict(DiffusionLoss(DDPM, sampler="speed").state_dict())
    e = DiffusionLoss(S.EDM(), process="fdm")
    with pytest.raises(ValueError, match="warmup"):
        e.load_state_dict(a.state_dict())
    # the same configuration loads, through a JSON round trip too (tuples become lists)
    import json

    state = json.loads(json.dumps(a.state_dict()))
    a2 = DiffusionLoss(S.EDM(), process="fdm", warmup=4, fdm_multiplier=2.0)
    a.step()
    a2.load_state_dict(a.state_dict())
    assert a2.warmup.steps == 1
    a2.load_state_dict(state)
    assert a2.warmup.steps == 0


def test_edm_sigma_data_comes_from_the_schedule():
    sched = S.EDM(sigma_data=1.0)
    for kw in (dict(target="edm"), dict(process="fdm")):
        loss_fn = DiffusionLoss(sched, **kw)
        assert loss_fn.precond.sigma_data == 1.0
        x0, eps = _data()
        net = Recorder().double()
        t = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
        loss_fn(net, x0, t=t, noise=eps)
        if kw.get("target") == "edm":  # c_in = 1/sqrt(sigma^2 + 1)
            torch.testing.assert_close(net.x, (x0 + t.view(-1, 1, 1, 1) * eps) / torch.sqrt(t**2 + 1).view(-1, 1, 1, 1))
        D = _edm_denoised(x0 + t.view(-1, 1, 1, 1) * eps, t.view(-1, 1, 1, 1), _recorded_output(net), sd=1.0)
        lam = (t**2 + 1.0) / t**2
        want = lam * _per_sample_mse(D, x0)
        if loss_fn.warmup is None:
            torch.testing.assert_close(loss_fn.last_per_sample, want)
    assert DiffusionLoss(sched, target="edm", weighting="edm").weighting.sigma_data == 1.0
    # the sampling side uses the same sigma_data
    from tdiff.denoisers import Denoiser

    assert Denoiser(lambda x, t, y=None: x, sched, precond="edm").sigma_data == 1.0


@pytest.mark.parametrize("sched, kw, name", [
    (S.EDM(), dict(process="fdm"), "lognormal"), (S.EDM(), dict(target="edm"), "lognormal"),
    (S.VPLinear(), dict(process="fdm"), "uniform"), (S.VE(), dict(process="fdm"), "loguniform"),
    (DDPM, dict(), "uniform"), (S.EDM(), dict(process="fdm", precond="edm", sampler="uniform"), "uniform"),
])
def test_default_sampler_is_the_preconditionings_own(sched, kw, name):
    assert DiffusionLoss(sched, **kw).sampler.name == name


def test_fdm_on_edm_samples_edms_lognormal():
    loss_fn = DiffusionLoss(S.EDM(), process="fdm")
    sig = loss_fn.sample_t(50_000, "cpu", torch.Generator().manual_seed(0))
    assert abs(sig.log().mean().item() + 1.2) < 0.03 and abs(sig.log().std().item() - 1.2) < 0.03


@pytest.mark.parametrize("weighting", [_Negative, _NaN])
def test_negative_or_nan_weights_raise(weighting):
    sched = S.VPLinear()
    loss_fn = DiffusionLoss(sched, weighting=weighting(sched))
    x0, _ = _data()
    with pytest.raises(ValueError, match="finite and non-negative"):
        loss_fn(Recorder().double(), x0)


def test_per_device_tables_are_made_once_and_kept():
    from tdiff.training import PerDevice

    calls = []

    def make():
        calls.append(1)
        return torch.arange(3.0), torch.ones(2)

    tables = PerDevice(make)
    assert len(calls) == 1  # made at construction: a compiled step only looks tables up
    first = tables.on("cpu")
    assert tables.on(torch.device("cpu")) is first and len(calls) == 1
    assert torch.equal(first[0], torch.arange(3.0)) and torch.equal(first[1], torch.ones(2))
