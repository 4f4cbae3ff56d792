"""Conformance with diffusers' schedulers, through the public path only:

    den = tdiff.denoisers.from_diffusers(net, scheduler)      # schedule, prediction type, clip_sample
    x0 = tdiff.sample(den, x_T, tdiff.solvers.from_diffusers_timesteps(scheduler), generator=...)

against the scheduler's own loop (scale_model_input, the network, step) on the same network: the exact posterior
mean of a Gaussian mixture, wrapped as an eps / v / x0 / flow network fed the scheduler's timestep. Everything runs
in float64 and must agree to 1e-10 (stochastic samplers with the same generator).

How diffusers is made to compute in float64 (its float32 casts otherwise hide differences below ~1e-6):
  1. set_timesteps runs as shipped (its sigmas and timesteps are rounded to float32 there; tdiff reads those
     very values, so both sides share them);
  2. then every floating table the step reads (sigmas, alphas_cumprod, final_alpha_cumprod, alpha_t, sigma_t,
     lambda_t, betas, alphas, one) is converted to float64;
  3. while stepping, the scheduler module's global `torch` is replaced by a proxy whose `float32` is
     `torch.float64`, so `sample.to(torch.float32)` and `randn_tensor(..., dtype=torch.float32)` stay float64.

One row per config is printed (pytest -s): config, NFE, max |tdiff - diffusers|.
"""
import contextlib
import math
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("scipy")  # beta sigmas

import tdiff  # noqa: E402
from tdiff.data.gaussian_mixture import GaussianMixture  # noqa: E402
from tdiff.schedules import DiscreteVP, RectifiedFlow  # noqa: E402
from tdiff.solvers import from_diffusers_timesteps, to_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10
# 4-dim mixture with means beyond [-1, 1], so clip_sample is active at high noise
MIX = GaussianMixture([[1.5, -0.5, 0.8, 0.2], [-1.2, 0.9, -0.4, -1.1], [0.3, 1.4, -1.3, 0.6]],
                      [0.3, 0.5, 0.2], [1.0, 2.0, 1.5])
LIN = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
SCALED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
COS = dict(beta_schedule="squaredcos_cap_v2")
EPS, V, X0 = ({"prediction_type": p} for p in ("epsilon", "v_prediction", "sample"))
ZSNR = dict(rescale_betas_zero_snr=True)
NOCLIP = dict(clip_sample=False)


class MixtureNet:
    """A diffusers-style network: net(x, timestep, class_labels=None, return_dict=False)[0] is the exact
    mixture's eps / v / x0 / flow velocity at the noise level of `timestep` (not of the sample's grid point)."""

    def __init__(self, scheduler):
        get = scheduler.config.get
        self.n_train = get("num_train_timesteps", 1000)
        self.flow = type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" or get("use_flow_sigmas", False)
        self.kind = get("prediction_type", "flow_prediction") if not self.flow else "flow_prediction"
        self.schedule = RectifiedFlow() if self.flow else DiscreteVP.from_diffusers(scheduler)

    def __call__(self, x, timestep, class_labels=None, return_dict=False):
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        t = t / self.n_train if self.flow else self.schedule.t_from_index(t)
        a = self.schedule.alpha(t).view(-1, *[1] * (x.dim() - 1))
        s = self.schedule.sigma(t).view(-1, *[1] * (x.dim() - 1))
        d = MIX.posterior_mean(x, t, self.schedule)
        eps = (x - a * d) / s
        out = {"epsilon": eps, "v_prediction": a * eps - s * d, "sample": d, "flow_prediction": eps - d}[self.kind]
        return (out,)


