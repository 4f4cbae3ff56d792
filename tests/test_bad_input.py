"""Bad input across the public API (issue 17 item 7): every case asserts the good behaviour, a clear error that
names the argument (or file) and what was expected, or, for legitimate-but-odd input, the correct result.

Cases are tiny (a few-element tensors, 2-4 step grids, a 1-block DiT) and table-driven: each table row is one
collected test. Ops run on the reference and the C++ backends (TDIFF_BACKEND), and the registered C++ kernels are
called directly too (they are public API and validate their own inputs).
"""
import json
import re
import math
import os

import pytest
import torch

import tdiff
from tdiff import schedules as S
from tdiff.ops import cached_block, multistep_update, noisy_sample, weighted_mse
from tdiff.timesteps import LearnedSchedule, edm_rho, interpolate_schedule, logsnr_uniform, quadratic_t, uniform_t

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend

VP = S.VPLinear()
TS = torch.tensor([1.0, 0.5, 0.1])  # a valid 2-step VP grid


def x0_den(x, t):
    """An x0-predicting callable (sample() takes any D(x, t) with schedule=)."""
    return 0.5 * x


x0_den.schedule = VP


def X(b=2):
    return torch.randn(b, 1, 2, 2, generator=torch.Generator().manual_seed(0))


def _p(*values):
    """One table row: the values, then its id."""
    return pytest.param(*values[:-1], id=values[-1])


def _check(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


# ---------------------------------------------------------------------------------------------------------------
# sample / Sampler
# ---------------------------------------------------------------------------------------------------------------
SAMPLE = [
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="dpm++"), ValueError, r"solver must be one of .*'dpm\+\+'",
       "unknown-solver"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver=None, order=7), ValueError, r"order for solver 'dpmpp' must be",
       "order-7"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="heun", order=1), ValueError, r"order for solver 'heun' must be 2",
       "heun-order-1"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="dpmpp", order=2.0), ValueError, r"order for solver 'dpmpp'",
       "order-float"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="dpmpp", order=True), ValueError, r"order for solver 'dpmpp'",
       "order-bool"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="unipc", varient="bh1"), ValueError,
       r"unknown option\(s\) \['varient'\] for solver 'unipc'.*'variant'", "unipc-varient"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="heun", s_chrun=1.0), ValueError,
       r"unknown option\(s\) \['s_chrun'\] for solver 'heun'.*'s_churn'", "heun-s_chrun"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="euler", eta=0.5), ValueError,
       r"unknown option\(s\) \['eta'\] for solver 'euler'", "euler-eta"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="ddim", s_churn=1.0), ValueError,
       r"unknown option\(s\) \['s_churn'\] for solver 'ddim'", "ddim-s_churn"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="ddpm", eta=1.0), ValueError,
       r"unknown option\(s\) \['eta'\] for solver 'ddpm'", "ddpm-eta"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="dpmpp", variant="bh2"), ValueError,
       r"unknown option\(s\) \['variant'\] for solver 'dpmpp'", "dpmpp-variant"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, final_sigmas_type="none"), ValueError,
       r"final_sigmas_type must be one of", "final-sigmas-type"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([1.0, float("nan"), 0.1])), ValueError,
       r"timesteps contains NaN or inf; expected finite times in \[0.0, 1.0\]", "ts-nan"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([float("inf"), 0.5, 0.1])), ValueError,
       r"timesteps contains NaN or inf; expected finite times", "ts-inf"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([0.1, 0.5, 1.0])), ValueError,
       r"timesteps must be strictly decreasing \(from noise to data\)", "ts-increasing"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([1.0, 0.5, 0.5, 0.1])), ValueError,
       r"timesteps must not hold duplicated times", "ts-duplicated"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([1.0])), ValueError, r"timesteps must be a 1-D tensor of at least 2 times, got shape \(1,\)",
       "ts-one"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([])), ValueError, r"timesteps must be a 1-D tensor of at least 2 times, got shape \(0,\)",
       "ts-empty"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([[1.0, 0.5, 0.1]])), ValueError, r"timesteps must be a 1-D tensor of at least 2 times, got shape \(1, 3\)",
       "ts-2d"),
    _p(lambda: tdiff.sample(x0_den, X(), torch.tensor([1.5, 0.5, 0.1])), ValueError,
       r"timesteps .*outside the domain of VPLinear", "ts-out-of-domain"),
    _p(lambda: tdiff.sample(x0_den, X(), None), ValueError,
       r"timesteps must be a 1-D tensor of decreasing schedule times .* got None", "ts-none"),
    _p(lambda: tdiff.sample(x0_den, X(), "logsnr"), ValueError,
       r"timesteps must be a 1-D tensor of decreasing schedule times, got str", "ts-string"),
    _p(lambda: tdiff.sample(x0_den, torch.zeros(2, 4, dtype=torch.int64), TS), ValueError,
       r"x_T must be float32, float64, bfloat16 or float16, got torch.int64", "xT-int"),
    _p(lambda: tdiff.sample(x0_den, torch.zeros(0, 4), TS), ValueError, r"x_T must be a tensor with a non-empty batch",
       "xT-empty-batch"),
    _p(lambda: tdiff.sample(x0_den, torch.tensor(1.0), TS), ValueError, r"x_T must be a tensor with a non-empty batch",
       "xT-0d"),
    _p(lambda: tdiff.sample(x0_den, [[1.0, 2.0]], TS), ValueError, r"x_T must be a tensor", "xT-list"),
    _p(lambda: tdiff.sample(lambda x, t: x[:1], X(), TS, schedule=VP), ValueError,
       r"denoiser returned an output of shape \(1, 1, 2, 2\); expected \(2, 1, 2, 2\)", "den-wrong-shape"),
    _p(lambda: tdiff.sample(lambda x, t: None, X(), TS, schedule=VP), ValueError,
       r"denoiser returned an output of shape NoneType", "den-none"),
    _p(lambda: tdiff.sample(lambda x, t: x, X(), TS), ValueError, r"denoiser must have a \.schedule", "den-no-schedule"),
    _p(lambda: tdiff.sample("den", X(), TS, schedule=VP), ValueError, r"denoiser must be callable", "den-not-callable"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, guidance=float("nan")), ValueError, r"guidance must be finite",
       "guidance-nan"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, guidance=float("inf")), ValueError, r"guidance must be finite",
       "guidance-inf"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, guidance=torch.ones(3)), ValueError,
       r"guidance must be a number or a \(2,\) tensor, got shape \(3,\)", "guidance-shape"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, guidance=2.0), ValueError,
       r"with guidance, the denoiser must return a pair \(cond, uncond\)", "guidance-not-pair"),
    _p(lambda: tdiff.sample(lambda x, t: (x, x[:1]), X(), TS, schedule=VP, guidance=2.0), ValueError,
       r"denoiser returned a guidance output of shape \(1, 1, 2, 2\)", "guidance-pair-shape"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, check_finite=1), ValueError, r"check_finite must be True or False",
       "check-finite-int"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, state_dtype=torch.float16), ValueError,
       r"state_dtype must be None, torch.float32 or torch.float64", "state-dtype-half"),
    _p(lambda: tdiff.sample(lambda x, t: x * float("nan"), X(), TS, schedule=VP, check_finite=True),
       FloatingPointError, r"non-finite value .* first at step 0", "check-finite-nan"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="ddpm", generator=[torch.Generator()]), ValueError,
       r"a list of generators must hold one per sample \(2\), got 1", "generator-list-length"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, timesteps_cond=torch.tensor([1.0, 0.5, 0.1, 0.0, 0.0])), ValueError,
       r"timesteps_cond must be a 1-D tensor of 2 or 3 times .* got shape \(5,\)", "timesteps-cond-length"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="unipc", disable_corector=[1]), ValueError,
       r"unknown option\(s\) \['disable_corector'\] for solver 'unipc'", "Sampler-option"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="ipndm", order=5), ValueError,
       r"order for solver 'ipndm' must be one of \(1, 2, 3, 4\), got 5", "Sampler-ipndm-order"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="dpmpp").start(torch.zeros(2, 2, dtype=torch.int32)),
       ValueError, r"x_T must be float32", "Sampler-start-int"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="dpmpp", order_rule="fast"), ValueError,
       r"order_rule must be one of \('stable', 'diffusers'\), got 'fast'", "order-rule"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="unipc", variant="bh3"), ValueError, r"variant must be one of \('bh1', 'bh2'\), got 'bh3'",
       "unipc-variant-value"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="dpmpp", solver_type="rk4"), ValueError, r"solver_type must be one of \('midpoint', 'heun'\), got 'rk4'",
       "solver-type-value"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="ddim", eta=-0.5), ValueError, r"eta must be a finite number >= 0, got -0.5",
       "ddim-eta-negative"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="ddim", eta=float("nan")), ValueError, r"eta must be a finite number >= 0, got nan",
       "ddim-eta-nan"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="heun", s_churn=-1.0), ValueError, r"s_churn must be >= 0.0, got -1.0",
       "heun-churn-negative"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="heun", s_noise=float("inf")), ValueError, r"s_noise must be finite, got inf",
       "heun-s-noise-inf"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="dpmpp", orders=[1, 5]), ValueError,
       r"orders\[1\] for solver 'dpmpp' must be one of \(1, 2, 3\) and at most 2",
       "orders-bad"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="dpmpp", orders=[1, 2, 3, 1, 2]), ValueError,
       r"orders for solver 'dpmpp' must be a list of 2 orders \(one per step\)", "orders-length"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="dpmpp", lower_order_final="yes"), ValueError,
       r"lower_order_final must be True or False, got 'yes'", "lower-order-final-str"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="unipc", use_corrector=2), ValueError,
       r"use_corrector must be True or False, got 2", "use-corrector-int"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="unipc", disable_corrector="0"), ValueError,
       r"disable_corrector must be a list of step indices, got '0'", "disable-corrector-str"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="ddim", eta="1"), ValueError,
       r"eta must be a finite number >= 0, got '1'", "ddim-eta-str"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="ddim", targets=["v", "w"]), ValueError,
       r"targets must be a 1-D tensor of 2 times \(where each step lands\), got list", "ddim-targets-str"),
    _p(lambda: tdiff.solvers.Sampler(x0_den, TS, solver="heun", s_churn=1.0, s_min=5.0, s_max=1.0), ValueError,
       r"s_min must be <= s_max .* got s_min=5.0, s_max=1.0", "heun-smin-above-smax"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, guidance="7.5"), ValueError,
       r"guidance must be a number or a \(2,\) tensor, got str '7.5'", "guidance-str"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, solver="ddpm", generator="seed"), ValueError,
       r"generator must be None, a torch.Generator or a list of one per sample, got str 'seed'", "generator-str"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, progress="yes"), ValueError, r"progress must be True or False, got 'yes'",
       "progress-str"),
    _p(lambda: tdiff.sample(lambda x, t: x, X(), TS, schedule="vp"), ValueError,
       r"schedule must be a tdiff NoiseSchedule, got str", "schedule-str"),
    _p(lambda: tdiff.solvers.build_program("vp", TS), ValueError, r"schedule must be a tdiff NoiseSchedule, got str",
       "build-program-schedule"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, timesteps_cond=torch.tensor([1.0, NAN, 0.1])), ValueError,
       r"timesteps_cond contains NaN or inf", "timesteps-cond-nan"),
    _p(lambda: tdiff.sample(x0_den, X(), TS, timesteps_cond=torch.tensor([3.0, 0.5, 0.1])), ValueError,
       r"timesteps_cond is outside the domain of VPLinear", "timesteps-cond-domain"),
    _p(lambda: tdiff.sample(x0_den, X().to(torch.complex64), TS), ValueError,
       r"x_T must be float32, float64, bfloat16 or float16, got torch.complex64", "xT-complex"),
    _p(lambda: tdiff.solvers.to_diffusers(TS, VP, kind="betas"), ValueError,
       r"kind must be 'sigmas' or 'timesteps', got 'betas'", "to-diffusers-kind"),
    _p(lambda: tdiff.solvers.from_diffusers_timesteps(__import__("diffusers").PNDMScheduler()), ValueError,
       r"scheduler class PNDMScheduler is not supported", "from-diffusers-pndm"),
    _p(lambda: tdiff.solvers.from_diffusers_timesteps(__import__("diffusers").DDIMScheduler()), ValueError,
       r"scheduler must have had set_timesteps\(\.\.\.\) called", "from-diffusers-no-set-timesteps"),
    _p(lambda: tdiff.denoiser(net, VP)(X(), "0.5"), TypeError,
       r"times must be a number, a sequence of numbers or a tensor, got str '0.5'", "den-t-str"),
]


@pytest.mark.parametrize("thunk,exc,match", SAMPLE)
def test_sample_refuses(thunk, exc, match):
    _check(thunk, exc, match)


def test_sample_list_timesteps_equal_tensor():
    # legitimate but odd: a Python list of times is the same grid as the tensor
    x = X()
    torch.testing.assert_close(tdiff.sample(x0_den, x, [1.0, 0.5, 0.1]), tdiff.sample(x0_den, x, TS.double()))


def test_sample_guidance_tensor_equals_float():
    pair = lambda x, t: (0.5 * x, 0.25 * x)  # noqa: E731
    pair_den = type("D", (), {"__call__": staticmethod(pair), "schedule": VP})()
    x = X()
    a = tdiff.sample(pair_den, x, TS, guidance=3.0)
    b = tdiff.sample(pair_den, x, TS, guidance=torch.full((2,), 3.0))
    c = tdiff.sample(lambda x, t: 0.25 * x + 3.0 * (0.5 * x - 0.25 * x), x, TS, schedule=VP)  # guided by hand
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


