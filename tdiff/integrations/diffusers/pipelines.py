"""A diffusers pipeline as a tdiff Denoiser, and the one-call helpers that learn a schedule from a pipeline.

    den, shape = pipeline_denoiser(pipe, prompt="a photo of a cat", guidance_scale=7.5)
    x0 = tdiff.sample(den, x_T, tdiff.timesteps.logsnr_uniform(den.schedule, nfe=8), solver="unipc")

`pipeline_denoiser` takes what the pipeline's own loop takes: its denoising network (pipe.unet / pipe.transformer),
its scheduler config (noise schedule, prediction type, clip_sample: `tdiff.denoisers.from_diffusers`) and its
conditioning, given as the pipeline's own call arguments (prompt, negative_prompt, class_labels, guidance_scale,
height, width, ...). The prompt is encoded once with the pipeline's own `encode_prompt`; classifier-free guidance is
formed as the pipeline forms it (its batch order, its formula, SD's guidance_rescale), so `tdiff.sample` on the
Denoiser equals the pipeline's loop on the same latents (tests/test_diffusers_pipelines.py).

One conditioning per Denoiser: every sample in a batch gets the same prompt or class label. (The learning helpers
shuffle samples across batches, so per-sample prompts would need per-sample conditioning in the learner itself.)

    pipe.scheduler = tdiff.ld3_learn(pipe, nfe=5, pipeline_kwargs=dict(prompt="a photo of a cat"))
    pipe.scheduler = tdiff.timesteps.dm_nonuniform(pipe, nfe=8)

`ld3_learn` and `dm_nonuniform` accept a pipeline in place of their denoiser / schedule (`from_pipeline`) and return
a `TdiffScheduler` for the pipeline's scheduler config, holding the learned schedule (with its decoupled network
times, and the metadata that refuses another config). `dm_nonuniform` only needs the scheduler config.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Optional, Tuple

import torch

#: the pipeline classes the helpers take, by the network they run
SUPPORTED_PIPELINES = {
    "DDPMPipeline": "UNet2DModel", "DDIMPipeline": "UNet2DModel", "DiTPipeline": "DiTTransformer2DModel",
    "PixArtAlphaPipeline": "PixArtTransformer2DModel", "StableDiffusionPipeline": "UNet2DConditionModel",
    "StableDiffusion3Pipeline": "SD3Transformer2DModel",
}


class PipelineDenoiser(NamedTuple):
    denoiser: object  # a tdiff.denoisers.Denoiser
    shape: Tuple[int, ...]  # one sample's latent shape
    metadata: dict  # the pipeline and its conditioning, as recorded with a schedule learned from it


def family(pipe) -> str:
    """The supported pipeline class a pipeline is (or derives from); a clear error otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES and cls.__module__.startswith("diffusers."):
            return cls.__name__
    raise ValueError(f"{type(pipe).__name__} is not supported; supported pipelines: "
                     + ", ".join(f"{p} ({n})" for p, n in SUPPORTED_PIPELINES.items()))


def is_pipeline(obj, pipeline_kwargs: Optional[dict] = None) -> bool:
    """Whether obj is a diffusers pipeline (then the one-call helpers take it); pipeline_kwargs for anything else is
    refused."""
    from .. import is_diffusers_pipeline

    if is_diffusers_pipeline(obj):
        return True
    if pipeline_kwargs is not None:
        raise ValueError(f"pipeline_kwargs is only for a diffusers pipeline; got a {type(obj).__name__}")
    return False


def _allowed(kw: dict, allowed: Tuple[str, ...], name: str) -> None:
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"unknown pipeline argument(s) {unknown} for {name}; its conditioning arguments are "
                         f"{sorted(allowed) or 'none (it is unconditional)'}")


def _one(value, name: str, pipeline: str, kinds=(str,)):
    """A single conditioning value (a list of one is accepted, as pipelines take lists)."""
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{name} must be a single value (or a list of one) for {pipeline}: a learned schedule "
                             f"is learned under one conditioning, got {len(value)} values")
        value = value[0]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and int in kinds:
        value = int(value)
    if value is None or isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{pipeline} needs pipeline_kwargs {name}= ({' or '.join(k.__name__ for k in kinds)}), "
                         f"got {value!r}")
    return value


def _guidance(kw: dict, default: float) -> float:
    w = kw.get("guidance_scale", default)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not w == w or abs(w) == float("inf"):
        raise ValueError(f"guidance_scale must be a finite number, got {w!r}")
    return float(w)


