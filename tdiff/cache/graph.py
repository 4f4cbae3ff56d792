"""Which units read each unit's result: the dependency graph that exact rectification needs.

Traced, not assumed: one call runs with every unit's result replaced by a fresh autograd leaf, and the autograd
graph behind each unit's inputs (and behind the network output) is walked back to the leaves it reaches. A path
stops at a leaf, so what a walk finds are the units whose results flow in *directly* (through any non-unit ops:
concatenation, down/up-sampling, residual adds), i.e. exactly what the caching runtime would have to supply.

- "output" formulation on a transformer: a chain, unit b read only by unit b + 1 (the last by the output head).
- "output" formulation on a UNet: a down-path unit is also read by the up-path unit its skip connection feeds.
- "branch" formulation: a pre-gate branch is added into the residual stream, which every later unit and the
  output head read, so every unit feeds the output directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Sequence

import torch
from torch import nn

from .units import Unit, column_groups


@dataclass(frozen=True)
class UnitGraph:
    """consumers[b]: the columns (or units) that read b's result in the same call; feeds_output[b]: whether the
    network output reads it directly. formulation: the caching formulation it was traced under."""

    consumers: Sequence[FrozenSet[int]]
    feeds_output: Sequence[bool]
    formulation: str

    def __post_init__(self):
        if len(self.consumers) != len(self.feeds_output):
            raise ValueError("consumers and feeds_output must have one entry per column")

    @property
    def size(self) -> int:
        return len(self.consumers)

    @staticmethod
    def chain(n: int, formulation: str = "output") -> "UnitGraph":
        """Unit b read only by unit b + 1, the last by the output: the seed's assumption behind Eq. 12."""
        return UnitGraph([frozenset({b + 1}) if b + 1 < n else frozenset() for b in range(n)],
                         [b == n - 1 for b in range(n)], formulation)

    def contract(self, groups: List[List[int]]) -> "UnitGraph":
        """The graph between mask columns, each a group of units: a column is read by the columns of its units'
        readers outside the column itself."""
        column = {u: c for c, members in enumerate(groups) for u in members}
        consumers, feeds = [], []
        for c, members in enumerate(groups):
            consumers.append(frozenset(column[v] for u in members for v in self.consumers[u]) - {c})
            feeds.append(any(self.feeds_output[u] for u in members))
        return UnitGraph(consumers, feeds, self.formulation)


def _reachable_leaves(roots: List[torch.Tensor], leaf_bit: Dict[int, int], memo: Dict[int, int]) -> int:
    """Bitmask of the leaves (by leaf_bit[id(tensor)]) reachable backwards from `roots` through autograd nodes."""
    found = 0
    stack = []
    for t in roots:
        if id(t) in leaf_bit:
            found |= leaf_bit[id(t)]
        elif t.grad_fn is not None:
            stack.append(t.grad_fn)
    # iterative post-order over the DAG, memoised per node
    pending = list(stack)
    while pending:
        node = pending[-1]
        key = id(node)
        if key in memo:
            pending.pop()
            continue
        children = [n for n, _ in node.next_functions if n is not None]
        todo = [n for n in children if id(n) not in memo and type(n).__name__ != "AccumulateGrad"]
        if todo:
            pending.extend(todo)
            continue
        bits = 0
        for n in children:
            if type(n).__name__ == "AccumulateGrad":
                bits |= leaf_bit.get(id(n.variable), 0)
            else:
                bits |= memo[id(n)]
        memo[key] = bits
        pending.pop()
    for node in stack:
        found |= memo[id(node)]
    return found


def unit_graph(model: nn.Module, example_inputs, example_kwargs: Optional[dict] = None, *,
               formulation: Optional[str] = None, granularity: str = "unit") -> UnitGraph:
    """Trace which units (mask columns, for `granularity`) read each unit's result in one call of `model` on the
    example inputs. Uses the learned cache installed on the model if there is one (and its formulation), else
    installs one for `formulation` (default "output") for the trace."""
    from .api import temporary_cache

    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    with temporary_cache(model, formulation) as cache:
        units: List[Unit] = cache.units
        requires = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)  # only the unit leaves matter; keeps the autograd graph small
        try:
            with torch.enable_grad(), cache.isolated(), cache.probe() as probe:
                output = model(*example_inputs, **dict(example_kwargs or {}))
        finally:
            for p, r in zip(model.parameters(), requires):
                p.requires_grad_(r)
        from .runtime import _tensors

        leaf_bit = {id(t): 1 << u for u, outs in probe.outputs.items() for t in outs}
        memo: Dict[int, int] = {}
        producers = {u: _reachable_leaves(probe.inputs.get(u, []), leaf_bit, memo) for u in range(len(units))}
        out_bits = _reachable_leaves(_tensors(_as_tuple(output)), leaf_bit, memo)
        consumers = [frozenset(c for c in range(len(units)) if producers[c] >> b & 1) for b in range(len(units))]
        graph = UnitGraph(consumers, [bool(out_bits >> b & 1) for b in range(len(units))], cache.formulation)
        return graph.contract(column_groups(units, granularity))


def _as_tuple(output):
    """diffusers outputs (BaseOutput, a dict subclass) -> their values."""
    if isinstance(output, dict):
        return tuple(output.values())
    return output