# ---------------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
SCHEDULES = [
    _p(lambda: S.VPLinear(beta0=NAN), ValueError, r"VPLinear beta0 must be finite", "vplinear-beta0-nan"),
    _p(lambda: S.VPLinear(beta0=-0.1), ValueError, r"VPLinear beta0 must be finite and in \(0", "vplinear-beta0-neg"),
    _p(lambda: S.VPLinear(beta1=INF), ValueError, r"VPLinear beta1 must be finite", "vplinear-beta1-inf"),
    _p(lambda: S.VPLinear(beta0=1.0, beta1=0.5), ValueError, r"VPLinear beta1 must be finite and in \(1.0",
       "vplinear-beta1-below-beta0"),
    _p(lambda: S.VPLinear(t_min=1.5), ValueError, r"VPLinear t_min must be finite and in \[0.0, 1.0\)",
       "vplinear-tmin"),
    _p(lambda: S.VPLinear(beta0="0.1"), ValueError, r"VPLinear beta0 must be a number", "vplinear-beta0-str"),
    _p(lambda: S.VPLinear(beta0=True), ValueError, r"VPLinear beta0 must be a number", "vplinear-beta0-bool"),
    _p(lambda: S.VPCosine(s=NAN), ValueError, r"VPCosine s must be finite", "vpcosine-s-nan"),
    _p(lambda: S.VPCosine(t_max=1.5), ValueError, r"VPCosine t_max must be finite and in \(0.0, 1.0\)",
       "vpcosine-tmax"),
    _p(lambda: S.VPCosine(t_max=1.0), ValueError, r"VPCosine t_max must be finite and in \(0.0, 1.0\)",
       "vpcosine-tmax-1"),
    _p(lambda: S.VPCosine(t_min=0.999), ValueError, r"VPCosine t_min must be finite and in \[0.0, 0.9946",
       "vpcosine-tmin-above-tmax"),
    _p(lambda: S.VE(sigma_max=INF), ValueError, r"VE sigma_max must be finite", "ve-sigmamax-inf"),
    _p(lambda: S.VE(sigma_min=0.0), ValueError, r"VE sigma_min must be finite and in \(0.0", "ve-sigmamin-0"),
    _p(lambda: S.VE(sigma_min=10.0, sigma_max=1.0), ValueError, r"VE sigma_max must be finite and in \(10.0",
       "ve-reversed"),
    _p(lambda: S.EDM(sigma_max=INF), ValueError, r"EDM sigma_max must be finite", "edm-sigmamax-inf"),
    _p(lambda: S.EDM(sigma_data=0.0), ValueError, r"EDM sigma_data must be finite and in \(0.0", "edm-sigmadata-0"),
    _p(lambda: S.EDM(sigma_min=-1.0), ValueError, r"EDM sigma_min must be finite and in \(0.0", "edm-sigmamin-neg"),
    _p(lambda: S.RectifiedFlow(t_max=1.0), ValueError, r"RectifiedFlow t_max must be finite and in \(0.0, 1.0\)",
       "flow-tmax-1"),
    _p(lambda: S.RectifiedFlow(t_min=0.0), ValueError, r"RectifiedFlow t_min must be finite and in \(0.0",
       "flow-tmin-0"),
    _p(lambda: S.DiscreteVP(), ValueError, r"DiscreteVP needs exactly one of betas or alphas_cumprod",
       "discrete-none"),
    _p(lambda: S.DiscreteVP(betas=[0.1, 0.2], alphas_cumprod=[0.9, 0.5]), ValueError,
       r"DiscreteVP needs exactly one of", "discrete-both"),
    _p(lambda: S.DiscreteVP(betas=[0.1]), ValueError, r"betas must hold at least 2 finite values", "discrete-one-beta"),
    _p(lambda: S.DiscreteVP(betas=[0.1, NAN, 0.2]), ValueError, r"betas must hold at least 2 finite values",
       "discrete-beta-nan"),
    _p(lambda: S.DiscreteVP(betas=[0.1, -0.2, 0.3]), ValueError, r"betas must hold .* each in \(0, 1\)",
       "discrete-beta-neg"),
    _p(lambda: S.DiscreteVP(betas=[0.1, 1.0, 0.3]), ValueError, r"betas must hold .* each in \(0, 1\)",
       "discrete-beta-1-inside"),
    _p(lambda: S.DiscreteVP(alphas_cumprod=[0.9, 0.95, 0.5]), ValueError,
       r"alphas_cumprod must be strictly decreasing; alphas_cumprod\[1\]", "discrete-ac-increasing"),
    _p(lambda: S.DiscreteVP(alphas_cumprod=[1.0, 0.5]), ValueError, r"alphas_cumprod must hold .* each in \(0, 1\)",
       "discrete-ac-1"),
    _p(lambda: S.FDMMomentum(m=NAN), ValueError, r"FDMMomentum m must be finite", "fdm-m-nan"),
    _p(lambda: S.FDMMomentum(m=-1.0), ValueError, r"FDMMomentum m must be finite and in \[0.0", "fdm-m-neg"),
    _p(lambda: S.FDMMomentum(u_min=1.0, u_max=0.5), ValueError, r"FDMMomentum u_max must be finite and in \(1.0",
       "fdm-u-reversed"),
    _p(lambda: S.FDMMomentum(source="t"), ValueError, r"FDMMomentum.source must be 'sigma' or 'time'",
       "fdm-source"),
    _p(lambda: S.FDMMomentum(on="output"), ValueError, r"FDMMomentum.on must be 'input' or 'mean'", "fdm-on"),
    _p(lambda: S.from_config({"class": "VPSquare"}), ValueError, r"cannot rebuild schedule from .*VPSquare.*known",
       "from-config-class"),
    _p(lambda: S.from_config({"class": "VE", "sigma_max": -1.0}), ValueError, r"VE sigma_max must be finite",
       "from-config-value"),
    _p(lambda: S.betas_from_diffusers_config({"beta_schedule": "sigmoid"}), ValueError,
       r"beta_schedule='sigmoid' is not supported", "betas-schedule"),
    _p(lambda: VP.check_t(torch.tensor([0.5, 2.0])), ValueError, r"t is outside the domain of VPLinear", "check-t"),
    _p(lambda: VP.check_t(torch.tensor([NAN])), ValueError, r"t contains NaN or inf", "check-t-nan"),
    _p(lambda: S.EDM().check_t(torch.tensor([0.0])), ValueError, r"t must be positive for EDM", "edm-check-t-0"),
    _p(lambda: VP.t_from_edm_sigma(torch.tensor([-1.0])), ValueError, r"sigma must be positive", "t-from-sigma-neg"),
    _p(lambda: S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 10)).kernel_spec() and
       S.DiscreteVP(alphas_cumprod=[0.9, 0.5, 0.0]).kernel_spec(), ValueError,
       r"fused kernels do not support a zero-terminal-SNR DiscreteVP", "zero-snr-kernel-spec"),
]


@pytest.mark.parametrize("thunk,exc,match", SCHEDULES)
def test_schedules_refuse(thunk, exc, match):
    _check(thunk, exc, match)


# ---------------------------------------------------------------------------------------------------------------
# time-step heuristics, DM-NonUniform
# ---------------------------------------------------------------------------------------------------------------
HEUR = [uniform_t, quadratic_t, edm_rho, logsnr_uniform]
TIMESTEPS = [
    *[_p(lambda f=f, n=n: f(VP, n), ValueError, r"nfe must be an integer >= 1", f"{f.__name__}-nfe-{n!r}")
      for f in HEUR for n in (0, -3, True, 2.0)],
    *[_p(lambda f=f: f(VP, 4, t_max=0.1, t_min=0.5), ValueError, r"t_min must be < t_max",
         f"{f.__name__}-reversed") for f in HEUR],
    *[_p(lambda f=f: f(VP, 4, t_max=2.0), ValueError, r"t_max is outside the domain of VPLinear",
         f"{f.__name__}-tmax-domain") for f in HEUR],
    *[_p(lambda f=f: f(VP, 4, t_min=NAN), ValueError, r"t_min contains NaN", f"{f.__name__}-tmin-nan") for f in HEUR],
    *[_p(lambda f=f: f("vp", 4), ValueError, r"schedule must be a tdiff NoiseSchedule", f"{f.__name__}-schedule")
      for f in HEUR],
    *[_p(lambda f=f, r=r: f(VP, 4, rho=r), ValueError, r"rho must be", f"{f.__name__}-rho-{r}")
      for f in (quadratic_t, edm_rho) for r in (0.0, -1.0, NAN, INF)],
    _p(lambda: logsnr_uniform(S.VPLinear(t_min=0.0), 4, t_min=0.0), ValueError,
       r"logsnr_uniform spaces points in lambda .* must be finite at both ends", "logsnr-tmin-0"),
    _p(lambda: edm_rho(S.VPLinear(t_min=0.0), 4, t_min=0.0), ValueError,
       r"edm_rho spaces points in log sigma/alpha, .* must be finite at both ends", "edm-rho-tmin-0"),
    _p(lambda: interpolate_schedule(VP, [0.1, 0.5, 1.0], 4), ValueError, r"reference must be strictly decreasing \(from noise to data\)",
       "interpolate-increasing"),
    _p(lambda: interpolate_schedule(VP, [1.0, 0.5, 0.1], 0), ValueError, r"nfe must be an integer >= 1",
       "interpolate-nfe-0"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 0), ValueError, r"nfe must be an integer >= 2, got 0", "dmn-nfe-0"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 3.0), ValueError, r"nfe must be an integer >= 2, got 3.0", "dmn-nfe-float"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, solver="rk45"), ValueError, r"solver must be one of",
       "dmn-solver"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, order=5), ValueError,
       r"order must be 1, 2 or 3 \(the orders of \('dpmpp', 'unipc'\)\), got 5", "dmn-order"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, method="bfgs"), ValueError, r"method must be one of",
       "dmn-method"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, gradient="finite-difference"), ValueError,
       r"gradient='finite-difference' applies to method='trust-constr' only", "dmn-gradient"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, objective="lpips"), ValueError, r"objective must be one of \('lagrange', 'solver'\), got 'lpips'",
       "dmn-objective"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, starts=["random"]), ValueError,
       r"starts must be a non-empty sequence of", "dmn-starts"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, starts=[]), ValueError, r"starts must be a non-empty sequence",
       "dmn-starts-empty"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, margin=-1.0), ValueError, r"margin must be in \[0",
       "dmn-margin"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, maxiter=0), ValueError, r"maxiter must be an integer >= 1",
       "dmn-maxiter"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, tol=0.0), ValueError, r"tol must be > 0", "dmn-tol"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, p=NAN), ValueError, r"p must be a finite number > 0, got nan",
       "dmn-p-nan"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, warmup_steps=-1), ValueError, r"warmup_steps must be an integer >= 0, got -1",
       "dmn-warmup"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, solver="dpmpp", varient="x"), ValueError,
       r"solver options \['varient'\] apply to objective='solver' only", "dmn-unknown-option"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, t_max=0.1, t_min=0.5), ValueError, r"t_min must be < t_max",
       "dmn-reversed"),
    _p(lambda: tdiff.timesteps.sampling_options(0, 3), ValueError, r"nfe must be an integer >= 1, got 0",
       "sampling-options-nfe"),
    _p(lambda: tdiff.timesteps.sampling_options(4, 5), ValueError, r"order must be 1, 2 or 3, got 5",
       "sampling-options-order"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, pipeline_kwargs={"prompt": "a cat"}), ValueError,
       r"pipeline_kwargs is only for a diffusers pipeline; got a VPLinear", "dmn-pipeline-kwargs"),
    _p(lambda: tdiff.timesteps.dm_nonuniform(VP, 4, p=INF), ValueError, r"p must be a finite number > 0, got inf",
       "dmn-p-inf"),
]


@pytest.mark.parametrize("thunk,exc,match", TIMESTEPS)
def test_timesteps_refuse(thunk, exc, match):
    _check(thunk, exc, match)


@pytest.mark.parametrize("f", HEUR, ids=lambda f: f.__name__)
def test_heuristic_nfe_1_is_the_two_ends(f):
    # legitimate but odd: one step is just [t_max, t_min], exactly
    ts = f(VP, 1)
    assert ts.tolist() == [VP.t_max, VP.t_min]


# ---------------------------------------------------------------------------------------------------------------
# LD3 (arguments are checked before any model call)
# ---------------------------------------------------------------------------------------------------------------
def _ld3(**kw):
    base = dict(nfe=3, shape=(1, 2, 2), schedule=VP, n_train=2, n_val=2, epochs=2, progress=False)
    return tdiff.ld3_learn(x0_den, **{**base, **kw})


LD3 = [
    _p(lambda: _ld3(nfe=1), ValueError, r"nfe must be an integer >= 2", "nfe-1"),
    _p(lambda: _ld3(nfe=3.0), ValueError, r"nfe must be an integer >= 2", "nfe-float"),
    _p(lambda: _ld3(nfe=True), ValueError, r"nfe must be an integer >= 2", "nfe-bool"),
    _p(lambda: _ld3(teacher_nfe=3), ValueError, r"teacher_nfe must be greater than the student's nfe \(3\)",
       "teacher-nfe-not-greater"),
    _p(lambda: _ld3(solver="rk4"), ValueError, r"solver must be one of .*'rk4'", "solver"),
    _p(lambda: _ld3(teacher_solver="rk4"), ValueError, r"teacher_solver must be one of", "teacher-solver"),
    _p(lambda: _ld3(loss="lpipz"), ValueError, r"loss must be one of \('l2', 'l1', 'lpips', 'digits_perceptual'\) or a callable .* got 'lpipz'",
       "loss-name"),
    _p(lambda: _ld3(epochs=0), ValueError, r"epochs must be an integer >= 1", "epochs-0"),
    _p(lambda: _ld3(phase1_epochs=3), ValueError, r"phase1_epochs must be in \[0, epochs=2\]",
       "phase1-epochs"),
    _p(lambda: _ld3(batch_size=0), ValueError, r"batch_size must be an integer >= 1", "batch-0"),
    _p(lambda: _ld3(n_train=-1), ValueError, r"n_train must be an integer >= 1", "n-train"),
    _p(lambda: _ld3(r_gamma=NAN), ValueError, r"ball radius must be finite and >= 0, got r_gamma=nan", "r-gamma-nan"),
    _p(lambda: _ld3(r=-1.0), ValueError, r"ball radius must be finite and >= 0, got r=-1.0", "r-negative"),
    _p(lambda: _ld3(lr_decay=0.0), ValueError, r"lr_decay must be in \(0, 1\]", "lr-decay-0"),
    _p(lambda: _ld3(lr_x_decay=1.5), ValueError, r"lr_x_decay must be in \(0, 1\]", "lr-x-decay"),
    _p(lambda: _ld3(lr_decay="fast"), (ValueError, TypeError), r"lr_decay must be", "lr-decay-str"),
    _p(lambda: _ld3(lr_xi=-1.0), ValueError, r"lr_xi must be", "lr-xi-negative"),
    _p(lambda: _ld3(lr_xi=NAN), ValueError, r"lr_xi must be", "lr-xi-nan"),
    _p(lambda: _ld3(lr_x=INF), ValueError, r"lr_x must be", "lr-x-inf"),
    _p(lambda: _ld3(lr_xi_c=-0.1), ValueError, r"lr_xi_c must be", "lr-xi-c"),
    _p(lambda: _ld3(min_lr_xi=-1.0), ValueError, r"min_lr_xi must be", "min-lr-xi"),
    _p(lambda: _ld3(x_grad="mean"), ValueError, r"x_grad must be one of", "x-grad"),
    _p(lambda: _ld3(shape=None), ValueError, r"shape \(the shape of one sample", "shape-none"),
    _p(lambda: _ld3(shape=(1, -2, 2)), ValueError, r"shape must be", "shape-negative"),
    _p(lambda: _ld3(space="sigma"), ValueError, r"space must be one of \('time', 'lambda'\), got 'sigma'", "space"),
    _p(lambda: _ld3(teacher_timesteps="cosine"), ValueError, r"teacher_timesteps must be one of", "teacher-ts-name"),
    _p(lambda: _ld3(teacher_timesteps=torch.tensor([1.0, 0.1])), ValueError, r"teacher_timesteps must hold",
       "teacher-ts-length"),
    _p(lambda: _ld3(init="cosine"), ValueError, r"init must be 'best', one of", "init-name"),
    _p(lambda: _ld3(init=torch.tensor([1.0, 0.1])), ValueError, r"init must hold", "init-length"),
    _p(lambda: _ld3(pipeline_kwargs=dict(prompt="a cat")), ValueError, r"pipeline_kwargs is only for a diffusers pipeline; got a function",
       "pipeline-kwargs"),
    _p(lambda: _ld3(solver="heun", nfe=2), ValueError, r"nfe=2: solver 'heun' .*cannot make exactly 2 model calls|"
       r"single step", "heun-nfe-2"),
]


@pytest.mark.parametrize("thunk,exc,match", LD3)
def test_ld3_refuses(thunk, exc, match):
    _check(thunk, exc, match)


# ---------------------------------------------------------------------------------------------------------------
# fused ops: public functions on every backend, and the registered C++ kernels called directly
# ---------------------------------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(dtype)


B2 = _t(2, 3)  # a (2, 3) batch
ROW1 = torch.tensor([[1.0, 0.5], [1.0, 0.5]])  # (B, 1+K) rows for one history tensor
PQ = torch.tensor([[0.1, 0.9], [0.1, 0.9]])
ZS = S.DiscreteVP(alphas_cumprod=[0.9, 0.5, 0.0])  # zero terminal SNR

