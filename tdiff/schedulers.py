"""diffusers schedulers and pipelines, the tdiff way (implemented in tdiff.integrations.diffusers; importing this
module imports diffusers).

    pipe.scheduler = tdiff.schedulers.TdiffScheduler.from_config(pipe.scheduler.config, solver="unipc", order=2,
                                                                 timesteps="logsnr_uniform")
    pipe.scheduler = tdiff.ld3_learn(pipe, nfe=5, pipeline_kwargs=dict(prompt="a photo of a cat"))
    den, shape = tdiff.schedulers.pipeline_denoiser(pipe, prompt="a photo of a cat")   # the pipeline as a Denoiser
"""
from diffusers import SchedulerMixin  # noqa: F401  how diffusers' pipeline loader tells this module's schedulers'
# load method (pipe.save_pretrained names a TdiffScheduler as ["tdiff.schedulers", "TdiffScheduler"])

from .integrations.diffusers.pipelines import SUPPORTED_PIPELINES, pipeline_denoiser
from .integrations.diffusers.scheduler import TdiffScheduler

__all__ = ["TdiffScheduler", "pipeline_denoiser", "SUPPORTED_PIPELINES"]
