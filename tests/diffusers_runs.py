"""Running the tiny pipelines of tests/cache_pipelines.py (one sample each) for the scheduler and pipeline tests:
the pipeline's call arguments, the same conditioning for `tdiff.schedulers.pipeline_denoiser`, the x_T the
pipeline starts from, and the latents it ends with (the last `prev_sample` of its scheduler)."""
import functools

import torch

import cache_pipelines as cp

FAMILIES = ("ddpm", "ddim", "dit", "pixart", "sd", "sd3")
#: pipeline_denoiser's conditioning for the one-sample call of each family (index 0 of cache_pipelines' calls)
CONDITIONING = {
    "ddpm": {}, "ddim": {},
    "dit": dict(class_labels=1, guidance_scale=3.0),
    "pixart": dict(prompt="a photo of a cat", guidance_scale=3.0, max_sequence_length=8),
    "sd": dict(prompt="a photo of a cat", negative_prompt="blurry", guidance_scale=3.0),
    "sd3": dict(prompt="a photo of a cat", guidance_scale=3.0, max_sequence_length=8),
}


@functools.lru_cache(maxsize=None)
def _built(family: str):
    if family == "ddim":
        from diffusers import DDIMPipeline

        pipe, call = cp.ddpm()
        pipe = DDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe, call
    return getattr(cp, {"sd": "stable_diffusion"}.get(family, family))()


def pipeline(family: str):
    """The family's tiny pipeline with its original scheduler restored (the builders are shared per session)."""
    pipe, call = _built(family)
    if not hasattr(pipe, "_original_scheduler"):
        pipe._original_scheduler = pipe.scheduler
    pipe.scheduler = pipe._original_scheduler
    return pipe


def call_kwargs(family: str, steps: int, seed: int = 0, **extra) -> dict:
    """One sample's pipeline call; ddpm/ddim/dit draw x_T from generator(s) seeded `seed`."""
    kw = _built(family)[1](batch=1, index=0, steps=steps)
    if "generator" in kw or family == "ddim":
        kw["generator"] = [torch.Generator().manual_seed(seed)] if family != "ddim" else \
            torch.Generator().manual_seed(seed)
    kw.pop("output_type", None)
    if family in ("ddpm", "ddim"):
        kw["output_type"] = "pt"
    elif family != "dit":
        kw["output_type"] = "latent"
    return {**kw, **extra}


def x_T(family: str, pipe, kwargs: dict, shape):
    """(x_T, generator): the pipeline's starting latents and the generator(s) in the state the pipeline's scheduler
    continues from (fresh ones, seeded as in kwargs)."""
    if "latents" in kwargs:
        return kwargs["latents"].clone(), None
    gen = kwargs["generator"]
    if isinstance(gen, list):
        gens = [torch.Generator().manual_seed(g.initial_seed()) for g in gen]
        return torch.cat([torch.randn((1, *shape), generator=g) for g in gens]), gens
    g = torch.Generator().manual_seed(gen.initial_seed())
    return torch.randn((kwargs.get("batch_size", 1), *shape), generator=g), g


def final_latents(family: str, pipe, kwargs: dict) -> torch.Tensor:
    """Run the pipeline; the latents its loop ends with (DiT's guided batch holds each sample twice)."""
    seen = []
    step = pipe.scheduler.step

    @functools.wraps(step)
    def recording(*args, **kw):
        out = step(*args, **kw)
        seen.append(out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    pipe.scheduler.step = recording
    try:
        pipe(**fresh(kwargs))
    finally:
        del pipe.scheduler.step
    out = seen[-1]
    return out.chunk(2)[0] if family == "dit" and kwargs.get("guidance_scale", 4.0) > 1 else out


def fresh(kwargs: dict) -> dict:
    """The call arguments with new generators in their seeded state (a run advances them)."""
    kw = dict(kwargs)
    g = kw.get("generator")
    if isinstance(g, list):
        kw["generator"] = [torch.Generator().manual_seed(x.initial_seed()) for x in g]
    elif g is not None:
        kw["generator"] = torch.Generator().manual_seed(g.initial_seed())
    return kw


@functools.lru_cache(maxsize=None)
def _pixart_binned():
    return _pixart_with_resolution_binning()


@functools.lru_cache(maxsize=None)
def _sd3_decodable():
    """SD3 with a VAE that has SD3's latent shift (its pipeline decodes with it)."""
    from diffusers import AutoencoderKL, StableDiffusion3Pipeline

    pipe = _built("sd3")[0]
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=1, sample_size=8, shift_factor=0.0609, scaling_factor=1.5305).eval()
    pipe = StableDiffusion3Pipeline(**{**pipe.components, "vae": vae, "scheduler": pipeline("sd3").scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def readme_pipeline(family: str):
    """The family's tiny pipeline for calls with the pipeline's own defaults (image outputs)."""
    pipe = {"pixart": _pixart_binned, "sd3": _sd3_decodable}.get(family, lambda: pipeline(family))()
    if not hasattr(pipe, "_original_scheduler"):
        pipe._original_scheduler = pipe.scheduler
    pipe.scheduler = pipe._original_scheduler
    return pipe


def _pixart_with_resolution_binning():
    """A tiny PixArt-alpha whose sizes PixArtAlphaPipeline's default resolution binning accepts (transformer
    sample_size 32, the 256 px bins; a VAE that downsamples 8x), for calls with the pipeline's defaults."""
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = cp._jitter(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                      out_channels=4, num_layers=2, sample_size=32, patch_size=2,
                                                      cross_attention_dim=16, caption_channels=16,
                                                      use_additional_conditions=False))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=1, sample_size=32).eval()
    pipe = PixArtAlphaPipeline(tokenizer=cp.tokenizer(), text_encoder=cp.t5(16), vae=vae, transformer=transformer,
                               scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe
