"""Train a small diffusion model on digits with any sampler / weighting / process, logging loss and Fréchet
distance at fixed iteration counts.

  python -m tdiff.training.train --model dit --sampler speed --weighting speed --process standard --iters 600
  python -m tdiff.training.train --model dit --schedule edm --sampler lognormal --process fdm --warmup 100

Writes <out>.json (config, loss curve, FD at each evaluation) and <out>.png (the learning curves). `train()` is
the same thing as a function, used by bench/training_speedup.py.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from .. import schedules as S
from ..models.defaults import default_schedule
from ..models.trainer import ema_update
from .eval_sampler import sample_images
from .loss import DiffusionLoss

SCHEDULES = ("ddpm", "vp", "edm", "flow")


def make_schedule(name: str) -> S.NoiseSchedule:
    if name == "ddpm":
        return default_schedule()
    if name == "vp":
        return S.VPLinear()
    if name == "edm":
        return S.EDM()
    if name == "flow":
        return S.RectifiedFlow()
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


@dataclass
class TrainConfig:
    model: str = "dit"
    schedule: str = "ddpm"
    sampler: str = "uniform"
    weighting: Optional[str] = None
    process: str = "standard"
    target: Optional[str] = None
    mode: str = "reweight"
    warmup: Optional[int] = None
    fdm_multiplier: float = 2.0
    iters: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.99
    seed: int = 0
    eval_every: int = 100
    eval_samples: int = 400
    eval_steps: int = 25
    model_overrides: dict = field(default_factory=dict)  # e.g. a smaller DiT for benchmarks
    threads: Optional[int] = None


def build_loss(cfg: TrainConfig) -> DiffusionLoss:
    return DiffusionLoss(make_schedule(cfg.schedule), sampler=cfg.sampler, weighting=cfg.weighting,
                         process=cfg.process, target=cfg.target, mode=cfg.mode, warmup=cfg.warmup,
                         fdm_multiplier=cfg.fdm_multiplier)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    from ..models.defaults import build_model as build, default_config

    base = default_config(cfg.model)
    config = type(base)(**{**base.to_dict(), **cfg.model_overrides}) if cfg.model_overrides else base
    return build(cfg.model, config)


def evaluate_fd(loss_fn: DiffusionLoss, model, cfg: TrainConfig) -> float:
    from ..metrics.frechet import frechet_distance

    n = cfg.eval_samples
    y = torch.arange(n) % 10
    imgs = sample_images(loss_fn, model, (n, 1, 16, 16), steps=cfg.eval_steps, seed=12345, y=y)
    return frechet_distance(imgs)


def train(cfg: TrainConfig, log=print) -> dict:
    if cfg.iters < 1 or cfg.batch_size < 1 or cfg.eval_every < 1:
        raise ValueError("iters, batch_size and eval_every must be positive integers")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from ..data.digits import load_digits_tensor

    images, labels = load_digits_tensor(16, "train")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    loss_fn = build_loss(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    history = {"iter": [], "loss": [], "eval_iter": [], "fd": [], "wall_s": []}
    pending = []
    t0 = time.perf_counter()
    for it in range(1, cfg.iters + 1):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=g)
        loss = loss_fn(model, images[idx], generator=g, y=labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_fn.step()
        ema_update(ema, model, cfg.ema)
        history["iter"].append(it)
        pending.append(loss.detach())  # converted at evaluations: no host sync per step on a GPU
        if it % cfg.eval_every == 0 or it == cfg.iters:
            history["loss"].extend(torch.stack(pending).tolist())
            pending.clear()
            fd = evaluate_fd(loss_fn, ema, cfg)
            history["eval_iter"].append(it)
            history["fd"].append(fd)
            history["wall_s"].append(time.perf_counter() - t0)
            log(f"iter {it:5d}  loss {history['loss'][-1]:.4f}  FD {fd:.3f}  ({time.perf_counter() - t0:.0f}s)")
    return {"config": asdict(cfg), "loss_config": loss_fn.config(), "history": history,
            "train_seconds": time.perf_counter() - t0}


def plot_history(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result["history"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    k = max(1, len(h["loss"]) // 50)
    smooth = [sum(h["loss"][i:i + k]) / len(h["loss"][i:i + k]) for i in range(0, len(h["loss"]), k)]
    a1.plot(h["iter"][::k], smooth)
    a1.set(xlabel="iteration", ylabel="training loss (smoothed)", yscale="log")
    a2.plot(h["eval_iter"], h["fd"], marker="o")
    a2.set(xlabel="iteration", ylabel="Fréchet distance (digits)")
    c = result["config"]
    fig.suptitle(f"{c['model']} {c['schedule']} sampler={c['sampler']} weighting={c['weighting']} "
                 f"process={c['process']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tdiff.training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", choices=("dit", "unet"), default=d.model)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--sampler", default=d.sampler, help="uniform | speed | lognormal | logitnormal")
    p.add_argument("--weighting", default=None, help="none | speed | min_snr | p2 | edm (default: process's)")
    p.add_argument("--process", choices=("standard", "fdm"), default=d.process)
    p.add_argument("--target", default=None, help="eps | x0 | v | flow | edm (standard process)")
    p.add_argument("--mode", choices=("reweight", "unbiased"), default=d.mode)
    p.add_argument("--warmup", type=int, default=None, help="FDM weight warm-up steps")
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-steps", type=int, default=d.eval_steps)
    p.add_argument("--out", default=None, help="output prefix (default: train_<model>_<sampler>_<process>)")
    a = p.parse_args(argv)
    cfg = TrainConfig(model=a.model, schedule=a.schedule, sampler=a.sampler,
                      weighting=None if a.weighting in (None, "none") else a.weighting, process=a.process,
                      target=a.target, mode=a.mode, warmup=a.warmup, iters=a.iters, batch_size=a.batch_size,
                      lr=a.lr, seed=a.seed, eval_every=a.eval_every, eval_samples=a.eval_samples,
                      eval_steps=a.eval_steps)
    result = train(cfg)
    out = a.out or f"train_{a.model}_{a.sampler}_{a.weighting or 'default'}_{a.process}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot_history(result, out + ".png")
    print(f"wrote {out}.json and {out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
