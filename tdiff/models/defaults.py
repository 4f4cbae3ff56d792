"""Embedded default models: a small DiT and a small UNet trained on digits (16x16), built on first use.

`load_default(which)` loads the cached checkpoint or trains it (minutes on a CPU). A checkpoint holds the EMA
weights, the model config, the schedule (its betas) and the metrics reached; it is written atomically through
tdiff.artefacts. A file that cannot be read or that does not match the requested config or schedule is reported
with a warning and retrained, never silently reused.

Training budget: each default trains for at most DEFAULT_ITERS (4000) iterations of batch 64 or
DEFAULT_TIME_BUDGET_S (480 s) of wall time, whichever comes first. On an idle two-core CPU an iteration takes
~0.15-0.3 s, so the time budget is what stops it; the iterations and wall time reached are stored in the
checkpoint's metrics. Because the time budget stops it, a retrain is reproducible only given the same machine
load; pass time_budget_s=None with an explicit `iters` for a deterministic run. On a CPU shared with other jobs,
num_threads=1 is several times faster than the default thread count (no oversubscription stalls).
"""
from __future__ import annotations

import os
import time
import warnings
from typing import Optional, Tuple, Union

import torch

from ..artefacts import load_torch, save_torch
from ..schedules import DiscreteVP
from .dit import DiT, DiTConfig
from .paths import cache_dir
from .unet import UNet, UNetConfig

FORMAT, VERSION = "tdiff-default-checkpoint", 1
WHICH = ("dit", "unet")
DEFAULT_ITERS = 4000
DEFAULT_TIME_BUDGET_S = 480.0
_TRAIN = {"dit": dict(lr=1.5e-3, batch_size=64), "unet": dict(lr=2e-3, batch_size=64)}


def default_schedule() -> DiscreteVP:
    """DDPM's linear betas, 1e-4 to 0.02 over 1000 steps."""
    return DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))


def default_config(which: str) -> Union[DiTConfig, UNetConfig]:
    _check_which(which)
    return DiTConfig.preset("digits") if which == "dit" else UNetConfig.preset("digits")


def build_model(which: str, config: Union[None, dict, DiTConfig, UNetConfig] = None) -> torch.nn.Module:
    _check_which(which)
    cls, cfg_cls = (DiT, DiTConfig) if which == "dit" else (UNet, UNetConfig)
    if config is None:
        config = default_config(which)
    elif isinstance(config, dict):
        config = cfg_cls(**config)
    elif not isinstance(config, cfg_cls):
        raise ValueError(f"config for {which!r} must be a {cfg_cls.__name__} or dict, got {type(config).__name__}")
    return cls(config)


def checkpoint_path(which: str) -> str:
    _check_which(which)
    return os.path.join(cache_dir(), f"default_{which}.pt")


def _check_which(which):
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")


def _make_denoiser(model, schedule, guidance=None, clip_x0=None):
    from ..denoisers import denoiser

    return denoiser(model, schedule, prediction="eps", guidance=guidance, null_label=model.null_label,
                    clip_x0=clip_x0)


def _load_checkpoint(path: str, which: str, config, schedule: DiscreteVP) -> torch.nn.Module:
    doc = load_torch(path, FORMAT, VERSION)
    if doc.get("which") != which:
        raise ValueError(f"it holds a {doc.get('which')!r} model")
    if doc.get("config") != config.to_dict():
        raise ValueError(f"its config {doc.get('config')} differs from the requested {config.to_dict()}")
    betas = doc.get("schedule_betas")
    if not torch.is_tensor(betas) or doc.get("schedule") != schedule.config():
        raise ValueError("its schedule differs from the default schedule")
    model = build_model(which, config)
    model.load_state_dict(doc["state_dict"])  # strict: a missing or extra tensor is an error
    return model.eval()


def load_default(which: str, train_if_missing: bool = True, progress: bool = True, guidance: Optional[float] = None,
                 config=None, iters: Optional[int] = None, time_budget_s: Optional[float] = None,
                 evaluate: bool = True, num_threads: Optional[int] = None, clip_x0: Optional[float] = 1.0):
    """-> (model, schedule, denoiser) for the default 'dit' or 'unet' digits model. Trains it when no usable
    checkpoint exists (unless train_if_missing=False, which raises FileNotFoundError instead). `config`, `iters`
    and `time_budget_s` override the defaults (tests use tiny configs); evaluate=False skips the Fréchet
    distance measured after training. The denoiser clamps its x0 prediction to [-clip_x0, clip_x0] (the digits
    live in [-1, 1]; this removes the occasional diverged sample of the small, briefly trained defaults); pass
    clip_x0=None for the raw network."""
    _check_which(which)
    config = default_config(which) if config is None else build_model(which, config).config
    schedule = default_schedule()
    path = checkpoint_path(which)
    if os.path.exists(path):
        try:
            model = _load_checkpoint(path, which, config, schedule)
            return model, schedule, _make_denoiser(model, schedule, guidance, clip_x0)
        except Exception as e:
            if not train_if_missing:
                raise
            warnings.warn(f"default {which} checkpoint {path!r} is unusable ({e}); retraining it", RuntimeWarning)
    elif not train_if_missing:
        raise FileNotFoundError(f"no default {which} checkpoint at {path!r}; run `python -m tdiff train-defaults`")
    model, _ = train_default(which, config=config, iters=iters, time_budget_s=time_budget_s, progress=progress,
                             evaluate=evaluate, num_threads=num_threads)
    return model, schedule, _make_denoiser(model, schedule, guidance, clip_x0)


