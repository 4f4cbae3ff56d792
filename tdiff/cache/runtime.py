"""The live caching state installed on a model: per-unit caches, the step counter, CFG contexts, and the
three ways a unit can be asked to run (shared mask row, per-sample rows, soft scores while training a mask).

Units are patched in place (an instance attribute shadows the method or the submodule's `forward`), the way
diffusers hooks wrap a module's forward, so the model keeps working with any sampler that calls it. `remove()`
restores the original attributes.

The step counter advances when the *first* unit runs, i.e. once per model evaluation, however the model was
entered (`model(...)`, `model.forward(...)` or `forward_with_cfg`).
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .units import Unit, find_blocks, find_units

_MARK = "_tdiff_learned_cache"


class _Context:
    """One independent cache: a step counter and the last branch output of every unit."""

    def __init__(self):
        self.step = -1
        self.cache: Dict[int, torch.Tensor] = {}


class LearnedCache:
    """Handle returned by `apply_learned_cache`. `mask` is a (steps, units) bool tensor or None (always compute,
    used while recording reference features)."""

    def __init__(self, model: nn.Module, mask: Optional[torch.Tensor]):
        self.model = model
        self.units: List[Unit] = find_units(model)
        if mask is not None and (mask.ndim != 2 or mask.shape[1] != len(self.units)):
            raise ValueError(f"mask must have shape (steps, {len(self.units)}) (one column per unit), got "
                             f"{tuple(mask.shape)}")
        self.mask = None if mask is None else mask.to(torch.bool).cpu()
        self._mask_list = None if mask is None else self.mask.tolist()  # python bools: no per-unit host syncs
        self._contexts: Dict[str, _Context] = {}
        self._active = "default"
        self._rows: Optional[torch.Tensor] = None
        self._soft: Optional[dict] = None
        self._patches: list = []
        self._install()

    # ----- installation -----
    def _install(self):
        blocks = dict(find_blocks(self.model))
        for name, block in blocks.items():
            if getattr(block, _MARK, None) is not None:
                raise ValueError(f"block {name} already has a learned cache; call .remove() on the old one first")
        for index, unit in enumerate(self.units):
            block = blocks[unit.block_name]
            target = getattr(block, unit.attribute)
            owner, attr = (target, "forward") if isinstance(target, nn.Module) else (block, unit.attribute)
            original = getattr(owner, attr)

            def wrapper(*args, _u=index, _fn=original, **kwargs):
                return self._run_unit(_u, _fn, args, kwargs)

            self._patch(owner, attr, wrapper)
        # DiT-interface blocks also get a block-level forward for per-sample masks, which uses the fused
        # gather/skip op (it needs the gate, which only the block sees).
        for name, block in blocks.items():
            object.__setattr__(block, _MARK, self)
            if hasattr(block, "modulation") and hasattr(block, "attn_branch"):
                first = next(i for i, u in enumerate(self.units) if u.block_name == name)
                self._patch(block, "forward", self._dit_block_forward(block, first))

    def _patch(self, owner, attr, value):
        had = attr in owner.__dict__
        self._patches.append((owner, attr, had, owner.__dict__.get(attr)))
        object.__setattr__(owner, attr, value)

    def remove(self):
        """Restore the model's original forwards and drop the caches."""
        for owner, attr, had, old in reversed(self._patches):
            if had:
                object.__setattr__(owner, attr, old)
            else:
                object.__delattr__(owner, attr)
        self._patches.clear()
        for _, block in find_blocks(self.model):
            if getattr(block, _MARK, None) is self:
                object.__delattr__(block, _MARK)
        self.reset()

    # ----- state -----
    def reset(self):
        """Forget every cache and restart the step counter: call between sampling runs."""
        self._contexts.clear()

    @contextlib.contextmanager
    def sampling_run(self):
        """`with cache.sampling_run(): sample(...)` resets on entry and exit."""
        self.reset()
        try:
            yield self
        finally:
            self.reset()

    @contextlib.contextmanager
    def cache_context(self, name: str):
        """Separate cache and step counter, for samplers that call the model once for the conditional and once
        for the unconditional half of classifier-free guidance. (A single batched CFG call needs nothing: the
        cache is per sample row, so the halves never mix.)"""
        previous, self._active = self._active, str(name)
        try:
            yield self
        finally:
            self._active = previous

    @contextlib.contextmanager
    def sample_rows(self, rows: torch.Tensor):
        """Per-sample masks for the next model call(s): rows (batch, units) bool, one mask row per sample, so
        one batch can hold samples at different sampling steps (serving)."""
        rows = torch.as_tensor(rows)
        if rows.ndim != 2 or rows.shape[1] != len(self.units):
            raise ValueError(f"rows must have shape (batch, {len(self.units)}), got {tuple(rows.shape)}")
        previous, self._rows = self._rows, _RowsPlan(rows.to(torch.bool))
        try:
            yield self
        finally:
            self._rows = previous

    @property
    def step(self) -> int:
        """Index of the last step run in the active context (-1 before the first call)."""
        return self._context().step

    def _context(self) -> _Context:
        ctx = self._contexts.get(self._active)
        if ctx is None:
            ctx = self._contexts[self._active] = _Context()
        return ctx

    def _begin(self, u: int) -> _Context:
        ctx = self._context()
        if u == 0:
            ctx.step += 1
        return ctx

    # ----- execution -----
    def _run_unit(self, u: int, fn: Callable, args, kwargs):
        ctx = self._begin(u)
        cached = ctx.cache.get(u)
        if self._soft is not None:
            return self._run_soft(u, fn, args, kwargs, ctx, cached)
        if self._rows is not None:
            return self._run_rows(u, fn, args, kwargs, ctx, cached)
        if not self._should_compute(ctx.step, u, cached):
            if torch.is_tensor(args[0]) and cached.shape[0] != args[0].shape[0]:
                raise ValueError("the batch size changed since the cache was filled; call reset()")
            return cached
        out = fn(*args, **kwargs)
        ctx.cache[u] = out.detach()
        return out

    def _row(self, step: int):
        if self._mask_list is None:
            return None
        if step >= len(self._mask_list):
            raise ValueError(
                f"the mask has {len(self._mask_list)} steps but the model was called for step {step + 1}; "
                f"call reset() (or use `with cache.sampling_run():`) between sampling runs"
            )
        return self._mask_list[step]

    def _should_compute(self, step: int, u: int, cached) -> bool:
        if cached is None:  # first step (or first call in this context) always computes
            return True
        row = self._row(step)
        return True if row is None else row[u]

    def _rows_for(self, u: int, batch: int, cached) -> "_RowsPlan":
        plan = self._rows
        if plan.batch != batch:
            raise ValueError(f"sample_rows has {plan.batch} rows but the batch has {batch} samples")
        if cached is None and not plan.all[u]:
            raise ValueError("every sample must compute every unit on its first step (no cache yet)")
        if cached is not None and cached.shape[0] != batch:
            raise ValueError("the batch size changed since the cache was filled; call reset()")
        return plan

    def _run_rows(self, u, fn, args, kwargs, ctx, cached):
        # generic per-sample path (no gate available here): gather, compute, merge
        batch = args[0].shape[0]
        plan = self._rows_for(u, batch, cached)
        if plan.all[u]:
            out = fn(*args, **kwargs)
        elif not plan.any[u]:
            return cached
        else:
            idx = plan.index(u, cached.device)
            fresh = fn(*_take_rows(args, idx, batch), **_take_rows_kw(kwargs, idx, batch))
            out = cached.index_copy(0, idx, fresh.to(cached.dtype))
        ctx.cache[u] = out.detach()
        return out

    def _run_soft(self, u, fn, args, kwargs, ctx, cached):
        fresh = fn(*args, **kwargs)
        if cached is None:
            out = fresh
        else:
            s = self._soft["scores"][u]
            # random relaxation: draw the binary decision with probability s, pass the gradient to s
            # straight through (the seed's random sampling, not Gumbel-softmax)
            m = torch.bernoulli(s.detach(), generator=self._soft.get("generator")) + s - s.detach() \
                if self._soft["sample"] else s
            out = m * fresh + (1 - m) * cached
        if self._soft["commit"]:
            ctx.cache[u] = out.detach()
        return out

    def _dit_block_forward(self, block, first_unit: int):
        class_forward = type(block).forward

        def forward(x, c, *args, **kwargs):
            if self._rows is None or self._soft is not None:
                return class_forward(block, x, c, *args, **kwargs)
            sm, cm, gm, sp, cp, gp = block.modulation(c)
            x = self._fused_unit(first_unit, type(block).attn_branch.__get__(block), x, gm, sm, cm)
            return self._fused_unit(first_unit + 1, type(block).mlp_branch.__get__(block), x, gp, sp, cp)

        return forward

    def _fused_unit(self, u, branch, x, gate, shift, scale):
        from tdiff.ops.cached_block import cached_block

        ctx = self._begin(u)
        cached = ctx.cache.get(u)
        plan = self._rows_for(u, x.shape[0], cached)
        if plan.all[u]:
            fresh = branch(x, shift, scale)
            ctx.cache[u] = fresh.detach()
            return x + gate.unsqueeze(1) * fresh
        if not plan.any[u]:  # the whole batch reuses: no gather
            return x + gate.unsqueeze(1) * cached
        idx = plan.index(u, x.device)
        fresh = branch(x.index_select(0, idx), shift.index_select(0, idx), scale.index_select(0, idx))
        out, branch_out = cached_block(x, gate, fresh, cached, plan.source(u, x.device))
        ctx.cache[u] = branch_out.detach()
        return out


