"""Knowledge-guided mask rectification (seed Sec. 3.5, Eq. 12), made exact.

The seed's rule, in sampling-step order (row i = step i, row i + 1 = the next, less noisy step):
    m[i, b] = 0  if  m[i, b+1] = 0  and  m[i+1, b] = 1,
i.e. unit b's fresh result at step i is needed neither by unit b + 1 at step i (which reuses its cache) nor by
unit b at step i + 1 (which recomputes). It assumes unit b's result is read by unit b + 1 alone.

Exact form used here, for any dependency graph (graph.unit_graph traces it): unit b may skip at step i when
- no reader of b's result computes at step i (every consumer reuses its cache), and
- the network output does not read b's result directly, and
- b recomputes at step i + 1, or step i is the last (no later step reads the cache).
Each switch leaves every output of every step bit-identical given the mask at that moment; rows go from the last
step back to the first and units from the last to the first in execution order (as in the seed), so a switch
never changes the conditions a previous one relied on, and the rectified mask is lossless as a whole.

- "output" formulation (seed Eq. 3): on a transformer the graph is the seed's chain and the rule is Eq. 12 (plus
  the last step, which the seed leaves alone although nothing reads its caches); on a UNet skip connections make
  a down-path unit's result read by an up-path unit too, which the graph accounts for.
- "branch" formulation (pre-gate branches): every branch is added into the residual stream that the output head
  reads, so the exact rule switches nothing off. Rectifying such a mask is refused unless `lossy=True`.
`lossy=True` (any formulation) applies the seed's Eq. 12 literally, as a heuristic: the chain assumption, and not
at the last step; on the branch formulation or a UNet it changes the output.
"""
from __future__ import annotations

import torch

from .graph import UnitGraph
from .maskfile import as_mask_matrix


def rectify(mask, graph: UnitGraph, *, lossy: bool = False) -> torch.Tensor:
    """The rectified (steps, columns) mask. `graph`: the columns' dependency graph (tdiff.cache.unit_graph, or
    UnitGraph.chain(columns) for a transformer under the output formulation)."""
    if not isinstance(graph, UnitGraph):
        raise ValueError(f"graph must be a tdiff.cache.UnitGraph (from tdiff.cache.unit_graph(model, inputs) or "
                         f"UnitGraph.chain(columns)), got {type(graph).__name__}")
    m = as_mask_matrix(mask).clone()
    steps, columns = m.shape
    if graph.size != columns:
        raise ValueError(f"the graph has {graph.size} columns but the mask has {columns}")
    if lossy:  # the seed's Eq. 12 as written: unit b read by unit b + 1 alone
        graph = UnitGraph.chain(columns, graph.formulation)
    elif graph.formulation == "branch":
        raise ValueError(
            "rectification is not lossless for the 'branch' formulation: a pre-gate branch is added into the "
            "residual stream that every later unit and the output head read, so no unit can be switched off "
            "without changing the output. Cache unit outputs instead (formulation='output', seed Eq. 3), where "
            "rectification is exact, or pass lossy=True to apply the seed's Eq. 12 as a heuristic"
        )
    for i in range(steps - 1, 0, -1):
        if lossy and i == steps - 1:
            continue  # the seed's rule as written needs a next step
        for b in range(columns - 1, -1, -1):
            if not m[i, b] or graph.feeds_output[b] or any(m[i, c] for c in graph.consumers[b]):
                continue
            if i + 1 < steps and not m[i + 1, b]:
                continue  # the next step reuses this step's result
            m[i, b] = False
    return m
