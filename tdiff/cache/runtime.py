"""The live caching state installed on a network, and the one place where a unit's compute-or-reuse decision is
made (`LearnedCache.decision`).

State: per cache context (one per half of split classifier-free guidance) a step counter, the network time of the
run's first call, and the last result of every unit (its output or its pre-gate branch, by formulation).

Runs: the step advances once per call of the network's forward. A run ends after the mask's last step; the next
call starts a new run, and so does any call whose network time is at least the current run's first time (a
sampler starting again from noise), so pipelines and samplers need no explicit reset. A call past the mask's
last step that continues the run (its time still falling) is refused. `reset()` / `sampling_run()` remain.

Decisions, in order of precedence: a training or counting mode (soft scores, a forced row, a graph probe), then
per-sample rows (`sample_rows`, or a (batch, steps, units) mask), then the mask row of the current step; a unit
with no cache yet always computes.

How the network is entered does not matter here: `install_native` patches instance attributes (tdiff models and
plain modules); tdiff.integrations.diffusers.hooks registers diffusers ModelHooks. Both call `begin_call`,
`end_call`, `run_unit` and `run_gated`.
"""
from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .adapters import CacheAdapter, time_value
from .units import Unit

_MARK = "_tdiff_learned_cache"


class _Context:
    """One independent cache: a step counter, the run's first network time, and every unit's last result."""

    def __init__(self):
        self.step = -1
        self.first_time: Optional[float] = None
        self.cache: Dict[int, object] = {}


@dataclass
class Call:
    """One recorded network call: its cache context, step, inputs (detached) and output (detached)."""

    context: str
    step: int
    args: tuple
    kwargs: dict
    time: Optional[float]
    output: object = None


# ----- modes: at most one at a time; a mode with `step` set pins the context and step of the calls it runs -----
@dataclass
class _Soft:
    scores: torch.Tensor  # (units,) in [0, 1]
    sample: bool  # draw m ~ Bernoulli(s) with a straight-through gradient; else m = s (Eq. 4)
    commit: bool  # store the mixed result as the cache
    generator: Optional[torch.Generator] = None
    step: Optional[int] = None
    context: str = "default"


@dataclass
class _Forced:
    row: List[bool]
    step: Optional[int] = None
    context: str = "default"
    keep: Optional[list] = None  # collects every unit's inputs and computed results (so that a trace keeps work
    # whose result goes unused: it is executed, so it must be counted)


@dataclass
class _Probe:
    inputs: Dict[int, list] = field(default_factory=dict)
    outputs: Dict[int, list] = field(default_factory=dict)
    step: Optional[int] = None
    context: str = "default"


@dataclass
class _Rows:
    plan: "_RowsPlan"
    step: Optional[int] = None
    context: str = "default"