class _RowsPlan:
    """Per-sample mask rows (batch, units), with each unit's decisions worked out once per `sample_rows` rather
    than once per unit per call: whether all / any sample computes it (python bools, so no per-unit tensor
    reductions), the computing rows' indices, and the op's `source` map (row b -> its row among the computed
    ones, or -1 to reuse the cache). Indices and sources sit in one tensor, moved to a device once per plan."""

    def __init__(self, rows: torch.Tensor):
        self.batch, units = rows.shape
        columns = rows.t().tolist()
        self.all = [all(c) for c in columns]
        self.any = [any(c) for c in columns]
        sources = torch.where(rows, rows.long().cumsum(0) - 1, -1).t()  # (units, batch)
        indices = rows.t().nonzero()[:, 1]  # computing rows, unit by unit
        self._counts = [sum(c) for c in columns]
        self._index_start = list(itertools.accumulate(self._counts[:-1], initial=self.batch * units))
        self._flat = torch.cat([sources.flatten(), indices])
        self._on_device: Dict[torch.device, torch.Tensor] = {}

    def _flat_on(self, device) -> torch.Tensor:
        flat = self._on_device.get(device)
        if flat is None:
            flat = self._on_device[device] = self._flat.to(device)
        return flat

    def index(self, u: int, device) -> torch.Tensor:
        start = self._index_start[u]
        return self._flat_on(device)[start:start + self._counts[u]]

    def source(self, u: int, device) -> torch.Tensor:
        return self._flat_on(device)[u * self.batch:(u + 1) * self.batch]


def _take_rows(args, idx, batch):
    return tuple(a.index_select(0, idx) if torch.is_tensor(a) and a.ndim and a.shape[0] == batch else a for a in args)


def _take_rows_kw(kwargs, idx, batch):
    return {k: v.index_select(0, idx) if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v
            for k, v in kwargs.items()}
