"""Running a diffusers pipeline for mask training: its denoising network, and one sampling run through it (the
pipeline's own scheduler loop and conditioning, guidance included)."""
from __future__ import annotations

from typing import Callable, Tuple

from torch import nn

SUPPORTED = ("pipelines whose denoising network, pipe.transformer or pipe.unet, is a model class with a tdiff.cache "
             "adapter: DDPMPipeline / DDIMPipeline (UNet2DModel), StableDiffusionPipeline (UNet2DConditionModel), "
             "DiTPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline, FluxPipeline")


def denoiser_network(pipe) -> nn.Module:
    """pipe.transformer or pipe.unet, checked to have a caching adapter."""
    from tdiff.cache.adapters import resolve

    for name in ("transformer", "unet"):
        network = getattr(pipe, name, None)
        if isinstance(network, nn.Module):
            try:
                resolve(network)
            except ValueError as e:
                raise ValueError(f"{type(pipe).__name__} is not supported: its {name} is a "
                                 f"{type(network).__name__}. Supported: {SUPPORTED}") from e
            return network
    raise ValueError(f"{type(pipe).__name__} is not supported: it has no transformer or unet. Supported: {SUPPORTED}")


def pipeline_sampler(pipe, call_kwargs: dict) -> Tuple[nn.Module, Callable[[nn.Module], object], dict]:
    """(network, sample_fn, meta): sample_fn(network) runs pipe(**call_kwargs) once; meta names the scheduler
    ("solver") and, after the run, holds the scheduler's time steps."""
    if not isinstance(call_kwargs, dict):
        raise ValueError(f"pipeline_kwargs must be a dict of pipeline call arguments, got {type(call_kwargs).__name__}")
    network = denoiser_network(pipe)
    meta = {"solver": type(pipe.scheduler).__name__, "pipeline": type(pipe).__name__}

    def sample_fn(model):
        if model is not network:
            raise ValueError("the pipeline runs its own network; sample_fn got another model")
        out = pipe(**call_kwargs)
        meta["timesteps"] = [float(t) for t in pipe.scheduler.timesteps]
        return out

    return network, sample_fn, meta