class LearnedCache:
    """Handle returned by `apply_learned_cache`: reset, sampling_run, cache_context, sample_rows, remove.

    mask: (steps, units) bool, one mask per sample as (batch, steps, units), or None (always compute; used to
    record reference runs). times: the network time of each step the mask was made for; calls at other times
    are refused."""

    def __init__(self, network: nn.Module, adapter: CacheAdapter, units: List[Unit], formulation: str,
                 mask: Optional[torch.Tensor] = None, times: Optional[List[float]] = None):
        self.network, self.adapter, self.units, self.formulation = network, adapter, units, formulation
        if mask is not None:
            mask = torch.as_tensor(mask).to(torch.bool).cpu()
            if mask.ndim not in (2, 3) or mask.shape[-1] != len(units):
                raise ValueError(f"mask must have shape (steps, {len(units)}) or (batch, steps, {len(units)}) "
                                 f"(one column per unit), got {tuple(mask.shape)}")
        self.mask = mask
        self.per_sample = mask is not None and mask.ndim == 3
        self.steps = None if mask is None else mask.shape[-2]
        self._mask_list = None if mask is None or self.per_sample else mask.tolist()  # python bools: no syncs
        self._step_plans: Dict[int, _RowsPlan] = {}
        if times is not None and self.steps is not None and len(times) != self.steps:
            raise ValueError(f"times has {len(times)} entries but the mask has {self.steps} steps")
        self.times = None if times is None else [float(t) for t in times]
        self._contexts: Dict[str, _Context] = {}
        self._active = "default"
        self._mode = None
        self._recorder: Optional[List[Call]] = None
        self._open_calls: List[Call] = []
        self._uninstall: Optional[Callable[[], None]] = None

    # ----- state -----
    def reset(self):
        """Forget every cache and restart the step counters."""
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
        """Separate caches and step counter for the calls inside: for samplers that call the network once for the
        conditional and once for the unconditional half of classifier-free guidance. (A single batched CFG call
        needs nothing: caches are per sample row, so the halves never mix.)"""
        previous, self._active = self._active, str(name)
        try:
            yield self
        finally:
            self._active = previous

    def set_context(self, name: Optional[str]) -> None:
        """Select the cache context by name (None: the default one); diffusers' `cache_context` calls this."""
        self._active = "default" if name is None else str(name)

    @contextlib.contextmanager
    def sample_rows(self, rows: torch.Tensor):
        """Per-sample mask rows for the calls inside: rows (batch, units) bool, one row per sample, so one batch can
        hold samples at different sampling steps (serving). The step counter does not move."""
        rows = torch.as_tensor(rows)
        if rows.ndim != 2 or rows.shape[1] != len(self.units):
            raise ValueError(f"rows must have shape (batch, {len(self.units)}), got {tuple(rows.shape)}")
        with self._in_mode(_Rows(_RowsPlan(rows.to(torch.bool)), context=self._active)):
            yield self

    @property
    def step(self) -> int:
        """Index of the last step run in the active context (-1 before the first call)."""
        return self._context().step

    def _context(self) -> _Context:
        ctx = self._contexts.get(self._active)
        if ctx is None:
            ctx = self._contexts[self._active] = _Context()
        return ctx

    def remove(self):
        """Restore the network's original forwards and drop the caches."""
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None
        self.reset()

    # ----- modes for training, counting and tracing -----
    @contextlib.contextmanager
    def _in_mode(self, mode):
        if self._mode is not None:
            raise RuntimeError(f"{type(self._mode).__name__[1:]} mode is already active on this cache")
        self._mode, previous = mode, self._active
        if mode.step is not None:
            self._active = mode.context
        try:
            yield mode
        finally:
            self._mode, self._active = None, previous

    def soft(self, scores: torch.Tensor, *, sample: bool, commit: bool, step: Optional[int] = None,
             context: str = "default", generator: Optional[torch.Generator] = None):
        """Mask training: every unit computes and its result is m * fresh + (1 - m) * cache with m ~ Bernoulli(s)
        (straight-through gradient to s) or m = s. `commit` stores the mixed result as the cache (seed Eq. 4)."""
        if scores.shape != (len(self.units),):
            raise ValueError(f"scores must have shape ({len(self.units)},), got {tuple(scores.shape)}")
        return self._in_mode(_Soft(scores, sample, commit, generator, step, context))

    def forced(self, row, *, step: Optional[int] = None, context: str = "default", keep: Optional[list] = None):
        """Run every call inside with this (units,) row instead of the mask's; `keep` (a list) collects every
        computed unit result."""
        row = [bool(v) for v in torch.as_tensor(row).tolist()]
        if len(row) != len(self.units):
            raise ValueError(f"row must have {len(self.units)} entries, got {len(row)}")
        return self._in_mode(_Forced(row, step, context, keep))

    def probe(self):
        """Every unit computes; its output is replaced by a fresh autograd leaf and its inputs are recorded, so
        that graph.unit_graph can read which units (and whether the output) read each unit's result."""
        return self._in_mode(_Probe())

    @contextlib.contextmanager
    def isolated(self):
        """Run with fresh, empty caches and restore the current ones afterwards."""
        saved, self._contexts = self._contexts, {}
        try:
            yield self
        finally:
            self._contexts = saved

    @contextlib.contextmanager
    def recording(self):
        """Record every network call (context, step, inputs, output) into the yielded list."""
        calls: List[Call] = []
        previous, self._recorder = self._recorder, calls
        try:
            yield calls
        finally:
            self._recorder = previous

    # ----- network-level: one call = one step -----
    def begin_call(self, args: tuple, kwargs: dict) -> None:
        mode = self._mode
        if mode is not None:  # training, counting, tracing and per-sample rows decide without the step counter
            ctx = self._context()
            if mode.step is not None:
                ctx.step = mode.step
            self._record_begin(ctx, args, kwargs, None)
            return
        t = time_value(self.adapter.time(args, kwargs))
        ctx = self._context()
        if ctx.step >= 0 and t is not None and ctx.first_time is not None and t >= ctx.first_time:
            ctx = self._new_run()  # the sampler started again from the highest noise level
        elif self.steps is not None and ctx.step + 1 >= self.steps:
            if t is not None:
                self._new_run()  # refused calls leave no half run behind
                raise ValueError(
                    f"the mask has {self.steps} steps but the network was called for step {ctx.step + 2} of the "
                    f"same run (its time {t:g} is still below the run's first time {ctx.first_time:g}); the mask "
                    f"was made for another number of steps: train one for this sampler, or resample it with "
                    f"tdiff.cache.resample_mask"
                )
            ctx = self._new_run()  # no time known: a completed run is followed by a new one
        ctx.step += 1
        if ctx.step == 0:
            ctx.first_time = t
        if self.times is not None and t is not None and ctx.step < len(self.times):
            expected = self.times[ctx.step]
            if not math.isclose(t, expected, rel_tol=1e-4, abs_tol=1e-6):
                self._new_run()
                raise ValueError(
                    f"the mask was made for network time {expected:g} at step {ctx.step}, but the network was called "
                    f"at {t:g}: it belongs to another sampler, schedule or number of steps"
                )
        self._record_begin(ctx, args, kwargs, t)

    def end_call(self, output):
        if self._recorder is not None and self._open_calls:
            self._open_calls.pop().output = _map(_detach, output)
        return output

    def _new_run(self) -> _Context:
        ctx = self._contexts[self._active] = _Context()
        return ctx

    def _record_begin(self, ctx, args, kwargs, t):
        if self._recorder is not None:
            call = Call(self._active, ctx.step, _map(_detach, tuple(args)), {k: _map(_detach, v) for k, v in
                                                                              kwargs.items()}, t)
            self._recorder.append(call)
            self._open_calls.append(call)

    # ----- the decision -----
    def _plan(self, ctx: _Context) -> Optional["_RowsPlan"]:
        if isinstance(self._mode, _Rows):
            return self._mode.plan
        if self.per_sample and not isinstance(self._mode, (_Forced, _Soft, _Probe)):
            plan = self._step_plans.get(ctx.step)
            if plan is None:
                plan = self._step_plans[ctx.step] = _RowsPlan(self.mask[:, self._checked_step(ctx)])
            return plan
        return None

    def _checked_step(self, ctx: _Context) -> int:
        if ctx.step < 0:
            raise RuntimeError("a cached unit ran outside a call of the network's forward; call the network itself")
        return ctx.step

    def decision(self, u: int):
        """The one place a unit's fate is decided: True (compute), False (reuse the cache), a _RowsPlan (some
        samples compute), or the _Soft / _Probe mode object."""
        ctx = self._context()
        mode = self._mode
        if isinstance(mode, (_Soft, _Probe)):
            return mode
        if ctx.cache.get(u) is None:
            return True  # nothing cached yet: the first step of a run (or of this context) computes
        plan = self._plan(ctx)
        if plan is not None:
            return plan
        if isinstance(mode, _Forced):
            return mode.row[u]
        if self._mask_list is None:
            return True
        return self._mask_list[self._checked_step(ctx)][u]

    def computes(self, u: int) -> bool:
        """Whether any sample computes unit u in this call."""
        d = self.decision(u)
        return d.any[u] if isinstance(d, _RowsPlan) else bool(d)

    # ----- execution -----
    def run_unit(self, u: int, fn: Callable, args: tuple, kwargs: dict):
        """Run unit u as fn(*args, **kwargs), or reuse its cached result, as decided."""
        ctx = self._context()
        cached = ctx.cache.get(u)
        d = self.decision(u)
        self._keep((args, kwargs))
        if d is True:
            out = fn(*args, **kwargs)
            ctx.cache[u] = _map(_detach, out)
            self._keep(out)
            return out
        if d is False:
            _check_batch(cached, _first_tensor((args, kwargs)))
            return cached
        if isinstance(d, _Soft):
            fresh = fn(*args, **kwargs)
            return self._mix(u, d, fresh, cached, ctx)
        if isinstance(d, _Probe):
            return self._probe_unit(u, d, (args, kwargs), fn(*args, **kwargs))
        batch = _first_tensor((args, kwargs)).shape[0]
        plan = self._checked_plan(d, u, batch, cached)
        if not plan.any[u]:
            return cached
        idx = plan.index(u, _first_tensor(cached).device)
        fresh = fn(*_take_rows(args, idx, batch), **_take_rows(kwargs, idx, batch))
        out = _map2(lambda c, f: c.index_copy(0, idx, f.to(c.dtype)), cached, fresh)
        ctx.cache[u] = _map(_detach, out)
        return out

    def run_gated(self, u: int, branch: Callable, x: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                  scale: torch.Tensor, residual: Callable):
        """Pre-gate branch unit (formulation "branch"): residual(x, gate, b) with b = branch(x, shift, scale) fresh or
        cached. Per-sample rows go through the fused tdiff::cached_block op (gather, gate, residual, refresh)."""
        ctx = self._context()
        cached = ctx.cache.get(u)
        d = self.decision(u)
        self._keep((x, gate, shift, scale))
        if d is True:
            fresh = branch(x, shift, scale)
            ctx.cache[u] = fresh.detach()
            self._keep(fresh)
            return residual(x, gate, fresh)
        if d is False:
            _check_batch(cached, x)
            return residual(x, gate, cached)
        if isinstance(d, _Soft):
            return residual(x, gate, self._mix(u, d, branch(x, shift, scale), cached, ctx))
        if isinstance(d, _Probe):
            return residual(x, gate, self._probe_unit(u, d, (x, shift, scale), branch(x, shift, scale)))
        plan = self._checked_plan(d, u, x.shape[0], cached)
        if not plan.any[u]:
            return residual(x, gate, cached)
        from tdiff.ops import cached_block

        idx = plan.index(u, x.device)
        fresh = branch(x.index_select(0, idx), shift.index_select(0, idx), scale.index_select(0, idx))
        out, refreshed = cached_block(x, gate, fresh, cached, plan.source(u, x.device))
        ctx.cache[u] = refreshed.detach()
        return out

    def _keep(self, out) -> None:
        if isinstance(self._mode, _Forced) and self._mode.keep is not None:
            self._mode.keep.extend(_tensors(out))

    def _checked_plan(self, plan: "_RowsPlan", u: int, batch: int, cached) -> "_RowsPlan":
        if plan.batch != batch:
            raise ValueError(f"the per-sample rows are for {plan.batch} samples but the batch has {batch}")
        if not plan.all[u] and cached is None:
            raise ValueError("every sample must compute every unit on its first step (no cache yet)")
        if cached is not None:
            _check_batch(cached, batch)
        return plan

    def _mix(self, u: int, mode: _Soft, fresh, cached, ctx: _Context):
        if cached is None:
            out = fresh
        else:
            s = mode.scores[u]
            # random relaxation (seed Sec. 3.3): m ~ Bernoulli(s), straight-through gradient to s; or m = s
            m = torch.bernoulli(s.detach(), generator=mode.generator) + s - s.detach() if mode.sample else s
            out = _map2(lambda f, c: m.to(f.dtype) * f + (1 - m.to(f.dtype)) * c, fresh, cached)
        if mode.commit:
            ctx.cache[u] = _map(_detach, out)
        return out

    @staticmethod
    def _probe_unit(u: int, mode: _Probe, inputs, out):
        mode.inputs[u] = _tensors(inputs)
        leaves = _map(lambda t: t.detach().requires_grad_(t.is_floating_point()), out)
        mode.outputs[u] = _tensors(leaves)
        return leaves