OPS = [
    # noisy_sample
    _p(lambda: noisy_sample(B2.long(), B2.long(), torch.rand(2), VP), ValueError,
       r"x0 must be float32, float64, bfloat16 or float16, got torch.int64", "ns-x0-int"),
    _p(lambda: noisy_sample(B2, _t(2, 4), torch.rand(2), VP), ValueError, r"eps must have the shape of x0 \(2, 3\)",
       "ns-eps-shape"),
    _p(lambda: noisy_sample(B2, B2.double(), torch.rand(2), VP), ValueError, r"eps must have the dtype of x0",
       "ns-eps-dtype"),
    _p(lambda: noisy_sample(B2, B2, torch.rand(3), VP), ValueError, r"t must have shape \(2,\) \(one time per sample\)",
       "ns-t-shape"),
    _p(lambda: noisy_sample(B2, B2, torch.rand(2, 1), VP), ValueError, r"t must have shape \(2,\)", "ns-t-2d"),
    _p(lambda: noisy_sample(B2, B2, torch.zeros(2, dtype=torch.long), VP), ValueError,
       r"t must be a floating tensor, got torch.int64", "ns-t-int"),
    _p(lambda: noisy_sample(B2, B2, 2.0, VP), ValueError,
       r"noisy_sample: t must be finite and inside the domain \[0.0, 1.0\] of VPLinear", "ns-t-2"),
    _p(lambda: noisy_sample(B2, B2, -1.0, VP), ValueError, r"noisy_sample: t must be finite and inside the domain",
       "ns-t-neg"),
    _p(lambda: noisy_sample(B2, B2, INF, VP), ValueError, r"noisy_sample: t must be finite and inside the domain",
       "ns-t-inf"),
    _p(lambda: noisy_sample(B2, B2, torch.tensor([0.5, NAN]), VP), ValueError,
       r"noisy_sample: t must be finite .* for samples \[1\]", "ns-t-nan"),
    _p(lambda: noisy_sample(B2, B2, 0.5, "vp"), TypeError, r"schedule must be a tdiff NoiseSchedule, got str",
       "ns-schedule-str"),
    _p(lambda: noisy_sample(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0), VP), ValueError,
       r"x0 must have a non-empty batch dimension", "ns-empty"),
    _p(lambda: noisy_sample([1.0, 2.0], B2, 0.5, VP), TypeError, r"x0 must be a tensor, got list", "ns-x0-list"),
    _p(lambda: noisy_sample(B2, [1.0, 2.0], torch.rand(2), VP), TypeError, r"eps must be a tensor, got list",
       "ns-eps-list"),
    _p(lambda: noisy_sample(B2, B2, 0.5, ZS), ValueError, r"fused kernels do not support a zero-terminal-SNR",
       "ns-zero-snr"),
    _p(lambda: noisy_sample(B2, B2, 0.5, VP, precond_sigma_data=-0.5), ValueError,
       r"precond_sigma_data must be None or a finite number > 0, got (-0.5|nan)",
       "ns-sigma-data-neg"),
    _p(lambda: noisy_sample(B2, B2, 0.5, VP, precond_sigma_data=NAN), ValueError,
       r"precond_sigma_data must be None or a finite number > 0, got (-0.5|nan)",
       "ns-sigma-data-nan"),
    # multistep_update
    _p(lambda: multistep_update(B2.long(), [B2.long()], ROW1), ValueError, r"x must be float32", "mu-x-int"),
    _p(lambda: multistep_update(B2, [], ROW1[:, :1]), ValueError, r"history must hold 1 to 4 tensors, got 0",
       "mu-history-empty"),
    _p(lambda: multistep_update(B2, [B2] * 5, torch.ones(2, 6)), ValueError,
       r"history must hold 1 to 4 tensors, got 5", "mu-history-5"),
    _p(lambda: multistep_update(B2, [None], ROW1), TypeError, r"history\[0\] must be a tensor like x, got NoneType",
       "mu-history-none"),
    _p(lambda: multistep_update(B2, B2, ROW1), TypeError, r"history must be a list of 1 to 4 tensors, got Tensor",
       "mu-history-tensor"),
    _p(lambda: multistep_update(B2, [B2, _t(2, 4)], torch.ones(2, 3)), ValueError,
       r"history\[1\] must have the shape of x \(2, 3\), got \(2, 4\)", "mu-history-shape"),
    _p(lambda: multistep_update(B2, [B2.double()], ROW1), ValueError, r"history\[0\] must have the dtype of x",
       "mu-history-dtype"),
    _p(lambda: multistep_update(B2, [B2], torch.ones(2, 3)), ValueError,
       r"coeffs must have shape \(2, 2\) \(one row \[c_x, c_0..c_K-1\] per sample\), got \(2, 3\)", "mu-coeffs-width"),
    _p(lambda: multistep_update(B2, [B2], torch.ones(3, 2)), ValueError, r"coeffs must have shape \(2, 2\)",
       "mu-coeffs-batch"),
    _p(lambda: multistep_update(B2, [B2], ROW1.double()), ValueError,
       r"coeffs must be torch.float32 for torch.float32 data, got torch.float64", "mu-coeffs-dtype"),
    _p(lambda: multistep_update(B2, [B2], torch.tensor([[1.0, NAN], [1.0, 0.5]])), ValueError,
       r"coeffs must be finite; rows \[0\] hold NaN or inf", "mu-coeffs-nan"),
    _p(lambda: multistep_update(B2, [B2], torch.tensor([1.0, INF])), ValueError, r"coeffs must be finite",
       "mu-coeffs-shared-inf"),
    _p(lambda: multistep_update(B2, [B2], ROW1, uncond=B2), ValueError,
       r"uncond and scale must be given together", "mu-uncond-no-scale"),
    _p(lambda: multistep_update(B2, [B2], ROW1, scale=2.0), ValueError, r"uncond and scale must be given together",
       "mu-scale-no-uncond"),
    _p(lambda: multistep_update(B2, [B2], ROW1, src=B2), ValueError,
       r"src is the sample the network saw; it needs convert rows", "mu-src-no-convert"),
    _p(lambda: multistep_update(B2, [B2], ROW1, convert=torch.ones(2, 3)), ValueError,
       r"convert must have shape \(2, 2\) \(one row \[p, q\] per sample\)", "mu-convert-width"),
    _p(lambda: multistep_update(B2, [B2], ROW1, convert=torch.tensor([NAN, 1.0])), ValueError,
       r"convert must be finite", "mu-convert-nan"),
    _p(lambda: multistep_update(B2, [B2], ROW1, uncond=B2, scale=NAN), ValueError, r"scale must be finite",
       "mu-scale-nan"),
    _p(lambda: multistep_update(B2, [B2], ROW1, uncond=B2, scale=torch.ones(3)), ValueError,
       r"scale must have shape \(2,\) \(one guidance scale per sample\)", "mu-scale-shape"),
    _p(lambda: multistep_update(B2, [B2], ROW1, uncond=_t(2, 4), scale=1.0), ValueError,
       r"uncond must have the shape of history\[0\] \(cond\)", "mu-uncond-shape"),
    _p(lambda: multistep_update(B2, [B2], ROW1, uncond=[1.0], scale=1.0), TypeError,
       r"uncond must be a tensor like history\[0\], got list", "mu-uncond-list"),
    _p(lambda: multistep_update(B2, [B2], ROW1, src=_t(2, 4), convert=PQ), ValueError,
       r"src must have the shape of x \(2, 3\), got \(2, 4\)", "mu-src-shape"),
    _p(lambda: multistep_update(B2, [B2], ROW1, check=False, uncond=_t(2, 4), scale=1.0), ValueError,
       r"uncond must have the shape of history\[0\] \(cond\)", "mu-nocheck-uncond-shape"),
    _p(lambda: multistep_update(B2, [_t(2, 4)], ROW1, check=False), ValueError,
       r"history\[0\] must have the shape of x", "mu-nocheck-history-shape"),
    _p(lambda: multistep_update(B2, [B2], torch.ones(2, 3), check=False), ValueError, r"coeffs must have shape \(2, 2\)",
       "mu-nocheck-coeffs-width"),
    _p(lambda: multistep_update(torch.zeros(0, 3), [torch.zeros(0, 3)], torch.zeros(0, 2)), ValueError,
       r"x must have a non-empty batch dimension", "mu-empty"),
    # weighted_mse
    _p(lambda: weighted_mse(B2.long(), B2.long(), torch.ones(2)), ValueError, r"pred must be float32",
       "wm-pred-int"),
    _p(lambda: weighted_mse(B2, _t(2, 4), torch.ones(2)), ValueError, r"target must have the shape of pred \(2, 3\)",
       "wm-target-shape"),
    _p(lambda: weighted_mse(B2, B2.double(), torch.ones(2)), ValueError, r"target must have the dtype of pred",
       "wm-target-dtype"),
    _p(lambda: weighted_mse(B2, B2, torch.ones(3)), ValueError,
       r"weight must have shape \(2,\) \(one weight per sample\)", "wm-weight-shape"),
    _p(lambda: weighted_mse(B2, B2, torch.ones(2, 1)), ValueError, r"weight must have shape \(2,\)",
       "wm-weight-2d"),
    _p(lambda: weighted_mse(B2, B2, torch.ones(2, dtype=torch.long)), ValueError, r"weight must be float32",
       "wm-weight-int"),
    _p(lambda: weighted_mse(B2, B2, [1.0, 1.0]), TypeError, r"weight must be a tensor, got list", "wm-weight-list"),
    _p(lambda: weighted_mse(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0)), ValueError,
       r"pred must have a non-empty batch dimension and data", "wm-empty"),
    _p(lambda: weighted_mse(torch.zeros(2, 0), torch.zeros(2, 0), torch.ones(2)), ValueError,
       r"pred must have a non-empty batch dimension and data", "wm-no-data"),
    # cached_block: x (3, 4, 5), gate (3, 5), fresh (K, 4, 5), cache (3, 4, 5), source (3,)
    _p(lambda: cached_block(_t(3, 20), _t(3, 5), _t(1, 4, 5), _t(3, 20), torch.tensor([0, -1, -1])), ValueError,
       r"x must be \(B, N, C\) with B > 0, got shape \(3, 20\)", "cb-x-2d"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 4), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, -1, -1])), ValueError,
       r"gate must have shape \(3, 5\), got \(3, 4\)", "cb-gate-shape"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1), _t(3, 4, 5), torch.tensor([0, -1, -1])), ValueError,
       r"fresh must have shape \(K, 4, 5\)", "cb-fresh-1-element"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(4, 4, 5), _t(3, 4, 5), torch.tensor([0, 1, 2])), ValueError,
       r"fresh must have shape \(K, 4, 5\)", "cb-fresh-K-above-B"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1, 4, 5), _t(3, 4, 6), torch.tensor([0, -1, -1])), ValueError,
       r"cache must have the shape of x \(3, 4, 5\)", "cb-cache-shape"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, 10**6, -1])),
       ValueError, r"source.* out of range", "cb-source-huge"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, -2, -1])),
       ValueError, r"source.* out of range", "cb-source-minus-2"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, -1, -1],
                                                                                      dtype=torch.int32)),
       ValueError, r"source must be an int64 tensor of shape \(3,\)", "cb-source-int32"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, -1])), ValueError,
       r"source must be an int64 tensor of shape \(3,\)", "cb-source-short"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, 0, -1])), ValueError,
       r"source (must map the computing samples one-to-one onto the 1 rows of fresh|maps two samples onto fresh row 0)",
       "cb-source-duplicate"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5), _t(2, 4, 5), _t(3, 4, 5), torch.tensor([0, -1, -1])), ValueError,
       r"(source must map the computing samples one-to-one onto the 2 rows|fresh has 2 rows but source selects 1)",
       "cb-fresh-row-unread"),
    _p(lambda: cached_block(_t(3, 4, 5), _t(3, 5).double(), _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, -1, -1])),
       ValueError, r"gate must have the dtype of x", "cb-gate-dtype"),
    _p(lambda: cached_block(_t(3, 4, 5).long(), _t(3, 5).long(), _t(1, 4, 5).long(), _t(3, 4, 5).long(),
                            torch.tensor([0, -1, -1])), ValueError, r"x must be float32", "cb-x-int"),
    _p(lambda: cached_block(_t(3, 4, 5), None, _t(1, 4, 5), _t(3, 4, 5), torch.tensor([0, -1, -1])), TypeError,
       r"gate must be a tensor, got NoneType", "cb-gate-none"),
]


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("thunk,exc,match", OPS)
def test_ops_refuse(monkeypatch, backend, thunk, exc, match):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    _check(thunk, exc, match)


def _cpp():
    from tdiff.ops import dispatch

    assert dispatch.extension_loaded(), "tdiff._C is not built: the registered C++ kernels cannot be checked"
    return torch.ops.tdiff


X345 = _t(3, 4, 5)
CPP_KERNELS = [
    _p(lambda: _cpp().cached_block_cpu(X345, _t(3, 5), _t(1), X345, torch.tensor([0, -1, -1])), ValueError,
       r"tdiff::cached_block_cpu: fresh must have shape \(K, 4, 5\)", "cached_block_cpu-fresh"),
    _p(lambda: _cpp().cached_block_cpu(X345, _t(3, 5), _t(1, 4, 5), X345, torch.tensor([0, 10**6, -1])), ValueError,
       r"tdiff::cached_block_cpu: source\[1\] = 1000000 is out of range", "cached_block_cpu-source"),
    _p(lambda: _cpp().cached_block_backward_cpu(X345, X345, _t(3, 5), X345, torch.tensor([0, 10**6, -1]), 1),
       ValueError, r"tdiff::cached_block_backward_cpu: source\[1\] = 1000000 is out of range",
       "cached_block_backward_cpu-source"),
    _p(lambda: _cpp().cached_block_backward_cpu(X345, X345, _t(3, 5), X345, torch.tensor([0, -1, -1]), 7),
       ValueError, r"tdiff::cached_block_backward_cpu: the number of fresh rows must be in \[0, 3\], got 7",
       "cached_block_backward_cpu-computed"),
    _p(lambda: _cpp().noisy_sample_backward_cpu(B2, B2, _t(1)), ValueError,
       r"tdiff::noisy_sample_backward_cpu: coefs must have shape \(2, 3\)", "noisy_sample_backward_cpu-coefs"),
    _p(lambda: _cpp().noisy_sample_cpu(B2, B2, torch.rand(2), 7, [0.1, 20.0, 0.0, 0.0], None, -1.0, [], 0, False),
       ValueError, r"kind must be a schedule kind code 0..5, got 7", "noisy_sample_cpu-kind"),
    _p(lambda: _cpp().noisy_sample_cpu(B2, B2, torch.rand(2), 2, [0.5, 0.5, 50.0, 0.0], torch.zeros(3).double(), -1.0,
                                       [], 0, False), ValueError, r"a discrete schedule needs its float64 log-alpha table with params\[2\] >= 2 entries",
       "noisy_sample_cpu-table-length"),
    _p(lambda: _cpp().noisy_sample_cpu(B2, B2, torch.rand(2), 0, [0.1, 20.0, 0.0, 0.0], None, -1.0, [1.0], 1, False),
       ValueError, r"fdm must hold 6", "noisy_sample_cpu-fdm"),
    _p(lambda: _cpp().multistep_update_cpu(B2, [B2] * 5, torch.ones(2, 6)), ValueError,
       r"tdiff::multistep_update_cpu: history must hold 1 to 4 tensors, got 5", "multistep_update_cpu-K5"),
    _p(lambda: _cpp().multistep_update_cpu(B2, [_t(1)], ROW1), ValueError, r"tdiff::multistep_update_cpu: history\[0\]",
       "multistep_update_cpu-history-shape"),
    _p(lambda: _cpp().multistep_update_convert_cpu(B2, [B2], ROW1, None, None, None, torch.ones(2, 5)), ValueError,
       r"tdiff::multistep_update_convert_cpu: convert", "multistep_update_convert_cpu-convert"),
    _p(lambda: _cpp().multistep_update_backward_cpu(B2, B2, [B2], torch.ones(2, 3)), ValueError,
       r"tdiff::multistep_update_backward_cpu: coeffs", "multistep_update_backward_cpu-coeffs"),
    _p(lambda: _cpp().weighted_mse_cpu(B2, B2, _t(3)), ValueError,
       r"tdiff::weighted_mse_cpu: weight must have shape \(2,\)", "weighted_mse_cpu-weight"),
    _p(lambda: _cpp().weighted_mse_backward_cpu(_t(3), B2, B2, _t(2)), ValueError,
       r"tdiff::weighted_mse_backward_cpu: grad_loss", "weighted_mse_backward_cpu-grad"),
]


@pytest.mark.parametrize("thunk,exc,match", CPP_KERNELS)
def test_registered_cpp_kernels_refuse(thunk, exc, match):
    _check(thunk, exc, match)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_ops_odd_but_legitimate_input(monkeypatch, backend):
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    x, h = _t(2, 3), _t(2, 3) + 1
    # a shared (1+K,) row is the same as the row expanded over the batch
    torch.testing.assert_close(multistep_update(x, [h], torch.tensor([0.5, 2.0])), 0.5 * x + 2.0 * h)
    # a float guidance scale is the same as a (B,) tensor of it
    u = _t(2, 3) - 1
    a, _ = multistep_update(x, [h], ROW1, uncond=u, scale=3.0)
    b, _ = multistep_update(x, [h], ROW1, uncond=u, scale=torch.full((2,), 3.0))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, x + 0.5 * (u + 3.0 * (h - u)))
    # one float time is the batch's time; t = 0 on EDM is the clean sample (sigma = 0)
    xt, _ = noisy_sample(x, h, 0.25, VP)
    torch.testing.assert_close(xt, noisy_sample(x, h, torch.full((2,), 0.25), VP)[0])
    torch.testing.assert_close(noisy_sample(x, h, torch.zeros(2), S.EDM())[0], x)
    # zero weights give a zero loss; a block where every sample reuses its cache is x + gate * cache
    assert torch.equal(weighted_mse(x, h, torch.zeros(2)), torch.zeros(2))
    xb, gate, cache = _t(3, 4, 5), _t(3, 5), _t(3, 4, 5) + 2
    out, branch = cached_block(xb, gate, torch.zeros(0, 4, 5), cache, torch.full((3,), -1))
    torch.testing.assert_close(out, xb + gate[:, None, :] * cache)
    torch.testing.assert_close(branch, cache)


# ---------------------------------------------------------------------------------------------------------------
# denoisers
# ---------------------------------------------------------------------------------------------------------------
def net(x, t, y=None):
    return 0.1 * x