def _size(kw: dict, default: Tuple[int, int], multiple: int, pipeline: str) -> Tuple[int, int]:
    sizes = []
    for name, d in zip(("height", "width"), default):
        v = kw.get(name, d)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
            raise ValueError(f"{name} for {pipeline} must be a positive multiple of {multiple}, got {v!r}")
        sizes.append(v)
    return tuple(sizes)


def _expand(t: torch.Tensor, b: int) -> torch.Tensor:
    return t.expand(b, *t.shape[1:])


def _cfg(w: float) -> bool:
    return w > 1  # the pipelines' do_classifier_free_guidance


def _unconditional(pipe, kw, name):
    """DDPMPipeline / DDIMPipeline: self.unet(image, t).sample."""
    _allowed(kw, (), name)
    unet = pipe.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)

    def call(model, x, t, y=None):
        return model(x, t).sample

    return unet, call, (unet.config.in_channels, *size), {}


def _dit(pipe, kw, name):
    """DiTPipeline: the class label and its null class through the network in one batch, guided on the first
    in_channels output channels (the rest is the learned variance)."""
    _allowed(kw, ("class_labels", "guidance_scale"), name)
    label = _one(kw.get("class_labels"), "class_labels", name, (int, str))
    if isinstance(label, str):
        label = int(pipe.get_label_ids([label])[0])
    w = _guidance(kw, 4.0)
    net = pipe.transformer
    c, s = net.config.in_channels, net.config.sample_size
    null = int(net.config.num_embeds_ada_norm)  # the label table's null row (DiTPipeline's 1000 for ImageNet)

    def call(model, x, t, y=None):
        b = x.shape[0]
        labels = torch.full((b,), label, dtype=torch.long, device=x.device)
        if not _cfg(w):
            return model(x, timestep=t, class_labels=labels).sample[:, :c]
        both = torch.cat([labels, torch.full_like(labels, null)])
        eps = model(torch.cat([x, x]), timestep=torch.cat([t, t]), class_labels=both).sample[:, :c]
        cond, uncond = torch.split(eps, b, dim=0)
        return uncond + w * (cond - uncond)

    return net, call, (c, s, s), {"class_labels": label, "guidance_scale": w}


def _text_call(w: float, embeds: dict, negative: dict, forward: Callable, c: int, out_channels: int,
               rescale: float = 0.0):
    """The text pipelines' guided call: [uncond; cond] in one batch, uncond + w (cond - uncond), SD's
    guidance_rescale, and their learned-variance rule (keep the first c channels when there are 2c)."""

    def call(model, x, t, y=None):
        b = x.shape[0]
        if _cfg(w):
            kw = {k: torch.cat([_expand(negative[k], b), _expand(v, b)]) for k, v in embeds.items()}
            out = forward(model, torch.cat([x, x]), torch.cat([t, t]), kw)
            uncond, cond = out.chunk(2)
            out = uncond + w * (cond - uncond)
            if rescale > 0:
                from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

                out = rescale_noise_cfg(out, cond, guidance_rescale=rescale)
        else:
            out = forward(model, x, t, {k: _expand(v, b) for k, v in embeds.items()})
        return out.chunk(2, dim=1)[0] if out_channels // 2 == c else out

    return call