def evaluate_fd(model, schedule, n: int = 256, steps: int = 20, seed: int = 0,
                clip_x0: Optional[float] = None) -> float:
    """Fréchet distance of n class-conditional samples (labels 0..9 in turn), 20-step DDIM."""
    from ..metrics.frechet import frechet_distance
    from .trainer import ddim_sample

    cfg = model.config
    y = torch.arange(n) % 10 if getattr(model, "num_classes", 0) else None
    shape = (n, cfg.in_channels, cfg.input_size, cfg.input_size)
    x = ddim_sample(_make_denoiser(model, schedule, clip_x0=clip_x0), shape, steps, y=y, seed=seed)
    return frechet_distance(x, size=cfg.input_size)


def train_default(which: str, config=None, iters: Optional[int] = None, time_budget_s: Optional[float] = None,
                  progress: bool = True, seed: int = 0, evaluate: bool = True,
                  num_threads: Optional[int] = None) -> Tuple[torch.nn.Module, dict]:
    """Train one default from scratch and save its checkpoint. Returns (EMA model, metrics)."""
    from ..data.digits import load_digits_tensor
    from .trainer import train_diffusion

    _check_which(which)
    config = default_config(which) if config is None else build_model(which, config).config
    if iters is None:
        iters = DEFAULT_ITERS
    if time_budget_s is None and iters == DEFAULT_ITERS:
        time_budget_s = DEFAULT_TIME_BUDGET_S
    schedule = default_schedule()
    if config.input_size not in (8, 16, 32) or config.in_channels != 1:
        raise ValueError(f"digits defaults need in_channels=1 and input_size 8, 16 or 32, got {config}")
    images, labels = load_digits_tensor(config.input_size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(which, config)
        untrained = build_model(which, config).eval()
    ema, info = train_diffusion(model, schedule, images, labels if config.num_classes else None, iters=iters,
                                time_budget_s=time_budget_s, progress=progress, seed=seed, num_threads=num_threads,
                                **_TRAIN[which])
    metrics = {"iters": info["iters"], "train_wall_time_s": round(info["wall_time_s"], 1),
               "final_loss": info["final_loss"], "time_budget_s": time_budget_s, "max_iters": iters}
    if evaluate:
        t0 = time.perf_counter()
        metrics["fd_trained"] = evaluate_fd(ema, schedule)
        metrics["fd_trained_clip_x0"] = evaluate_fd(ema, schedule, clip_x0=1.0)
        metrics["fd_untrained"] = evaluate_fd(untrained, schedule)
        metrics["fd_untrained_clip_x0"] = evaluate_fd(untrained, schedule, clip_x0=1.0)
        metrics["eval_wall_time_s"] = round(time.perf_counter() - t0, 1)
    save_torch(checkpoint_path(which), FORMAT, VERSION, {
        "which": which, "config": config.to_dict(), "state_dict": ema.state_dict(),
        "schedule": schedule.config(), "schedule_betas": 1 - schedule.alphas_cumprod / torch.cat(
            [torch.ones(1, dtype=torch.float64), schedule.alphas_cumprod[:-1]]),
        "metrics": metrics, "train_settings": {**_TRAIN[which], "seed": seed},
    })
    return ema, metrics


def checkpoint_metrics(which: str) -> dict:
    """The metrics stored in a default checkpoint (FD trained/untrained, iterations, wall time)."""
    return dict(load_torch(checkpoint_path(which), FORMAT, VERSION)["metrics"])


def train_defaults(which: str = "all", iters: Optional[int] = None, time_budget_s: Optional[float] = None,
                   progress: bool = True, seed: int = 0, num_threads: Optional[int] = None) -> dict:
    """CLI entry (`python -m tdiff train-defaults`): (re)train 'dit', 'unet' or 'all'; returns metrics per model."""
    names = WHICH if which == "all" else (which,)
    for name in names:
        _check_which(name)
    results = {}
    for name in names:
        _, results[name] = train_default(name, iters=iters, time_budget_s=time_budget_s, progress=progress,
                                         seed=seed, num_threads=num_threads)
        print(f"{name}: {results[name]}  -> {checkpoint_path(name)}")
    return results