DEN = [
    _p(lambda: tdiff.denoiser(net, VP, prediction="epsilon"), ValueError, r"prediction must be one of .*'epsilon'",
       "prediction"),
    _p(lambda: tdiff.denoiser(net, VP, precond="karras"), ValueError, r"precond must be None or 'edm', got 'karras'",
       "precond"),
    _p(lambda: tdiff.denoiser(net, VP, guidance=NAN), ValueError, r"guidance must be a finite number or None",
       "guidance-nan"),
    _p(lambda: tdiff.denoiser(net, VP, guidance="7.5"), ValueError, r"guidance must be a finite number or None",
       "guidance-str"),
    _p(lambda: tdiff.denoiser(net, VP, clip_x0=0.0), ValueError, r"clip_x0 must be > 0", "clip-x0-0"),
    _p(lambda: tdiff.denoiser(net, VP, clip_x0=INF), ValueError, r"clip_x0 must be a finite number", "clip-x0-inf"),
    _p(lambda: tdiff.denoiser(net, VP, null_label=-1), ValueError, r"null_label must be None or a class index >= 0",
       "null-label"),
    _p(lambda: tdiff.denoiser("net", VP), ValueError, r"model must be callable", "model-str"),
    _p(lambda: tdiff.denoiser(net, "vp"), ValueError, r"schedule must be a tdiff NoiseSchedule, got str",
       "schedule-str"),
    _p(lambda: tdiff.denoiser(net, VP, model_time=5), ValueError, r"model_time must be None or a callable",
       "model-time"),
    _p(lambda: tdiff.denoisers.Denoiser(net, VP, validate=1), ValueError, r"validate must be True or False",
       "validate-int"),
    _p(lambda: tdiff.denoiser(net, VP)(X(), torch.tensor([0.5, 0.5, 0.5])), ValueError,
       r"t must be a scalar or have shape \(2,\), got \(3,\)", "call-t-shape"),
    _p(lambda: tdiff.denoiser(net, VP)(X(), 1.5), ValueError, r"t is outside the domain of VPLinear", "call-t-domain"),
    _p(lambda: tdiff.denoiser(net, VP)(torch.ones(3), 0.5), ValueError, r"x must be a tensor of shape \(B, \.\.\.\)",
       "call-x-1d"),
    _p(lambda: tdiff.denoiser(lambda x, t, y=None: x[:, :, :1], VP)(X(), 0.5), ValueError,
       r"the network returned shape \(2, 1, 1, 2\); expected \(2, 1, 2, 2\)", "network-shape"),
    _p(lambda: tdiff.denoiser(lambda x, t, y=None: None, VP)(X(), 0.5), ValueError,
       r"the network must return a tensor shaped like x", "network-none"),
    _p(lambda: tdiff.denoiser(net, VP, guidance=2.0)(X(), 0.5, y=torch.tensor([1, 2])), ValueError,
       r"guidance needs null_label", "guidance-no-null-label"),
    _p(lambda: tdiff.denoiser(net, VP).conversion(0.5, "v"), ValueError, r"target must be 'x0' or 'eps', got 'v'",
       "conversion-target"),
    _p(lambda: tdiff.denoiser(net, VP).edm_call(X(), -1.0), ValueError, r"sigma must be positive", "edm-call-sigma"),
    _p(lambda: tdiff.denoisers.from_diffusers(net, {"_class_name": "DDPMScheduler", "prediction_type": "mu"}),
       ValueError, r"prediction_type 'mu' is not supported", "diffusers-prediction-type"),
    _p(lambda: tdiff.denoisers.from_diffusers(net, {"_class_name": "DDIMScheduler", "thresholding": True}),
       ValueError, r"thresholding=True cannot be reproduced", "diffusers-thresholding"),
    _p(lambda: tdiff.denoisers.from_diffusers(net, {"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}),
       ValueError, r"beta_schedule='sigmoid' is not supported", "diffusers-beta-schedule"),
    _p(lambda: tdiff.denoisers.from_diffusers(net, {"_class_name": "ScoreSdeVeScheduler", "sigma_min": 0.01,
                                                    "sigma_max": 1348.0}), ValueError,
       r"scheduler 'ScoreSdeVeScheduler' has no DDPM noise schedule", "diffusers-score-sde-ve"),
    _p(lambda: tdiff.denoisers.from_diffusers(net, {"_class_name": "EDMEulerScheduler", "sigma_min": 0.002,
                                                    "sigma_max": 80.0, "sigma_data": 0.5}), ValueError,
       r"scheduler 'EDMEulerScheduler' has no DDPM noise schedule", "diffusers-edm-euler"),
]


@pytest.mark.parametrize("thunk,exc,match", DEN)
def test_denoisers_refuse(thunk, exc, match):
    _check(thunk, exc, match)


def test_from_diffusers_flow_heun_is_flow():
    # FlowMatchHeunDiscreteScheduler is flow matching too (it used to get DDPM's default betas)
    den = tdiff.denoisers.from_diffusers(net, {"_class_name": "FlowMatchHeunDiscreteScheduler",
                                              "num_train_timesteps": 1000})
    assert isinstance(den.schedule, S.RectifiedFlow) and den.prediction == "flow"


# ---------------------------------------------------------------------------------------------------------------
# learned caching: masks, cached_dit / apply_learned_cache, train_mask, macs, mask files
# ---------------------------------------------------------------------------------------------------------------
from tdiff import cache as C  # noqa: E402
from tdiff.models.dit import DiT, DiTConfig  # noqa: E402


def tiny_dit():
    """A 1-block DiT (2 mask columns: attention and MLP)."""
    torch.manual_seed(0)
    return DiT(DiTConfig(input_size=4, patch_size=2, in_channels=1, hidden_size=8, depth=1, num_heads=2,
                         num_classes=2)).eval()


M4 = torch.ones(4, 2, dtype=torch.bool)  # a valid 4-step mask for tiny_dit


def _twice():
    m = tiny_dit()
    tdiff.cached_dit(m, M4)
    return tdiff.cached_dit(m, M4)


def _train(**kw):
    return C.train_mask(tiny_dit(), kw.pop("sample_fn", lambda m: None), progress=False, **kw)


CACHE = [
    _p(lambda: tdiff.cached_dit(tiny_dit(), None), ValueError, r"mask is None; pass a \(steps, columns\) 0/1 matrix",
       "cached-dit-none"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), torch.ones(4, 3)), ValueError,
       r"mask must have shape \(steps, 2\) .* got \(4, 3\)", "cached-dit-columns"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), torch.ones(2)), ValueError,
       r"mask must be a non-empty \(steps, columns\) or \(batch, steps, columns\) matrix, got shape \(2,\)",
       "cached-dit-1d"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), torch.ones(0, 2)), ValueError, r"mask must be a non-empty", "cached-dit-empty"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), torch.full((4, 2), 0.5)), ValueError, r"mask entries must be 0 or 1",
       "cached-dit-scores"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), torch.full((4, 2), 2)), ValueError, r"mask entries must be 0 or 1",
       "cached-dit-2"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), torch.ones(4, 2, dtype=torch.complex64)), ValueError,
       r"mask entries must be 0 or 1", "cached-dit-complex"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), M4, nfe=5), ValueError, r"mask has 4 steps but nfe=5", "cached-dit-nfe"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), M4, granularity="layer"), ValueError,
       r"granularity must be one of .*'layer'", "cached-dit-granularity"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), M4, formulation="input"), ValueError,
       r"formulation must be one of .*'input'", "cached-dit-formulation"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), C.LearnedMask(M4), formulation="branch"), ValueError,
       r"formulation 'branch' contradicts the mask's 'output'", "cached-dit-contradicts"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), C.LearnedMask(M4, fingerprint="0" * 16)), ValueError,
       r"this mask was trained for a model with fingerprint 0{16}", "cached-dit-fingerprint"),
    _p(lambda: tdiff.cached_dit(tiny_dit(), C.LearnedMask(M4), nfe=6), ValueError,
       r"this mask has 4 steps \(NFE\) but the sampler uses 6", "cached-dit-learned-nfe"),
    _p(lambda: tdiff.cached_dit(torch.nn.Linear(2, 2), M4), ValueError, r"cannot find cacheable units in Linear",
       "cached-dit-linear"),
    _p(lambda: tdiff.cached_dit("dit", M4), ValueError, r"model must be a torch.nn.Module, got str", "cached-dit-str"),
    _p(_twice, ValueError, r"DiT already has a learned cache installed; call \.remove\(\) on it first",
       "cached-dit-twice"),
    _p(lambda: C.apply_learned_cache(tiny_dit(), M4), ValueError, r"config must be a LearnedCacheConfig, got Tensor",
       "apply-config-tensor"),
    _p(lambda: C.LearnedMask(M4, network_times=[1.0, 2.0]), ValueError,
       r"network_times has 2 entries for 4 mask rows", "learned-mask-network-times"),
    _p(lambda: C.resample_mask(C.LearnedMask(M4), 0), ValueError, r"nfe must be a positive integer, got 0",
       "resample-nfe-0"),
    _p(lambda: C.resample_mask(C.LearnedMask(M4), 2.5), ValueError, r"nfe must be a positive integer, got 2.5",
       "resample-nfe-float"),
    _p(lambda: C.macs(tiny_dit(), None, (torch.zeros(1, 1, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long))),
       ValueError, r"pass the mask to count", "macs-no-mask"),
    _p(lambda: C.macs(tiny_dit(), torch.ones(4, 3), (torch.zeros(1, 1, 4, 4), torch.zeros(1))), ValueError,
       r"mask must have shape \(steps, 2\)", "macs-mask-columns"),
    _p(lambda: C.macs(tiny_dit(), torch.full((4, 2), 0.5), (torch.zeros(1, 1, 4, 4), torch.zeros(1))), ValueError,
       r"mask entries must be 0 or 1", "macs-mask-scores"),
    _p(lambda: C.macs(tiny_dit(), M4, (torch.zeros(1, 1, 4, 4), torch.zeros(1)), granularity="layer"), ValueError,
       r"granularity must be one of", "macs-granularity"),
    _p(lambda: C.macs(torch.nn.Linear(2, 2), M4, (torch.zeros(1, 2),)), ValueError, r"cannot find cacheable units",
       "macs-linear"),
    _p(lambda: _train(iterations=0), ValueError, r"iterations must be a positive integer, got 0", "train-iters-0"),
    _p(lambda: _train(iterations=2.0), ValueError, r"iterations must be a positive integer, got 2.0",
       "train-iters-float"),
    _p(lambda: _train(lr=NAN), ValueError, r"lr must be a finite number >= 0, got nan", "train-lr-nan"),
    _p(lambda: _train(lambda1=-1.0), ValueError, r"lambda1 must be a finite number >= 0", "train-lambda1"),
    _p(lambda: _train(lambda2=INF), ValueError, r"lambda2 must be a finite number >= 0, got inf", "train-lambda2"),
    _p(lambda: _train(threshold=1.5), ValueError, r"threshold must be a number in \[0, 1\], got 1.5",
       "train-threshold"),
    _p(lambda: _train(threshold=NAN), ValueError, r"threshold must be a number in \[0, 1\], got nan",
       "train-threshold-nan"),
    _p(lambda: _train(bimodal_start=True), ValueError, r"bimodal_start must be a number in \[0, 1\]",
       "train-bimodal-start"),
    _p(lambda: _train(bimodal_growth=10.0), ValueError, r"bimodal_growth must be a number in \[1, 10\)",
       "train-growth"),
    _p(lambda: _train(relaxation="gumbel"), ValueError, r"relaxation must be one of \('bernoulli', 'soft'\)",
       "train-relaxation"),
    _p(lambda: _train(feature_loss="l3"), ValueError, r"feature_loss must be one of", "train-feature-loss"),
    _p(lambda: _train(cache_update="lazy"), ValueError, r"cache_update must be one of", "train-cache-update"),
    _p(lambda: _train(granularity="layer"), ValueError, r"granularity must be one of", "train-granularity"),
    _p(lambda: _train(formulation="input"), ValueError, r"formulation must be one of", "train-formulation"),
    _p(lambda: _train(target_mac_fraction=1.5), ValueError, r"target_mac_fraction must be None or a number in \(0, 1\], got 1.5",
       "train-mac-fraction"),
    _p(lambda: _train(sample_fn="sampler"), ValueError, r"sample_fn must be a callable sample_fn\(model\)",
       "train-sample-fn"),
    _p(lambda: _train(pipeline_kwargs=dict(prompt="a cat")), ValueError,
       r"pipeline_kwargs is only for a diffusers pipeline; got a network", "train-pipeline-kwargs"),
    _p(lambda: _train(), ValueError, r"sample_fn never called the model", "train-never-called"),
    _p(lambda: C.binarise(torch.full((3, 2), NAN)), ValueError, r"scores must be finite, got NaN or inf",
       "binarise-nan"),
    _p(lambda: C.binarise(torch.rand(3)), ValueError, r"scores must be a \(steps, columns\) matrix, got shape \(3,\)",
       "binarise-1d"),
    _p(lambda: C.binarise(torch.rand(3, 2), threshold=2.0), ValueError, r"threshold must be in \[0, 1\], got 2.0",
       "binarise-threshold"),
    _p(lambda: C.binarise(torch.rand(3, 2), target_mac_fraction=0.5, unit_macs=[1.0]), ValueError,
       r"unit_macs must give the MACs of each of the 2 columns", "binarise-unit-macs"),
    _p(lambda: C.uniform_interval_mask(-1, 2, 1), ValueError, r"steps must be an integer >= 1, got -1",
       "interval-mask-steps"),
    _p(lambda: C.uniform_interval_mask(4, 2, 0), ValueError, r"interval must be an integer >= 1, got 0",
       "interval-mask-interval"),
    _p(lambda: C.uniform_mask_at_fraction(4, [1.0, 1.0], 0.0, 1.5), ValueError, r"fraction must be in \(0, 1\], got 1.5",
       "mask-at-fraction"),
    _p(lambda: C.rectify(torch.ones(3, 5, dtype=torch.bool), C.UnitGraph.chain(2)), ValueError,
       r"the graph has 2 columns but the mask has 5", "rectify-columns"),
    _p(lambda: C.rectify(torch.full((3, 2), 0.5), C.UnitGraph.chain(2)), ValueError, r"mask entries must be 0 or 1",
       "rectify-scores"),
    _p(lambda: C.rectify(M4, M4), ValueError, r"graph must be a tdiff.cache.UnitGraph .* got Tensor", "rectify-graph"),
    _p(lambda: C.register_adapter("DiT", None), ValueError,
       r"register_adapter\(model_class, adapter\) takes a class and a CacheAdapter instance", "register-adapter"),
    _p(lambda: C.mask_columns(tiny_dit(), "layer"), ValueError, r"granularity must be one of \('unit', 'block'\)",
       "mask-columns-granularity"),
]


@pytest.mark.parametrize("thunk,exc,match", CACHE)
def test_cache_refuses(thunk, exc, match):
    _check(thunk, exc, match)


