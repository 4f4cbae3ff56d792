"""Bad input to the sampling path and to the schedule/denoiser constructors gets a clear error naming the argument;
half-precision sampling keeps its state in float32; check_finite names the first non-finite step."""
import math

import pytest
import torch

import tdiff
from tdiff.data.gaussian_mixture import GaussianMixture
from tdiff.preconditioning import Preconditioning
from tdiff.schedules import EDM, VE, DiscreteVP, FDMMomentum, RectifiedFlow, VPCosine, VPLinear
from tdiff.solvers import sample
from tdiff.solvers.sample import SPECS
from tdiff.timesteps import edm_rho, interpolate_schedule, logsnr_uniform, uniform_t

pytestmark = pytest.mark.usefixtures("one_thread")

SCHED = VPLinear()
MIX = GaussianMixture([[1.0, 0.5], [-1.0, -0.5], [0.3, -1.2]], [0.3, 0.5, 0.2], [1.0, 2.0, 1.5])
X = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
TS = torch.linspace(0.9, 0.05, 7, dtype=torch.float64)


def den(x, t):
    return MIX.posterior_mean(x, t, SCHED)


den.schedule = SCHED


# ---------------------------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,typo,valid", [
    ("unipc", {"varient": "bh1"}, "variant"),
    ("heun", {"s_chrun": 40.0}, "s_churn"),
    ("dpmpp", {"lower_order_finale": False}, "lower_order_final"),
    ("euler", {"eta": 0.5}, "final_sigmas_type"),
    ("ddim", {"solver_type": "heun"}, "eta"),
    ("ipndm", {"variant": "bh1"}, "lower_order_final"),
])
def test_unknown_options_are_refused_listing_the_valid_ones(solver, typo, valid):
    with pytest.raises(ValueError, match=rf"unknown option\(s\) \['{list(typo)[0]}'\] for solver '{solver}'.*{valid}"):
        sample(den, X, TS, solver=solver, **typo)


def test_every_solver_lists_its_options():
    for name, spec in SPECS.items():
        with pytest.raises(ValueError, match=f"for solver '{name}'"):
            sample(den, X, TS, solver=name, no_such_option=1)


@pytest.mark.parametrize("kw,match", [
    (dict(solver="dpmpp", order_rule="fast"), "order_rule"),
    (dict(solver="dpmpp", solver_type="rk4"), "solver_type"),
    (dict(solver="dpmpp", lower_order_final="yes"), "lower_order_final"),
    (dict(solver="dpmpp", orders=[1, 2]), "orders for solver 'dpmpp' must be a list of 6"),
    (dict(solver="dpmpp", orders=[2, 2, 2, 2, 2, 2]), r"orders\[0\]"),
    (dict(solver="dpmpp", order=3, orders=[1, 2, 4, 3, 3, 3]), r"orders\[2\]"),
    (dict(solver="unipc", disable_corrector="1"), "disable_corrector"),
    (dict(solver="unipc", final_corrector=True, final_sigmas_type="zero"), "final_corrector"),
    (dict(solver="ddim", eta=-0.5), "eta"),
    (dict(solver="ddim", eta=float("nan")), "eta"),
    (dict(solver="ddim", use_clipped_model_output=1), "use_clipped_model_output"),
    (dict(solver="ddim", targets=TS[1:3]), "targets must be a 1-D tensor of 6"),
    (dict(solver="ddim", targets=TS[:-1]), r"targets\[i\] must be below"),
    (dict(solver="heun", s_noise=float("inf")), "s_noise"),
    (dict(solver="heun", s_min="0"), "s_min"),
    (dict(solver="dpmsolver", final_sigmas_type="zero"), "noise prediction"),
    (dict(solver="dpmpp", order=True), "order for solver 'dpmpp'"),
    (dict(solver="dpmpp", state_dtype=torch.float16), "state_dtype"),
    (dict(solver="dpmpp", check_finite="yes"), "check_finite"),
])
def test_bad_option_values(kw, match):
    with pytest.raises(ValueError, match=match):
        sample(den, X, TS, **kw)


# ---------------------------------------------------------------------------------------------------------------
# timesteps and the denoiser's output
# ---------------------------------------------------------------------------------------------------------------
def test_timesteps_none_and_wrong_types():
    with pytest.raises(ValueError, match="timesteps must be a 1-D tensor.*got None"):
        sample(den, X, None)
    with pytest.raises(ValueError, match="timesteps must be a 1-D tensor"):
        sample(den, X, "0.9 0.1")
    with pytest.raises(ValueError, match="real times"):
        sample(den, X, torch.tensor([True, False]))


