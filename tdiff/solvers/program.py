"""A solver as a straight-line program over named buffers, built once per timestep vector.

Each solver module turns (schedule, grid, order, options) into a `Program`: per step, a short list of
instructions, plus every coefficient row the instructions use, as differentiable tensors of the timesteps. The
sampling loop (sample.py) only interprets the instructions: it calls the denoiser, converts its raw output with a
per-evaluation (p, q) row (sample.py: `to_prediction`) and calls the fused `tdiff::multistep_update` op, so there is
no solver arithmetic, no host sync and no allocation in the loop beyond the model calls and the update outputs.

Buffer names: "x" is the running sample; "D{i}" the data (x0) prediction of evaluation i; solvers may add their own
(e.g. iPNDM's "d{i}", Heun's "xp", the noise-prediction solvers' "E{i}").

Evaluation points: `eval_points[k]` is the schedule time of the sample that evaluation k sees (the grid point, or
Heun's churned point). The network is fed `eval_times[k]` (LD3's decoupled time, or diffusers' rounded integer
timestep), but its output is converted at the sample's own noise level, eval_points[k] (issue 12.1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

#: what an evaluation's output is converted to: the data prediction x0 or the noise prediction eps
TARGETS = ("x0", "eps")


@dataclass(frozen=True)
class Eval:
    """buffers[out] = the model's prediction of `target` at buffers[src], at network time eval_times[k] and
    converted at the sample's noise level eval_points[k].

    extra: further (name, target) conversions of the same model output (no extra model call). A clamp of x0
    (the denoiser's clip_x0) applies to the x0 targets only, so ("E", "eps") is the *unclipped* noise prediction
    (diffusers' DDIM with use_clipped_model_output=False)."""

    out: str
    src: str
    k: int
    target: str = "x0"
    extra: Tuple[Tuple[str, str], ...] = ()


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
    eval_points: Optional[Tensor] = None  # (E,) schedule times of the samples evaluated (where outputs convert)
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

    def evals(self) -> List[Eval]:
        """The evaluations in program order (evaluation k is the k-th)."""
        return sorted((i for step in self.steps for i in step if isinstance(i, Eval)), key=lambda e: e.k)

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


# ---------------------------------------------------------------------------------------------------------------
# Which order each step uses
# ---------------------------------------------------------------------------------------------------------------
ORDER_RULES = ("stable", "diffusers")

#: the stable rule's largest allowed growth of a step over the earlier steps its extrapolation reaches back to
STEP_RATIO_MAX = 2.0


def multistep_orders(n_steps: int, order: int, lower_order_final: bool, final_zero: bool,
                     warmup: bool = True) -> List[int]:
    """Order used at each step: warm-up from order 1 (a multistep method has no history yet), and lower orders
    at the final steps. `lower_order_final` caps the order at the number of steps left (UniPC's and iPNDM's rule
    in diffusers); a final step to sigma = 0 is always first order, because lambda is infinite there."""
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


def stable_orders(lam: Tensor, order: int, final_zero: bool, ratio_max: float = STEP_RATIO_MAX) -> List[int]:
    """The stable rule: lower the order by the size of the step in lambda, not by the count of steps.

    A p-step method extrapolates the data prediction from the p-1 earlier points over the new step h_i. Its
    divided differences carry 1/r_k, r_k = (lambda_i - lambda_{i-k})/h_i, so a step much longer than the ones
    before it multiplies the history's errors (diffusers' DPM++3 on uniform-t grids: the last step in lambda is 4x
    the one before, and the error at NFE 15 is 17x the error at NFE 12, where its under-15-steps rule happens to
    apply). Order p is used at step i only if h_i <= ratio_max * h_{i-k} for k = 1..p-1; otherwise the order
    drops until it holds (order 1 always does). A final step to sigma = 0 (h infinite) is first order. On a grid
    uniform in lambda every step keeps the full order (no lowering by count)."""
    lam = lam.detach().to(torch.float64).cpu()
    n = lam.numel() - 1
    h = (lam[1:] - lam[:-1]).tolist()
    orders = []
    for i in range(n):
        p = min(order, i + 1)
        if final_zero and i == n - 1:
            p = 1
        while p > 1 and any(not h[i] <= ratio_max * h[i - k] for k in range(1, p)):
            p -= 1
        orders.append(p)
    return orders


def check_orders(solver: str, orders, n_steps: int, allowed: Sequence[int], final_zero: bool) -> List[int]:
    """Validate an explicit per-step order list (e.g. the diffusers interop's exact sequence)."""
    if isinstance(orders, Tensor):
        orders = orders.tolist()
    if not isinstance(orders, (list, tuple)) or len(orders) != n_steps:
        raise ValueError(f"orders for solver {solver!r} must be a list of {n_steps} orders (one per step), "
                         f"got {orders!r}")
    for i, p in enumerate(orders):
        if isinstance(p, bool) or not isinstance(p, int) or p not in allowed or p > i + 1:
            raise ValueError(f"orders[{i}] for solver {solver!r} must be one of {tuple(allowed)} and at most {i + 1} "
                             f"(the outputs available at step {i}), got {p!r}")
    if final_zero and orders[-1] != 1:
        raise ValueError("the last order must be 1 with final_sigmas_type='zero' (lambda is infinite at sigma = 0)")
    return list(orders)


def choose_orders(solver: str, lam: Tensor, order: int, lower_order_final: bool, order_rule: str,
                  final_zero: bool, diffusers_rule, orders=None, allowed: Sequence[int] = (1, 2, 3)) -> List[int]:
    """Per-step orders: explicit `orders`, else the stable rule (by step size) or diffusers' rule (by count,
    `diffusers_rule(n_steps, order, lower_order_final, final_zero)`); lower_order_final=False disables lowering."""
    n = lam.numel() - 1
    if orders is not None:
        return check_orders(solver, orders, n, allowed, final_zero)
    check_choice("order_rule", order_rule, ORDER_RULES)
    if order_rule == "diffusers":
        return diffusers_rule(n, order, lower_order_final, final_zero)
    if not lower_order_final:
        return multistep_orders(n, order, False, final_zero)
    return stable_orders(lam, order, final_zero)


def check_order(solver: str, order: int, allowed: Sequence[int]) -> int:
    if isinstance(order, bool) or not isinstance(order, int) or order not in allowed:
        raise ValueError(f"order for solver {solver!r} must be one of {tuple(allowed)}, got {order!r}")
    return order


def check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
