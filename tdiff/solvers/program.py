"""A solver as a straight-line program over named buffers, built once per timestep vector.

Each solver module turns (schedule, grid, order, options) into a `Program`: per step, a short list of
instructions, plus every coefficient row the instructions use, as differentiable tensors of the timesteps. The
sampling loop (sample.py) only interprets the instructions: it calls the denoiser and the fused
`tdiff::multistep_update` op, so there is no solver arithmetic, no host sync and no allocation in the loop beyond
the model calls and the update outputs.

Buffer names: "x" is the running sample; "D{i}" the denoiser output (x0 prediction) of evaluation i; solvers may
add their own (e.g. iPNDM's "d{i}", Heun's "xp").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


@dataclass(frozen=True)
class Eval:
    """buffers[out] = denoiser(buffers[src], eval_times[k])."""

    out: str
    src: str
    k: int


@dataclass(frozen=True)
class Update:
    """buffers[out] = row[0] buffers[x] + sum_j row[j+1] buffers[hist[j]], with row = rows[row]."""

    out: str
    x: str
    hist: Tuple[str, ...]
    row: int


@dataclass(frozen=True)
class Noise:
    """buffers[out] = standard normal noise like x (SDE solvers, churn)."""

    out: str


@dataclass(frozen=True)
class Alias:
    """buffers[out] = buffers[src]: a second name for the same tensor, no copy (keeps a state for a corrector)."""

    out: str
    src: str


Instruction = Union[Eval, Update, Noise, Alias]


@dataclass
class Program:
    steps: List[List[Instruction]] = field(default_factory=list)
    rows: List[Tensor] = field(default_factory=list)  # each (1+K,), differentiable in the timesteps
    eval_times: Optional[Tensor] = None  # (E,) times handed to the denoiser
    nfe: int = 0

    def row(self, values: Union[Tensor, Sequence[Tensor]]) -> int:
        """Register a coefficient row [c_x, c_0, ...] (a 1-D tensor or a list of 0-dim ones); return its index."""
        if not isinstance(values, Tensor):
            values = torch.stack([torch.as_tensor(v) for v in values])
        self.rows.append(values)
        return len(self.rows) - 1

    def add_step(self, instructions: List[Instruction]) -> None:
        self.steps.append(instructions)
        self.nfe += sum(isinstance(i, Eval) for i in instructions)

    def last_uses(self) -> dict:
        """buffer name -> index (in the flat instruction list) of the last instruction that reads it."""
        last = {}
        for n, ins in enumerate(i for step in self.steps for i in step):
            if isinstance(ins, (Eval, Alias)):
                reads = (ins.src,)
            else:
                reads = (ins.x, *ins.hist) if isinstance(ins, Update) else ()
            for name in reads:
                last[name] = n
        return last


def rows_by_group(keys: Sequence, compute) -> list:
    """Per step i, the coefficient row compute(keys[i], ...) as a 1-D tensor, evaluated once per distinct key for
    all steps sharing it: compute(key, idx) gets a LongTensor of step indices and returns a list of (len(idx),)
    tensors (one per row entry). Vectorising over steps keeps the table build to a few dozen tensor ops instead of
    dozens per step. A key of None gives no row."""
    out: list = [None] * len(keys)
    groups: dict = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        mat = torch.stack(compute(key, torch.tensor(idx)), dim=1)  # (steps in group, 1+K)
        for j, i in enumerate(idx):
            out[i] = mat[j]
    return out


def multistep_orders(n_steps: int, order: int, lower_order_final: bool, final_zero: bool,
                     warmup: bool = True) -> List[int]:
    """Order used at each step: warm-up from order 1 (a multistep method has no history yet), and lower orders
    at the final steps. `lower_order_final` caps the order at the number of steps left (UniPC's and iPNDM's rule);
    a final step to sigma = 0 is always first order, because lambda is infinite there."""
    orders = []
    for i in range(n_steps):
        p = order
        if warmup:
            p = min(p, i + 1)
        if lower_order_final:
            p = min(p, n_steps - i)
        if final_zero and i == n_steps - 1:
            p = 1
        orders.append(p)
    return orders


def check_order(solver: str, order: int, allowed: Sequence[int]) -> int:
    if not isinstance(order, int) or order not in allowed:
        raise ValueError(f"order for solver {solver!r} must be one of {tuple(allowed)}, got {order!r}")
    return order
