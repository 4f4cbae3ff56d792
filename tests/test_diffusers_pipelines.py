"""A diffusers pipeline as a tdiff Denoiser, and the one-call helpers ld3_learn(pipe) / dm_nonuniform(pipe).

`pipeline_denoiser` must reproduce each pipeline's own loop: tdiff.sample on it, with the grid and solver of the
pipeline's own scheduler (`from_diffusers_timesteps`), equals the pipeline run with that scheduler, in DDPM, DDIM,
DiT, PixArt-alpha, Stable Diffusion and SD3 (diffusers steps in float32). Then the helpers return a TdiffScheduler
that the pipeline runs, and unsupported pipelines and bad arguments get clear errors.
"""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tdiff  # noqa: E402
import cache_pipelines as cp  # noqa: E402
import diffusers_runs as R  # noqa: E402
from tdiff.schedulers import SUPPORTED_PIPELINES, TdiffScheduler, pipeline_denoiser  # noqa: E402
from tdiff.solvers import from_diffusers_timesteps  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", R.FAMILIES)
def test_pipeline_denoiser_reproduces_the_pipelines_own_loop(family):
    pipe = R.pipeline(family)
    den, shape, meta = pipeline_denoiser(pipe, **R.CONDITIONING[family])
    assert meta["pipeline"] == type(pipe).__name__
    kw = R.call_kwargs(family, 4)
    want = R.final_latents(family, pipe, kw)
    x, _ = R.x_T(family, pipe, kw, shape)
    assert x.shape == want.shape
    with torch.no_grad():
        got = tdiff.sample(den, x, from_diffusers_timesteps(pipe.scheduler))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert float(want.std()) > 0.1


def _tiny_ld3():
    return dict(nfe=3, teacher_nfe=5, n_train=2, n_val=2, epochs=1, phase1_epochs=1, batch_size=2,
                init="logsnr_uniform", progress=False)


@pytest.mark.parametrize("family", ["dit", "sd3"])
def test_ld3_learn_from_a_pipeline_returns_a_scheduler_it_runs(family):
    pipe = R.pipeline(family)
    cond = R.CONDITIONING[family]
    sched = tdiff.ld3_learn(pipe, pipeline_kwargs=cond, **_tiny_ld3())
    assert isinstance(sched, TdiffScheduler)
    fixed = sched.config.timesteps
    assert fixed["metadata"]["pipeline"] == type(pipe).__name__ and fixed["metadata"]["solver"] == "unipc"
    assert fixed["timesteps_cond"] is not None and len(fixed["timesteps"]) == 4
    pipe.scheduler = sched
    kw = R.call_kwargs(family, 3)
    got = R.final_latents(family, pipe, kw)
    den, shape, _ = pipeline_denoiser(pipe, **cond)
    learned = tdiff.timesteps.LearnedSchedule(torch.tensor(fixed["timesteps"], dtype=torch.float64),
                                              torch.tensor(fixed["timesteps_cond"], dtype=torch.float64),
                                              fixed["metadata"], den.schedule)
    with torch.no_grad():
        want = tdiff.sample(den, R.x_T(family, pipe, kw, shape)[0], learned, solver="unipc")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_dm_nonuniform_from_a_pipeline(family):
    pipe = R.pipeline(family)
    sched = tdiff.timesteps.dm_nonuniform(pipe, nfe=4, solver="unipc", order=2)
    den, _, _ = pipeline_denoiser(pipe, **R.CONDITIONING[family])
    want = tdiff.timesteps.dm_nonuniform(den.schedule, nfe=4, solver="unipc", order=2)
    assert isinstance(sched, TdiffScheduler)
    assert sched.config.timesteps["timesteps"] == want.tolist()
    assert sched.config.timesteps["metadata"]["method"] == "dm_nonuniform"
    torch.testing.assert_close(sched.timesteps.double(), den.model_time(want[:4]).float().double())
    pipe.scheduler = sched
    R.final_latents(family, pipe, R.call_kwargs(family, 4))  # runs in the pipeline


def test_unsupported_pipelines_and_bad_conditioning():
    flux, _ = cp.flux()
    for call in (lambda: pipeline_denoiser(flux, prompt="a cat"),
                 lambda: tdiff.timesteps.dm_nonuniform(flux, nfe=4),
                 lambda: tdiff.ld3_learn(flux, nfe=3, pipeline_kwargs={"prompt": "a cat"})):
        with pytest.raises(ValueError, match="FluxPipeline is not supported; supported pipelines: DDPMPipeline"):
            call()
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**R.pipeline("sd").components)
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline is not supported"):
        pipeline_denoiser(img2img, prompt="a cat")
    assert set(SUPPORTED_PIPELINES) == {"DDPMPipeline", "DDIMPipeline", "DiTPipeline", "PixArtAlphaPipeline",
                                        "StableDiffusionPipeline", "StableDiffusion3Pipeline"}
    sd, dit = R.pipeline("sd"), R.pipeline("dit")
    bad = [
        (lambda: pipeline_denoiser(sd), "needs pipeline_kwargs prompt="),
        (lambda: pipeline_denoiser(sd, prompt=["a cat", "a dog"]), "single value"),
        (lambda: pipeline_denoiser(sd, prompt="a cat", guidance=3.0), "unknown pipeline argument"),
        (lambda: pipeline_denoiser(sd, prompt="a cat", height=12), "multiple of 8"),
        (lambda: pipeline_denoiser(dit, class_labels=[1, 2]), "single value"),
        (lambda: pipeline_denoiser(dit, class_labels=1, guidance_scale=float("nan")), "finite"),
        (lambda: pipeline_denoiser(R.pipeline("ddpm"), prompt="a cat"), "unconditional"),
        (lambda: tdiff.ld3_learn(sd, nfe=3, pipeline_kwargs="a cat"), "must be a dict"),
        (lambda: tdiff.ld3_learn(sd, schedule=tdiff.schedules.VPLinear(), nfe=3, pipeline_kwargs={"prompt": "a"}),
         "schedule= cannot be given"),
        (lambda: tdiff.ld3_learn(lambda x, t: x, nfe=3, pipeline_kwargs={"prompt": "a"}), "only for a diffusers"),
        (lambda: tdiff.timesteps.dm_nonuniform(sd, nfe=4, return_result=True), "return_result"),
    ]
    for fn, match in bad:
        with pytest.raises(ValueError, match=match):
            fn()