class _Torch64:
    """The scheduler module's `torch`, with float32 meaning float64."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


TABLES = ("sigmas", "alphas_cumprod", "final_alpha_cumprod", "alpha_t", "sigma_t", "lambda_t", "betas", "alphas",
          "one")


@contextlib.contextmanager
def float64_steps(scheduler):
    for name in TABLES:
        value = getattr(scheduler, name, None)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            setattr(scheduler, name, value.to(torch.float64))
    module = sys.modules[type(scheduler).__module__]
    saved = module.torch
    module.torch = _Torch64()
    try:
        yield
    finally:
        module.torch = saved


def diffusers_loop(scheduler, net, x_T, generator=None, **step_kw):
    """The pipeline's loop, from the state that corresponds to tdiff's x_T; returns the result in tdiff's x."""
    euler_like = type(scheduler).__name__ in ("EulerDiscreteScheduler", "HeunDiscreteScheduler")
    if generator is not None:
        step_kw["generator"] = generator
    scale = getattr(scheduler, "scale_model_input", lambda x, t: x)
    with float64_steps(scheduler):
        sigmas = getattr(scheduler, "sigmas", None)
        x = x_T / (sigmas[0] ** 2 + 1) ** -0.5 if euler_like else x_T.clone()  # x~ = x / alpha
        for t in scheduler.timesteps:
            x = scheduler.step(net(scale(x, t), t)[0], t, x, **step_kw).prev_sample
    if euler_like:  # back from x~ = x / alpha at the sigma of the last step's end (alpha = 1 at sigma = 0)
        x = x * (sigmas[scheduler.step_index] ** 2 + 1) ** -0.5
    return x