class _RowsPlan:
    """Per-sample mask rows (batch, units), each unit's decisions worked out once: whether all / any sample computes
    it (python bools, so no per-unit reductions), the computing rows' indices, and the fused op's `source` map
    (row b -> its row among the computed ones, or -1 to reuse). Indices and sources sit in one tensor, moved to a
    device once per plan."""

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


# ----- results that are tensors or (nested) tuples / lists of tensors -----
def _map(fn, value):
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_map(fn, v) for v in value)
    return value


def _map2(fn, a, b):
    if torch.is_tensor(a):
        return fn(a, b)
    if isinstance(a, (tuple, list)):
        return type(a)(_map2(fn, x, y) for x, y in zip(a, b))
    return a


def _tensors(value) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _first_tensor(value) -> torch.Tensor:
    found = _tensors(value)
    if not found:
        raise ValueError(f"expected a tensor (or a tuple of tensors), got {type(value).__name__}")
    return found[0]


def _detach(t: torch.Tensor) -> torch.Tensor:
    return t.detach()


def _check_batch(cached, current) -> None:
    batch = current if isinstance(current, int) else current.shape[0]
    if _first_tensor(cached).shape[0] != batch:
        raise ValueError("the batch size changed since the cache was filled; call reset() (or start a new run)")


def _take_rows(value, idx, batch):
    """Rows idx of every tensor argument whose leading dimension is the batch (others pass unchanged)."""
    def take(v):
        return v.index_select(0, idx) if torch.is_tensor(v) and v.ndim and v.shape[0] == batch else v

    if isinstance(value, dict):
        return {k: take(v) for k, v in value.items()}
    return tuple(take(v) for v in value)