def test_integer_mask_equals_bool_mask():
    # legitimate but odd: an int 0/1 mask is the bool mask
    m = tiny_dit()
    x, t, y = torch.randn(2, 1, 4, 4), torch.full((2,), 500.0), torch.tensor([0, 1])
    rows = torch.tensor([[1, 1], [0, 1], [1, 0], [0, 0]])
    outs = []
    for mask in (rows, rows.bool()):
        fast = tdiff.cached_dit(m, mask)
        with fast.sampling_run():
            outs.append([fast(x, t, y) for _ in range(4)])
        fast.remove()
    for a, b in zip(*outs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# artefact files: a valid file is written, then damaged (or replaced) one way per case; every loader must name the
# file and what is wrong
# ---------------------------------------------------------------------------------------------------------------
def _set(**kv):
    def mutate(doc):
        for k, v in kv.items():
            *path, last = k.split(".")
            d = doc
            for p in path:
                d = d[p]
            d[last] = v
        return doc
    return mutate


def _drop(key):
    def mutate(doc):
        *path, last = key.split(".")
        d = doc
        for p in path:
            d = d[p]
        del d[last]
        return doc
    return mutate


# damage applied to the file itself (bytes or path), the same for every JSON artefact
def _write_damaged(path, how, doc_text):
    if how == "truncated":
        path.write_text(doc_text[: len(doc_text) // 2])
    elif how == "not-json":
        path.write_text("this is not JSON {")
    elif how == "non-utf8":
        path.write_bytes(b"\xff\xfe\x00{" + doc_text.encode()[4:])
    elif how == "top-level-list":
        path.write_text("[1, 2, 3]")
    elif how == "empty":
        path.write_text("")
    elif how == "directory":
        path.unlink()
        path.mkdir()
    elif how == "missing":
        path.unlink()
    elif how == "wrong-format":
        doc = json.loads(doc_text)
        doc["format"] = "someone-else"
        path.write_text(json.dumps(doc))
    elif how == "wrong-version":
        doc = json.loads(doc_text)
        doc["format_version"] = 99
        path.write_text(json.dumps(doc))
    else:
        raise AssertionError(how)


FILE_DAMAGE = {
    "truncated": r"cannot read .* file '.*x\.json'",
    "not-json": r"cannot read .* file '.*x\.json'",
    "non-utf8": r"cannot read .* file '.*x\.json': it is not UTF-8",
    "top-level-list": r"'.*x\.json' holds a list, expected a tdiff .* file \(an object\)",
    "empty": r"cannot read .* file '.*x\.json'",
    "directory": r"cannot read .* file '.*x\.json'",
    "missing": r"cannot read .* file '.*x\.json'",
    "wrong-format": r"'.*x\.json' is a 'someone-else' file, expected a '(tdiff\.cache\.mask|tdiff-learned-schedule)'",
    "wrong-version": r"'.*x\.json' has format_version 99, this tdiff reads",
}


def _save_mask(path):
    C.save_mask(str(path), C.LearnedMask(M4, fingerprint=tdiff.artefacts.fingerprint_module(tiny_dit()),
                                         solver="ddim", timesteps=[1.0, 0.75, 0.5, 0.25, 0.1]))


def _save_learned(path):
    meta = {"schedule": VP.config(), "solver": "dpmpp", "order": 2, "nfe": 2, "model_fingerprint": None}
    LearnedSchedule(TS.double(), None, meta, VP).save(str(path))


LOADERS = {"mask": (_save_mask, lambda p, **kw: C.load_mask(str(p), **kw)),
           "learned": (_save_learned, lambda p, **kw: LearnedSchedule.load(str(p), **kw))}


@pytest.mark.parametrize("kind", sorted(LOADERS))
@pytest.mark.parametrize("how", sorted(FILE_DAMAGE))
def test_damaged_json_artefact_refused(tmp_path, kind, how):
    save, load = LOADERS[kind]
    path = tmp_path / "x.json"
    save(path)
    _write_damaged(path, how, path.read_text())
    with pytest.raises(ValueError, match=FILE_DAMAGE[how]):
        load(path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_oversized_json_artefact_refused(tmp_path, monkeypatch, kind):
    save, load = LOADERS[kind]
    path = tmp_path / "x.json"
    save(path)
    monkeypatch.setattr(tdiff.artefacts, "MAX_JSON_BYTES", 64)
    with pytest.raises(ValueError, match=r"file '.*x\.json' is 0\.0 MiB, more than the 0\.0 MiB limit"):
        load(path)


MASK_FILES = [
    _p(_set(matrix=[[1, 2], [1, 1], [1, 1], [1, 1]]), {}, r"'matrix' must be a non-empty rectangular list of rows of "
       r"0/1 entries, got \[\[1, 2\]", "entry-2"),
    _p(_set(matrix=[[1, 0.5], [1, 1], [1, 1], [1, 1]]), {}, r"'matrix' must be a non-empty rectangular", "entry-half"),
    _p(_set(matrix=[[1, -1], [1, 1], [1, 1], [1, 1]]), {}, r"'matrix' must be a non-empty rectangular", "entry-neg"),
    _p(_set(matrix=[[1, 1], [1], [1, 1], [1, 1]]), {}, r"'matrix' must be a non-empty rectangular", "ragged"),
    _p(_set(matrix=[]), {}, r"'matrix' must be a non-empty rectangular", "matrix-empty"),
    _p(_drop("matrix"), {}, r"has no 'matrix' field", "matrix-missing"),
    _p(_drop("granularity"), {}, r"has no 'granularity' field", "granularity-missing"),
    _p(_set(granularity="layer"), {}, r"granularity must be one of", "granularity-value"),
    _p(_set(granularity=3), {}, r"'granularity' must be a string, got 3", "granularity-int"),
    _p(_drop("formulation"), {}, r"has no 'formulation' field", "formulation-missing"),
    _p(_set(formulation="input"), {}, r"formulation must be one of", "formulation-value"),
    _p(_set(threshold="0.5"), {}, r"'threshold' must be a number in \[0, 1\], got '0.5'", "threshold-str"),
    _p(_set(threshold=NAN), {}, r"'threshold' must be a number in \[0, 1\], got nan", "threshold-nan"),
    _p(_set(threshold=2.0), {}, r"'threshold' must be a number in \[0, 1\], got 2.0", "threshold-2"),
    _p(_set(timesteps="1,0.5"), {}, r"'timesteps' must be a list of finite numbers", "timesteps-str"),
    _p(_set(timesteps=[1.0, NAN]), {}, r"'timesteps' must be a list of finite numbers", "timesteps-nan"),
    _p(_set(network_times=[1.0, 2.0]), {}, r"'network_times' must be a list of 4 finite numbers", "network-times"),
    _p(_set(extra=[1, 2]), {}, r"'extra' must be an object, got \[1, 2\]", "extra-list"),
    _p(_set(solver=3), {}, r"'solver' must be a string, got 3", "solver-int"),
    _p(_set(fingerprint=12), {}, r"'fingerprint' must be a string, got 12", "fingerprint-int"),
    _p(_set(nfe=5), {}, r"is inconsistent: nfe 5 but 4 mask rows", "nfe-inconsistent"),
    _p(_set(nfe="4"), {}, r"'nfe' must be an integer, got '4'", "nfe-str"),
    _p(_set(fingerprint="0" * 16), {"model": "tiny"}, r"this mask was trained for a model with fingerprint 0{16}",
       "other-model"),
    _p(lambda d: d, {"nfe": 6}, r"this mask has 4 steps \(NFE\) but the sampler uses 6", "other-nfe"),
    _p(lambda d: d, {"solver": "unipc"}, r"this mask was trained for solver 'ddim', not 'unipc'", "other-solver"),
]


@pytest.mark.parametrize("mutate,kwargs,match", MASK_FILES)
def test_load_mask_refuses(tmp_path, mutate, kwargs, match):
    path = tmp_path / "mask.json"
    _save_mask(path)
    path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    kwargs = {k: (tiny_dit() if v == "tiny" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=match):
        C.load_mask(str(path), **kwargs)


def test_mask_file_round_trip_and_model_check(tmp_path):
    # the valid file the cases above damage loads back as written, for the model it was made for
    path = tmp_path / "mask.json"
    _save_mask(path)
    mask = C.load_mask(str(path), model=tiny_dit(), nfe=4, solver="ddim")
    assert torch.equal(mask.matrix, M4) and mask.timesteps == [1.0, 0.75, 0.5, 0.25, 0.1]


LEARNED_FILES = [
    _p(_set(timesteps=[1.0, NAN, 0.1]), {}, r"timesteps must be finite", "ts-nan"),
    _p(_set(timesteps=[INF, 0.5, 0.1]), {}, r"timesteps must be finite", "ts-inf"),
    _p(_set(timesteps=[1.0, -INF, 0.1]), {}, r"timesteps must be finite", "ts-minus-inf"),
    _p(_set(timesteps=[0.1, 0.5, 1.0]), {}, r"timesteps must be strictly decreasing", "ts-increasing"),
    _p(_set(timesteps=[1.0, 0.5, 0.5]), {}, r"timesteps must be strictly decreasing", "ts-duplicate"),
    _p(_set(timesteps=[1.0]), {}, r"timesteps must be a list of at least 2 numbers", "ts-short"),
    _p(_set(timesteps="1.0, 0.5"), {}, r"timesteps must be a list of at least 2 numbers", "ts-str"),
    _p(_set(timesteps=[1.0, True, 0.1]), {}, r"timesteps must be a list of at least 2 numbers", "ts-bool"),
    _p(_set(timesteps=[1.5, 0.5, 0.1]), {}, r"timesteps is outside the domain of VPLinear", "ts-domain"),
    _p(_drop("timesteps"), {}, r"timesteps are missing", "ts-missing"),
    _p(_set(timesteps_cond=[1.0, 0.5]), {}, r"timesteps_cond must hold as many times as timesteps \(3\)",
       "tc-length"),
    _p(_set(timesteps_cond=[0.1, 0.5, 1.0]), {}, r"timesteps_cond must be decreasing", "tc-increasing"),
    _p(_set(final_sigmas_type="none"), {}, r"final_sigmas_type must be one of", "final-sigmas-type"),
    _p(_drop("metadata"), {}, r"metadata must be an object", "metadata-missing"),
    _p(_set(metadata=[1]), {}, r"metadata must be an object", "metadata-list"),
    _p(_drop("metadata.solver"), {}, r"metadata\.solver is missing", "solver-missing"),
    _p(_set(**{"metadata.solver": "rk4"}), {}, r"metadata\.solver must be one of .*'rk4'", "solver-unknown"),
    _p(_set(**{"metadata.order": "2"}), {}, r"metadata\.order has the wrong type \(str\)", "order-str"),
    _p(_set(**{"metadata.order": True}), {}, r"metadata\.order has the wrong type \(bool\)", "order-bool"),
    _p(_set(**{"metadata.nfe": 0}), {}, r"metadata\.nfe must be >= 1, got 0", "nfe-0"),
    _p(_set(**{"metadata.nfe": 7}), {}, r"metadata\.nfe = 7, but dpmpp order 2 makes 2 model calls", "nfe-wrong"),
    _p(_set(**{"metadata.guidance": NAN}), {}, r"metadata\.guidance must be a finite number or null", "guidance-nan"),
    _p(_set(**{"metadata.solver_options": {"varient": "bh1"}}), {}, r"unknown option\(s\) \['varient'\]",
       "solver-options-unknown"),
    _p(_set(**{"metadata.solver_options": [1]}), {}, r"metadata\.solver_options must be an object", "options-list"),
    _p(_set(**{"metadata.schedule": {"class": "VPSquare"}}), {}, r"cannot rebuild the schedule", "schedule-class"),
    _p(_set(**{"metadata.schedule": {"class": "VPLinear", "beta1": INF}}), {}, r"cannot rebuild the schedule",
       "schedule-inf"),
    _p(_set(**{"metadata.schedule": "VPLinear"}), {}, r"metadata\.schedule has the wrong type", "schedule-str"),
    _p(_set(**{"metadata.model_fingerprint": 5}), {}, r"metadata\.model_fingerprint has the wrong type",
       "fingerprint-int"),
    _p(_set(**{"metadata.model_fingerprint": "0" * 16}), {"model": "tiny"},
       r"was learned for another model \(fingerprint 0{16}", "other-model"),
    _p(lambda d: d, {"solver": "unipc"}, r"was learned for solver 'dpmpp' \(order 2\), not 'unipc'", "other-solver"),
    _p(lambda d: d, {"order": 3}, r"was learned for order 2, not 3", "other-order"),
    _p(lambda d: d, {"schedule": S.VPCosine()}, r"was learned for schedule .*VPLinear.*, not .*VPCosine",
       "other-schedule"),
]


@pytest.mark.parametrize("mutate,kwargs,match", LEARNED_FILES)
def test_load_learned_schedule_refuses(tmp_path, mutate, kwargs, match):
    path = tmp_path / "ld3.json"
    _save_learned(path)
    text = json.dumps(mutate(json.loads(path.read_text())))  # NaN and inf as JSON's NaN / Infinity
    path.write_text(text)
    kwargs = {k: (tiny_dit() if v == "tiny" else v) for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=r"'.*ld3\.json'.*" + match):
        LearnedSchedule.load(str(path), **kwargs)


# default-model checkpoints (safetensors): a tiny config cached in a temporary TDIFF_CACHE_DIR, then damaged
from tdiff.models import defaults as D  # noqa: E402
from tdiff.models.weights import save_weights  # noqa: E402

TINY = dict(input_size=4, patch_size=2, hidden_size=8, depth=1, num_heads=2)


def _save_default(path, model=None, **payload):
    cfg = D.config_of("dit", TINY)
    model = model if model is not None else D.build_model("dit", cfg)
    doc = {"which": "dit", "config": cfg.to_dict(), "schedule": D.default_schedule().config(),
           "recipe": D._recipe("dit", cfg, None, None, D.DEFAULT_SEED), "metrics": {}}
    doc.update(payload)
    save_weights(str(path), D.FORMAT, D.VERSION, model, {k: v for k, v in doc.items() if v is not None})


def _nan_model():
    m = D.build_model("dit", TINY)
    with torch.no_grad():
        next(m.parameters()).view(-1)[0] = NAN
    return m


def _missing_tensor_model():
    class Fewer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))
    return Fewer()


DEFAULT_FILES = [
    _p(lambda p: p.write_bytes(b"\x00" * 64), r"cannot read tdiff-default-weights file", "garbage"),
    _p(lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), r"cannot read tdiff-default-weights file",
       "truncated"),
    _p(lambda p: _save_default(p, model=_nan_model()), r"tensor '.*' holds NaN or inf", "nan-weights"),
    _p(lambda p: _save_default(p, model=_missing_tensor_model()), r"does not hold this network's weights: missing",
       "other-network"),
    _p(lambda p: _save_default(p, which="unet"), r"holds a 'unet' model, expected 'dit'", "other-which"),
    _p(lambda p: _save_default(p, config=None), r"tdiff-default-weights file '.*' has no 'config' entry",
       "config-missing"),
    _p(lambda p: _save_default(p, recipe={"iters": 1}), r"was trained with \{'iters': 1\}, not the requested",
       "other-recipe"),
    _p(lambda p: _save_default(p, schedule={"class": "VPLinear"}), r"was trained with schedule", "other-schedule"),
    _p(lambda p: _save_default(p, metrics=[1.0]), r"'metrics' must be a dict, got list", "metrics-list"),
    _p(lambda p: (p.unlink(), p.mkdir()), r"cannot read tdiff-default-weights file", "directory"),
]


@pytest.mark.parametrize("damage,match", DEFAULT_FILES)
def test_default_checkpoint_refused(tmp_path, monkeypatch, damage, match):
    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    path = tmp_path / os.path.basename(D.checkpoint_path("dit", TINY))
    _save_default(path)
    damage(path)
    with pytest.raises(ValueError, match=match):
        D.load_default("dit", config=TINY)  # never retrains (train_if_missing=False)


def test_default_checkpoint_missing_and_bad_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no dit checkpoint for config .* pass train_if_missing=True"):
        D.load_default("dit", config=TINY)
    with pytest.raises(ValueError, match=r"which must be one of \('dit', 'unet'\), got 'vit'"):
        D.load_default("vit")
    with pytest.raises(ValueError, match=r"iters must be a positive integer, got 0"):
        D.load_default("dit", config=TINY, iters=0)
    with pytest.raises(ValueError, match=r"config for 'dit' must be a DiTConfig or dict, got list"):
        D.load_default("dit", config=[1])
    path = tmp_path / os.path.basename(D.checkpoint_path("dit", TINY))
    _save_default(path)
    model, _, _ = D.load_default("dit", config=TINY)  # the valid file the cases above damage loads
    assert isinstance(model, DiT)


# ---------------------------------------------------------------------------------------------------------------
# training: DiffusionLoss, samplers, weightings, warm-up
# ---------------------------------------------------------------------------------------------------------------
from tdiff.training import DiffusionLoss  # noqa: E402
from tdiff.training import samplers as TS_  # noqa: E402
from tdiff.training import weightings as W  # noqa: E402
from tdiff.training.warmup import WeightWarmup  # noqa: E402

DDPM = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))  # the linear DDPM schedule


def _model(x, t, y=None):
    return 0.1 * x


def _loaded(state, **kw):
    DiffusionLoss(DDPM, **kw).load_state_dict(state)


def _warm_state(**change):
    state = DiffusionLoss(S.EDM(), process="fdm", warmup=10).state_dict()
    state["warmup"] = {**state["warmup"], **change} if change else {}
    return state


