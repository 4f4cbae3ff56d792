import math

import pytest
import torch

from tdiff import schedules as S

T = torch.linspace(0.02, 0.98, 25, dtype=torch.float64)


def all_schedules():
    return [S.VPLinear(), S.VPCosine(), S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000)), S.VE(),
            S.EDM(), S.RectifiedFlow()]


def _t_for(sched):
    return sched.t_min + (sched.t_max - sched.t_min) * T


def test_vp_linear_closed_form():
    s = S.VPLinear(0.1, 20.0)
    log_a = -0.25 * T**2 * (20.0 - 0.1) - 0.5 * T * 0.1
    torch.testing.assert_close(s.log_alpha(T), log_a)
    torch.testing.assert_close(s.alpha(T) ** 2 + s.sigma(T) ** 2, torch.ones_like(T))
    # beta(t) = -2 d log alpha / dt = b0 + t (b1 - b0)
    torch.testing.assert_close(-2 * s.d_log_alpha(T), 0.1 + T * (20.0 - 0.1))


def test_vp_cosine_closed_form():
    s = S.VPCosine(0.008)
    f = lambda t: torch.cos((t + 0.008) / 1.008 * math.pi / 2)  # noqa: E731
    torch.testing.assert_close(s.alpha(T * 0.99), f(T * 0.99) / f(torch.tensor(0.0, dtype=torch.float64)))


def test_ve_edm_flow_closed_forms():
    ve = S.VE(0.02, 100.0)
    torch.testing.assert_close(ve.sigma(T), 0.02 * (100.0 / 0.02) ** T)
    torch.testing.assert_close(ve.alpha(T), torch.ones_like(T))
    edm = S.EDM()
    sig = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    torch.testing.assert_close(edm.sigma(sig), sig)
    torch.testing.assert_close(edm.edm_sigma(sig), sig)
    fl = S.RectifiedFlow()
    torch.testing.assert_close(fl.alpha(T), 1 - T)
    torch.testing.assert_close(fl.sigma(T), T)
    torch.testing.assert_close(fl.lambda_(T), torch.log((1 - T) / T))


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: type(s).__name__)
def test_lambda_inverse_and_sigma_roundtrip(sched):
    t = _t_for(sched)
    torch.testing.assert_close(sched.t_from_lambda(sched.lambda_(t)), t, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(sched.t_from_edm_sigma(sched.edm_sigma(t)), t, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(sched.edm_sigma(t), sched.sigma(t) / sched.alpha(t))


class _ShiftedSigma(S.VPLinear):
    """A VP subclass with its own log_sigma: log_alpha_sigma must call it, not derive sigma from alpha."""

    def log_sigma(self, t):
        return super().log_sigma(t) + 0.25


@pytest.mark.parametrize("sched", all_schedules() + [_ShiftedSigma()], ids=lambda s: type(s).__name__)
def test_log_alpha_sigma_is_the_two_evaluations(sched):
    t = _t_for(sched)
    log_alpha, log_sigma = sched.log_alpha_sigma(t)
    assert torch.equal(log_alpha, sched.log_alpha(t)) and torch.equal(log_sigma, sched.log_sigma(t))


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: type(s).__name__)
def test_log_alpha_from_lambda_matches_the_detour_through_t(sched):
    t = torch.linspace(sched.t_min, sched.t_max, 11, dtype=torch.float64)
    lam = sched.lambda_(t)
    torch.testing.assert_close(sched.log_alpha_from_lambda(lam), sched.log_alpha(t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: type(s).__name__)
def test_derivatives_match_finite_differences(sched):
    t = _t_for(sched)[2:-2]
    h = 1e-6 * (sched.t_max - sched.t_min)
    for fn, d in [(sched.lambda_, sched.d_lambda), (sched.log_alpha, sched.d_log_alpha),
                  (sched.sigma, sched.d_sigma)]:
        fd = (fn(t + h) - fn(t - h)) / (2 * h)
        torch.testing.assert_close(d(t), fd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("sched", all_schedules(), ids=lambda s: type(s).__name__)
def test_lambda_decreasing(sched):
    lam = sched.lambda_(_t_for(sched))
    assert bool((lam[1:] < lam[:-1]).all())


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_matches_diffusers_alphas_cumprod(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule)
    ours = S.DiscreteVP.from_diffusers(sch.config)  # built from the config alone, not the computed tensor
    torch.testing.assert_close(ours.alphas_cumprod, sch.alphas_cumprod.double(), atol=2e-6, rtol=1e-5)
    # at the grid nodes alpha(t_i)^2 is alphas_cumprod[i]
    i = torch.arange(0, 1000, 37)
    torch.testing.assert_close(ours.alpha(ours.t_from_index(i)) ** 2, ours.alphas_cumprod[i])
    from_obj = S.DiscreteVP.from_diffusers(sch)
    torch.testing.assert_close(from_obj.alphas_cumprod, sch.alphas_cumprod.double())


def test_discrete_piecewise_linear_log_alpha():
    s = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 10))
    t0, t1 = s.t_from_index(3), s.t_from_index(4)
    mid = s.log_alpha((t0 + t1) / 2)
    torch.testing.assert_close(mid, (s.log_alpha(t0) + s.log_alpha(t1)) / 2)


def test_discrete_host_evaluation_equals_torch_and_follows_its_table():
    """The no-grad tables' host log alpha (cached segments) is torch's exactly, inside, at the nodes and beyond both
    ends, and is remade when the table is written or replaced. log sigma = log(-expm1(2 log alpha)) / 2 goes through
    libm on the host and ATen's vectorised functions in torch: the same to 2 ulp (bit for bit under AVX-512 here,
    up to 2 ulp apart on 5% of the points under ATEN_CPU_CAPABILITY=avx2)."""
    import numpy as np

    s = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 50, dtype=torch.float64))
    t = torch.cat([torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1.000001,
                   s.t_table, torch.tensor([0.0, 1e-9, 1.0 + 1e-6], dtype=torch.float64)])
    with np.errstate(invalid="ignore"):  # log sigma of an extrapolated log alpha above 0 (t = 0) is NaN
        host = s.log_alpha_sigma_host(t.numpy())
        assert all(isinstance(v, np.ndarray) for v in host)
        log_alpha, log_sigma = s.log_alpha_sigma(t)
        torch.testing.assert_close(torch.from_numpy(host[0]), log_alpha, rtol=0, atol=0, equal_nan=True)
        np.testing.assert_array_max_ulp(host[1], log_sigma.numpy(), maxulp=2)
        s.log_alpha_table.mul_(0.5)  # written in place
        assert torch.equal(torch.from_numpy(s.log_alpha_sigma_host(t.numpy())[0]), s.log_alpha(t))
        torch.testing.assert_close(s.log_alpha(t.float()), s.log_alpha(t).float(), rtol=1e-6, atol=1e-6)  # float32 copy
        s.log_alpha_table = s.log_alpha_table * 2  # replaced: both paths, and torch's per-dtype copies, follow it
        assert np.array_equal(s.log_alpha_sigma_host(t.numpy())[0],
                              s._interp(t.numpy(), s.t_table.numpy(), s.log_alpha_table.numpy()))
        assert torch.equal(torch.from_numpy(s.log_alpha_sigma_host(t.numpy())[0]), s.log_alpha(t))
        s.log_alpha_table.mul_(0.5)  # written in place: the float32 copy is remade
        torch.testing.assert_close(s.log_alpha(t.float()), s.log_alpha(t).float(), rtol=1e-6, atol=1e-6)