def test_times_outside_the_domain_and_duplicates():
    with pytest.raises(ValueError, match="timesteps is outside the domain of VPLinear"):
        sample(den, X, torch.tensor([1.2, 0.5, 0.1], dtype=torch.float64))
    with pytest.raises(ValueError, match="NaN or inf"):
        sample(den, X, torch.tensor([0.9, float("inf"), 0.1], dtype=torch.float64))
    edm = EDM()
    with pytest.raises(ValueError, match="NaN or inf"):
        sample(lambda x, t: x, X, torch.tensor([float("inf"), 1.0, 0.1], dtype=torch.float64), schedule=edm)
    with pytest.raises(ValueError, match="duplicated times.*HeunDiscreteScheduler.*from_diffusers_timesteps"):
        sample(den, X, torch.tensor([0.9, 0.5, 0.5, 0.1], dtype=torch.float64), solver="heun")


def test_a_denoiser_of_the_wrong_shape_is_named():
    def bad(x, t):
        return x[:, :1]

    bad.schedule = SCHED
    with pytest.raises(ValueError, match=r"denoiser returned an output of shape \(3, 1\); expected \(3, 2\)"):
        sample(bad, X, TS)

    class Net(torch.nn.Module):
        def forward(self, x, t, y=None):
            return x.sum(-1)

    with pytest.raises(ValueError, match=r"network returned shape \(3,\); expected \(3, 2\)"):
        sample(tdiff.denoiser(Net(), SCHED), X, TS)
    with pytest.raises(ValueError, match="a pair"):
        sample(den, X, TS, guidance=2.0)


def test_check_finite_names_the_first_non_finite_step():
    calls = []

    def flaky(x, t):
        calls.append(1)
        out = den(x, t)
        return out * float("nan") if len(calls) == 3 else out

    flaky.schedule = SCHED
    out = sample(flaky, X, TS, solver="dpmpp")  # by design no sync: NaN propagates
    assert torch.isnan(out).all()
    calls.clear()
    with pytest.raises(FloatingPointError, match="first at step 2 of 6, in the denoiser's output at evaluation 2"):
        sample(flaky, X, TS, solver="dpmpp", check_finite=True)
    torch.testing.assert_close(sample(den, X, TS, check_finite=True), sample(den, X, TS))


# ---------------------------------------------------------------------------------------------------------------
# half precision
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,unit_roundoff", [(torch.bfloat16, 2.0**-9), (torch.float16, 2.0**-11)])
def test_half_precision_keeps_the_state_in_float32(dtype, unit_roundoff):
    """A half model (it computes and returns in its input's dtype) at NFE 1000: the solver state in the input's
    dtype lost the small per-step changes (error 4% in fp16, 22% in bf16); in float32 the error stays within 2x of
    fp32's or of the dtype's own resolution, and does not grow with NFE."""

    def half_model(x, t):
        return MIX.posterior_mean(x.double(), t, SCHED).to(x.dtype)

    half_model.schedule = SCHED
    x = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    errors = {}
    for nfe in (10, 1000):
        ts = logsnr_uniform(SCHED, nfe)
        ref = sample(half_model, x.double(), ts, solver="dpmpp", order=2)
        scale = float(ref.norm(dim=1).mean())
        for name, xx in (("fp32", x.float()), ("half", x)):
            out = sample(half_model, xx, ts, solver="dpmpp", order=2)
            assert out.dtype == xx.dtype
            errors[name, nfe] = float((out.double() - ref).norm(dim=1).mean()) / scale
    assert errors["half", 1000] <= 2 * max(errors["fp32", 1000], unit_roundoff), errors
    assert errors["half", 1000] <= 2 * errors["half", 10], errors