TRAINING = [
    _p(lambda: DiffusionLoss(DDPM, process="ddpm"), ValueError, r"process must be one of \('standard', 'fdm'\), got "
       r"'ddpm'", "process"),
    _p(lambda: DiffusionLoss(DDPM, sampler="spede"), ValueError, r"sampler must be one of .*'speed'.*got 'spede'",
       "sampler-name"),
    _p(lambda: DiffusionLoss(DDPM, sampler=["speed"]), TypeError, r"sampler must be a name .* got list \['speed'\]",
       "sampler-list"),
    _p(lambda: DiffusionLoss(DDPM, weighting="snr"), ValueError, r"weighting must be one of .*got 'snr'",
       "weighting-name"),
    _p(lambda: DiffusionLoss(DDPM, target="score"), ValueError, r"target must be one of .*got 'score'", "target"),
    _p(lambda: DiffusionLoss(DDPM, mode="biased"), ValueError, r"mode must be one of .*got 'biased'", "mode"),
    _p(lambda: DiffusionLoss(DDPM, target="edm", precond="karras"), ValueError, r"precond must be one of",
       "precond"),
    _p(lambda: DiffusionLoss(DDPM, precond="edm"), ValueError, r"precond is only used with target='edm'",
       "precond-eps"),
    _p(lambda: DiffusionLoss(DDPM, sigma_data=0.5), ValueError, r"sigma_data is only used with target='edm'",
       "sigma-data-eps"),
    _p(lambda: DiffusionLoss(DDPM, fdm_multiplier=3.0), ValueError, r"fdm_multiplier only applies to process='fdm'",
       "fdm-multiplier-standard"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier=INF), ValueError,
       r"fdm_multiplier must be finite, got inf", "fdm-multiplier-inf"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier=0.0), ValueError,
       r"fdm_multiplier must lie in \(0.0, inf\]", "fdm-multiplier-0"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_multiplier="2"), TypeError,
       r"fdm_multiplier must be a real number, got str", "fdm-multiplier-str"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_on="output"), ValueError, r"fdm_on must be one of",
       "fdm-on"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_beta_min=-1.0), ValueError, r"fdm_beta_min must lie in",
       "fdm-beta-min"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_sigma_range=(1.0,)), TypeError,
       r"fdm_sigma_range must be a \(sigma_min, sigma_max\) pair", "fdm-range-short"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", fdm_sigma_range=(2.0, 1.0)), ValueError,
       r"fdm_sigma_range\[1\] must lie in \(2.0, inf\]", "fdm-range-reversed"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", target="eps"), ValueError,
       r"process='fdm' trains the preconditioned denoiser; target must be None or 'edm'", "fdm-target"),
    _p(lambda: DiffusionLoss(DDPM, network_time=5), TypeError, r"network_time must be a callable", "network-time"),
    _p(lambda: DiffusionLoss(DDPM, sampler_kwargs=[1]), TypeError, r"sampler_kwargs must be a dict of options",
       "sampler-kwargs-list"),
    _p(lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(kk=2)), TypeError,
       r"unexpected keyword argument 'kk'", "sampler-kwargs-unknown"),
    _p(lambda: DiffusionLoss(DDPM, sampler=TS_.UniformSampler(DDPM), sampler_kwargs=dict(n=10)), ValueError,
       r"sampler options \['n'\] were given for an already-built sampler", "sampler-built-with-options"),
    _p(lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(k=INF)), ValueError,
       r"k \(SpeeD's suppression ratio\) must be finite", "speed-k-inf"),
    _p(lambda: DiffusionLoss(DDPM, sampler="speed", sampler_kwargs=dict(tau=5000)), ValueError,
       r"tau \(a step index of the schedule's cells\) must be an integer in \[1, ", "speed-tau-range"),
    _p(lambda: DiffusionLoss(DDPM, weighting="speed", weighting_kwargs=dict(lam=0.2)), ValueError,
       r"lam \(SpeeD's lambda\) must lie in \[0.5, 1.0\], got 0.2", "speed-lambda"),
    _p(lambda: DiffusionLoss(DDPM, weighting="min_snr", weighting_kwargs=dict(gamma=-1.0)), ValueError,
       r"gamma must lie in \(0.0, inf\]", "min-snr-gamma"),
    _p(lambda: DiffusionLoss(DDPM, warmup=0), ValueError, r"warmup_steps must be an integer in \[1, inf\], got 0",
       "warmup-0"),
    _p(lambda: DiffusionLoss(DDPM, warmup="100"), TypeError, r"warmup_steps must be an integer, got str",
       "warmup-str"),
    _p(lambda: DiffusionLoss(DDPM, check=1), TypeError, r"check must be True or False", "check-int"),
    _p(lambda: DiffusionLoss("ddpm"), TypeError, r"schedule must be a tdiff.schedules.NoiseSchedule, got str",
       "schedule-str"),
    _p(lambda: DiffusionLoss(DDPM)(_model, torch.zeros(2, 1, 2, 2, dtype=torch.long)), TypeError,
       r"x0 must be a floating-point tensor .* got torch.int64", "call-x0-int"),
    _p(lambda: DiffusionLoss(DDPM)(_model, torch.zeros(0, 1, 2, 2)), ValueError,
       r"x0 must be a \(B, \.\.\.\) tensor with B >= 1", "call-x0-empty"),
    _p(lambda: DiffusionLoss(DDPM)("model", X()), TypeError, r"model must be callable", "call-model-str"),
    _p(lambda: DiffusionLoss(DDPM)(_model, X(), t=torch.rand(3)), ValueError, r"t must be a tensor of shape \(2,\)",
       "call-t-shape"),
    _p(lambda: DiffusionLoss(DDPM)(_model, X(), t=torch.tensor([0.5, 1.5])), ValueError,
       r"t is outside the domain of DiscreteVP", "call-t-domain"),
    _p(lambda: DiffusionLoss(DDPM)(_model, X(), noise=torch.zeros(2, 1, 2, 3)), ValueError,
       r"noise must be a tensor with x0's shape \(2, 1, 2, 2\)", "call-noise-shape"),
    _p(lambda: DiffusionLoss(DDPM)(lambda x, t, y=None: x[:1], X()), ValueError,
       r"the model returned shape \(1, 1, 2, 2\), expected x0's \(2, 1, 2, 2\)", "call-model-shape"),
    _p(lambda: _loaded({"warmup": {}}), ValueError, r"state is missing \['config'\]", "state-missing-config"),
    _p(lambda: _loaded("state"), TypeError, r"state must be a dict from DiffusionLoss.state_dict\(\), got str",
       "state-str"),
    _p(lambda: _loaded(DiffusionLoss(DDPM, sampler="speed").state_dict()), ValueError,
       r"state was saved by a DiffusionLoss with sampler\.k=2\.0, this loss has sampler\.k=", "state-other-config"),
    _p(lambda: _loaded({"warmup": None, "config": [1]}), TypeError, r"state\['config'\] must be a dict",
       "state-config-list"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", warmup=10).load_state_dict(_warm_state()), ValueError,
       r"warm-up state is missing \['steps', ", "state-warmup-empty"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", warmup=10).load_state_dict(_warm_state(steps=-1)), ValueError,
       r"warm-up state steps must be an integer in \[0, inf\], got -1", "state-warmup-steps"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm", warmup=10).load_state_dict(_warm_state(lambda_max=7.0)),
       ValueError, r"warm-up state lambda_max=7.0 does not match this warm-up's 5.0", "state-warmup-other"),
    _p(lambda: DiffusionLoss(S.EDM(), process="fdm").load_state_dict(_warm_state(steps=1)), ValueError,
       r"state was saved by a DiffusionLoss with warmup=", "state-warmup-presence"),
    # samplers and weightings on their own
    _p(lambda: TS_.SpeedSampler(DDPM, k=0.0), ValueError, r"k \(SpeeD's suppression ratio\) must lie in \(0.0",
       "speed-k-0"),
    _p(lambda: TS_.SpeedSampler(DDPM, k=NAN), ValueError, r"k \(SpeeD's suppression ratio\) must be finite",
       "speed-k-nan"),
    _p(lambda: TS_.SpeedSampler(DDPM, tau=0), ValueError, r"tau \(a step index of the schedule's cells\) must be an "
       r"integer in \[1, ", "speed-tau-0"),
    _p(lambda: TS_.SpeedSampler(DDPM, tau=2.5), ValueError, r"tau \(a step index of the schedule's cells\) must be an "
       r"integer, got 2.5", "speed-tau-float"),
    _p(lambda: TS_.SpeedSampler(DDPM, reflect=1), TypeError, r"reflect must be True or False", "speed-reflect"),
    _p(lambda: TS_.SpeedSampler(DDPM, threshold=-1e-4), ValueError, r"threshold must lie in \(0.0", "speed-threshold"),
    _p(lambda: TS_.LogNormalSampler(DDPM, p_std=0.0), ValueError, r"p_std must lie in \(0.0", "lognormal-std-0"),
    _p(lambda: TS_.LogNormalSampler(DDPM, p_mean=NAN), ValueError, r"p_mean must be finite", "lognormal-mean-nan"),
    _p(lambda: TS_.LogitNormalSampler(S.RectifiedFlow(), std=-1.0), ValueError, r"std must lie in \(0.0",
       "logitnormal-std"),
    _p(lambda: TS_.UniformSampler(DDPM).sample(0), ValueError, r"batch must be an integer in \[1, inf\], got 0",
       "sample-batch-0"),
    _p(lambda: TS_.UniformSampler(DDPM).sample(2.5), ValueError, r"batch must be an integer, got 2.5",
       "sample-batch-float"),
    _p(lambda: TS_.UniformSampler(VP).sample_indices(2), ValueError, r"sample_indices .*DiscreteVP",
       "sample-indices-continuous"),
    _p(lambda: W.MinSNRWeight(DDPM, gamma=0.0), ValueError, r"gamma must lie in \(0.0", "min-snr-gamma-0"),
    _p(lambda: W.MinSNRWeight(DDPM, target="score"), ValueError,
       r"target \(Min-SNR's regression target\) must be one of", "min-snr-target"),
    _p(lambda: W.P2Weight(DDPM, k=0.0), ValueError, r"k \(P2's k keeps 1/\(k\+snr\)\^gamma finite at snr=0\) must lie",
       "p2-k-0"),
    _p(lambda: W.P2Weight(DDPM, gamma=-1.0), ValueError, r"gamma must lie in \[0.0", "p2-gamma"),
    _p(lambda: W.SpeedWeight(DDPM, lam=1.5), ValueError, r"lam \(SpeeD's lambda\) must lie in \[0.5, 1.0\]",
       "speed-weight-lambda"),
    _p(lambda: W.SpeedWeight(DDPM, tau=10**6), ValueError, r"tau \(a step index of the schedule's cells\) must be",
       "speed-weight-tau"),
    _p(lambda: W.SpeedWeight(DDPM, threshold=NAN), ValueError, r"threshold \(a per-step increment of sqrt\(1-alpha_bar\)\) must be finite, got nan",
       "speed-weight-threshold"),
    _p(lambda: W.EDMWeight(DDPM, sigma_data=-1.0), ValueError, r"sigma_data must lie in \(0.0, inf\], got -1.0",
       "edm-weight-sigma-data"),
    _p(lambda: W.make_weighting("min_snr", DDPM, gama=5.0), TypeError, r"unexpected keyword argument 'gama'",
       "weighting-kwarg"),
    _p(lambda: WeightWarmup(10, lambda_max=5.0, lambda_end=1.0), ValueError,
       r"lambda_end must lie in \(5.0, inf\], got 1.0", "warmup-end-below-max"),
    _p(lambda: WeightWarmup(10, lambda_max=NAN), ValueError, r"lambda_max must be finite", "warmup-max-nan"),
]


@pytest.mark.parametrize("thunk,exc,match", TRAINING)
def test_training_refuses(thunk, exc, match):
    _check(thunk, exc, match)


# ---------------------------------------------------------------------------------------------------------------
# TdiffScheduler (diffusers' scheduler protocol)
# ---------------------------------------------------------------------------------------------------------------
def _sched(n=None, **kw):
    from tdiff.schedulers import TdiffScheduler

    s = TdiffScheduler(**kw)
    if n is not None:
        s.set_timesteps(n)
    return s


def _stepped(s, k, shape=(1, 2)):
    for t in s.timesteps[:k]:
        s.step(torch.zeros(shape), t, torch.zeros(shape))
    return s


def _from_config(**kw):
    from tdiff.schedulers import TdiffScheduler

    return TdiffScheduler.from_config({"_class_name": "DDPMScheduler", "num_train_timesteps": 1000}, **kw)


Z = torch.zeros(1, 2)
SCHEDULER = [
    _p(lambda: _sched(solver="rk4"), ValueError, r"solver must be None or one of .*'rk4'", "solver"),
    _p(lambda: _sched(order="2"), ValueError, r"order must be None or an integer, got '2'", "order-str"),
    _p(lambda: _sched(solver="unipc", order=5, n=4), ValueError, r"order for solver 'unipc' must be one of",
       "order-5"),
    _p(lambda: _sched(solver_options=[1]), ValueError, r"solver_options must be None or a dict", "options-list"),
    _p(lambda: _sched(solver="unipc", solver_options={"varient": "bh1"}, n=4), ValueError,
       r"unknown option\(s\) \['varient'\] for solver 'unipc'", "options-unknown"),
    _p(lambda: _sched(thresholding=True), ValueError, r"thresholding=True .* cannot be reproduced", "thresholding"),
    _p(lambda: _sched(prediction_type="mu"), ValueError, r"prediction_type must be one of .*got 'mu'",
       "prediction-type"),
    _p(lambda: _sched(use_flow_sigmas=True, prediction_type="epsilon"), ValueError,
       r"flow-matching config .* prediction_type must be 'flow_prediction' or None", "flow-prediction-type"),
    _p(lambda: _sched(final_sigmas_type="one"), ValueError, r"final_sigmas_type must be one of", "final-sigmas"),
    _p(lambda: _sched(timesteps="cosine"), ValueError, r"timesteps must be one of .*'cosine'", "grid-name"),
    _p(lambda: _sched(timesteps=torch.tensor([0.1, 0.5])), ValueError, r"timesteps must be strictly decreasing",
       "grid-increasing"),
    _p(lambda: _sched(timesteps={"a": 1}), ValueError, r"a timesteps dict \(a saved grid\) must have the keys",
       "grid-dict"),
    _p(lambda: _sched(source_scheduler=5), ValueError, r"source_scheduler must be a diffusers scheduler class name",
       "source-int"),
    _p(lambda: _sched(source_scheduler="ScoreSdeVeScheduler"), ValueError,
       r"scheduler 'ScoreSdeVeScheduler' has no DDPM noise schedule", "source-ve"),
    _p(lambda: _sched(beta_schedule="sigmoid"), ValueError, r"beta_schedule='sigmoid' is not supported",
       "beta-schedule"),
    _p(lambda: _sched(num_train_timesteps=0), ValueError, r"num_train_timesteps must be an integer >= 2, got 0",
       "num-train-0"),
    _p(lambda: _sched(solver="heun", solver_options={"s_churn": 1.0}, n=3), ValueError,
       r"solver 'heun' with these options does something to x_T before its first model call", "heun-churn"),
    _p(lambda: _from_config(sover="unipc"), ValueError, r"unknown option 'sover' for TdiffScheduler", "from-config-kw"),
    _p(lambda: _from_config(orders=2), ValueError, r"unknown option 'orders' for TdiffScheduler", "from-config-kw2"),
    _p(lambda: __import__("tdiff.schedulers").schedulers.TdiffScheduler.from_config("some/path"), ValueError,
       r"config must be a scheduler config dict .* got str", "from-config-path"),
    _p(lambda: _sched().set_timesteps(0), ValueError, r"num_inference_steps must be an integer >= 1, got 0", "n-0"),
    _p(lambda: _sched().set_timesteps(2.5), ValueError, r"num_inference_steps must be an integer >= 1, got 2.5",
       "n-float"),
    _p(lambda: _sched().set_timesteps(True), ValueError, r"num_inference_steps must be an integer >= 1, got True",
       "n-bool"),
    _p(lambda: _sched().set_timesteps(timesteps=[500, 10], sigmas=[1.0, 0.5]), ValueError,
       r"pass at most one of timesteps= and sigmas=", "timesteps-and-sigmas"),
    _p(lambda: _sched().set_timesteps(timesteps=[2000, 10]), ValueError,
       r"timesteps must be training indices in \[0, 999\], got \[2000.0, 10.0\]", "timesteps-range"),
    _p(lambda: _sched().set_timesteps(timesteps=[10, 500]), ValueError, r"timesteps must be strictly decreasing",
       "timesteps-increasing"),
    _p(lambda: _sched().set_timesteps(timesteps=[500, 500, 10]), ValueError,
       r"timesteps must not hold duplicated times", "timesteps-duplicated"),
    _p(lambda: _sched().set_timesteps(timesteps=[500.0, NAN]), ValueError, r"timesteps must be finite, got \[500.0, "
       r"nan\]", "timesteps-nan"),
    _p(lambda: _sched().set_timesteps(timesteps=[[500.0, 10.0]]), ValueError,
       r"timesteps must be a 1-D sequence of at least one value", "timesteps-2d"),
    _p(lambda: _sched().set_timesteps(sigmas=[-1.0, 0.5]), ValueError, r"sigmas must be positive noise levels",
       "sigmas-negative"),
    _p(lambda: _sched().set_timesteps(sigmas=[INF, 0.5]), ValueError, r"sigmas must be finite", "sigmas-inf"),
    _p(lambda: _sched().set_timesteps(4, mu=0.5), ValueError, r"mu=0.5 shifts diffusers' own flow-matching grid",
       "mu"),
    _p(lambda: _sched().step(Z, 999, Z), ValueError, r"call set_timesteps\(\.\.\.\) before step\(\)",
       "step-before-set"),
    _p(lambda: _sched(n=3).step(torch.zeros(1, 3), 999, Z), ValueError,
       r"model_output has shape \(1, 3\); expected the shape of sample \(1, 2\)", "step-output-shape"),
    _p(lambda: _sched(n=3).step("out", 999, Z), ValueError, r"model_output and sample must be tensors",
       "step-output-str"),
    _p(lambda: _sched(n=3).step(Z, 12345, Z), ValueError, r"step\(\) got timestep 12345.0, which is not one of "
       r"scheduler.timesteps", "step-timestep"),
    _p(lambda: (s := _stepped(_sched(n=3), 1)).step(Z, s.timesteps[1], torch.zeros(2, 2)), ValueError,
       r"sample has shape \(2, 2\); this run's samples have shape \(1, 2\)", "step-sample-shape"),
    _p(lambda: _stepped(_sched(n=2), 2).step(Z, 999, Z), ValueError,
       r"all 2 model calls of this run have been stepped", "step-after-end"),
    _p(lambda: (s := _stepped(_sched(n=3), 1)).step(Z, s.timesteps[1], Z, eta=0.5), ValueError,
       r"eta / use_clipped_model_output changed during a run", "step-eta-changed"),
    _p(lambda: _sched(n=3).set_begin_index(-1), ValueError, r"begin_index must be an integer >= 0, got -1",
       "begin-index-neg"),
    _p(lambda: _sched(n=3).set_begin_index(7), ValueError, r"begin_index must be below the 3 model calls, got 7",
       "begin-index-large"),
]


