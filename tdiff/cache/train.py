"""Mask training (seed Sec. 3.3-3.5): learn a (steps, columns) 0/1 caching mask for a frozen network, one
sampling step at a time.

1. Record: run the sampler (or a diffusers pipeline) once with the plain network, storing every network call's
   inputs (the trajectory from Gaussian noise; no data set is used), its cache context (split CFG halves) and its
   output, the reference end features x^ori_{t,end}.
2. Per step i (row 0 always computes), continuous scores s_i in [0, 1] are optimised with every unit relaxed as
   in Eq. 4, x = m f(x_in) + (1 - m) cache with m = s (`relaxation="soft"`, default), or with m ~ Bernoulli(s) and a
   straight-through gradient to s (`relaxation="bernoulli"`, the seed's "random sampling", not Gumbel-softmax):
     L_i = ||f_i(m) - f_i^ref||^2 + w_i (lambda1 sum s + lambda2(k) sum s(1 - s))          (Eqs. 5-8, 11)
   where w_i is the timestep-aware weight (loss_scaling.py, Eqs. 9-10) and k the iteration. Caches from step i - 1
   are detached, so gradients and memory stay within one step however many steps there are.
3. The step is committed (its caches filled for step i + 1) with the soft update of Eq. 4, x = s f + (1 - s) cache
   (`cache_update="soft"`, default), or with the binarised row as it will run at inference ("hard").
4. Binarise at threshold 0.5 (seed), optionally tightened to a MAC budget, then rectify (Eq. 12) where that is
   exact: under the "output" formulation, on the traced dependency graph (rectify.py).

Choices against the seed, each recorded in the mask's `extra`:
- Bimodal schedule (the seed gives none): lambda2(k) = 0 for k < k0 = bimodal_start * K, then lambda2 *
  bimodal_growth^(k - k0): off while the scores find the accuracy/sparsity trade-off, then growing geometrically
  (x1e6 over 20 iterations at 2) until it outweighs the feature and sparsity gradients whatever their scale.
  The expected feature loss is linear in each score (m is Bernoulli), so once lambda2 dominates the objective is
  concave in each score and the scores end at 0 or 1, each on the side of 0.5 the loss put it on: the 0.5
  threshold is decided by the loss, not by how far the iterations could move a score. lr * (K - k0) >= 1 lets a
  score cross the whole interval during the ramp. `extra["undecided_share"]` is the share of scores left in
  (0.1, 0.9).
- Feature loss ||.||^2 summed over a sample's features and averaged over the batch (Eq. 5); `feature_loss=
  "relative"` divides by ||f^ref||^2 (scale-free lambdas). With several calls per step (split CFG), their losses
  add up. The "end features" are the network output, for every architecture.
- delta (Eq. 9) is the backward difference, the direction in which step i uses the cache (loss_scaling.py).
- Inputs follow the uncached (teacher) trajectory; caches follow the committed masked steps.
- Relaxation: the seed's text speaks of random sampling, its Eq. 4 of the soft mixture s f + (1 - s) cache; soft
  is the default because the straight-through estimate is blind at s = 1: with m = 1 the output equals the
  reference and the gradient is exactly 0, so any lambda1 > 0 pulls every score down until draws of m = 0 appear,
  whatever the cost of skipping. Under the soft mixture the error grows as (1 - s)^2 ||f - cache||^2, so a unit
  ends on exactly when reusing it alone costs more than ~lambda1 w_i (on the digits DiT, DDIM-50, output
  formulation, lambda1 1e-2: MACs 0.48 at FD +4% soft, against MACs 0.12 at FD x18 with Bernoulli sampling even at
  lambda1 1e-4; bench/caching.py keeps the Bernoulli variant as an ablation).
- Row 0 always computes (there is no cache at the first step). Scores start at `init_score` (1: compute all).
- Optimiser (the seed names none): signed momentum, s -= lr * sign(m) with m an exponential average (0.9) of the
  gradient, so a score moves lr per iteration whatever the loss scale; the straight-through gradient of a unit
  that was sampled off can be orders of magnitude larger than the others, which stalls Adam (its second moment
  remembers the outlier for ~1000 iterations) but only turns this momentum's sign for a few.

Resumable: with `checkpoint=`, the scores are written after every step under the model fingerprint, the settings
and the trajectory (a hash of every recorded network input: x_T, the time steps, the solver's states, the
conditioning), so resuming with another x_T, solver or conditioning, or reusing a finished checkpoint for new
data, is refused instead of silently reused.
Scale-out: under torch.distributed, each rank trains a contiguous slice of steps (starting from caches filled by
the full network) and the slices are gathered with one all_reduce.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from tdiff.artefacts import fingerprint_module, load_torch, save_torch

from .api import build_cache
from .binarise import binarise
from .loss_scaling import loss_weights, relative_feature_variation
from .maskfile import LearnedMask
from .runtime import Call, _first_tensor, _tensors, installed_cache
from .units import check_formulation, check_granularity, column_groups, unit_columns

CHECKPOINT_FORMAT = "tdiff.cache.mask_training"
CHECKPOINT_VERSION = 2
FEATURE_LOSSES = ("sq", "relative")
RELAXATIONS = ("bernoulli", "soft")
CACHE_UPDATES = ("soft", "hard")
MOMENTUM = 0.9


def _dist():
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _step_range(steps: int, rank: int, world: int):
    per = -(-steps // world)
    return min(steps, rank * per), min(steps, (rank + 1) * per)


def _end_feature(output) -> torch.Tensor:
    return _first_tensor(tuple(output.values()) if isinstance(output, dict) else output)


def trajectory_hash(calls: List[Call], solver: Optional[str], timesteps) -> str:
    """sha256 of every recorded network input (with its context and step), the solver name and time steps."""
    h = hashlib.sha256()
    h.update(repr((solver, None if timesteps is None else [float(t) for t in timesteps])).encode())
    for call in calls:
        h.update(f"{call.context}|{call.step}|".encode())
        for t in _tensors((call.args, call.kwargs)):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:24]


def _check_settings(iterations, lr, lambda1, lambda2, bimodal_start, init_score, threshold, feature_loss,
                    cache_update):
    if type(iterations) is not int or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    for name, value in (("lr", lr), ("lambda1", lambda1), ("lambda2", lambda2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("bimodal_start", bimodal_start), ("init_score", init_score), ("threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if feature_loss not in FEATURE_LOSSES:
        raise ValueError(f"feature_loss must be one of {FEATURE_LOSSES}, got {feature_loss!r}")
    if cache_update not in CACHE_UPDATES:
        raise ValueError(f"cache_update must be one of {CACHE_UPDATES}, got {cache_update!r}")


def bimodal_weight(k: int, iterations: int, lambda2: float, bimodal_start: float, growth: float) -> float:
    """lambda2 at iteration k: 0 before k0 = bimodal_start * iterations, then lambda2 * growth^(k - k0)."""
    k0 = int(bimodal_start * iterations)
    return 0.0 if k < k0 else lambda2 * growth ** (k - k0)


def train_mask(model: nn.Module, sample_fn: Optional[Callable[[nn.Module], object]] = None, *,
               pipeline_kwargs: Optional[dict] = None, formulation: str = "output", granularity: str = "unit",
               iterations: int = 40, lr: float = 0.05, lambda1: float = 1e-2, lambda2: float = 1e-2,
               bimodal_start: float = 0.5, bimodal_growth: float = 2.0, feature_loss: str = "sq",
               relaxation: str = "soft", cache_update: str = "soft",
               loss_scaling: bool = True, rectify: Optional[bool] = None, lossy_rectify: bool = False,
               threshold: float = 0.5, target_mac_fraction: Optional[float] = None, init_score: float = 1.0,
               checkpoint: Optional[str] = None, solver: Optional[str] = None,
               timesteps: Optional[List[float]] = None, seed: int = 0, progress: bool = True) -> LearnedMask:
    """Learn a caching mask. Returns a LearnedMask (its `extra` holds the scores and settings).

    model: a network (tdiff DiT / UNet, a diffusers model, anything with a registered adapter) with
    `sample_fn(model)` running the sampler from Gaussian noise through it; or a diffusers pipeline, run once as
    `pipe(**pipeline_kwargs)` (its network, scheduler loop and conditioning, guidance included).
    rectify: None rectifies where it is exact (formulation "output"); True with the "branch" formulation needs
    lossy_rectify=True (the seed's Eq. 12 as a heuristic). target_mac_fraction: after thresholding, also switch
    off the lowest-score units until the run (after rectification) costs at most this fraction of the uncached
    MACs. checkpoint: a path, written after every step and resumed from when it exists.
    """
    from tdiff.integrations import is_diffusers_pipeline

    pipeline_meta: dict = {}
    if is_diffusers_pipeline(model):
        from tdiff.integrations.diffusers.pipeline_runs import pipeline_sampler

        if sample_fn is not None:
            raise ValueError("pass either a pipeline with pipeline_kwargs, or a network with sample_fn, not both")
        model, sample_fn, pipeline_meta = pipeline_sampler(model, pipeline_kwargs or {})
        solver = solver or pipeline_meta["solver"]
    elif pipeline_kwargs is not None:
        raise ValueError("pipeline_kwargs is only for a diffusers pipeline; got a network")
    if not callable(sample_fn):
        raise ValueError("sample_fn must be a callable sample_fn(model) that runs the sampler through the model")
    check_formulation(formulation)
    granularity = check_granularity(granularity)
    _check_settings(iterations, lr, lambda1, lambda2, bimodal_start, init_score, threshold, feature_loss,
                    cache_update)
    if target_mac_fraction is not None and (isinstance(target_mac_fraction, bool) or not isinstance(
            target_mac_fraction, (int, float)) or not 0.0 < target_mac_fraction <= 1.0):
        # checked before training, not only when binarising after it
        raise ValueError(f"target_mac_fraction must be None or a number in (0, 1], got {target_mac_fraction!r}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {relaxation!r}")
    if isinstance(bimodal_growth, bool) or not isinstance(bimodal_growth, (int, float)) \
            or not 1.0 <= bimodal_growth < 10:
        raise ValueError(f"bimodal_growth must be a number in [1, 10), got {bimodal_growth!r}")
    if rectify is None:
        rectify = formulation == "output" or lossy_rectify
    if installed_cache(model) is not None:
        raise ValueError("the model already has a learned cache installed; remove() it before training a mask")

    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # the network is frozen; only the scores learn
    cache = build_cache(model, formulation)
    try:
        with torch.no_grad(), cache.recording() as calls:
            sample_fn(model)
        if not calls:
            raise ValueError("sample_fn never called the model; it must run the sampler with the model it is given")
        if any(c.output is None for c in calls):
            raise ValueError("a recorded network call did not return; sample_fn must call the model it is given")
        by_step: Dict[int, List[Call]] = {}
        for call in calls:
            by_step.setdefault(call.step, []).append(call)
        steps = max(by_step) + 1
        if sorted(by_step) != list(range(steps)):
            raise ValueError(f"the sampler's network calls skipped steps: recorded steps {sorted(by_step)}")
        contexts = [tuple(c.context for c in by_step[i]) for i in range(steps)]
        if len(set(contexts)) != 1 or len(set(contexts[0])) != len(contexts[0]):
            raise ValueError(f"every step must call the network once per cache context, got {contexts}")
        if timesteps is None and pipeline_meta:
            timesteps = pipeline_meta.get("timesteps")
        network_times = [by_step[i][0].time for i in range(steps)]
        reference = [[_end_feature(c.output).float() for c in by_step[i]] for i in range(steps)]
        delta = relative_feature_variation([torch.cat([f.flatten() for f in r]) for r in reference])
        weights = loss_weights(delta) if loss_scaling else torch.ones(steps, dtype=torch.float64)

        units = cache.units
        groups = column_groups(units, granularity)
        col_of_unit = unit_columns(units, granularity)
        fingerprint = fingerprint_module(model)
        trajectory = trajectory_hash(calls, solver, timesteps)
        settings = dict(formulation=formulation, granularity=granularity, steps=steps, iterations=iterations, lr=lr,
                        lambda1=lambda1, lambda2=lambda2, bimodal_start=bimodal_start,
                        bimodal_growth=bimodal_growth, relaxation=relaxation, feature_loss=feature_loss,
                        cache_update=cache_update, loss_scaling=loss_scaling, init_score=init_score, seed=seed,
                        threshold=threshold)
        rank, world = _dist()
        lo, hi = _step_range(steps, rank, world)
        ckpt_path = None if checkpoint is None else (checkpoint if world == 1 else f"{checkpoint}.rank{rank}")
        scores = torch.full((steps, len(groups)), float(init_score), dtype=torch.float64)
        scores[0] = 1.0
        start = max(lo, 1)
        generator = torch.Generator().manual_seed(seed + rank)  # the Bernoulli draws: reproducible, resumable
        if ckpt_path is not None and os.path.exists(ckpt_path):
            doc = load_torch(ckpt_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
            if doc.get("fingerprint") != fingerprint or doc.get("settings") != settings:
                raise ValueError(f"checkpoint {ckpt_path!r} was written for another model or other settings; "
                                 f"delete it or pass another path")
            if doc.get("trajectory") != trajectory:
                raise ValueError(f"checkpoint {ckpt_path!r} was written for another sampling trajectory (another "
                                 f"x_T, time steps, solver or conditioning); delete it or pass another path")
            if not (torch.is_tensor(doc.get("scores")) and doc["scores"].shape == scores.shape):
                raise ValueError(f"checkpoint {ckpt_path!r} has no scores of shape {tuple(scores.shape)}")
            if not bool(((doc["scores"] >= 0) & (doc["scores"] <= 1)).all()):  # NaN fails this too
                raise ValueError(f"checkpoint {ckpt_path!r} holds scores outside [0, 1] (or NaN)")
            nxt = doc.get("next_step")
            if isinstance(nxt, bool) or not isinstance(nxt, int) or not max(lo, 1) <= nxt <= hi:
                raise ValueError(f"checkpoint {ckpt_path!r}: next_step must be an integer in [{max(lo, 1)}, {hi}], "
                                 f"got {nxt!r}")
            if not (torch.is_tensor(doc.get("rng")) and doc["rng"].dtype == torch.uint8):
                raise ValueError(f"checkpoint {ckpt_path!r}: rng must be a uint8 generator state tensor")
            scores = doc["scores"].to(torch.float64)
            start = nxt
            generator.set_state(doc["rng"])

        def commit(i: int, known: bool):
            """Run step i as the mask will (filling the caches for step i + 1)."""
            row = scores[i][col_of_unit].float()
            for call in by_step[i]:
                if not known:
                    mode = cache.forced([True] * len(units), step=i, context=call.context)
                elif cache_update == "soft":
                    mode = cache.soft(row, sample=False, commit=True, step=i, context=call.context)
                else:
                    mode = cache.forced(row > threshold, step=i, context=call.context)
                with mode:
                    model(*call.args, **call.kwargs)

        with torch.no_grad():  # caches up to the first step to train: earlier steps owned by other ranks run full
            for i in range(0, start):
                commit(i, known=world == 1 or i >= lo)

        iterator = range(start, hi)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc="mask training" + (f" (rank {rank})" if world > 1 else ""))
        for i in iterator:
            w = float(weights[i])
            row = scores[i].float().clone().requires_grad_(True)
            momentum = torch.zeros_like(row)
            for k in range(iterations):
                loss = 0.0
                for call, ref in zip(by_step[i], reference[i]):
                    with cache.soft(row[col_of_unit], sample=relaxation == "bernoulli", commit=False, step=i,
                                    context=call.context, generator=generator):
                        out = _end_feature(model(*call.args, **call.kwargs)).float()
                    err = (out - ref).pow(2).flatten(1).sum(1)
                    if feature_loss == "relative":
                        err = err / ref.pow(2).flatten(1).sum(1).clamp_min(1e-12)
                    loss = loss + err.mean()
                l2 = bimodal_weight(k, iterations, lambda2, bimodal_start, bimodal_growth)
                loss = loss + w * (lambda1 * row.sum() + l2 * (row * (1 - row)).sum())
                (grad,) = torch.autograd.grad(loss, row)
                with torch.no_grad():  # signed momentum: a step of lr along the averaged gradient's sign
                    momentum.mul_(MOMENTUM).add_(grad, alpha=1 - MOMENTUM)
                    row.sub_(lr * momentum.sign()).clamp_(0.0, 1.0)
            scores[i] = row.detach().double()
            with torch.no_grad():
                commit(i, known=True)
            if ckpt_path is not None:
                save_torch(ckpt_path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, dict(
                    scores=scores, next_step=i + 1, fingerprint=fingerprint, settings=settings,
                    trajectory=trajectory, rng=generator.get_state()))
    finally:
        cache.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)

    if world > 1:
        mine = torch.zeros_like(scores)
        mine[lo:hi] = scores[lo:hi]
        torch.distributed.all_reduce(mine)
        scores = mine
        scores[0] = 1.0

    first = calls[0]
    graph = None
    if rectify:
        from .graph import unit_graph

        graph = unit_graph(model, first.args, first.kwargs, formulation=formulation, granularity=granularity)
    unit_costs = base = None
    if target_mac_fraction is not None:
        from .mac_count import unit_macs

        base, unit_costs = unit_macs(model, first.args, first.kwargs, formulation, granularity)
    from .rectify import rectify as rectify_mask

    matrix = binarise(scores, threshold, unit_costs, base or 0.0, target_mac_fraction,
                      then=(lambda m: rectify_mask(m, graph, lossy=lossy_rectify)) if rectify else None)
    trained = scores[1:]
    undecided = float(((trained > 0.1) & (trained < 0.9)).double().mean()) if trained.numel() else 0.0
    extra = dict(settings, scores=scores.tolist(), loss_weights=weights.tolist(), feature_variation=delta.tolist(),
                 rectified=bool(rectify), lossy_rectify=lossy_rectify, target_mac_fraction=target_mac_fraction,
                 undecided_share=undecided, trajectory=trajectory, contexts=list(contexts[0]))
    return LearnedMask(matrix=matrix, granularity=granularity, formulation=formulation, fingerprint=fingerprint,
                       solver=solver, timesteps=None if timesteps is None else [float(t) for t in timesteps],
                       threshold=threshold, extra=extra,
                       network_times=None if any(t is None for t in network_times) else network_times)