def test_fdm_factor_formula():
    f = S.FDMMomentum(m=2.0, beta_min=0.1, beta_d=19.9, u_min=0.0, u_max=1.0, source="time")
    tp = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    B = 2.0 * (0.1 * tp + 0.5 * 19.9 * tp**2)
    torch.testing.assert_close(f.factor(tp), torch.exp(-B) * (1 + B))
    assert f.factor(torch.tensor(0.0)).item() == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta0"):
        S.VPLinear(beta0=-1.0)
    with pytest.raises(ValueError, match="betas"):
        S.DiscreteVP(betas=torch.tensor([0.1, 0.0, 0.2]))
    with pytest.raises(ValueError, match="betas"):
        S.DiscreteVP(betas=torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="decreasing"):
        S.DiscreteVP(alphas_cumprod=torch.tensor([0.5, 0.9]))
    with pytest.raises(ValueError, match="outside the domain"):
        S.VPLinear().check_t(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="NaN"):
        S.VPLinear().check_t(torch.tensor([float("nan")]), name="timesteps")
    with pytest.raises(ValueError, match="positive"):
        S.EDM().check_t(torch.tensor([0.0]))
    with pytest.raises(ValueError, match="sigma must be positive"):
        S.VPLinear().t_from_edm_sigma(torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="beta_schedule"):
        S.DiscreteVP.from_diffusers({"beta_schedule": "nope"})
    with pytest.raises(ValueError, match="source"):
        S.FDMMomentum(source="nope")


def test_config_roundtrip():
    for sched in [S.VPLinear(0.2, 15.0), S.VPCosine(), S.VE(0.01, 50.0), S.EDM(), S.RectifiedFlow()]:
        again = S.from_config(sched.config())
        torch.testing.assert_close(again.lambda_(_t_for(sched)), sched.lambda_(_t_for(sched)))


def test_zero_terminal_snr_discrete_vp():
    """rescale_betas_zero_snr: alpha = 0 at t = 1 (lambda = -inf), exact at every node, alpha linear in t on the last
    segment, and t_from_lambda its inverse; from a config as from a scheduler."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    rescaled = S.rescale_zero_terminal_snr(betas)
    s = S.DiscreteVP(betas=rescaled)
    ac = torch.cumprod(1 - rescaled, 0)
    assert s.zero_terminal_snr and float(ac[-1]) == 0.0
    torch.testing.assert_close(s.alpha(s.t_table) ** 2, ac, rtol=1e-12, atol=1e-15)
    t0, t1 = s.t_table[-2], s.t_table[-1]
    mid = (t0 + t1) / 2
    torch.testing.assert_close(s.alpha(mid), s.alpha(t0) / 2)
    t = torch.tensor([0.3, 0.9, float(mid), 0.99995], dtype=torch.float64)
    torch.testing.assert_close(s.t_from_lambda(s.lambda_(t)), t, rtol=1e-9, atol=1e-12)
    assert math.isinf(float(s.lambda_(1.0))) and float(s.sigma(1.0)) == 1.0
    cfg = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "rescale_betas_zero_snr": True}
    torch.testing.assert_close(S.DiscreteVP.from_diffusers(cfg).alphas_cumprod, s.alphas_cumprod)
    clamped = S.DiscreteVP.from_diffusers({**cfg, "_class_name": "EulerDiscreteScheduler"})
    assert not clamped.zero_terminal_snr and float(clamped.alphas_cumprod[-1]) == pytest.approx(2.0**-24)
    g = torch.tensor([0.9999], dtype=torch.float64, requires_grad=True)
    s.log_alpha(g).backward()
    assert torch.isfinite(g.grad).all()