# (id, scheduler class, config, steps, step() keywords, tdiff keywords)
CONFIGS = [
    # DDIM: spacing, set_alpha_to_one, prediction types, clipping, zero SNR, eta
    ("ddim-lin-eps-leading", "DDIMScheduler", {**LIN, **EPS, **NOCLIP, "steps_offset": 1}, 10, {}),
    ("ddim-scaled-v-trailing", "DDIMScheduler", {**SCALED, **V, **NOCLIP, "timestep_spacing": "trailing"}, 7, {}),
    ("ddim-cos-eps-linspace-a1false", "DDIMScheduler", {**COS, **EPS, **NOCLIP, "timestep_spacing": "linspace",
                                                        "set_alpha_to_one": False}, 12, {}),
    ("ddim-lin-x0-trailing", "DDIMScheduler", {**LIN, **X0, **NOCLIP, "timestep_spacing": "trailing"}, 5, {}),
    ("ddim-scaled-v-trailing-zsnr", "DDIMScheduler", {**SCALED, **V, **NOCLIP, **ZSNR,
                                                      "timestep_spacing": "trailing"}, 8, {}),
    ("ddim-lin-eps-leading-clip", "DDIMScheduler", {**LIN, **EPS, "clip_sample": True}, 10, {}),
    ("ddim-lin-eps-trailing-eta0.5", "DDIMScheduler", {**LIN, **EPS, **NOCLIP, "timestep_spacing": "trailing"}, 10,
     {"eta": 0.5}),
    ("ddim-scaled-v-linspace-eta1-a1false", "DDIMScheduler", {**SCALED, **V, **NOCLIP, "timestep_spacing":
                                                              "linspace", "set_alpha_to_one": False}, 6, {"eta": 1.0}),
    ("ddim-cos-eps-leading-eta0.3-clip", "DDIMScheduler", {**COS, **EPS, "clip_sample": True}, 9, {"eta": 0.3}),
    # DDPM ancestral sampling
    ("ddpm-lin-eps-leading", "DDPMScheduler", {**LIN, **EPS, **NOCLIP}, 10, {}),
    ("ddpm-scaled-v-linspace", "DDPMScheduler", {**SCALED, **V, **NOCLIP, "timestep_spacing": "linspace"}, 8, {}),
    ("ddpm-cos-eps-trailing", "DDPMScheduler", {**COS, **EPS, **NOCLIP, "timestep_spacing": "trailing"}, 6, {}),
    ("ddpm-lin-x0-linspace-log-clip", "DDPMScheduler", {**LIN, **X0, "clip_sample": True, "timestep_spacing":
                                                        "linspace", "variance_type": "fixed_small_log"}, 5, {}),
    ("ddpm-scaled-v-trailing-zsnr", "DDPMScheduler", {**SCALED, **V, **NOCLIP, **ZSNR,
                                                      "timestep_spacing": "trailing"}, 7, {}),
    # DPM-Solver++ / DPM-Solver, ODE and SDE, every sigma option, both final sigmas, lower_order_final on and off
    ("dpmpp2m-lin-eps-linspace-zero", "DPMSolverMultistepScheduler", {**LIN, **EPS}, 10, {}),
    ("dpmpp2m-heun-scaled-eps-leading-smin", "DPMSolverMultistepScheduler",
     {**SCALED, **EPS, "solver_type": "heun", "timestep_spacing": "leading", "final_sigmas_type": "sigma_min"}, 12, {}),
    ("dpmpp3m-cos-v-trailing-zero", "DPMSolverMultistepScheduler",
     {**COS, **V, "solver_order": 3, "timestep_spacing": "trailing"}, 20, {}),
    ("dpmpp3m-karras-lin-eps-zero", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "use_karras_sigmas": True}, 13, {}),
    ("dpmpp2m-karras-scaled-v-smin-nolof", "DPMSolverMultistepScheduler",
     {**SCALED, **V, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 25, {}),
    ("dpmpp3m-exp-lin-eps-zero", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "use_exponential_sigmas": True}, 15, {}),
    ("dpmpp3m-exp-scaled-eps-smin-zerostep", "DPMSolverMultistepScheduler",
     {**SCALED, **EPS, "solver_order": 3, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, 12, {}),
    ("dpmpp2m-beta-scaled-eps-zero", "DPMSolverMultistepScheduler", {**SCALED, **EPS, "use_beta_sigmas": True}, 9, {}),
    ("dpmpp3m-lu-lin-eps-zero", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "use_lu_lambdas": True}, 11, {}),
    ("dpmpp1-lin-x0-zero", "DPMSolverMultistepScheduler", {**LIN, **X0, "solver_order": 1}, 5, {}),
    ("dpmpp2m-lin-eps-euler-at-final", "DPMSolverMultistepScheduler", {**LIN, **EPS, "euler_at_final": True}, 16, {}),
    ("dpmpp2m-scaled-v-trailing-zsnr", "DPMSolverMultistepScheduler",
     {**SCALED, **V, **ZSNR, "timestep_spacing": "trailing"}, 10, {}),
    ("dpmpp3m-karras-lin-eps-smin-zerostep", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, 10, {}),
    ("dpmpp2m-flow-shift3", "DPMSolverMultistepScheduler",
     {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0}, 10, {}),
    ("dpmpp2m-cos-eps-lambda-clipped", "DPMSolverMultistepScheduler", {**COS, **EPS, "lambda_min_clipped": -5.1}, 10,
     {}),
    ("dpmpp3m-lin-eps-smin-nolof", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": False}, 8, {}),
    ("dpmsolver2-lin-eps-smin", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, 10, {}),
    ("dpmsolver3-scaled-v-smin", "DPMSolverMultistepScheduler",
     {**SCALED, **V, "algorithm_type": "dpmsolver", "solver_order": 3, "final_sigmas_type": "sigma_min"}, 16, {}),
    ("dpmsolver2-heun-karras-lin-x0-smin", "DPMSolverMultistepScheduler",
     {**LIN, **X0, "algorithm_type": "dpmsolver", "solver_type": "heun", "use_karras_sigmas": True,
      "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 12, {}),
    ("dpmsolver1-cos-eps-smin", "DPMSolverMultistepScheduler",
     {**COS, **EPS, "algorithm_type": "dpmsolver", "solver_order": 1, "final_sigmas_type": "sigma_min"}, 6, {}),
    ("sde-dpmpp2m-lin-eps-zero", "DPMSolverMultistepScheduler", {**LIN, **EPS, "algorithm_type": "sde-dpmsolver++"},
     10, {}),
    ("sde-dpmpp2m-heun-karras-scaled-v-smin", "DPMSolverMultistepScheduler",
     {**SCALED, **V, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "use_karras_sigmas": True,
      "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 14, {}),
    ("sde-dpmpp3m-lin-eps-zero", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, 15, {}),
    ("sde-dpmpp1-cos-x0-zero", "DPMSolverMultistepScheduler",
     {**COS, **X0, "algorithm_type": "sde-dpmsolver++", "solver_order": 1}, 5, {}),
    ("sde-dpmsolver1-lin-eps-smin", "DPMSolverMultistepScheduler",
     {**LIN, **EPS, "algorithm_type": "sde-dpmsolver", "solver_order": 1, "final_sigmas_type": "sigma_min"}, 6, {}),
    ("sde-dpmsolver2-heun-scaled-v-smin", "DPMSolverMultistepScheduler",
     {**SCALED, **V, "algorithm_type": "sde-dpmsolver", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
     10, {}),
    # UniPC
    ("unipc1-bh1-lin-eps-linspace-smin", "UniPCMultistepScheduler",
     {**LIN, **EPS, "solver_order": 1, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, 8, {}),
    ("unipc2-bh2-scaled-eps-leading-zero", "UniPCMultistepScheduler",
     {**SCALED, **EPS, "timestep_spacing": "leading", "steps_offset": 1}, 10, {}),
    ("unipc3-bh2-cos-v-trailing-zero", "UniPCMultistepScheduler",
     {**COS, **V, "solver_order": 3, "timestep_spacing": "trailing"}, 12, {}),
    ("unipc3-bh1-karras-lin-eps-smin-zerostep", "UniPCMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "solver_type": "bh1", "use_karras_sigmas": True,
      "final_sigmas_type": "sigma_min"}, 10, {}),
    ("unipc3-bh2-exp-lin-eps-zero", "UniPCMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "use_exponential_sigmas": True}, 15, {}),
    ("unipc2-bh2-beta-scaled-v-smin", "UniPCMultistepScheduler",
     {**SCALED, **V, "use_beta_sigmas": True, "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"},
     9, {}),
    ("unipc3-bh2-lin-eps-smin-nolof", "UniPCMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "final_sigmas_type": "sigma_min", "lower_order_final": False,
      "timestep_spacing": "trailing"}, 6, {}),
    ("unipc3-bh2-lin-eps-disable-corrector", "UniPCMultistepScheduler",
     {**LIN, **EPS, "solver_order": 3, "disable_corrector": [0, 3]}, 8, {}),
    ("unipc2-bh2-scaled-v-trailing-zsnr", "UniPCMultistepScheduler",
     {**SCALED, **V, **ZSNR, "timestep_spacing": "trailing"}, 10, {}),
    ("unipc2-bh2-flow-shift2", "UniPCMultistepScheduler",
     {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 2.0}, 10, {}),
    ("unipc2-bh1-lin-x0-smin", "UniPCMultistepScheduler",
     {**LIN, **X0, "solver_type": "bh1", "final_sigmas_type": "sigma_min", "timestep_spacing": "trailing"}, 7, {}),
    # Euler (fractional network times with Karras/exponential/beta sigmas)
    ("euler-lin-eps-linspace-zero", "EulerDiscreteScheduler", {**LIN, **EPS}, 10, {}),
    ("euler-scaled-v-leading-zero", "EulerDiscreteScheduler",
     {**SCALED, **V, "timestep_spacing": "leading", "steps_offset": 1}, 12, {}),
    ("euler-cos-eps-trailing-smin", "EulerDiscreteScheduler",
     {**COS, **EPS, "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min"}, 8, {}),
    ("euler-karras-lin-eps-zero", "EulerDiscreteScheduler", {**LIN, **EPS, "use_karras_sigmas": True}, 9, {}),
    ("euler-exp-scaled-eps-smin-zerostep", "EulerDiscreteScheduler",
     {**SCALED, **EPS, "use_exponential_sigmas": True, "final_sigmas_type": "sigma_min"}, 10, {}),
    ("euler-beta-lin-v-zero", "EulerDiscreteScheduler", {**LIN, **V, "use_beta_sigmas": True}, 6, {}),
    ("euler-loglinear-lin-eps-zero", "EulerDiscreteScheduler", {**LIN, **EPS, "interpolation_type": "log_linear"},
     10, {}),
    ("euler-lin-eps-linspace-smin-zerostep", "EulerDiscreteScheduler",
     {**LIN, **EPS, "final_sigmas_type": "sigma_min"}, 10, {}),
    ("euler-scaled-v-trailing-zsnr", "EulerDiscreteScheduler",
     {**SCALED, **V, **ZSNR, "timestep_spacing": "trailing"}, 10, {}),
    ("euler-lin-x0-zero", "EulerDiscreteScheduler", {**LIN, **X0}, 5, {}),
    # Heun (diffusers' repeated-times convention)
    ("heun-lin-eps-linspace", "HeunDiscreteScheduler", {**LIN, **EPS}, 8, {}),
    ("heun-karras-scaled-v", "HeunDiscreteScheduler", {**SCALED, **V, "use_karras_sigmas": True}, 6, {}),
    ("heun-cos-eps-trailing-clip", "HeunDiscreteScheduler",
     {**COS, **EPS, "timestep_spacing": "trailing", "clip_sample": True}, 5, {}),
    ("heun-exp-lin-x0", "HeunDiscreteScheduler", {**LIN, **X0, "use_exponential_sigmas": True}, 7, {}),
    ("heun-beta-lin-eps", "HeunDiscreteScheduler", {**LIN, **EPS, "use_beta_sigmas": True}, 5, {}),
    # flow matching (shift, Karras/exponential/beta sigmas, terminal shift, dynamic shifting)
    ("flow-euler-shift1", "FlowMatchEulerDiscreteScheduler", {}, 10, {}),
    ("flow-euler-shift3", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, 8, {}),
    ("flow-euler-karras", "FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, 12, {}),
    ("flow-euler-exp-shift2", "FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True, "shift": 2.0}, 6, {}),
    ("flow-euler-beta", "FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}, 7, {}),
    ("flow-euler-shift-terminal", "FlowMatchEulerDiscreteScheduler", {"shift": 2.0, "shift_terminal": 0.1}, 9, {}),
    ("flow-euler-dynamic-shift", "FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": True}, 10, {}),
]

def _make(cls_name, config, steps):
    scheduler = getattr(diffusers, cls_name)(**config)
    if config.get("use_dynamic_shifting"):
        scheduler.set_timesteps(steps, mu=0.8)
    else:
        scheduler.set_timesteps(steps)
    return scheduler


def _x_T(scheduler):
    g = torch.Generator().manual_seed(3)
    return torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=g)


def _stochastic(cls_name, config, step_kw):
    return cls_name == "DDPMScheduler" or step_kw.get("eta", 0) > 0 or "sde" in config.get("algorithm_type", "")


@pytest.fixture(scope="module")
def report():
    rows = []
    yield rows
    print(f"\n{'config':44s} {'steps':>5s} {'tdiff NFE':>9s}  max |tdiff - diffusers|")
    for name, steps, nfe, diff in rows:
        print(f"{name:44s} {steps:5d} {nfe:9d}  {diff:.2e}")
    print(f"{len(rows)} configs, worst {max(r[3] for r in rows):.2e}")


@pytest.mark.parametrize("name,cls_name,config,steps,step_kw", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_conformance(report, name, cls_name, config, steps, step_kw):
    scheduler = _make(cls_name, config, steps)
    net = MixtureNet(scheduler)
    x_T = _x_T(scheduler)
    den = tdiff.denoisers.from_diffusers(net, scheduler)
    grid = from_diffusers_timesteps(scheduler)
    stochastic = _stochastic(cls_name, config, step_kw)
    gen = torch.Generator().manual_seed(11) if stochastic else None
    sampler = tdiff.solvers.Sampler(den, grid, **step_kw)  # what tdiff.sample(den, x_T, grid, ...) runs
    ours, nfe = sampler(x_T, gen), sampler.nfe
    if stochastic:
        ref_gen = torch.Generator().manual_seed(11)
    ref = diffusers_loop(scheduler, net, x_T, ref_gen if stochastic else None, **step_kw)
    if cls_name == "DDPMScheduler" and int(scheduler.timesteps[-1]) > 0:
        # diffusers clamps the posterior variance to >= 1e-20, so its last step to alpha = 1 adds noise of std 1e-10
        # (drawn next from the generator) when the last timestep is not 0; tdiff adds none (the variance is 0)
        ours = ours + 1e-10 * torch.randn(x_T.shape, dtype=x_T.dtype, generator=gen)
    diff = float((ours - ref).abs().max())
    report.append((name, steps, nfe, diff))
    assert torch.isfinite(ref).all()
    assert diff < TOL, f"{name}: max difference {diff:.3e}"


@pytest.mark.parametrize("cls_name,config,field", [
    ("DPMSolverMultistepScheduler", {"thresholding": True}, "thresholding"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver", "solver_order": 3,
                                     "final_sigmas_type": "sigma_min"}, "solver_order"),
    ("DPMSolverMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True, "final_sigmas_type": "sigma_min",
                                     "lower_order_final": False}, "solver_order"),
    ("UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0"),
    ("UniPCMultistepScheduler", {"solver_order": 2, "lower_order_final": False}, "lower_order_final"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous", "prediction_type": "v_prediction"}, "timestep_type"),
    ("EulerDiscreteScheduler", {"rescale_betas_zero_snr": True}, "alphas_cumprod"),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, "stochastic_sampling"),
    ("FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True}, "invert_sigmas"),
    ("DDPMScheduler", {"variance_type": "fixed_large"}, "variance_type"),
    ("DDPMScheduler", {"variance_type": "learned_range"}, "variance_type"),
    ("LMSDiscreteScheduler", {}, "not supported"),
])
def test_unreproducible_configs_are_refused_naming_the_field(cls_name, config, field):
    scheduler = _make(cls_name, config, 10)
    with pytest.raises(ValueError, match=field):
        from_diffusers_timesteps(scheduler)


def test_thresholding_is_refused_by_the_denoiser_wrapper_too():
    scheduler = diffusers.DDIMScheduler(thresholding=True)
    with pytest.raises(ValueError, match="thresholding"):
        tdiff.denoisers.from_diffusers(MixtureNet(diffusers.DDIMScheduler()), scheduler)


def test_the_grid_carries_the_solver_but_an_explicit_solver_wins():
    scheduler = _make("UniPCMultistepScheduler", {"solver_order": 3, "disable_corrector": [1]}, 8)
    grid = from_diffusers_timesteps(scheduler)
    assert (grid.solver, grid.order, grid.options["disable_corrector"]) == ("unipc", 3, [1])
    den = tdiff.denoisers.from_diffusers(MixtureNet(scheduler), scheduler)
    x = _x_T(scheduler)
    torch.testing.assert_close(tdiff.sample(den, x, grid), tdiff.sample(den, x, grid, solver="unipc", order=3,
                                                                       **grid.options))
    # another solver on the same grid ignores the carried options
    other = tdiff.sample(den, x, grid, solver="dpmpp", order=2)
    assert other.shape == x.shape and not torch.allclose(other, tdiff.sample(den, x, grid))


def test_to_diffusers_round_trip():
    sched = diffusers.DPMSolverMultistepScheduler(**LIN, final_sigmas_type="sigma_min")
    sched.set_timesteps(10)
    schedule = DiscreteVP.from_diffusers(sched)
    grid = from_diffusers_timesteps(sched, schedule)
    assert to_diffusers(grid, schedule, "timesteps")["timesteps"] == sched.timesteps.tolist()
    sigmas = to_diffusers(grid.timesteps, schedule, "sigmas")["sigmas"]
    torch.testing.assert_close(torch.tensor(sigmas, dtype=torch.float64), sched.sigmas[:-1].double())
    with pytest.raises(ValueError, match="kind"):
        to_diffusers(grid, schedule, "betas")
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(6)
    fgrid = from_diffusers_timesteps(flow)
    torch.testing.assert_close(torch.tensor(to_diffusers(fgrid, RectifiedFlow())["sigmas"], dtype=torch.float64),
                               flow.sigmas[:-1].double())


def test_enough_configs_cover_every_claimed_class():
    from tdiff.solvers.interop import SUPPORTED

    assert len(CONFIGS) >= 60
    assert {c[1] for c in CONFIGS} == set(SUPPORTED)
    assert math.isclose(TOL, 1e-10)