@pytest.mark.parametrize("thunk,exc,match", SCHEDULER)
def test_tdiff_scheduler_refuses(thunk, exc, match):
    _check(thunk, exc, match)


# ---------------------------------------------------------------------------------------------------------------
# command lines, in-process: a bad flag or value exits with status 2 and a message naming it; nothing runs
# ---------------------------------------------------------------------------------------------------------------
CLI_TDIFF = [
    _p([], r"the following arguments are required: cmd", "no-command"),
    _p(["dem"], r"argument cmd: invalid choice: 'dem'", "command-typo"),
    _p(["demo", "--quik"], r"unrecognized arguments: --quik", "demo-flag-typo"),
    _p(["demo", "--out"], r"argument --out: expected one argument", "demo-out-missing"),
    _p(["train-defaults", "vit"], r"argument which: invalid choice: 'vit'", "train-defaults-which"),
    _p(["train-defaults", "dit", "vit"], r"argument which: invalid choice: 'vit'", "train-defaults-which-second"),
    _p(["train-defaults", "--progress"], r"unrecognized arguments: --progress", "train-defaults-flag"),
    _p(["bench", "--quik"], r"unrecognized arguments: --quik", "bench-flag"),
]

CLI_TRAIN = [
    _p(["--model", "vit"], r"argument --model: invalid choice: 'vit'", "model"),
    _p(["--iters", "ten"], r"argument --iters: invalid int value: 'ten'", "iters-text"),
    _p(["--iters", "-5"], r"--iters must be an integer in \[1, inf\], got -5", "iters-negative"),
    _p(["--iters", "0"], r"--iters must be an integer in \[1, inf\], got 0", "iters-0"),
    _p(["--batch-size", "0"], r"--batch-size must be an integer in \[1, inf\], got 0", "batch-size"),
    _p(["--lr", "nan"], r"--lr must be finite, got nan", "lr-nan"),
    _p(["--lr=-1e-3"], r"--lr must lie in \(0.0, inf\]", "lr-negative"),
    _p(["--ema", "1.5"], r"--ema must lie in \[0.0, 1.0\), got 1.5", "ema"),
    _p(["--eval-samples", "1"], r"--eval-samples must be an integer in \[2, inf\], got 1", "eval-samples"),
    _p(["--threads", "0"], r"--threads must be an integer in \[1, inf\], got 0", "threads-0"),
    _p(["--seed", "-1"], r"--seed must be an integer in \[0, inf\], got -1", "seed"),
    _p(["--checkpoint-every", "-2"], r"--checkpoint-every must be an integer in \[0, inf\]", "checkpoint-every"),
    _p(["--sampler", "spede"], r"argument --sampler: invalid choice: 'spede'", "sampler"),
    _p(["--weighting", "snr"], r"argument --weighting: invalid choice: 'snr'", "weighting"),
    _p(["--process", "ddpm"], r"argument --process: invalid choice: 'ddpm'", "process"),
    _p(["--schedule", "linear"], r"argument --schedule: invalid choice: 'linear'", "schedule"),
    _p(["--speed-k", "2"], r"--speed-k belongs to sampler=speed, but this run uses sampler=None", "speed-k-owner"),
    _p(["--sampler", "speed", "--speed-k", "inf"], r"k \(SpeeD's suppression ratio\) must be finite, got inf",
       "speed-k-inf"),
    _p(["--sampler", "speed", "--speed-k", "two"], r"argument --speed-k: invalid float value: 'two'",
       "speed-k-text"),
    _p(["--sampler", "speed", "--speed-reflect", "maybe"], r"argument --speed-reflect: expected true or false",
       "speed-reflect"),
    _p(["--sampler", "speed", "--speed-tau", "5000"], r"tau \(a step index of the schedule's cells\) must be an "
       r"integer in \[1, 999\], got 5000", "speed-tau"),
    _p(["--weighting", "speed", "--speed-lambda", "0.2"], r"lam \(SpeeD's lambda\) must lie in \[0.5, 1.0\]",
       "speed-lambda"),
    _p(["--weighting", "min_snr", "--min-snr-gamma", "0"], r"gamma must lie in \(0.0, inf\]", "min-snr-gamma"),
    _p(["--fdm-multiplier", "3"], r"--fdm-multiplier belongs to process=fdm", "fdm-multiplier-owner"),
    _p(["--process", "fdm", "--schedule", "edm", "--fdm-multiplier", "inf"], r"fdm_multiplier must be finite",
       "fdm-multiplier-inf"),
    _p(["--process", "fdm", "--schedule", "edm", "--fdm-sigma-range", "1"],
       r"argument --fdm-sigma-range: expected two numbers 'lo,hi', got '1'", "fdm-sigma-range"),
    _p(["--warmup-lambda-max", "3"], r"warm-up options \['lambda_max'\] need a warm-up", "warmup-options"),
    _p(["--warmup", "0"], r"warmup_steps must be an integer in \[1, inf\], got 0", "warmup-0"),
    _p(["--model-config", "[1]"], r"argument --model-config: expected a JSON object, got '\[1\]'", "model-config-list"),
    _p(["--model-config", "{depth: 2}"], r"argument --model-config: expected a JSON object", "model-config-json"),
    _p(["--model-config", '{"dept": 2}'], r"unexpected keyword argument 'dept'", "model-config-key"),
    _p(["--model-config", '{"depth": -1}'], r"depth must be a positive integer, got -1", "model-config-value"),
    _p(["--bogus"], r"unrecognized arguments: --bogus", "unknown-flag"),
]


def _exits(main, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err), match


@pytest.mark.parametrize("argv,match", CLI_TDIFF)
def test_tdiff_cli_refuses(capsys, argv, match):
    from tdiff.__main__ import main

    _exits(main, argv, match, capsys)


def test_train_defaults_without_names_means_all(monkeypatch):
    # `python -m tdiff train-defaults` (no names) retrains all three; argparse's choices= once refused it
    from tdiff import __main__ as cli

    seen = []
    monkeypatch.setattr(D, "train_defaults", lambda which, out=None, progress=True: seen.append((which, out)))
    assert cli.main(["train-defaults", "--out", "somewhere"]) == 0
    assert cli.main(["train-defaults", "unet", "dit", "unet"]) == 0
    assert seen == [(["classifier", "dit", "unet"], "somewhere"), (["unet", "dit"], "tdiff_defaults")]


@pytest.mark.parametrize("argv,match", CLI_TRAIN)
def test_train_cli_refuses(monkeypatch, tmp_path, capsys, argv, match):
    from tdiff.training import train as T

    monkeypatch.chdir(tmp_path)  # nothing may be written, but if it were, not into the checkout
    monkeypatch.setattr(T, "train", lambda *a, **k: pytest.fail("the CLI started training on a bad flag"))
    _exits(T.main, argv, match, capsys)