def _text_setup(pipe, kw: dict, name: str, extra: tuple, guidance: float, net, multiple: int):
    """The text pipelines' common arguments: (prompt, guidance scale, (height, width), latent shape), with each
    pipeline's default size (SD3: default_sample_size; the others: the network's sample_size) and size check."""
    _allowed(kw, ("prompt", "negative_prompt", "guidance_scale", "height", "width") + extra, name)
    vsf = pipe.vae_scale_factor
    base = pipe.default_sample_size if hasattr(pipe, "default_sample_size") else net.config.sample_size
    base = (base, base) if isinstance(base, int) else tuple(base)
    h, wd = _size(kw, (base[0] * vsf, base[1] * vsf), multiple, name)
    shape = (net.config.in_channels, h // vsf, wd // vsf)
    return _one(kw.get("prompt"), "prompt", name), _guidance(kw, guidance), (h, wd), shape


def _pixart(pipe, kw, name):
    net = pipe.transformer
    prompt, w, (h, wd), shape = _text_setup(pipe, kw, name, ("max_sequence_length", "clean_caption"), 4.5, net, 8)
    with torch.no_grad():
        pe, pm, ne, nm = pipe.encode_prompt(prompt, _cfg(w), negative_prompt=kw.get("negative_prompt", ""),
                                            num_images_per_prompt=1, device=pipe._execution_device,
                                            clean_caption=bool(kw.get("clean_caption", False)),
                                            max_sequence_length=kw.get("max_sequence_length", 120))
    embeds = {"encoder_hidden_states": pe, "encoder_attention_mask": pm}
    negative = {"encoder_hidden_states": ne, "encoder_attention_mask": nm}
    if net.config.sample_size == 128:  # PixArt-alpha 1024's micro-conditions, as the pipeline adds them
        embeds["resolution"] = negative["resolution"] = torch.tensor([[h, wd]], dtype=pe.dtype, device=pe.device)
        embeds["aspect_ratio"] = negative["aspect_ratio"] = torch.tensor([[h / wd]], dtype=pe.dtype, device=pe.device)

    def forward(model, x, t, k):
        added = {"resolution": k.pop("resolution", None), "aspect_ratio": k.pop("aspect_ratio", None)}
        return model(x, timestep=t, added_cond_kwargs=added, return_dict=False, **k)[0]

    call = _text_call(w, embeds, negative, forward, net.config.in_channels, net.config.out_channels)
    return net, call, shape, {"prompt": prompt, "guidance_scale": w}


def _stable_diffusion(pipe, kw, name):
    unet = pipe.unet
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"{name} with a guidance-distilled UNet (time_cond_proj_dim={unet.config.time_cond_proj_dim}"
                         f", an LCM) is not supported")
    prompt, w, _, shape = _text_setup(pipe, kw, name, ("guidance_rescale", "clip_skip"), 7.5, unet, 8)
    rescale = float(kw.get("guidance_rescale", 0.0))
    with torch.no_grad():
        pe, ne = pipe.encode_prompt(prompt, pipe._execution_device, 1, _cfg(w),
                                    negative_prompt=kw.get("negative_prompt"), clip_skip=kw.get("clip_skip"))

    def forward(model, x, t, k):
        return model(x, t, return_dict=False, **k)[0]

    call = _text_call(w, {"encoder_hidden_states": pe}, {"encoder_hidden_states": ne}, forward,
                      unet.config.in_channels, unet.config.out_channels, rescale)
    return unet, call, shape, {"prompt": prompt, "guidance_scale": w}


def _sd3(pipe, kw, name):
    net = pipe.transformer
    extra = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3", "max_sequence_length", "clip_skip")
    prompt, w, _, shape = _text_setup(pipe, kw, name, extra, 7.0, net, pipe.vae_scale_factor * net.config.patch_size)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(prompt=prompt, prompt_2=kw.get("prompt_2"), prompt_3=kw.get("prompt_3"),
                                             negative_prompt=kw.get("negative_prompt"),
                                             negative_prompt_2=kw.get("negative_prompt_2"),
                                             negative_prompt_3=kw.get("negative_prompt_3"),
                                             do_classifier_free_guidance=_cfg(w), device=pipe._execution_device,
                                             clip_skip=kw.get("clip_skip"),
                                             max_sequence_length=kw.get("max_sequence_length", 256))

    def forward(model, x, t, k):
        return model(hidden_states=x, timestep=t, return_dict=False, **k)[0]

    call = _text_call(w, {"encoder_hidden_states": pe, "pooled_projections": pp},
                      {"encoder_hidden_states": ne, "pooled_projections": npp}, forward, net.config.in_channels,
                      net.config.out_channels)
    return net, call, shape, {"prompt": prompt, "guidance_scale": w}


_FAMILIES = {"DDPMPipeline": _unconditional, "DDIMPipeline": _unconditional, "DiTPipeline": _dit,
             "PixArtAlphaPipeline": _pixart, "StableDiffusionPipeline": _stable_diffusion,
             "StableDiffusion3Pipeline": _sd3}


def _on_network_device(call: Callable) -> Callable:
    """Run the network on its own device whatever device the solver's samples live on."""

    def moved(model, x, t, y=None):
        device = next(model.parameters()).device
        if x.device == device:
            return call(model, x, t, y)
        return call(model, x.to(device), t.to(device), y).to(x.device)

    return moved


