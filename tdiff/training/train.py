"""Train a small diffusion model on digits with any time-step sampler / weighting / process, logging the loss and the
Fréchet distance of the EMA model at fixed iteration counts. Resumable.

  python -m tdiff.training.train --model dit --sampler speed --weighting speed --iters 600
  python -m tdiff.training.train --model dit --schedule edm --process fdm --warmup 200 --fdm-multiplier 2
  python -m tdiff.training.train ... --checkpoint run.ckpt --checkpoint-every 100     # then, after a kill:
  python -m tdiff.training.train ... --checkpoint run.ckpt --resume

Every K iterations, and on SIGTERM, the trainer writes a checkpoint atomically (`tdiff.artefacts`): the model, the
EMA model, the optimiser, the loss state (the FDM warm-up counter), the generator that draws batches, times and
noise, the global RNG (the DiT's label dropout draws from it) and the history so far. `--resume` continues from it
bit-identically; it refuses a checkpoint made with another configuration (naming the field), except for `--iters`,
which may grow. Evaluations run under `torch.random.fork_rng`, so they do not shift the training's random stream.
The results (<out>.json: config, loss curve, FD at each evaluation) are written atomically, and <out>.png plots
the learning curves. `train()` is the same thing as a function.

Method parameters (each flag's default is the method's own, shown in --help): SpeeD's k, tau, reflection and
threshold (sampler) and lambda (weights); Min-SNR's gamma; P2's k and gamma; the log-normal and logit-normal
mean and std; FDM's multiplier, where its factor goes, beta_min, beta_d and sigma range; the warm-up's steps,
lambda_max and lambda_end; the preconditioning and sigma_data. A method flag given for a method that is not used
is an error.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Optional

import torch

from .. import schedules as S
from ..artefacts import check_finite, load_torch, save_json, save_torch
from ..models.defaults import default_schedule
from ..models.trainer import ema_update
from .. import checks
from .loss import DiffusionLoss, _first_difference
from .samplers import SAMPLERS
from .warmup import WeightWarmup
from .weightings import WEIGHTINGS

SCHEDULES = ("ddpm", "vp", "cosine", "edm", "flow")
CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "tdiff-train-checkpoint", 1
RESULTS_FORMAT, RESULTS_VERSION = "tdiff-train-results", 1
SIGTERM_EXIT = 128 + signal.SIGTERM


def make_schedule(name: str) -> S.NoiseSchedule:
    checks.choice("schedule", name, SCHEDULES)
    return {"ddpm": default_schedule, "vp": S.VPLinear, "cosine": S.VPCosine, "edm": S.EDM,
            "flow": S.RectifiedFlow}[name]()


@dataclass
class TrainConfig:
    model: str = "dit"
    schedule: str = "ddpm"
    sampler: Optional[str] = None  # None: the loss's default (uniform, or the preconditioning's own)
    weighting: Optional[str] = None
    process: str = "standard"
    target: Optional[str] = None
    mode: str = "reweight"
    warmup: Optional[int] = None
    fdm_multiplier: float = 2.0
    sampler_kwargs: dict = field(default_factory=dict)  # e.g. {"k": 2.0, "tau": 700}
    weighting_kwargs: dict = field(default_factory=dict)  # e.g. {"gamma": 5.0}
    loss_kwargs: dict = field(default_factory=dict)  # precond, sigma_data, fdm_on, fdm_beta_min, ...
    warmup_kwargs: dict = field(default_factory=dict)  # lambda_max, lambda_end
    iters: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    ema: float = 0.99
    seed: int = 0
    eval_every: int = 100  # 0: no evaluation
    eval_samples: int = 400
    eval_steps: int = 25
    model_overrides: dict = field(default_factory=dict)  # e.g. a smaller DiT for benchmarks
    threads: Optional[int] = None
    checkpoint: Optional[str] = None  # path; None: no checkpoints
    checkpoint_every: int = 0  # 0: only on SIGTERM (when a checkpoint path is set)


def build_loss(cfg: TrainConfig) -> DiffusionLoss:
    warmup = None if cfg.warmup is None else WeightWarmup(cfg.warmup, **cfg.warmup_kwargs)
    if cfg.warmup is None and cfg.warmup_kwargs:
        raise ValueError(f"warm-up options {sorted(cfg.warmup_kwargs)} need a warm-up (warmup=steps)")
    kw = dict(cfg.loss_kwargs)
    if cfg.process == "fdm":
        kw["fdm_multiplier"] = cfg.fdm_multiplier
    elif cfg.fdm_multiplier != 2.0:
        raise ValueError("fdm_multiplier only applies to process='fdm'")
    return DiffusionLoss(make_schedule(cfg.schedule), sampler=cfg.sampler, weighting=cfg.weighting,
                         process=cfg.process, target=cfg.target, mode=cfg.mode, warmup=warmup,
                         sampler_kwargs=cfg.sampler_kwargs, weighting_kwargs=cfg.weighting_kwargs, **kw)


def build_model(cfg: TrainConfig) -> torch.nn.Module:
    from ..models.defaults import build_model as build, default_config

    base = default_config(cfg.model)
    config = type(base)(**{**base.to_dict(), **cfg.model_overrides}) if cfg.model_overrides else base
    return build(cfg.model, config)


def evaluate_fd(loss_fn: DiffusionLoss, model, cfg: TrainConfig) -> float:
    """FD of `eval_samples` class-balanced samples, DPM-Solver++(2M) over `eval_steps` log-SNR-uniform steps."""
    from ..metrics.frechet import frechet_distance
    from ..solvers import sample
    from ..timesteps import logsnr_uniform

    n = cfg.eval_samples
    y = torch.arange(n) % 10
    x_T = torch.randn((n, 1, 16, 16), generator=torch.Generator().manual_seed(12345))
    ts = logsnr_uniform(loss_fn.schedule, cfg.eval_steps)
    x_T = x_T * loss_fn.schedule.sigma(ts[0]).float()
    den = loss_fn.denoiser(model, clip_x0=1.0)
    with torch.no_grad():
        imgs = sample(lambda x, t: den(x, t, y=y), x_T, ts, solver="dpmpp", order=2, schedule=loss_fn.schedule)
    return frechet_distance(imgs.clamp(-1.0, 1.0))


def _check_config(cfg: TrainConfig, name: Callable[[str], str] = str) -> None:
    """Validate the run's settings; `name(field)` is how an error names a field (the CLI names its flag)."""
    checks.choice(name("model"), cfg.model, ("dit", "unet"))
    checks.integer(name("iters"), cfg.iters, low=1)
    checks.integer(name("batch_size"), cfg.batch_size, low=1)
    checks.positive(name("lr"), cfg.lr)
    checks.real(name("ema"), cfg.ema, low=0.0, high=1.0, high_open=True)
    checks.integer(name("seed"), cfg.seed, low=0)
    checks.integer(name("eval_every"), cfg.eval_every, low=0)
    checks.integer(name("eval_samples"), cfg.eval_samples, low=2)
    checks.integer(name("eval_steps"), cfg.eval_steps, low=1)
    checks.integer(name("checkpoint_every"), cfg.checkpoint_every, low=0)
    if cfg.threads is not None:
        checks.integer(name("threads"), cfg.threads, low=1)
    if cfg.checkpoint_every and not cfg.checkpoint:
        raise ValueError(f"{name('checkpoint_every')} needs a checkpoint path")
    for field_name in ("sampler_kwargs", "weighting_kwargs", "loss_kwargs", "warmup_kwargs", "model_overrides"):
        if not isinstance(getattr(cfg, field_name), dict):
            raise TypeError(f"{field_name} must be a dict, got {type(getattr(cfg, field_name)).__name__}")