# ---------------------------------------------------------------------------------------------------------------
# constructors: every argument of every schedule and of the denoiser
# ---------------------------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("make,match", [
    (lambda: VPLinear(beta0=NAN), "beta0"), (lambda: VPLinear(beta0=0.0), "beta0"), (lambda: VPLinear(beta0=INF), "beta0"),
    (lambda: VPLinear(beta1=INF), "beta1"), (lambda: VPLinear(beta1=NAN), "beta1"), (lambda: VPLinear(beta1=0.05), "beta1"),
    (lambda: VPLinear(t_min=NAN), "t_min"), (lambda: VPLinear(t_min=-0.1), "t_min"), (lambda: VPLinear(t_min=1.0), "t_min"),
    (lambda: VPLinear(beta0="0.1"), "beta0"),
    (lambda: VPCosine(s=NAN), "VPCosine s"), (lambda: VPCosine(s=0.0), "VPCosine s"), (lambda: VPCosine(s=INF), "VPCosine s"),
    (lambda: VPCosine(t_max=1.5), "t_max"), (lambda: VPCosine(t_max=1.0), "t_max"), (lambda: VPCosine(t_max=NAN), "t_max"),
    (lambda: VPCosine(t_min=-1e-3), "t_min"), (lambda: VPCosine(t_min=0.995), "t_min"),
    (lambda: VE(sigma_min=NAN), "sigma_min"), (lambda: VE(sigma_min=0.0), "sigma_min"), (lambda: VE(sigma_max=INF), "sigma_max"),
    (lambda: VE(sigma_max=0.01), "sigma_max"), (lambda: VE(t_min=NAN), "t_min"),
    (lambda: EDM(sigma_min=NAN), "sigma_min"), (lambda: EDM(sigma_min=-1.0), "sigma_min"), (lambda: EDM(sigma_max=INF), "sigma_max"),
    (lambda: EDM(sigma_max=0.001), "sigma_max"), (lambda: EDM(sigma_data=NAN), "sigma_data"), (lambda: EDM(sigma_data=0.0), "sigma_data"),
    (lambda: RectifiedFlow(t_min=NAN), "t_min"), (lambda: RectifiedFlow(t_max=1.0), "t_max"),
    (lambda: RectifiedFlow(t_min=0.0), "t_min"), (lambda: RectifiedFlow(t_min=0.5, t_max=0.4), "t_min"),
    (lambda: DiscreteVP(betas=[1e-4, NAN, 0.02]), "betas"), (lambda: DiscreteVP(betas=[1e-4, INF]), "betas"),
    (lambda: DiscreteVP(betas=[1e-4, 1.0, 0.02]), "betas"), (lambda: DiscreteVP(betas=[0.0, 0.02]), "betas"),
    (lambda: DiscreteVP(alphas_cumprod=[0.9, 0.95]), "strictly decreasing"),
    (lambda: DiscreteVP(alphas_cumprod=[0.9, NAN]), "alphas_cumprod"), (lambda: DiscreteVP(alphas_cumprod=[0.9, 0.0, 0.0]), "alphas_cumprod"),
    (lambda: DiscreteVP(), "exactly one"),
    (lambda: FDMMomentum(m=NAN), "FDMMomentum m"), (lambda: FDMMomentum(m=INF), "FDMMomentum m"), (lambda: FDMMomentum(m=-1.0), "m"),
    (lambda: FDMMomentum(beta_min=NAN), "beta_min"), (lambda: FDMMomentum(beta_d=INF), "beta_d"),
    (lambda: FDMMomentum(u_min=NAN), "u_min"), (lambda: FDMMomentum(u_max=0.001), "u_max"),
    (lambda: FDMMomentum(source="t"), "source"), (lambda: FDMMomentum(on="x0"), "on"),
    (lambda: Preconditioning("edm", NAN), "sigma_data"), (lambda: Preconditioning("edm", INF), "sigma_data"),
    (lambda: Preconditioning("edm", "0.5"), "sigma_data"), (lambda: Preconditioning("xx"), "kind"),
])
def test_schedule_constructors_refuse_nan_inf_and_out_of_range(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("kw,match", [
    (dict(guidance=NAN), "guidance"), (dict(guidance=INF), "guidance"), (dict(guidance="2"), "guidance"),
    (dict(clip_x0=NAN), "clip_x0"), (dict(clip_x0=INF), "clip_x0"), (dict(clip_x0=0.0), "clip_x0"),
    (dict(null_label=-1), "null_label"), (dict(null_label=1.5), "null_label"),
    (dict(prediction="score"), "prediction"), (dict(precond="vp"), "precond"),
    (dict(model_time=3.0), "model_time"), (dict(call="model"), "call"), (dict(validate="yes"), "validate"),
])
def test_denoiser_constructor_refuses_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        tdiff.denoiser(lambda x, t, y=None: x, SCHED, **kw)
    with pytest.raises(ValueError, match="model must be callable"):
        tdiff.denoiser(None, SCHED)
    with pytest.raises(ValueError, match="schedule"):
        tdiff.denoiser(lambda x, t, y=None: x, "vp")


def test_heuristics_refuse_an_infinite_lambda_at_an_end():
    with pytest.raises(ValueError, match="logsnr_uniform spaces points in lambda.*must be finite"):
        logsnr_uniform(VPLinear(t_min=0), 5)
    with pytest.raises(ValueError, match="edm_rho spaces points in log sigma/alpha"):
        edm_rho(VPLinear(t_min=0), 5)
    with pytest.raises(ValueError, match="interpolate_schedule"):
        interpolate_schedule(VPLinear(t_min=0), torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64), 4)
    # uniform in t has no such end: a valid grid down to t = 0
    t = uniform_t(VPLinear(t_min=0), 5)
    assert torch.isfinite(t).all() and float(t[-1]) == 0.0
    # zero terminal SNR: lambda = -inf at t = 1
    zero = DiscreteVP(alphas_cumprod=torch.cat([torch.linspace(0.999, 0.01, 999, dtype=torch.float64),
                                               torch.zeros(1, dtype=torch.float64)]))
    assert zero.zero_terminal_snr and math.isinf(float(zero.lambda_(1.0)))
    with pytest.raises(ValueError, match="logsnr_uniform"):
        logsnr_uniform(zero, 5)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        zero.kernel_spec()
