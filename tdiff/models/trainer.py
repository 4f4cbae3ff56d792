"""A small, plain diffusion trainer for the embedded defaults: eps-prediction MSE on a DiscreteVP schedule,
AdamW with warm-up, EMA weights and a tqdm bar. It stops at `iters` (or at `time_budget_s`, if one is given, which
makes the result depend on the machine's speed).

Deterministic for a given seed and thread count: batches and noise come from a generator seeded with `seed`, and
the network's own randomness (label dropout, nn.Dropout), which draws from torch's global RNG, from that RNG
seeded with `seed + 1` for the duration of training (the caller's RNG state is restored afterwards). torch seeds
its global RNG randomly in each process, so without this a run could not be repeated.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..schedules import DiscreteVP


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1.0 - decay)


def diffusion_loss(model, schedule: DiscreteVP, x0: torch.Tensor, y: Optional[torch.Tensor],
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """DDPM's simple loss: uniform training index i, x_t = alpha x0 + sigma eps, MSE on eps.
    The network is fed the index i itself, the diffusers convention that `tdiff.denoiser` defaults to."""
    b = x0.shape[0]
    i = torch.randint(0, schedule.n, (b,), generator=generator)
    t = schedule.t_from_index(i)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    a = schedule.alpha(t).to(x0.dtype).view(-1, 1, 1, 1)
    s = schedule.sigma(t).to(x0.dtype).view(-1, 1, 1, 1)
    out = model(a * x0 + s * eps, i.to(x0.dtype), y)
    return F.mse_loss(out[:, : x0.shape[1]], eps)


def train_diffusion(model: torch.nn.Module, schedule: DiscreteVP, images: torch.Tensor,
                    labels: Optional[torch.Tensor] = None, iters: int = 1000, batch_size: int = 128,
                    lr: float = 5e-4, weight_decay: float = 0.0, warmup: int = 100, ema_decay: float = 0.999,
                    seed: int = 0, time_budget_s: Optional[float] = None, progress: bool = True,
                    num_threads: Optional[int] = None, stop_after: Optional[int] = None,
                    on_step: Optional[Callable[[int, torch.nn.Module], None]] = None):
    """Train `model` in place; returns (ema_model in eval mode, info dict with losses, iters and wall time).
    num_threads: torch intra-op threads while training (1 is much faster on a CPU shared with other jobs, and
    makes the run repeatable bit for bit on one machine). stop_after: stop after that many iterations of the
    `iters`-long run (its learning-rate schedule unchanged), to check a prefix of a long run.
    on_step(k, model): called after the k-th optimiser step."""
    if iters <= 0:
        raise ValueError(f"iters must be positive, got {iters}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if stop_after is not None and not 0 < stop_after <= iters:
        raise ValueError(f"stop_after must be in [1, iters={iters}], got {stop_after}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(int(num_threads))
    try:
        cuda = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"})
        with torch.random.fork_rng(devices=cuda):
            for gen in [torch.default_generator] + [torch.cuda.default_generators[i] for i in cuda]:
                gen.manual_seed(seed + 1)  # the network's dropout draws (see the module doc)
            return _train(model, schedule, images, labels, iters, batch_size, lr, weight_decay, warmup, ema_decay,
                          seed, time_budget_s, progress, stop_after or iters, on_step)
    finally:
        torch.set_num_threads(previous_threads)


def _train(model, schedule, images, labels, iters, batch_size, lr, weight_decay, warmup, ema_decay, seed,
           time_budget_s, progress, stop_after, on_step):
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # linear warm-up, then cosine decay to 10%: fast progress in a short run without late noise
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: min(1.0, (k + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * min(k / iters, 1.0))))
    losses, start, done = [], time.perf_counter(), 0
    bar = tqdm(range(stop_after), disable=not progress, desc=f"train {type(model).__name__}", leave=True)
    for k in bar:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        loss = diffusion_loss(model, schedule, images[idx], None if labels is None else labels[idx], g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        # EMA warm-up: early on the average would be dominated by the random initialisation
        ema_update(ema, model, min(ema_decay, (1 + k) / (10 + k)))
        losses.append(loss.item())
        done = k + 1
        if on_step is not None:
            on_step(done, model)
        if k % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
            break
    bar.close()
    model.eval()
    info = {"iters": done, "wall_time_s": time.perf_counter() - start, "losses": losses,
            "final_loss": sum(losses[-50:]) / len(losses[-50:])}
    return ema, info


@torch.no_grad()
def ddim_sample(den, shape, steps: int = 20, y: Optional[torch.Tensor] = None, seed: int = 0) -> torch.Tensor:
    """Deterministic DDIM in data-prediction form over uniform times, used only to score the defaults here
    (tdiff.sample holds the real solvers): x_s = alpha_s D + sigma_s (x_t - alpha_t D) / sigma_t."""
    sch = den.schedule
    ts = torch.linspace(sch.t_max, sch.t_min, steps + 1, dtype=torch.float64)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * float(sch.sigma(ts[0]))
    cond = {} if y is None else {"y": y}
    for t, s in zip(ts[:-1], ts[1:]):
        x0 = den(x, t, **cond)
        eps = (x - float(sch.alpha(t)) * x0) / float(sch.sigma(t))
        x = float(sch.alpha(s)) * x0 + float(sch.sigma(s)) * eps
    return den(x, ts[-1], **cond).clamp(-1, 1)