def _resumable_config(cfg: TrainConfig) -> dict:
    """The fields a resumed run must share with the checkpoint (iters may grow; where checkpoints go and how
    many threads run do not change the result)."""
    doc = json.loads(json.dumps(asdict(cfg)))
    for key in ("iters", "checkpoint", "checkpoint_every", "threads"):
        doc.pop(key)
    return doc


def _save_checkpoint(path, cfg, it, model, ema, opt, loss_fn, gen, history, elapsed) -> None:
    save_torch(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, {
        "config": _resumable_config(cfg), "iteration": it, "model": model.state_dict(), "ema": ema.state_dict(),
        "optimizer": opt.state_dict(), "loss": loss_fn.state_dict(), "generator": gen.get_state(),
        "global_rng": torch.get_rng_state(), "history": history, "elapsed_s": elapsed})


def _load_checkpoint(path: str, cfg: TrainConfig) -> dict:
    doc = load_torch(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    missing = [k for k in ("config", "iteration", "model", "ema", "optimizer", "loss", "generator", "global_rng",
                           "history", "elapsed_s") if k not in doc]
    if missing:
        raise ValueError(f"checkpoint {path!r} is missing {missing}")
    diff = _first_difference(doc["config"], _resumable_config(cfg))
    if diff is not None:
        key, theirs, mine = diff
        raise ValueError(f"checkpoint {path!r} was made with {key}={theirs!r}; this run has {key}={mine!r}")
    if not (isinstance(doc["iteration"], int) and 0 <= doc["iteration"] <= cfg.iters):
        raise ValueError(f"checkpoint {path!r} is at iteration {doc['iteration']!r}, beyond iters={cfg.iters}")
    for key in ("model", "ema", "optimizer", "loss", "history"):
        if not isinstance(doc[key], dict):
            raise ValueError(f"checkpoint {path!r}: {key!r} must be a dict, got {type(doc[key]).__name__}")
    for key in ("generator", "global_rng"):
        if not (torch.is_tensor(doc[key]) and doc[key].dtype == torch.uint8):
            raise ValueError(f"checkpoint {path!r}: {key!r} must be a uint8 RNG state tensor")
    if isinstance(doc["elapsed_s"], bool) or not isinstance(doc["elapsed_s"], (int, float)) or \
            not 0 <= doc["elapsed_s"] < math.inf:
        raise ValueError(f"checkpoint {path!r}: 'elapsed_s' must be a finite number >= 0, got {doc['elapsed_s']!r}")
    for key in ("model", "ema"):  # resuming from NaN weights would train on garbage
        check_finite(doc[key], f"{path} [{key}]")
    return doc


class _Stop:
    """Set by SIGTERM: the loop checkpoints after the current iteration and returns."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


def optimise(loss: torch.Tensor, opt: torch.optim.Optimizer, loss_fn: DiffusionLoss, model: torch.nn.Module,
             ema: torch.nn.Module, ema_decay: float) -> None:
    """One training step after the loss: gradients, the optimiser, the loss's own state (FDM's warm-up counter)
    and the EMA model, in that order (the loss's state and the EMA follow the step that used them)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    loss_fn.step()
    ema_update(ema, model, ema_decay)


def train(cfg: TrainConfig, log: Callable[[str], None] = print, resume: bool = False,
          handle_sigterm: bool = False) -> dict:
    """Train; returns {"config", "loss_config", "history", "train_seconds", "interrupted"}."""
    _check_config(cfg)
    if resume and not cfg.checkpoint:
        raise ValueError("resume needs a checkpoint path")
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(checks.integer("threads", cfg.threads, low=1))
    stop = _Stop()
    previous = signal.signal(signal.SIGTERM, stop) if handle_sigterm else None
    try:
        return _train(cfg, log, resume, stop)
    finally:
        if handle_sigterm:
            signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, log, resume: bool, stop: _Stop) -> dict:
    from ..data.digits import load_digits_tensor

    images, labels = load_digits_tensor(16, "train")
    loss_fn = build_loss(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = {"iter": [], "loss": [], "eval_iter": [], "fd": [], "wall_s": []}
    start, elapsed0 = 0, 0.0
    if resume and os.path.exists(cfg.checkpoint):
        doc = _load_checkpoint(cfg.checkpoint, cfg)
        try:
            model.load_state_dict(doc["model"])
            ema.load_state_dict(doc["ema"])
            opt.load_state_dict(doc["optimizer"])
            loss_fn.load_state_dict(doc["loss"])
            gen.set_state(doc["generator"])
            torch.set_rng_state(doc["global_rng"])
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint {cfg.checkpoint!r} does not fit this run: {e}") from e
        history, start, elapsed0 = doc["history"], doc["iteration"], float(doc["elapsed_s"])
        log(f"resumed from {cfg.checkpoint} at iteration {start}")
    elif resume:
        log(f"no checkpoint at {cfg.checkpoint}; starting from scratch")
    t0 = time.perf_counter() - elapsed0
    pending = []

    def checkpoint(it):
        history["loss"].extend(torch.stack(pending).tolist() if pending else [])
        pending.clear()
        _save_checkpoint(cfg.checkpoint, cfg, it, model, ema, opt, loss_fn, gen, history,
                         time.perf_counter() - t0)

    it = start
    interrupted = False
    for it in range(start + 1, cfg.iters + 1):
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        loss = loss_fn(model, images[idx], generator=gen, y=labels[idx])
        optimise(loss, opt, loss_fn, model, ema, cfg.ema)
        history["iter"].append(it)
        pending.append(loss.detach())  # converted at evaluations: no host sync per step on a GPU
        if cfg.eval_every and (it % cfg.eval_every == 0 or it == cfg.iters):
            history["loss"].extend(torch.stack(pending).tolist())
            pending.clear()
            with torch.random.fork_rng(devices=[]):  # evaluation never shifts the training's RNG
                fd = evaluate_fd(loss_fn, ema, cfg)
            history["eval_iter"].append(it)
            history["fd"].append(fd)
            history["wall_s"].append(time.perf_counter() - t0)
            log(f"iter {it:5d}  loss {history['loss'][-1]:.4f}  FD {fd:.3f}  ({time.perf_counter() - t0:.0f}s)")
        if cfg.checkpoint and ((cfg.checkpoint_every and it % cfg.checkpoint_every == 0) or stop.requested):
            checkpoint(it)
        if stop.requested:
            log(f"SIGTERM: checkpoint written at iteration {it}" if cfg.checkpoint else "SIGTERM: stopped")
            interrupted = True
            break
    if cfg.checkpoint and not interrupted:
        checkpoint(it)  # the finished state: a later --resume with more --iters continues from here
    history["loss"].extend(torch.stack(pending).tolist() if pending else [])
    pending.clear()
    return {"config": asdict(cfg), "loss_config": loss_fn.config(), "history": history,
            "train_seconds": time.perf_counter() - t0, "iteration": it, "interrupted": interrupted}


def plot_history(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = result["history"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    k = max(1, len(h["loss"]) // 50)
    smooth = [sum(h["loss"][i:i + k]) / len(h["loss"][i:i + k]) for i in range(0, len(h["loss"]), k)]
    a1.plot(h["iter"][::k][:len(smooth)], smooth)
    a1.set(xlabel="iteration", ylabel="training loss (smoothed)", yscale="log")
    a2.plot(h["eval_iter"], h["fd"], marker="o")
    a2.set(xlabel="iteration", ylabel="Fréchet distance (digits)")
    c = result["loss_config"]
    fig.suptitle(f"{result['config']['model']} {c['schedule']['class']} sampler={c['sampler']['name']} "
                 f"weighting={c['weighting']['name']} process={c['process']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Command line. Method flags: (flag, group, owner, key); defaults come from the method's own signature.
# ----------------------------------------------------------------------------------------------------------------
def _default(fn, key):
    return inspect.signature(fn).parameters[key].default


_METHOD_FLAGS = [
    # (flag, where it goes, the method it belongs to, keyword, type, callable that holds the default, help)
    ("--speed-k", "sampler_kwargs", ("sampler", "speed"), "k", float, SAMPLERS["speed"],
     "SpeeD: sampling ratio of steps before tau to steps after it"),
    ("--speed-tau", "sampler_kwargs", ("sampler", "speed"), "tau", int, SAMPLERS["speed"],
     "SpeeD: first suppressed step (None: derived from the schedule, see tdiff.training.speed_areas; SpeeD's "
     "configs use 700)"),
    ("--speed-reflect", "sampler_kwargs", ("sampler", "speed"), "reflect", "bool", SAMPLERS["speed"],
     "SpeeD: dual-reflect half the batch around the convergence boundary"),
    ("--speed-threshold", "sampler_kwargs", ("sampler", "speed"), "threshold", float, SAMPLERS["speed"],
     "SpeeD: per-step increment below which the process counts as converged"),
    ("--speed-lambda", "weighting_kwargs", ("weighting", "speed"), "lam", float, WEIGHTINGS["speed"],
     "SpeeD weights: range [1-lambda, lambda] before tau, in [0.5, 1]"),
    ("--speed-weight-tau", "weighting_kwargs", ("weighting", "speed"), "tau", int, WEIGHTINGS["speed"],
     "SpeeD weights: first step with unit weight (None: derived from the schedule)"),
    ("--min-snr-gamma", "weighting_kwargs", ("weighting", "min_snr"), "gamma", float, WEIGHTINGS["min_snr"],
     "Min-SNR: gamma"),
    ("--p2-k", "weighting_kwargs", ("weighting", "p2"), "k", float, WEIGHTINGS["p2"], "P2: k"),
    ("--p2-gamma", "weighting_kwargs", ("weighting", "p2"), "gamma", float, WEIGHTINGS["p2"], "P2: gamma"),
    ("--lognormal-mean", "sampler_kwargs", ("sampler", "lognormal"), "p_mean", float, SAMPLERS["lognormal"],
     "log-normal sampler: mean of ln(sigma)"),
    ("--lognormal-std", "sampler_kwargs", ("sampler", "lognormal"), "p_std", float, SAMPLERS["lognormal"],
     "log-normal sampler: std of ln(sigma)"),
    ("--logitnormal-mean", "sampler_kwargs", ("sampler", "logitnormal"), "mean", float, SAMPLERS["logitnormal"],
     "logit-normal sampler: mean of logit(t)"),
    ("--logitnormal-std", "sampler_kwargs", ("sampler", "logitnormal"), "std", float, SAMPLERS["logitnormal"],
     "logit-normal sampler: std of logit(t)"),
    ("--fdm-on", "loss_kwargs", ("process", "fdm"), "fdm_on", str, DiffusionLoss,
     "FDM: 'input' (the factor scales the network input, FDM's code) or 'mean' (it scales x0, paper Eq. 15)"),
    ("--fdm-beta-min", "loss_kwargs", ("process", "fdm"), "fdm_beta_min", float, DiffusionLoss, "FDM: beta_min"),
    ("--fdm-beta-d", "loss_kwargs", ("process", "fdm"), "fdm_beta_d", float, DiffusionLoss, "FDM: beta_d"),
    ("--fdm-sigma-range", "loss_kwargs", ("process", "fdm"), "fdm_sigma_range", "pair", DiffusionLoss,
     "FDM: sigma_min,sigma_max of the factor's t' (None: the schedule's sigma range)"),
    ("--precond", "loss_kwargs", None, "precond", str, DiffusionLoss,
     "preconditioning edm|vp|ve for target=edm or process=fdm (None: the schedule's natural one)"),
    ("--sigma-data", "loss_kwargs", None, "sigma_data", float, DiffusionLoss,
     "EDM preconditioning's sigma_data (None: the schedule's, else 0.5)"),
    ("--warmup-lambda-max", "warmup_kwargs", None, "lambda_max", float, WeightWarmup,
     "FDM warm-up: initial weight cap"),
    ("--warmup-lambda-end", "warmup_kwargs", None, "lambda_end", float, WeightWarmup,
     "FDM warm-up: the cap at which clamping ends"),
]


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _pair(text: str):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers 'lo,hi', got {text!r}") from None
    return [lo, hi]


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tdiff.training.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", choices=("dit", "unet"), default=d.model, help=f"network (default {d.model})")
    p.add_argument("--model-config", type=_json_dict, default={},
                   help='overrides of the model config as JSON, e.g. \'{"hidden_size": 64, "depth": 3}\'')
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help=f"noise schedule (default {d.schedule})")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                   help="time-step sampler (default: uniform, or the preconditioning's own for target=edm / "
                        "process=fdm: log-normal for EDM, uniform for VP, log-uniform for VE)")
    p.add_argument("--weighting", choices=sorted(WEIGHTINGS), default=None,
                   help="loss weighting (default: none, or the preconditioning's own lambda(sigma) for FDM)")
    p.add_argument("--process", choices=("standard", "fdm"), default=d.process, help="default standard")
    p.add_argument("--target", choices=("eps", "x0", "v", "flow", "edm"), default=None,
                   help="regression target of the standard process (default eps)")
    p.add_argument("--mode", choices=("reweight", "unbiased"), default=d.mode, help=f"default {d.mode}")
    p.add_argument("--warmup", type=int, default=None,
                   help="FDM loss-weight warm-up steps (default: none; FDM's CIFAR-10 code uses 200)")
    p.add_argument("--fdm-multiplier", type=float, default=None,
                   help=f"FDM: momentum multiplier m (default {_default(DiffusionLoss, 'fdm_multiplier')})")
    for flag, _, owner, key, typ, holder, text in _METHOD_FLAGS:
        conv = {"bool": _bool, "pair": _pair}.get(typ, typ)
        p.add_argument(flag, type=conv, default=None, help=f"{text} (default {_default(holder, key)})")
    p.add_argument("--iters", type=int, default=d.iters, help=f"training iterations (default {d.iters})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--ema", type=float, default=d.ema, help=f"EMA decay per iteration (default {d.ema})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"default {d.seed}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help=f"evaluate the EMA model's FD every N iterations, 0 for never (default {d.eval_every})")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help=f"default {d.eval_samples}")
    p.add_argument("--eval-steps", type=int, default=d.eval_steps, help=f"solver steps (default {d.eval_steps})")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint path (default <out>.ckpt); written every --checkpoint-every iterations and on "
                        "SIGTERM")
    p.add_argument("--checkpoint-every", type=int, default=100, help="iterations between checkpoints, 0 for only "
                                                                     "on SIGTERM (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint, bit-identically")
    p.add_argument("--out", default=None, help="output prefix (default: train_<model>_<sampler>_<weighting>_"
                                               "<process>)")
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    used = {"sampler": a.sampler, "weighting": a.weighting, "process": a.process}
    groups = {"sampler_kwargs": {}, "weighting_kwargs": {}, "loss_kwargs": {}, "warmup_kwargs": {}}
    for flag, group, owner, key, _, _, _ in _METHOD_FLAGS:
        value = getattr(a, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if owner is not None and used[owner[0]] != owner[1] and not (
                owner == ("sampler", "lognormal") and used["sampler"] == "edm"):
            raise ValueError(f"{flag} belongs to {owner[0]}={owner[1]}, but this run uses {owner[0]}="
                             f"{used[owner[0]]}")
        groups[group][key] = value
    if a.fdm_multiplier is not None and a.process != "fdm":
        raise ValueError("--fdm-multiplier belongs to process=fdm")
    out = a.out or f"train_{a.model}_{a.sampler or 'default'}_{a.weighting or 'default'}_{a.process}"
    return TrainConfig(
        model=a.model, schedule=a.schedule, sampler=a.sampler, weighting=a.weighting, process=a.process,
        target=a.target, mode=a.mode, warmup=a.warmup,
        fdm_multiplier=2.0 if a.fdm_multiplier is None else a.fdm_multiplier, iters=a.iters,
        batch_size=a.batch_size, lr=a.lr, ema=a.ema, seed=a.seed, eval_every=a.eval_every,
        eval_samples=a.eval_samples, eval_steps=a.eval_steps, model_overrides=a.model_config, threads=a.threads,
        checkpoint=a.checkpoint or out + ".ckpt", checkpoint_every=a.checkpoint_every, **groups)


def main(argv=None) -> int:
    parser = make_parser()
    a = parser.parse_args(argv)
    try:
        cfg = config_from_args(a)
        # every setting is checked before training starts, and a refusal names the flag
        _check_config(cfg, name=lambda field: "--" + field.replace("_", "-"))
        build_loss(cfg)
        build_model(cfg)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    out = a.out or cfg.checkpoint[: -len(".ckpt")]
    result = train(cfg, resume=a.resume, handle_sigterm=True)
    if result["interrupted"]:
        print(f"interrupted at iteration {result['iteration']}; resume with --resume")
        return SIGTERM_EXIT
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    save_json(out + ".json", RESULTS_FORMAT, RESULTS_VERSION, result)
    plot_history(result, out + ".png")
    print(f"wrote {out}.json and {out}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
