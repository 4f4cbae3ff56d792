"""TdiffScheduler inside real diffusers pipelines (tiny random components, tests/cache_pipelines.py).

The pipeline's own loop with `pipe.scheduler = TdiffScheduler.from_config(...)` must equal `tdiff.sample` on the
same x_T, with the pipeline as a tdiff Denoiser (`pipeline_denoiser`, checked against diffusers' own loop in
test_diffusers_pipelines.py), in DDPM, DDIM, DiT, PixArt-alpha, Stable Diffusion and SD3: every family with another
solver and grid (stochastic solvers with the pipeline's generators, Heun's two calls per step, a learned schedule
with decoupled network times, flow matching with shift). Then: reproducing the pipeline's own scheduler
(timesteps="diffusers"), the save/load round trip, the rest of the protocol and bad input.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tdiff  # noqa: E402
import diffusers_runs as R  # noqa: E402
from tdiff.schedulers import TdiffScheduler, pipeline_denoiser  # noqa: E402
from tdiff.schedules import DiscreteVP, RectifiedFlow  # noqa: E402
from tdiff.solvers import from_diffusers_timesteps  # noqa: E402
from tdiff.timesteps import LearnedSchedule, edm_rho, logsnr_uniform, quadratic_t, uniform_t  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = dict(rtol=1e-5, atol=1e-5)


def _learned(schedule, n, **meta):
    """A schedule with decoupled network times, as LD3 makes them (the times moved off a heuristic)."""
    ts = logsnr_uniform(schedule, n)
    gaps = ts[:-1] - ts[1:]
    cond = ts.clone()
    cond[1:-1] = ts[1:-1] + 0.3 * gaps[1:] * torch.tensor([1.0, -1.0] * n)[: n - 1]
    moved = ts.clone()
    moved[1:-1] = ts[1:-1] - 0.2 * gaps[1:]
    return LearnedSchedule(moved, cond, {"schedule": schedule.config(), "solver": "dpmpp", "order": 3, "nfe": n,
                                         "model_fingerprint": None, **meta}, schedule)


def _flow_config():
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config


# (family, steps, TdiffScheduler options, pipeline call extras, the grid tdiff.sample gets, tdiff.sample options)
CASES = {
    "ddpm-ancestral": ("ddpm", 4, dict(solver="ddpm", timesteps="uniform_t"), {},
                       lambda s: uniform_t(s, 4), dict(solver="ddpm")),
    "ddim-eta-from-pipeline": ("ddim", 4, dict(solver="ddim", timesteps="quadratic_t"), dict(eta=0.5),
                               lambda s: quadratic_t(s, 4), dict(solver="ddim", eta=0.5)),
    "dit-unipc2-cfg": ("dit", 5, dict(solver="unipc", order=2), {},
                       lambda s: logsnr_uniform(s, 5), dict(solver="unipc", order=2)),
    "pixart-learned-decoupled": ("pixart", 5, dict(clip_sample=False, timesteps="learned"), {},
                                 lambda s: _learned(s, 5), dict(solver="dpmpp", order=3)),
    "sd-heun-two-calls-per-step": ("sd", 3, dict(solver="heun", timesteps="edm_rho", final_sigmas_type="zero",
                                                 solver_options={"order_rule": "diffusers"}), {},
                                   lambda s: edm_rho(s, 3), dict(solver="heun", final_sigmas_type="zero",
                                                                 order_rule="diffusers")),
    "sd3-flow-dpmpp2-zero": ("sd3", 4, dict(solver="dpmpp", order=2, final_sigmas_type="zero"), {},
                             lambda s: logsnr_uniform(s, 4), dict(solver="dpmpp", order=2, final_sigmas_type="zero")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_run_equals_tdiff_sample(case):
    family, steps, options, extra, grid, sample_kw = CASES[case]
    pipe = R.pipeline(family)
    config = _flow_config() if family == "sd3" else pipe.scheduler.config
    if options.get("timesteps") == "learned":
        options = dict(options, timesteps=grid(DiscreteVP.from_diffusers(config)))
    pipe.scheduler = TdiffScheduler.from_config(config, **options)
    den, shape, _ = pipeline_denoiser(pipe, **R.CONDITIONING[family])  # under the scheduler's config
    kw = R.call_kwargs(family, steps, **extra)
    got = R.final_latents(family, pipe, kw)
    x, generator = R.x_T(family, pipe, kw, shape)
    with torch.no_grad():
        want = tdiff.sample(den, x, grid(den.schedule), generator=generator, **sample_kw)
    assert len(pipe.scheduler.timesteps) == (2 * steps - 1 if sample_kw["solver"] == "heun" else steps)
    torch.testing.assert_close(got, want, **TOL)
    assert float(want.std()) > 0.1  # a real sample, not a saturated or vanished one


@pytest.mark.parametrize("family,scheduler", [
    ("sd", lambda: diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                         beta_end=0.012, use_karras_sigmas=True)),
    ("sd", lambda: diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                     beta_end=0.012, timestep_spacing="trailing")),
    ("ddim", lambda: diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing")),
    ("sd3", lambda: diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)),
])
def test_timesteps_diffusers_reproduces_the_pipelines_own_scheduler(family, scheduler):
    """timesteps="diffusers" with no solver: the source scheduler's grid, network times and solver, so the
    pipeline computes what it computed with its own scheduler (diffusers computes in float32)."""
    pipe = R.pipeline(family)
    pipe.scheduler = scheduler()
    kw = R.call_kwargs(family, 6)
    want = R.final_latents(family, pipe, kw)
    pipe.scheduler = TdiffScheduler.from_config(pipe.scheduler.config, timesteps="diffusers")
    got = R.final_latents(family, pipe, kw)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert pipe.scheduler.config.source_scheduler == type(scheduler()).__name__


def test_diffusers_grid_with_another_solver_keeps_the_grid_and_the_rounded_network_times():
    """timesteps="diffusers" with another solver: the source's grid (from its sigmas) and its integer network
    times, which differ from the grid's own times (decoupled), solved by tdiff's UniPC-3."""
    pipe = R.pipeline("sd")
    source = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                   use_karras_sigmas=True)
    pipe.scheduler = TdiffScheduler.from_config(source.config, timesteps="diffusers", solver="unipc", order=3)
    den, shape, _ = pipeline_denoiser(pipe, **R.CONDITIONING["sd"])
    kw = R.call_kwargs("sd", 6)
    got = R.final_latents("sd", pipe, kw)
    source.set_timesteps(6)
    torch.testing.assert_close(pipe.scheduler.timesteps, source.timesteps.float())  # integers, as diffusers feeds
    dt = from_diffusers_timesteps(source)
    assert not torch.allclose(dt.timesteps[:6], dt.timesteps_cond[:6])
    with torch.no_grad():
        want = tdiff.sample(den, R.x_T("sd", pipe, kw, shape)[0], dt.timesteps, timesteps_cond=dt.timesteps_cond,
                            final_sigmas_type=dt.final_sigmas_type, solver="unipc", order=3)
    torch.testing.assert_close(got, want, **TOL)
    # flow matching's own grid starts at sigma = 1 (lambda = -inf): a multistep solver is refused there, clearly
    with pytest.raises(ValueError, match="not finite"):
        TdiffScheduler.from_config(_flow_config(), timesteps="diffusers", solver="unipc", order=3).set_timesteps(5)


def test_save_pretrained_round_trip_keeps_a_learned_schedule_and_a_tensor(tmp_path):
    pipe = R.pipeline("dit")
    den, _, _ = pipeline_denoiser(pipe, **R.CONDITIONING["dit"])
    learned = _learned(den.schedule, 4, prediction_type="epsilon")
    kw = R.call_kwargs("dit", 4)
    for timesteps in (learned, learned.timesteps * 0.999):
        sched = TdiffScheduler.from_config(pipe.scheduler.config, timesteps=timesteps, solver="dpmpp", order=3)
        pipe.scheduler = sched
        first = R.final_latents("dit", pipe, kw)
        torch.testing.assert_close(R.final_latents("dit", pipe, kw), first, rtol=0, atol=0)  # a second call
        sched.save_pretrained(tmp_path / "s")
        for loaded in (TdiffScheduler.from_pretrained(tmp_path / "s"), TdiffScheduler.from_config(sched.config)):
            assert loaded.config.timesteps == sched.config.timesteps
            assert torch.equal(loaded.timesteps, sched.timesteps)
            pipe.scheduler = loaded
            torch.testing.assert_close(R.final_latents("dit", pipe, kw), first, rtol=0, atol=0)
    assert sched.config.timesteps["timesteps"] == (learned.timesteps * 0.999).tolist()  # float64, exactly
    # the learned one keeps its decoupled network times: the pipeline is handed them
    sched = TdiffScheduler.from_config(pipe.scheduler.config, timesteps=learned)
    torch.testing.assert_close(sched.timesteps.double(), den.schedule.index_from_t(learned.timesteps_cond[:4]),
                               rtol=1e-6, atol=1e-4)


def test_a_whole_pipeline_saves_and_loads_with_its_tdiff_scheduler(tmp_path):
    pipe = R.pipeline("ddpm")
    pipe.scheduler = TdiffScheduler.from_config(pipe.scheduler.config, solver="unipc", timesteps="logsnr_uniform")
    kw = R.call_kwargs("ddpm", 3)
    pipe.save_pretrained(tmp_path / "p")
    loaded = diffusers.DDPMPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is TdiffScheduler
    got = R.final_latents("ddpm", loaded, kw)
    # the reference runs the loaded UNet too: its weights are mmapped at unaligned addresses, where oneDNN may take
    # another kernel and round differently (7e-7) from the in-memory UNet; the scheduler is what is under test
    loaded.scheduler = pipe.scheduler
    torch.testing.assert_close(got, R.final_latents("ddpm", loaded, kw), rtol=0, atol=0)


def test_protocol_begin_index_add_noise_and_scale_noise():
    """img2img: set_begin_index(k) restarts the solver at model call k (its warm-up again, as diffusers'), and
    add_noise noises at the grid's own noise level of that call; scale_noise is FlowMatch's add_noise."""
    pipe = R.pipeline("dit")
    sched = pipe.scheduler = TdiffScheduler.from_config(pipe.scheduler.config, solver="dpmpp", order=3,
                                                        clip_sample=False)
    den, shape, _ = pipeline_denoiser(pipe, **R.CONDITIONING["dit"])
    assert den.clip_x0 is None
    assert sched.init_noise_sigma == 1.0 and sched.order == 1 and len(sched) == 1000
    sched.set_timesteps(6)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn((1, *shape), generator=g), torch.randn((1, *shape), generator=g)
    begin = 2
    sched.set_begin_index(begin)
    x = sched.add_noise(x0, noise, sched.timesteps[begin:begin + 1])
    assert torch.equal(sched.scale_model_input(x, sched.timesteps[begin]), x)
    for t in sched.timesteps[begin:]:
        with torch.no_grad():
            out = den.network_output(x, den.schedule.t_from_index(t.double()))
        x = sched.step(out, t, x).prev_sample
    ts = logsnr_uniform(den.schedule, 6)[begin:]
    torch.testing.assert_close(sched.add_noise(x0, noise, sched.timesteps[begin]),
                               den.schedule.alpha(ts[0]).float() * x0 + den.schedule.sigma(ts[0]).float() * noise)
    with torch.no_grad():
        want = tdiff.sample(den, sched.add_noise(x0, noise, sched.timesteps[begin]), ts, solver="dpmpp", order=3)
    torch.testing.assert_close(x, want, **TOL)
    # away from the grid, the convention of each family, as diffusers computes it
    ddpm = diffusers.DDPMScheduler()
    steps = torch.tensor([10, 500, 999])
    xs, ns = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(TdiffScheduler.from_config(ddpm.config).add_noise(xs, ns, steps),
                               ddpm.add_noise(xs, ns, steps))
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    flow.set_timesteps(4)
    tflow = TdiffScheduler.from_config(flow.config)
    torch.testing.assert_close(tflow.scale_noise(xs[:1], flow.timesteps[1:2] * 0 + 250.0, ns[:1]),
                               0.25 * ns[:1] + 0.75 * xs[:1])


def test_pipeline_timesteps_and_sigmas_arguments():
    """A pipeline's own timesteps= / sigmas= replace the evaluation points for that call (flow: shifted as
    diffusers' FlowMatch shifts them)."""
    vp = TdiffScheduler.from_config(diffusers.DDIMScheduler().config, solver="unipc")
    vp.set_timesteps(timesteps=[999, 600, 300, 50])
    torch.testing.assert_close(vp.timesteps, torch.tensor([999.0, 600.0, 300.0, 50.0]))
    sched = DiscreteVP.from_diffusers(diffusers.DDIMScheduler().config)
    sigmas = sched.edm_sigma(sched.t_from_index(torch.tensor([999.0, 400.0, 100.0]))).tolist()
    vp.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(vp.timesteps, torch.tensor([999.0, 400.0, 100.0]), rtol=1e-5, atol=1e-3)
    flow = TdiffScheduler.from_config(_flow_config(), solver="dpmpp")
    flow.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(sigmas=[1.0, 0.6, 0.2])
    torch.testing.assert_close(flow.timesteps, ref.timesteps)


def _bad(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_bad_input_schedule_or_steps_that_contradict_the_config():
    ddim = diffusers.DDIMScheduler(clip_sample=False).config
    vp = DiscreteVP.from_diffusers(ddim)
    learned = _learned(vp, 4)
    scaled = DiscreteVP.from_diffusers(diffusers.DDIMScheduler(beta_schedule="scaled_linear").config)
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=_learned(scaled, 4)), "another noise schedule")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=_learned(RectifiedFlow(), 4)), "RectifiedFlow")
    _bad(lambda: TdiffScheduler.from_config(_flow_config(), timesteps=learned), "flow matching")
    _bad(lambda: TdiffScheduler.from_config(diffusers.DDIMScheduler(num_train_timesteps=500).config,
                                            timesteps=learned), "another noise schedule")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=_learned(vp, 4, prediction_type="v_prediction")),
         "prediction_type 'v_prediction'")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=learned, solver="unipc"), "made for solver 'dpmpp'")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=learned, order=2), "made for solver 'dpmpp' order 3")
    fixed = TdiffScheduler.from_config(ddim, timesteps=learned)
    _bad(lambda: fixed.set_timesteps(50), "num_inference_steps=4")
    _bad(lambda: fixed.set_timesteps(sigmas=[3.0, 1.0]), "fixed grid")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=torch.tensor([0.5, 0.7])), "decreasing")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps=torch.tensor([1.5, 0.5])), "timesteps")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps="logsnr"), "timesteps must be one of")
    _bad(lambda: TdiffScheduler.from_config(diffusers.DDIMScheduler(thresholding=True).config), "thresholding")
    _bad(lambda: TdiffScheduler.from_config(ddim, solver="euler_ancestral"), "solver must be")
    _bad(lambda: TdiffScheduler.from_config(ddim, sover="unipc"), "unknown option 'sover'")
    _bad(lambda: TdiffScheduler.from_config(_flow_config(), prediction_type="epsilon"), "flow velocity")
    _bad(lambda: TdiffScheduler.from_config(ddim, solver="heun", solver_options={"s_churn": 1.0}).set_timesteps(4),
         "before its first model call")
    _bad(lambda: TdiffScheduler.from_config(ddim, solver="unipc", solver_options={"varient": "bh1"}).set_timesteps(4),
         "unknown option")
    _bad(lambda: TdiffScheduler.from_config(ddim).set_timesteps(0), "num_inference_steps")
    _bad(lambda: TdiffScheduler.from_config(ddim).set_timesteps(timesteps=[999, 1200]), "training indices")
    _bad(lambda: TdiffScheduler.from_config(ddim).set_timesteps(timesteps=[999, 0]), "final_sigmas_type='zero'")
    _bad(lambda: TdiffScheduler.from_config(_flow_config()).set_timesteps(4, mu=0.5), "mu=0.5")
    _bad(lambda: TdiffScheduler.from_config(ddim, timesteps="diffusers", source_scheduler="PNDMScheduler")
         .set_timesteps(4), "not supported")


