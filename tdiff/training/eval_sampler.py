"""A small deterministic sampler for evaluating models during training (Fréchet distance at fixed iterations).

First-order DDIM written in the sigma-space marginal x = mu(sigma) x0 + sigma eps that every target and process
of `DiffusionLoss` shares (mu = 1, except FDM's "mean" mode): x0_hat = D(x, t), eps_hat = (x - mu x0_hat)/sigma,
then x <- mu' x0_hat + sigma' eps_hat. Steps are uniform in log-SNR between the schedule's t_max and t_min. It is
deliberately simple and identical for every configuration, so that it compares trainings, not solvers.
"""
from __future__ import annotations

from typing import Optional

import torch

from .loss import DiffusionLoss


@torch.no_grad()
def sample_images(loss_fn: DiffusionLoss, model, shape, steps: int = 30, seed: int = 0,
                  y: Optional[torch.Tensor] = None, device="cpu") -> torch.Tensor:
    if int(steps) < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    sched = loss_fn.schedule
    lam_lo, lam_hi = sched.lambda_range()  # lambda at t_max, at t_min
    lams = torch.linspace(lam_lo, lam_hi, int(steps), dtype=torch.float64)
    ts = sched.t_from_lambda(lams).clamp(sched.t_min, sched.t_max).to(device)
    sigmas = sched.edm_sigma(ts)
    mus = loss_fn.mean_factor(sigmas)
    g = torch.Generator(device=device).manual_seed(int(seed))
    x = sigmas[0].float() * torch.randn(tuple(shape), generator=g, device=device)
    cond = {} if y is None else {"y": y}
    x0 = x
    for i in range(len(ts)):
        t = ts[i].expand(shape[0])
        x0 = loss_fn.denoise(model, x, t, **cond).clamp(-1.0, 1.0)
        if i + 1 == len(ts):
            break
        eps = (x - mus[i].float() * x0) / sigmas[i].float()
        x = mus[i + 1].float() * x0 + sigmas[i + 1].float() * eps
    return x0
