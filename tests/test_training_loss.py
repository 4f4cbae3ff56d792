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
    want = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": eps - x0}[target]
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


@pytest.mark.parametrize("make, match", [
    (lambda: DiffusionLoss(DDPM, process="nope"), "process"),
    (lambda: DiffusionLoss(DDPM, target="score"), "target"),
    (lambda: DiffusionLoss(DDPM, mode="biased"), "mode"),
    (lambda: DiffusionLoss(DDPM, process="fdm", target="eps"), "target"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier=0.0), "fdm_multiplier"),
    (lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_on="output"), "fdm_on"),
    (lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(k=0)), "k"),
    (lambda: DiffusionLoss(DDPM, weighting="speed", weighting_kwargs=dict(lam=1.5)), "lam"),
    (lambda: DiffusionLoss("ddpm"), "schedule"),
])
def test_bad_loss_config(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("weighting", [_Negative, _NaN])
def test_negative_or_nan_weights_raise(weighting):
    sched = S.VPLinear()
    loss_fn = DiffusionLoss(sched, weighting=weighting(sched))
    x0, _ = _data()
    with pytest.raises(ValueError, match="finite and non-negative"):
        loss_fn(Recorder().double(), x0)


def test_bad_call_input():
    loss_fn = DiffusionLoss(DDPM)
    x0, eps = _data()
    with pytest.raises(ValueError, match="t must have shape"):
        loss_fn(Recorder().double(), x0, t=torch.rand(3))
    with pytest.raises(ValueError, match="outside the domain"):
        loss_fn(Recorder().double(), x0, t=torch.full((5,), 1.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise must have the shape"):
        loss_fn(Recorder().double(), x0, noise=eps[:2])


def test_per_device_tables_are_made_once_and_kept():
    from tdiff.training.per_device import PerDevice

    calls = []

    def make():
        calls.append(1)
        return torch.arange(3.0), torch.ones(2)

    tables = PerDevice(make)
    first = tables.on("cpu")
    assert tables.on(torch.device("cpu")) is first and len(calls) == 1
    assert torch.equal(first[0], torch.arange(3.0)) and torch.equal(first[1], torch.ones(2))
