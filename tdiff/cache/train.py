"""Mask training (seed Sec. 3.3-3.5): learn a (steps, columns) 0/1 mask for a frozen model, one sampling step at a
time.

1. Record: run the sampler once with the plain model, storing every model call's inputs (the trajectory from
   Gaussian noise; no data set is used) and the end-block features (output of the last cacheable block).
2. Per step i (row 0 always computes), continuous scores s_i in [0, 1] are optimised with the unit outputs
   relaxed by random sampling, m ~ Bernoulli(s) with a straight-through gradient to s (not Gumbel-softmax):
     L_i = ||f_i(s) - f_i^ref||^2 / ||f_i^ref||^2 + w_i (lambda1 sum s + lambda2 sum s(1-s))
   with w_i the timestep-aware weight (loss_scaling.py). Caches from step i-1 are detached, so gradients and
   memory stay within one step however many steps there are.
3. The step is then committed with the binarised row (as it will run at inference) to fill the caches for step
   i+1; a checkpoint may be written so a partially trained mask can be resumed.
4. Binarise by threshold (optionally down to a MAC budget), then apply knowledge-guided rectification.

Scale-out: under torch.distributed, each rank trains a contiguous slice of steps (starting from caches filled by
the full model) and the slices are gathered with one all_reduce.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import torch
from torch import nn

from tdiff.artefacts import fingerprint_module, load_torch, save_torch

from .binarise import binarise
from .loss_scaling import loss_weights, relative_feature_variation
from .maskfile import LearnedMask
from .rectify import rectify as rectify_mask
from .runtime import LearnedCache
from .units import check_granularity, column_groups, find_blocks, find_units

CHECKPOINT_FORMAT = "tdiff.cache.mask_training"
CHECKPOINT_VERSION = 1


def _detach(v):
    return v.detach() if torch.is_tensor(v) else v


def record_sampling_run(model: nn.Module, sample_fn: Callable[[nn.Module], object]):
    """Run `sample_fn(model)` without gradients; return the (args, kwargs) of every model call and the output of
    the last cacheable block at each call."""
    calls, features = [], []
    last_block = find_blocks(model)[-1][1]

    def record_call(_module, args, kwargs):
        calls.append((tuple(_detach(a) for a in args), {k: _detach(v) for k, v in kwargs.items()}))

    def record_feature(_module, _args, output):
        features.append(output.detach())

    hooks = [model.register_forward_pre_hook(record_call, with_kwargs=True),
             last_block.register_forward_hook(record_feature)]
    try:
        with torch.no_grad():
            sample_fn(model)
    finally:
        for h in hooks:
            h.remove()
    if not calls:
        raise ValueError("sample_fn never called the model through model(...); it must run the sampler with the "
                         "model it is given (forward hooks record the inputs)")
    if len(features) != len(calls):
        raise ValueError(f"recorded {len(calls)} model calls but {len(features)} end-block outputs; sample_fn must "
                         f"call the model it is given once per step")
    return calls, features


def _step_range(steps: int, rank: int, world: int):
    per = -(-steps // world)
    return min(steps, rank * per), min(steps, (rank + 1) * per)


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def train_mask(model: nn.Module, sample_fn: Callable[[nn.Module], object], *, granularity: str = "branch",
               iterations: int = 20, lr: float = 0.03, lambda1: float = 5e-4, lambda2: float = 0.0,
               loss_scaling: bool = True, rectify: bool = True, threshold: float = 0.5,
               target_mac_fraction: Optional[float] = None, init_score: float = 1.0,
               checkpoint: Optional[str] = None, solver: Optional[str] = None,
               timesteps: Optional[List[float]] = None, seed: int = 0, progress: bool = True) -> LearnedMask:
    """Learn a caching mask for `model` under the sampler `sample_fn(model)` (which must start from Gaussian noise
    and call `model(...)` once per step). Returns a LearnedMask; its `extra` holds the scores and settings.

    checkpoint: a path; written after every step and resumed from when it exists (same model and settings).
    target_mac_fraction: after thresholding, also switch off the lowest-score units until the run (after
    rectification, when on) costs at most this fraction of the uncached MACs (counted with fvcore on the first
    recorded call). With threshold=0 the
    mask is chosen purely by score rank under that budget.

    Defaults were set on the embedded digits DiT (bench/caching.py). The feature loss is relative (MSE over the
    reference's mean square) and is exactly zero, with zero gradient, at the all-ones start, so lambda1 must sit
    on the scale of one unit's relative feature change (~1e-3): 0.05 drove every score to 0 within 10 Adam steps.
    lambda2 > lambda1 pins the scores at 1 from the start (the bimodal term's slope there is -lambda2), so it is
    off by default; raise it together with lambda1 for models whose units matter more.
    """
    check_granularity(granularity)
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations must be a non-negative integer, got {iterations!r}")
    for name, value in (("lr", lr), ("lambda1", lambda1), ("lambda2", lambda2)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    if not 0.0 <= init_score <= 1.0:
        raise ValueError(f"init_score must be in [0, 1], got {init_score}")

    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # the model is frozen; only the scores learn
    try:
        calls, reference = record_sampling_run(model, sample_fn)
        steps = len(calls)
        units = find_units(model)
        groups = column_groups(units, granularity)
        unit_column = torch.empty(len(units), dtype=torch.long)
        for col, members in enumerate(groups):
            unit_column[members] = col
        delta = relative_feature_variation(reference)
        weights = loss_weights(delta) if loss_scaling else torch.ones(steps, dtype=torch.float64)

        fingerprint = fingerprint_module(model)
        settings = dict(granularity=granularity, steps=steps, iterations=iterations, lr=lr, lambda1=lambda1,
                        lambda2=lambda2, loss_scaling=loss_scaling, init_score=init_score, seed=seed,
                        threshold=threshold)
        rank, world = _dist()
        lo, hi = _step_range(steps, rank, world)
        ckpt_path = None if checkpoint is None else (checkpoint if world == 1 else f"{checkpoint}.rank{rank}")
        scores = torch.full((steps, len(groups)), float(init_score), dtype=torch.float64)
        scores[0] = 1.0
        start = max(lo, 1)
        resumed_rng = None
        if ckpt_path is not None:
            if os.path.exists(ckpt_path):
                doc = load_torch(ckpt_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
                if doc["fingerprint"] != fingerprint or doc["settings"] != settings:
                    raise ValueError(f"checkpoint {ckpt_path!r} was written for another model or other settings; "
                                     f"delete it or pass another path")
                scores = doc["scores"].to(torch.float64)
                start = int(doc["next_step"])
                resumed_rng = doc["rng"]

        cache = LearnedCache(model, None)
        last_block = find_blocks(model)[-1][1]
        captured = {}
        hook = last_block.register_forward_hook(lambda _m, _a, out: captured.__setitem__("end", out))
        # the Bernoulli draws come from this generator alone: reproducible per rank, and resumable
        generator = torch.Generator().manual_seed(seed + rank)
        if resumed_rng is not None:
            generator.set_state(resumed_rng)
        try:
            def run(i, row, sample, commit):
                cache._context().step = i - 1  # the first unit advances it to i
                cache._soft = dict(scores=row[unit_column], sample=sample, commit=commit, generator=generator)
                args, kwargs = calls[i]
                model(*args, **kwargs)
                return captured.pop("end")

            # fill the caches up to the first step to train: steps trained earlier (resume) run their binarised
            # rows; steps owned by other ranks run the full model
            with torch.no_grad():
                for i in range(0, start):
                    known = (lo <= i) or world == 1
                    row = (scores[i] > threshold).float() if known and i > 0 else torch.ones(len(groups))
                    run(i, row.float(), sample=False, commit=True)

            iterator = range(start, hi)
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc=f"mask training (rank {rank})" if world > 1 else "mask training")
            for i in iterator:
                w = float(weights[i])
                ref = reference[i].float()
                ref_power = ref.pow(2).mean().clamp_min(1e-12)
                row = scores[i].float().clone().requires_grad_(True)
                opt = torch.optim.Adam([row], lr=lr)
                for _ in range(iterations):
                    opt.zero_grad(set_to_none=True)
                    end = run(i, row, sample=True, commit=False)
                    feature = (end.float() - ref).pow(2).mean() / ref_power
                    loss = feature + w * (lambda1 * row.sum() + lambda2 * (row * (1 - row)).sum())
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        row.clamp_(0.0, 1.0)
                scores[i] = row.detach().double()
                with torch.no_grad():
                    run(i, (scores[i] > threshold).float(), sample=False, commit=True)
                if ckpt_path is not None:
                    save_torch(ckpt_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, dict(
                        scores=scores, next_step=i + 1, fingerprint=fingerprint, settings=settings,
                        rng=generator.get_state()))
        finally:
            hook.remove()
            cache.remove()

        if world > 1:
            mine = torch.zeros_like(scores)
            mine[lo:hi] = scores[lo:hi]
            torch.distributed.all_reduce(mine)
            scores = mine
            scores[0] = 1.0

        unit_costs = base = None
        if target_mac_fraction is not None:
            from .mac_count import unit_macs

            args, kwargs = calls[0]
            base, per_unit = unit_macs(model, args, kwargs)
            unit_costs = [sum(per_unit[u] for u in members) for members in groups]
        matrix = binarise(scores, threshold, unit_costs, base or 0.0, target_mac_fraction,
                          then=rectify_mask if rectify else None)
        extra = dict(settings, scores=scores.tolist(), loss_weights=weights.tolist(),
                     feature_variation=delta.tolist(), rectified=rectify, target_mac_fraction=target_mac_fraction)
        return LearnedMask(matrix=matrix, granularity=granularity, fingerprint=fingerprint, solver=solver,
                           timesteps=None if timesteps is None else [float(t) for t in timesteps],
                           threshold=threshold, extra=extra)
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