def test_bad_input_steps_the_scheduler_cannot_honour():
    sched = TdiffScheduler.from_config(diffusers.DDIMScheduler().config, solver="unipc")
    x, out = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    _bad(lambda: sched.step(out, 999, x), "set_timesteps")
    sched.set_timesteps(2)
    t0, t1 = sched.timesteps
    _bad(lambda: sched.step(out, t0, x, eta=0.3), "solver='ddim'")
    _bad(lambda: sched.step(out, t0, x, use_clipped_model_output=True), "only solver='ddim'")
    sched.set_timesteps(2)
    _bad(lambda: sched.step(out, 123.0, x), "not one of scheduler.timesteps")
    _bad(lambda: sched.step(out[:, :1], t0, x), "model_output has shape")
    x = sched.step(out, t0, x).prev_sample
    _bad(lambda: sched.step(out, t0, x), "timesteps\\[1\\]")
    _bad(lambda: sched.step(out, t1, x, eta=0.0), "changed during a run")
    x = sched.step(out, t1, x).prev_sample
    _bad(lambda: sched.step(out, t1, x), "all 2 model calls")
    ddim = TdiffScheduler.from_config(diffusers.DDIMScheduler().config, solver="ddim", solver_options={"eta": 0.5})
    ddim.set_timesteps(2)
    _bad(lambda: ddim.step(out, ddim.timesteps[0], x, eta=0.0), "solver_options set eta=0.5")