# ---------------------------------------------------------------------------------------------------------------
# the rest of issue 17's list: writers, fingerprints, backends, cache keys
# ---------------------------------------------------------------------------------------------------------------
def test_unserialisable_payload_leaves_nothing_behind(tmp_path):
    path = tmp_path / "mask.json"
    _save_mask(path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"not JSON serializable"):
        C.save_mask(str(path), C.LearnedMask(M4, extra={"scores": torch.ones(2)}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.json"]  # no temporary file left
    assert path.read_bytes() == before  # and the old file intact


def test_saving_over_a_symlink_writes_its_target(tmp_path):
    target, link = tmp_path / "real.json", tmp_path / "link.json"
    _save_learned(target)
    link.symlink_to(target)
    _save_mask(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert C.load_mask(str(target)).nfe == 4


def test_stale_temporaries_of_a_dead_writer_are_swept(tmp_path):
    from tdiff import artefacts as A

    dead = tmp_path / f".tmp-tdiff-{A._HOST}-999999999-abc"  # no such process
    dead.write_bytes(b"x" * 100)
    other = tmp_path / "keep.tmp"
    other.write_bytes(b"y")
    _save_mask(tmp_path / "mask.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "mask.json"]


def test_fingerprint_sees_permuted_weights():
    a, b = tiny_dit(), tiny_dit()
    with torch.no_grad():
        w = b.blocks[0].mlp.fc1.weight
        w.copy_(w.flip(0))  # same sum and sum of squares, other weights
    assert float(w.detach().sum()) == pytest.approx(float(a.blocks[0].mlp.fc1.weight.detach().sum()), rel=1e-4)
    assert tdiff.artefacts.fingerprint_module(a) != tdiff.artefacts.fingerprint_module(b)
    with pytest.raises(ValueError, match=r"this mask was trained for a model with fingerprint"):
        tdiff.cached_dit(b, C.LearnedMask(M4, fingerprint=tdiff.artefacts.fingerprint_module(a)))


def test_another_config_never_overwrites_the_default_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    paths = {D.checkpoint_path("dit", TINY), D.checkpoint_path("dit", {**TINY, "depth": 2}),
             D.checkpoint_path("dit", TINY, iters=10), D.shipped_default_path("dit")}
    assert len(paths) == 4


def test_logsnr_uniform_on_a_schedule_starting_at_zero():
    # the issue's case: lambda is infinite at t_min = 0; it used to return [1, 0, nan, nan, 0]
    with pytest.raises(ValueError, match=r"logsnr_uniform spaces points in lambda = log\(alpha/sigma\), which is "
                                         r"\[.*, inf\] at t_max=1, t_min=0"):
        logsnr_uniform(S.VPLinear(t_min=0), 5)


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_cached_block_backward_refuses_a_bad_source(monkeypatch, backend):
    # the registered backward op writes gradients at source's rows: an out-of-range index must be refused
    monkeypatch.setenv("TDIFF_BACKEND", backend)
    g, gate = _t(3, 4, 5), _t(3, 5)
    with pytest.raises(ValueError, match=r"source.* out of range"):
        torch.ops.tdiff.cached_block_backward(g, g, gate, g, torch.tensor([0, 10**6, -1]), 1)
    with pytest.raises(ValueError, match=r"computed must be in \[0, 3\], got 4"):
        torch.ops.tdiff.cached_block_backward(g, g, gate, g, torch.tensor([0, -1, -1]), 4)


def test_unknown_backend_is_refused(monkeypatch):
    monkeypatch.setenv("TDIFF_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"TDIFF_BACKEND='cuda' is not one of \('auto', 'cpp', 'triton', 'torch'\)"):
        multistep_update(B2, [B2], ROW1)


# ---------------------------------------------------------------------------------------------------------------
# network configs, metrics and data helpers
# ---------------------------------------------------------------------------------------------------------------
from tdiff.data import digits as DG  # noqa: E402
from tdiff.data import gaussian_mixture as GM  # noqa: E402
from tdiff.metrics import distribution as MD  # noqa: E402
from tdiff.metrics import errors as ME  # noqa: E402
from tdiff.models.unet import UNetConfig  # noqa: E402

A4, B4 = _t(4, 3), _t(4, 3) + 1
MISC = [
    _p(lambda: DiTConfig(hidden_size=10, num_heads=3), ValueError, r"hidden_size \(10\) must be divisible by "
       r"num_heads \(3\)", "dit-heads"),
    _p(lambda: DiTConfig(input_size=9, patch_size=2), ValueError, r"input_size \(9\) must be divisible by patch_size",
       "dit-patch"),
    _p(lambda: DiTConfig(depth=True), ValueError, r"depth must be a positive integer, got True", "dit-depth-bool"),
    _p(lambda: DiTConfig(depth=2.5), ValueError, r"depth must be a positive integer, got 2.5", "dit-depth-float"),
    _p(lambda: DiTConfig(mlp_ratio=NAN), ValueError, r"mlp_ratio must be a finite number > 0, got nan",
       "dit-mlp-ratio-nan"),
    _p(lambda: DiTConfig(class_dropout_prob=1.0), ValueError, r"class_dropout_prob must be in \[0, 1\), got 1.0",
       "dit-dropout"),
    _p(lambda: DiTConfig(dept=3), TypeError, r"unexpected keyword argument 'dept'", "dit-unknown-field"),
    _p(lambda: UNetConfig(base_channels=8, num_groups=3), ValueError, r"base_channels\*1 must be divisible by "
       r"num_groups \(3\)", "unet-groups"),
    _p(lambda: UNetConfig(channel_mult=()), ValueError, r"channel_mult must be a non-empty tuple of positive ints",
       "unet-mult"),
    _p(lambda: UNetConfig(input_size=16, channel_mult=(1, 2), attn_resolutions=(5,)), ValueError,
       r"attn_resolutions must be resolutions the network reaches, \[16, 8\] .* got \(5,\)", "unet-attn-unreached"),
    _p(lambda: DiTConfig.preset("DiT-B/3"), ValueError, r"unknown DiT preset 'DiT-B/3'", "dit-preset"),
    _p(lambda: ME.rmse(A4, _t(4, 2)), ValueError, r"a and b must have the same shape, got \(4, 3\) and \(4, 2\)",
       "rmse-shape"),
    _p(lambda: ME.per_sample_error(A4, B4, kind="mae"), ValueError, r"kind must be 'rmse', 'mse' or 'max', got 'mae'",
       "error-kind"),
    _p(lambda: ME.psnr(A4, B4, data_range=0), ValueError, r"data_range must lie in \(0.0, inf\], got 0.0",
       "psnr-range"),
    _p(lambda: ME.psnr(A4, B4, reduction="max"), ValueError, r"reduction must be 'mean' or 'none', got 'max'",
       "psnr-reduction"),
    _p(lambda: ME.rmse(A4.long(), B4.long()), TypeError, r"a and b must be floating-point tensors", "rmse-int"),
    _p(lambda: MD.sliced_wasserstein(A4, B4, n_projections=0), ValueError,
       r"n_projections must be an integer in \[1, inf\], got 0", "sw-projections"),
    _p(lambda: MD.sliced_wasserstein(A4, _t(4, 2)), ValueError, r"x and y must have the same dimension, got 3 and 2",
       "sw-dimension"),
    _p(lambda: MD.mmd(A4, B4, bandwidths=[-1.0]), ValueError, r"bandwidths\[0\] must lie in \(0.0, inf\]",
       "mmd-bandwidth"),
    _p(lambda: MD.mmd(A4[:1], B4), ValueError, r"x and y need at least 2 samples each", "mmd-one-sample"),
    _p(lambda: tdiff.metrics.frechet_distance(torch.zeros(3)), ValueError,
       r"samples must be a tensor of shape \(N, 1, H, W\)", "frechet-shape"),
    _p(lambda: tdiff.metrics.frechet_distance(torch.full((4, 1, 16, 16), NAN)), ValueError,
       r"samples contain NaN or inf", "frechet-nan"),
    _p(lambda: tdiff.metrics.frechet_distance(torch.zeros(1, 1, 16, 16)), ValueError,
       r"samples must hold at least 2 images", "frechet-one"),
    _p(lambda: GM.image_mixture(k=0), ValueError, r"k must be a positive integer, got 0", "mixture-k"),
    _p(lambda: GM.image_mixture(spread=-1.0), ValueError, r"spread must be a finite positive number, got -1.0",
       "mixture-spread"),
    _p(lambda: DG.load_digits_tensor(size=12), ValueError, r"size must be one of \(8, 16, 32\), got 12",
       "digits-size"),
    _p(lambda: DG.load_digits_tensor(split="val"), ValueError, r"split must be one of \(None, 'train', 'test'\), "
       r"got 'val'", "digits-split"),
    _p(lambda: DG.digits_loader(batch_size=0), ValueError, r"batch_size must be positive, got 0", "digits-batch"),
]


@pytest.mark.parametrize("thunk,exc,match", MISC)
def test_configs_metrics_data_refuse(thunk, exc, match):
    _check(thunk, exc, match)


# class labels and inputs of the wrong shape through a denoiser into tdiff's DiT and UNet
def tiny_unet():
    from tdiff.models.unet import UNet

    torch.manual_seed(0)
    return UNet(UNetConfig(input_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,), num_groups=4, num_classes=3)).eval()


NETS = {"dit": (tiny_dit, 4, 2), "unet": (tiny_unet, 8, 3)}  # builder, input size, classes
LABELS = [
    _p(lambda n, s, k: tdiff.denoiser(n, VP)(torch.randn(2, 1, s, s), 0.5, y=torch.tensor([0, 1, 1])), ValueError,
       r"y must have shape \(2,\), got \(3,\)", "labels-batch"),
    _p(lambda n, s, k: tdiff.denoiser(n, VP, guidance=2.0)(torch.randn(2, 1, s, s), 0.5, y=torch.tensor([0, 1, 1])),
       ValueError, r"y must be a \(2,\) tensor of class labels \(one per sample\), got \(3,\)", "guided-labels-batch"),
    _p(lambda n, s, k: tdiff.denoiser(n, VP)(torch.randn(2, 1, s, s), 0.5, y=torch.tensor([0.0, 1.0])), ValueError,
       r"y must be an integer \(long\) tensor of class indices", "labels-float"),
    _p(lambda n, s, k: tdiff.denoiser(n, VP)(torch.randn(2, 1, s, s), 0.5, y=torch.tensor([0, 7])), ValueError,
       r"class labels must be in \[0, \d\] \(\d is the null class\), got \[0, 7\]", "labels-range"),
    _p(lambda n, s, k: tdiff.denoiser(n, VP)(torch.randn(2, 1, s, s), 0.5, y=torch.tensor([0, -3])), ValueError,
       r"class labels must be in \[0, \d\] .* got \[-3, 0\]", "labels-negative"),
    _p(lambda n, s, k: tdiff.denoiser(n, VP)(torch.randn(2, 3, s, s), 0.5), ValueError,
       r"x must have 1 channels, got 3", "x-channels"),
    _p(lambda n, s, k: tdiff.denoiser(n, VP)(torch.randn(2, 1, 6, 6), 0.5), ValueError, r"x must be \d+x\d+, got 6x6",
       "x-size"),
    _p(lambda n, s, k: n(torch.randn(2, 1, s, s), torch.zeros(3)), ValueError,
       r"t must be a scalar or have shape \(2,\), got \(3,\)", "net-t-shape"),
    _p(lambda n, s, k: n(torch.randn(2, s, s), torch.zeros(2)), ValueError, r"x must be \(B, C, H, W\), got shape",
       "net-x-3d"),
    _p(lambda n, s, k: tdiff.sample(lambda x, t: tdiff.denoiser(n, VP)(x, t, y=torch.tensor([0])),
                                    torch.randn(2, 1, s, s), TS, schedule=VP), ValueError,
       r"y must have shape \(2,\), got \(1,\)", "sample-labels-batch"),
]


@pytest.mark.parametrize("net_name", sorted(NETS))
@pytest.mark.parametrize("thunk,exc,match", LABELS)
def test_networks_refuse_bad_labels_and_inputs(net_name, thunk, exc, match):
    build, size, classes = NETS[net_name]
    with torch.no_grad():
        _check(lambda: thunk(build(), size, classes), exc, match)


# trainer checkpoints (torch files, weights_only): resuming from a damaged or foreign one is refused
from tdiff.training import train as TR  # noqa: E402


def _train_cfg(path, **kw):
    base = dict(iters=1, batch_size=2, eval_every=0, model_overrides=dict(hidden_size=8, depth=1, num_heads=2),
                checkpoint=str(path), checkpoint_every=1)
    return TR.TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "run.ckpt"
    TR.train(_train_cfg(path), log=lambda s: None)
    return path.read_bytes()


class Hostile:
    """A pickled object: loading with weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("a pickled payload ran",))  # harmless if it ever ran; weights_only must refuse it


def _rewrite(path, change):
    doc = torch.load(path, weights_only=True)
    change(doc)
    torch.save(doc, path)


CHECKPOINTS = [
    _p(lambda p: p.write_bytes(p.read_bytes()[:100]), {}, r"cannot read tdiff-train-checkpoint file '.*run\.ckpt'",
       "truncated"),
    _p(lambda p: p.write_bytes(b"\x00" * 64), {}, r"cannot read tdiff-train-checkpoint file", "garbage"),
    _p(lambda p: torch.save({"format": "tdiff-train-checkpoint", "format_version": 1, "x": Hostile()}, p), {},
       r"cannot read tdiff-train-checkpoint file '.*run\.ckpt': Weights only load failed", "pickled-object"),
    _p(lambda p: torch.save([1, 2], p), {}, r"'.*run\.ckpt' holds a list, expected a tdiff 'tdiff-train-checkpoint'",
       "top-level-list"),
    _p(lambda p: _rewrite(p, lambda d: d.update(format_version=7)), {}, r"has format_version 7, this tdiff reads 1",
       "wrong-version"),
    _p(lambda p: _rewrite(p, lambda d: d.update(format="tdiff-default-weights")), {},
       r"is a 'tdiff-default-weights' file, expected a 'tdiff-train-checkpoint' file", "wrong-format"),
    _p(lambda p: _rewrite(p, lambda d: d.pop("model")), {}, r"checkpoint '.*run\.ckpt' is missing \['model'\]",
       "missing-model"),
    _p(lambda p: _rewrite(p, lambda d: d.update(iteration=5)), {}, r"is at iteration 5, beyond iters=1",
       "iteration-beyond"),
    _p(lambda p: _rewrite(p, lambda d: d.update(iteration="1")), {}, r"is at iteration '1'", "iteration-str"),
    _p(lambda p: None, {"lr": 5e-4}, r"checkpoint '.*run\.ckpt' was made with lr=0.001; this run has lr=0.0005",
       "other-config"),
    _p(lambda p: None, {"model_overrides": dict(hidden_size=16, depth=1, num_heads=2)},
       r"was made with model_overrides\.hidden_size=8; this run has model_overrides\.hidden_size=16",
       "other-model"),
    _p(lambda p: (p.unlink(), p.mkdir()), {}, r"cannot read tdiff-train-checkpoint file", "directory"),
    _p(lambda p: _rewrite(p, lambda d: d.update(model={"w": torch.zeros(2)})), {},
       r"checkpoint '.*run\.ckpt' does not fit this run: Error\(s\) in loading state_dict for DiT", "model-keys"),
    _p(lambda p: _rewrite(p, lambda d: next(iter(d["ema"].values())).fill_(NAN)), {},
       r"'.*run\.ckpt \[ema\]': tensor '.*' holds NaN or inf", "ema-nan"),
    _p(lambda p: _rewrite(p, lambda d: d.update(history="abc")), {}, r"'history' must be a dict, got str",
       "history-str"),
    _p(lambda p: _rewrite(p, lambda d: d.update(elapsed_s="abc")), {},
       r"'elapsed_s' must be a finite number >= 0, got 'abc'", "elapsed-str"),
    _p(lambda p: _rewrite(p, lambda d: d.update(generator=torch.zeros(3))), {},
       r"'generator' must be a uint8 RNG state tensor", "generator-float"),
    _p(lambda p: _rewrite(p, lambda d: d.update(optimizer={})), {},
       r"checkpoint '.*run\.ckpt' does not fit this run: 'param_groups'", "optimizer-empty"),
    _p(lambda p: _rewrite(p, lambda d: d.update(loss={"warmup": {}})), {},
       r"does not fit this run: state is missing \['config'\]", "loss-state"),
]


@pytest.mark.parametrize("damage,change,match", CHECKPOINTS)
def test_trainer_resume_refuses(tmp_path, trainer_checkpoint, damage, change, match):
    path = tmp_path / "run.ckpt"
    path.write_bytes(trainer_checkpoint)
    damage(path)
    with pytest.raises(ValueError, match=match):
        TR.train(_train_cfg(path, **change), log=lambda s: None, resume=True)


# LD3 checkpoints: a damaged one is refused on resume (it must not resume, or return, NaN steps)
LD3_RUN = dict(nfe=3, shape=(1, 2, 2), schedule=VP, n_train=2, n_val=2, epochs=1, phase1_epochs=0, teacher_nfe=4,
               progress=False)


@pytest.fixture(scope="module")
def ld3_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ld3") / "ld3.ckpt"
    tdiff.ld3_learn(x0_den, checkpoint=str(path), **LD3_RUN)
    return path.read_bytes()


def _state(change):
    return lambda p: _rewrite(p, lambda d: change(d["state"]))


LD3_CHECKPOINTS = [
    _p(_state(lambda s: s["xi"].fill_(NAN)), r"damaged LD3 checkpoint: state 'xi' holds NaN or inf", "xi-nan"),
    _p(_state(lambda s: s.update(xi=torch.zeros(7))), r"state 'xi' must be a tensor of shape \(4,\), got \(7,\)",
       "xi-shape"),
    _p(_state(lambda s: s["best"]["xi_c"].fill_(INF)), r"state 'best.xi_c' holds NaN or inf", "best-inf"),
    _p(_state(lambda s: s["eps_prime"].fill_(NAN)), r"state 'eps_prime' holds NaN or inf", "eps-nan"),
    _p(_state(lambda s: s.update(target=torch.zeros(3, 1, 2, 2))), r"state 'target' must be a tensor of shape "
       r"\(4, 1, 2, 2\)", "target-shape"),
    _p(_state(lambda s: s.update(epoch="1")), r"state 'epoch' must be an integer >= 0, got '1'", "epoch-str"),
    _p(_state(lambda s: s.update(done=1)), r"state 'done' must be True or False, got 1", "done-int"),
    _p(_state(lambda s: s.update(history=5)), r"state 'history' must be a list, got int", "history-int"),
    _p(_state(lambda s: s.update(seconds="x")), r"damaged LD3 checkpoint: could not convert string to float",
       "seconds-str"),
    _p(_state(lambda s: s.pop("opt_xi")), r"damaged LD3 checkpoint: 'opt_xi'", "optimiser-missing"),
    _p(lambda p: _rewrite(p, lambda d: d.pop("state")), r"is a damaged LD3 checkpoint \(no settings or state\)",
       "state-missing"),
    _p(lambda p: _rewrite(p, lambda d: d["settings"].update(nfe=9)),
       r"is the checkpoint of another LD3 run \(it differs in \['nfe'\]\)", "other-run"),
    _p(lambda p: p.write_bytes(p.read_bytes()[:200]), r"cannot read tdiff-ld3-checkpoint file", "truncated"),
]


@pytest.mark.parametrize("damage,match", LD3_CHECKPOINTS)
def test_ld3_resume_refuses(tmp_path, ld3_checkpoint, damage, match):
    path = tmp_path / "ld3.ckpt"
    path.write_bytes(ld3_checkpoint)
    damage(path)
    with pytest.raises(ValueError, match=r"'.*ld3\.ckpt'.*" + match if "cannot read" not in match else match):
        tdiff.ld3_learn(x0_den, checkpoint=str(path), **LD3_RUN)


# mask-training checkpoints: damaged, or written for another model / trajectory, refused on resume
def _mask_run(model, path, seed=0, **kw):
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    den = tdiff.denoiser(model, VP)
    return C.train_mask(model, lambda m: tdiff.sample(den, x_T, TS, solver="ddim"), iterations=1,
                        checkpoint=str(path), progress=False, **kw)


@pytest.fixture(scope="module")
def mask_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("mask") / "mask.ckpt"
    _mask_run(tiny_dit(), path)
    return path.read_bytes()


MASK_CHECKPOINTS = [
    _p(lambda p: _rewrite(p, lambda d: d["scores"].fill_(NAN)), {}, r"holds scores outside \[0, 1\] \(or NaN\)",
       "scores-nan"),
    _p(lambda p: _rewrite(p, lambda d: d["scores"].fill_(2.0)), {}, r"holds scores outside \[0, 1\]", "scores-2"),
    _p(lambda p: _rewrite(p, lambda d: d.update(scores=torch.zeros(3, 3))), {}, r"has no scores of shape \(2, 2\)",
       "scores-shape"),
    _p(lambda p: _rewrite(p, lambda d: d.update(next_step="1")), {}, r"next_step must be an integer in \[1, 2\], "
       r"got '1'", "next-step-str"),
    _p(lambda p: _rewrite(p, lambda d: d.update(next_step=10**6)), {}, r"next_step must be an integer in \[1, 2\]",
       "next-step-huge"),
    _p(lambda p: _rewrite(p, lambda d: d.update(rng=[1, 2])), {}, r"rng must be a uint8 generator state tensor",
       "rng-list"),
    _p(lambda p: _rewrite(p, lambda d: d.update(fingerprint="0" * 16)), {},
       r"was written for another model or other settings", "other-model"),
    _p(lambda p: None, {"lambda1": 0.5}, r"was written for another model or other settings", "other-settings"),
    _p(lambda p: None, {"seed_x": 1}, r"was written for another sampling trajectory \(another x_T", "other-x_T"),
    _p(lambda p: p.write_bytes(p.read_bytes()[:50]), {}, r"cannot read tdiff.cache.mask_training file",
       "truncated"),
    _p(lambda p: _rewrite(p, lambda d: d.update(format_version=9)), {}, r"has format_version 9", "wrong-version"),
]


@pytest.mark.parametrize("damage,change,match", MASK_CHECKPOINTS)
def test_mask_training_resume_refuses(tmp_path, mask_checkpoint, damage, change, match):
    path = tmp_path / "mask.ckpt"
    path.write_bytes(mask_checkpoint)
    damage(path)
    change = dict(change)
    seed = change.pop("seed_x", 0)
    with pytest.raises(ValueError, match=match):
        _mask_run(tiny_dit(), path, seed=seed, **change)


# a saved TdiffScheduler (scheduler_config.json) edited by hand is validated as fully as a new one
SAVED_SCHEDULER = [
    _p(lambda c: c["timesteps"].update(timesteps=[0.9, NAN, 0.1]), r"timesteps contains NaN or inf", "times-nan"),
    _p(lambda c: c["timesteps"].update(timesteps="abc"), r"timesteps\['timesteps'\] must be a 1-D sequence of numbers",
       "times-str"),
    _p(lambda c: c["timesteps"].update(timesteps=[0.1, 0.5, 0.9]), r"timesteps must be strictly decreasing",
       "times-increasing"),
    _p(lambda c: c["timesteps"].update(timesteps_cond=[0.9, INF, 0.1]), r"timesteps_cond contains NaN or inf",
       "cond-inf"),
    _p(lambda c: c["timesteps"].update(metadata=[1]), r"timesteps\['metadata'\] must be a dict, got list",
       "metadata-list"),
    _p(lambda c: c.update(solver="rk4"), r"solver must be None or one of .*'rk4'", "solver"),
    _p(lambda c: c.update(order="2"), r"order must be None or an integer, got '2'", "order"),
    _p(lambda c: c.update(num_train_timesteps=-1), r"num_train_timesteps must be an integer >= 2, got -1", "ntt"),
]


@pytest.mark.parametrize("change,match", SAVED_SCHEDULER)
def test_saved_tdiff_scheduler_refused(tmp_path, change, match):
    from tdiff.schedulers import TdiffScheduler

    TdiffScheduler(timesteps=torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64)).save_pretrained(str(tmp_path))
    path = tmp_path / "scheduler_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        TdiffScheduler.from_pretrained(str(tmp_path))