# ----- installation on plain modules (tdiff models): instance attributes shadow forwards and methods -----
def installed_cache(model: nn.Module) -> Optional[LearnedCache]:
    """The LearnedCache installed on `model` (or on the network inside it), or None."""
    for m in model.modules():
        cache = m.__dict__.get(_MARK)
        if cache is not None:
            return cache
    return None


def mark(network: nn.Module, cache: LearnedCache) -> None:
    existing = installed_cache(network)
    if existing is not None:
        raise ValueError(f"{type(network).__name__} already has a learned cache installed; call .remove() on it "
                         f"first")
    object.__setattr__(network, _MARK, cache)


def unmark(network: nn.Module) -> None:
    if _MARK in network.__dict__:
        object.__delattr__(network, _MARK)


def install_native(cache: LearnedCache) -> None:
    """Patch the network's forward (step accounting), each unit's forward or method, and the adapter's block
    forwards; `cache.remove()` restores every attribute as it was."""
    patches = []

    def patch(owner, attr, value):
        patches.append((owner, attr, attr in owner.__dict__, owner.__dict__.get(attr)))
        object.__setattr__(owner, attr, value)

    network = cache.network
    mark(network, cache)
    network_forward = network.forward

    def forward(*args, **kwargs):
        cache.begin_call(args, kwargs)
        return cache.end_call(network_forward(*args, **kwargs))

    patch(network, "forward", forward)
    for unit in cache.units:
        if unit.via == "block":
            continue
        attr = "forward" if unit.via == "forward" else unit.attribute
        original = getattr(unit.module, attr)

        def wrapper(*args, _u=unit.index, _fn=original, **kwargs):
            return cache.run_unit(_u, _fn, args, kwargs)

        patch(unit.module, attr, wrapper)
    for block, block_forward in cache.adapter.block_forwards(network, cache.formulation, cache, cache.units):
        patch(block, "forward", block_forward)

    def uninstall():
        for owner, attr, had, old in reversed(patches):
            if had:
                object.__setattr__(owner, attr, old)
            else:
                object.__delattr__(owner, attr)
        unmark(network)

    cache._uninstall = uninstall