def _prediction_type(den) -> str:
    """The diffusers prediction_type of a Denoiser's prediction."""
    from ...denoisers import _DIFFUSERS_PREDICTIONS

    return {v: k for k, v in _DIFFUSERS_PREDICTIONS.items()}[den.prediction]


def pipeline_denoiser(pipe, **pipeline_kwargs) -> PipelineDenoiser:
    """(denoiser, shape, metadata): the pipeline's network under its scheduler config and one conditioning (the
    pipeline's own call arguments: prompt, negative_prompt, class_labels, guidance_scale, height, width, ...), as a
    tdiff Denoiser; `shape` is one sample's latent shape. See the module doc."""
    from ...denoisers import from_diffusers
    from .scheduler import source_config

    name = family(pipe)
    network, call, shape, conditioning = _FAMILIES[name](pipe, dict(pipeline_kwargs), name)
    config = source_config(pipe.scheduler)
    den = from_diffusers(network, config, call=_on_network_device(call))
    meta = {"pipeline": name, "conditioning": conditioning, "prediction_type": _prediction_type(den)}
    return PipelineDenoiser(den, tuple(int(v) for v in shape), meta)


# ------------------------------------------------------------------------------------------------------------------
# the one-call helpers
# ------------------------------------------------------------------------------------------------------------------
def from_pipeline(fn: Callable, args: dict):
    """Run `fn` (ld3_learn or dm_nonuniform, given its own locals()) on a pipeline and return a TdiffScheduler for
    the pipeline's scheduler config holding the result. Called from the first lines of those functions."""
    params = inspect.signature(fn).parameters
    args = {k: v for k, v in args.items() if k in params}
    extra = {}
    for k, p in params.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = dict(args.pop(k, None) or {})
    first = next(iter(params))
    pipe = args.pop(first)
    name = family(pipe)
    helper = {"ld3_learn": _ld3, "dm_nonuniform": _dm_nonuniform}.get(fn.__name__)
    if helper is None:
        raise ValueError(f"{fn.__name__} does not take a pipeline")
    return helper(fn, pipe, name, first, args, extra)


def _scheduler(pipe, learned, solver: str, order: int, options: dict):
    from .scheduler import TdiffScheduler, source_config

    return TdiffScheduler.from_config(source_config(pipe.scheduler), timesteps=learned, solver=solver, order=order,
                                      solver_options=options or None)


def _ld3(fn, pipe, name, first, args, extra):
    kwargs = args.pop("pipeline_kwargs", None) or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"pipeline_kwargs must be a dict of the pipeline's call arguments, got "
                         f"{type(kwargs).__name__}")
    if args.get("schedule") is not None:
        raise ValueError("schedule= cannot be given with a pipeline: the schedule is its scheduler config's")
    den, shape, meta = pipeline_denoiser(pipe, **kwargs)
    args[first] = den
    if args.get("shape") is None:
        args["shape"] = shape
    learned = fn(**args, **extra)
    learned.metadata.update(prediction_type=meta["prediction_type"], pipeline=meta["pipeline"],
                            conditioning=meta["conditioning"])
    return _scheduler(pipe, learned, learned.metadata["solver"], learned.metadata["order"], learned.options)


def _dm_nonuniform(fn, pipe, name, first, args, extra):
    from ...denoisers import from_diffusers
    from ...timesteps.dm_nonuniform import sampling_options
    from ...timesteps.learned import LearnedSchedule
    from .scheduler import _pipeline_calls_network, source_config

    if args.get("return_result"):
        raise ValueError("return_result=True cannot be given with a pipeline (a TdiffScheduler is returned)")
    config = source_config(pipe.scheduler)
    den = from_diffusers(_pipeline_calls_network, config)
    args[first] = den.schedule
    ts = fn(**args, **extra)
    # sample with the order plan the objective assumed (dm_nonuniform's `sampling_options`)
    options = {**sampling_options(ts.numel() - 1, args["order"], args["objective"]), **extra}
    meta = {"schedule": den.schedule.config(), "solver": args["solver"], "order": args["order"],
            "nfe": ts.numel() - 1, "model_fingerprint": None, "method": "dm_nonuniform", "pipeline": name,
            "prediction_type": _prediction_type(den), "solver_options": options}
    learned = LearnedSchedule(ts.detach(), None, meta, den.schedule)
    return _scheduler(pipe, learned, args["solver"], args["order"], options)
