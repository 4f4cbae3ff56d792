"""A solver as a straight-line program over named buffers, built once per timestep vector.

Each solver module turns (schedule, grid, order, options) into a `Program`: per step, a short list of
instructions, plus every coefficient row the instructions use, as differentiable tensors of the timesteps. The
sampling loop (sample.py) only interprets the instructions: it calls the denoiser and calls the fused
`tdiff::multistep_update` op, which also converts the raw output with a per-evaluation (p, q) row, so there is
no solver arithmetic, no host sync and no allocation in the loop beyond the model calls and the update outputs.

Buffer names: "x" is the running sample; "D{i}" the data (x0) prediction of evaluation i; solvers may add their own
(e.g. iPNDM's "d{i}", Heun's "xp", the noise-prediction solvers' "E{i}").

Structure: the instructions depend only on the run's structure (per-step orders, noise, ...), never on the time
steps' values; the builders cache them by that structure (`Structure`) and compute the rows in every call.

Evaluation points: `eval_points[k]` is the schedule time of the sample that evaluation k sees (the grid point, or
Heun's churned point). The network is fed `eval_times[k]` (LD3's decoupled time, or diffusers' rounded integer
timestep), but its output is converted at the sample's own noise level, eval_points[k] (issue 12.1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import arrays

#: what an evaluation's output is converted to: the data prediction x0 or the noise prediction eps
TARGETS = ("x0", "eps")


class Eval(NamedTuple):
    """buffers[out] = the model's prediction of `target` at buffers[src], at network time eval_times[k] and
    converted at the sample's noise level eval_points[k].

    extra: further (name, target) conversions of the same model output (no extra model call). A clamp of x0
    (the denoiser's clip_x0) applies to the x0 targets only, so ("E", "eps") is the *unclipped* noise prediction
    (diffusers' DDIM with use_clipped_model_output=False).

    The instructions are named tuples (immutable, as the frozen dataclasses they were): a program is built inside
    every `tdiff.sample` call, and a tuple is the cheapest immutable record to build. Their lengths differ, so no
    two kinds compare equal."""

    out: str
    src: str
    k: int
    target: str = "x0"
    extra: Tuple[Tuple[str, str], ...] = ()


class Update(NamedTuple):
    """buffers[out] = row[0] buffers[x] + sum_j row[j+1] buffers[hist[j]], with row = rows[row]."""

    out: str
    x: str
    hist: Tuple[str, ...]
    row: int


class Noise(NamedTuple):
    """buffers[out] = standard normal noise like x (SDE solvers, churn)."""

    out: str


class Alias(NamedTuple):
    """buffers[out] = buffers[src]: a second name for the same tensor, no copy (keeps a state for a corrector)."""

    out: str
    src: str


Instruction = Union[Eval, Update, Noise, Alias]


@dataclass(frozen=True, eq=False)
class Structure:
    """A program's instructions and what follows from them alone, built once per structure and shared by every
    Program of that structure (never mutated).

    Why: `tdiff.sample` builds its program inside every call, and writing out ~40 instructions and their buffer
    lifetimes is a large share of that build at 1x4x32x32. The instructions depend only on the structure of the
    run (the solver, the order of each step, which steps add noise, ...), never on the values of the time steps,
    so the builders cache them by that structure (functools.lru_cache on a function of it, `structure`); the rows,
    which do depend on the values, are computed in every call. A cached structure is correct for every input of
    that structure: nothing keyed on input values is cached.

    derived: further structure the sampling loop computes from the instructions alone (its conversion plan), by
    what else it depends on."""

    steps: tuple  # per step, a tuple of instructions
    nfe: int
    frees: tuple  # per instruction (flat index), the buffers nobody reads after it (Program.frees)
    evals: tuple  # the evaluations in program order
    derived: dict = field(default_factory=dict)

    def row_widths(self) -> dict:
        """width -> the indices of the rows of that width (row r is read by the Update with row = r, and its width
        is 1 + the length of that Update's history)."""
        if "row_widths" not in self.derived:
            by_width: dict = {}
            for ins in sorted((i for step in self.steps for i in step if type(i) is Update), key=lambda u: u.row):
                by_width.setdefault(1 + len(ins.hist), []).append(ins.row)
            self.derived["row_widths"] = by_width
        return self.derived["row_widths"]


def structure(steps) -> Structure:
    """The Structure of a list of steps (each a list of instructions)."""
    steps = tuple(tuple(step) for step in steps)
    flat = [i for step in steps for i in step]
    evals = tuple(sorted((i for i in flat if type(i) is Eval), key=lambda e: e.k))
    return Structure(steps, len(evals), _frees(flat), evals)


@dataclass
class Program:
    steps: List[List[Instruction]] = field(default_factory=list)
    # the coefficient rows (the `rows` property): each (1+K,), differentiable in the timesteps
    _rows: List[Tensor] = field(default_factory=list, repr=False)
    eval_times: Optional[Tensor] = None  # (E,) times handed to the denoiser
    eval_points: Optional[Tensor] = None  # (E,) schedule times of the samples evaluated (where outputs convert)
    # (alpha, sigma) host arrays at eval_points[:len(alpha)] when the grid knows them (Grid.points), else None
    eval_alpha_sigma: Optional[tuple] = None
    nfe: int = 0
    #: the shared instructions when the program was built from a cached Structure (then steps is its tuple)
    structure: Optional[Structure] = None

    @classmethod
    def of(cls, struct: Structure, rows: list, **kw) -> "Program":
        """A program with a cached structure's instructions and these rows (row r is what Update.row = r reads)."""
        return cls(steps=struct.steps, _rows=list(rows), nfe=struct.nfe, structure=struct, **kw)

    @classmethod
    def of_groups(cls, struct: Structure, groups: list, **kw) -> "Program":
        """`of` with the rows given as [(row indices, matrix)] (`mixed_groups`), row k of a matrix being the row of
        index idx[k]. Host (numpy) matrices are kept as they are until the rows are read (`rows`: one row view
        each) or sealed (`seal_rows` takes float64 (rows, width) matrices as its groups, without a row view each);
        tensors (the differentiable path) become one row view each now."""
        n = sum(len(idx) for idx, _ in groups)
        if all(type(mat) is np.ndarray for _, mat in groups):
            prog = cls(steps=struct.steps, _rows=[None] * n, nfe=struct.nfe, structure=struct, **kw)
            prog._built_groups = groups
            return prog
        return cls.of(struct, rows_of_groups(groups, n), **kw)

    @property
    def rows(self) -> List[Tensor]:
        """The coefficient rows as float64 tensors (numpy arrays where built on the host and not sealed). Rows
        sealed on the host (`seal_rows`) become tensors here, at the first read: the sampling loop reads the host
        matrices (`row_groups`) and never needs them."""
        built = getattr(self, "_built_groups", None)
        if built is not None:  # of_groups' host matrices, not sealed: a numpy row view each
            self._built_groups = None
            self._rows[:] = rows_of_groups(built, len(self._rows))
        host = getattr(self, "_host_groups", None)
        if host is not None and host[1] is None:
            for idx, mat in host[0]:  # one conversion per width (a matrix may be a transposed view)
                for r, row in zip(idx, torch.from_numpy(np.ascontiguousarray(mat)).unbind(0)):
                    self._rows[r] = row
            self._host_groups = (host[0], list(self._rows))
        return self._rows

    @rows.setter
    def rows(self, rows: List[Tensor]) -> None:
        self._rows, self._host_groups, self._built_groups = rows, None, None

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def row(self, values: Union[Tensor, Sequence[Tensor]]) -> int:
        """Register a coefficient row [c_x, c_0, ...] (a 1-D tensor or a list of 0-dim ones; or the same as numpy
        float64 from a host grid, then sealed by `seal_rows`); return its index."""
        if type(values) is not np.ndarray and not isinstance(values, Tensor):
            if any(isinstance(v, Tensor) for v in values):
                values = torch.stack([torch.as_tensor(v) for v in values])
            else:
                values = np.asarray(values, dtype=np.float64)
        self.rows.append(values)
        return len(self.rows) - 1

    def seal_rows(self) -> "Program":
        """Group the rows built on the host (numpy) by width into (rows, width) float64 matrices, each row to be a
        view of its width's matrix. When every row was built on the host, the matrices are kept for `row_groups`
        and the rows become tensors only when `rows` is read; otherwise they are converted now (rows that are
        tensors already are kept)."""
        built = getattr(self, "_built_groups", None)
        if built is not None and all(mat.ndim == 2 and mat.dtype == np.float64 for _, mat in built):
            self._built_groups, self._host_groups = None, (built, None)  # of_groups' matrices are the groups
            return self
        rows = self.rows
        if self.structure is not None and all(type(row) is np.ndarray for row in rows):
            by_width = self.structure.row_widths()  # every row is host-built, and its width is structural
        else:
            by_width = {}
            for r, row in enumerate(rows):
                if type(row) is np.ndarray:
                    by_width.setdefault(len(row), []).append(r)
        groups = [(idx, np.array([rows[r] for r in idx], dtype=np.float64)) for idx in by_width.values()]
        self._host_groups = (groups, None)  # None: not converted yet
        if sum(map(len, by_width.values())) != len(rows):
            self.rows  # noqa: B018 (convert now: a mixed program's row_groups stacks its tensors)
            self._host_groups = None
        return self

    def row_groups(self) -> list:
        """The rows grouped by width: [(row indices, (rows, width) float64 matrix)], the matrix a numpy array when
        the program was built on the host (and its rows not replaced since), else a tensor (differentiable)."""
        if getattr(self, "_built_groups", None) is not None:
            self.rows  # noqa: B018 (not sealed: the rows one by one)
        sealed = getattr(self, "_host_groups", None)
        if sealed is not None and (sealed[1] is None or (len(sealed[1]) == len(self._rows) and all(
                a is b for a, b in zip(sealed[1], self._rows)))):
            return sealed[0]
        by_width: dict = {}
        for r, row in enumerate(self.rows):
            by_width.setdefault(row.numel(), []).append(r)
        return [(idx, torch.stack([self.rows[r] for r in idx])) for idx in by_width.values()]

    def add_step(self, instructions: List[Instruction]) -> None:
        self.steps.append(instructions)
        for ins in instructions:
            if type(ins) is Eval:
                self.nfe += 1

    def evals(self) -> List[Eval]:
        """The evaluations in program order (evaluation k is the k-th)."""
        if self.structure is not None:
            return list(self.structure.evals)
        return sorted((i for step in self.steps for i in step if type(i) is Eval), key=lambda e: e.k)

    def frees(self) -> List[Tuple[str, ...]]:
        """Per instruction (flat index n), the buffers nobody reads after it: those it reads or writes whose last
        read is at or before n ("x", the result, excepted). Cached: the program is fixed once built (and shared
        by every program of a cached Structure)."""
        if self.structure is not None:
            return self.structure.frees
        if getattr(self, "_frees", None) is None:
            self._frees = _frees([i for step in self.steps for i in step])
        return self._frees


def _frees(flat: list) -> tuple:
    """Program.frees of the flat instruction list. A buffer is always freed at its last read, or at its write when
    nothing reads it later, so only those two need checking: two linear passes (reads, then the frees)."""
    touched = []  # per instruction: the names it writes and reads, in that order
    last = {}
    for n, ins in enumerate(flat):
        read = _reads(ins)
        for name in read:
            last[name] = n
        names = (ins.out, *read, *(name for name, _ in ins.extra)) if type(ins) is Eval else (ins.out, *read)
        touched.append(names)
    out = []
    for n, names in enumerate(touched):
        free = [k for k in names if k != "x" and last.get(k, -1) <= n]
        out.append(tuple(dict.fromkeys(free)) if len(free) > 1 else tuple(free))
    return tuple(out)


def _reads(ins) -> tuple:
    """The buffers an instruction reads."""
    kind = type(ins)
    if kind is Update:
        return (ins.x, *ins.hist)
    return (ins.src,) if kind is Eval or kind is Alias else ()


# ---------------------------------------------------------------------------------------------------------------
# Which order each step uses
# ---------------------------------------------------------------------------------------------------------------
ORDER_RULES = ("stable", "diffusers")

#: the stable rule: order p is used in full for steps up to STABLE_H[p][0] in lambda, not at all from STABLE_H[p][1],
#: blended with the first-order update between (weight `ramp`, a smoothstep)
STABLE_H = {2: (0.3, 1.5), 3: (0.3, 1.5), 4: (0.3, 1.5)}
#: ... but for these (solver, order): with (0.3, 1.5), UniPC-2's first- and second-order errors cancel at NFE 16-18
#: on quadratic-t grids and its error rises 1.18x after that dip (1024 samples of noise seed 0)
STABLE_H_SOLVER = {("unipc", 2): (0.1, 1.5)}
#: ... and only while a step is at most STABLE_RATIO[0] times the earlier steps that order reaches back to (none
#: from STABLE_RATIO[1] times)
STABLE_RATIO = (1.5, 3.0)


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


def ramp(v, lo, hi):
    """1 for v <= lo, 0 for v >= hi, smoothstep s^2 (3 - 2 s) between, s = (hi - v)/(hi - lo) (differentiable in v).

    Why not linear: the blend u = a u_p + (1 - a) u_1 owes part of its accuracy to the first-order error
    cancelling some of the order-p error. With a linear weight the share (1 - a) of the (much larger) first-order
    error falls with a finite slope up to lo, so where the two cancel the error dips and then climbs back to the
    pure order-p error as the steps shrink to lo (iPNDM-4 on logSNR-uniform grids: 1.12x over NFE 27-32; Heun's
    last step on quadratic-t grids: 1.12x). The smoothstep's zero slope at both ends lets the order-p error's own
    decrease dominate there."""
    s = arrays.clamp((hi - v) / (hi - lo), 0.0, 1.0)
    return s * s * (3 - 2 * s)


@dataclass
class OrderPlan:
    """Which update each step makes: `top[i]` is the order of step i's update; where the stable rule blends,
    step i's row is weight[i] (order top[i]) + (1 - weight[i]) (order 1), one row over the same buffers.

    weight: (N,) tensor, differentiable in the time steps, 1 where a step does not blend; None when none does.
    blend: per step, whether it blends (decided on the host, so that only those rows pay for the blend)."""

    top: List[int]
    weight: Optional[Tensor] = None
    blend: Optional[List[bool]] = None

    @classmethod
    def pure(cls, orders: Sequence[int]) -> "OrderPlan":
        return cls(list(orders))

    def first_order_at(self, i: int) -> None:
        """Make step i a plain first-order step (euler_at_final)."""
        self.top[i] = 1
        if self.blend is not None:
            self.blend[i] = False


def stable_window(solver: str, p: int) -> Tuple[float, float]:
    """(lo, hi) in lambda of the stable rule's blend for a step of order p of `solver`."""
    return STABLE_H_SOLVER.get((solver, p), STABLE_H[min(p, max(STABLE_H))])


@functools.lru_cache(maxsize=64)
def _windows(solver: str, order: int) -> tuple:
    """stable_window(solver, p) at index p, for p = 2..order (None below)."""
    return (None, None) + tuple(stable_window(solver, p) for p in range(2, order + 1))


def stable_orders(lam: Tensor, order: int, final_zero: bool, solver: str = "") -> OrderPlan:
    """The stable rule: lower the order by the size of each step in lambda, not by the count of steps.

    A q-step method extrapolates the data prediction from q-1 earlier points over the new step h_i = lambda_{i+1} -
    lambda_i. Two things make that extrapolation unreliable, and both are about the step, not about how many steps
    are left:
      - a long step: the polynomial in lambda is extrapolated over h_i, and the history's errors grow like h_i^(q-1)
        (at NFE 4-6 on any grid of a VP schedule, h_i is 2-4);
      - a step longer than those before it: the divided differences carry 1/r_k, r_k = (lambda_i - lambda_{i-k})/h_i
        (diffusers' DPM++3 on uniform-t grids: the last step in lambda is 4x the one before it, and the error at
        NFE 15 is 17x the error at NFE 12, where its under-15-steps rule happens to apply).
    Step i's update is u = a u_p + (1 - a) u_1, one linear combination of the order-p and first-order updates (so
    one row), with a = ramp(h_i; stable_window(solver, p)) * ramp(max_{k<p} h_i/h_{i-k}; STABLE_RATIO), `ramp` a
    smoothstep (its docstring says why not linear). The order falls continuously, because a switch at a threshold
    makes the error jump at the NFE where a step crosses it, and the rows stay differentiable in the time steps (a
    is a tensor of them). On a grid uniform in lambda with steps up to 0.3 (UniPC-2: 0.1) every step keeps its full
    order. A final step to sigma = 0 (h infinite) is first order.
    The thresholds and the ramp's shape were chosen on the 2-D default mixture (default_mixture_2d, VP linear, t 1
    -> 1e-3, 1024 samples of noise seed 0 only) for an error that does not grow with NFE 4-40 on any heuristic
    grid (err(n) <= 1.1 min_{m<n} err(m)): worst 1.03x there; checked, not tuned, on seeds 1 (the test; 1.07x with
    its 512 samples, 1.05x with 1024) and 2 (1.08x, 1.07x; bench/solvers' 40 curves 1.05x). diffusers' count rule
    reaches 23x on the bench's curves, and against it this rule's error is 1.24x at NFE 4-6, 1.19x at 7-12, 0.84x
    at 13-20 and 0.82x at 21-40 (geometric means over those 40 curves). Against the earlier linear ramp the mean
    error over the test's 60 curves (seed 2) is 1.01x at NFE 6, 1.02x at NFE 10 and 0.93x at NFE 20 (single curves
    0.5x-1.22x). A weight with more of order p at long steps (s (2 - s)) was 0.8x as accurate at NFE 10 but let
    ten curves rise, up to 1.6x: accuracy at NFE ~10 and a monotone error trade against each other here.
    Blending p with p-1 (a cascade) was tried earlier and let more curves rise.

    The decisions (which order, whether to blend) are made on the host from the step sizes; the blend weights of
    the blending steps are one vectorised tensor expression of the time steps (on a host grid, without gradients,
    the same `ramp` expression in floats, in the loop that decides)."""
    h = lam[1:] - lam[:-1]
    hd = arrays.tolist(h)
    n = len(hd)
    top, blend, reach, host_weights = [1] * n, [False] * n, [], []
    window = _windows(solver, order)  # by order
    host = arrays.on_host(h)
    ratio_lo, ratio_hi = STABLE_RATIO
    # step 0 (no history) and a final step to sigma = 0 are first order (the defaults above)
    for i in range(1, n - 1 if final_zero else n) if order > 1 else ():
        p = order if i >= order else i + 1
        lo, hi = window[p]
        step = hd[i]
        ratio = step / hd[i - 1]  # max over k < p of h_i / h_{i-k} (as max() keeps the first of equals)
        for k in range(2, p):
            r = step / hd[i - k]
            if r > ratio:
                ratio = r
        if step < hi and ratio < ratio_hi:  # else first order
            top[i] = p
            if not (step <= lo and ratio <= ratio_lo):
                blend[i] = True
                reach.append(i)
                if host:  # no gradient: the weight in floats here, the same formula as below; ramp is exactly 1
                    # at or below its lo ((hi - v)/(hi - lo) >= 1 in floats too), and a * 1.0 is a: not called there
                    a = ramp(step, lo, hi) if step > lo else 1.0
                    host_weights.append(a * ramp(ratio, ratio_lo, ratio_hi) if ratio > ratio_lo else a)
    if not reach:
        return OrderPlan(top)
    steps = arrays.indices(reach)
    if host:
        weight = np.ones(n)
        weight[steps] = host_weights
        return OrderPlan(top, weight, blend)
    k_max = max(top[i] for i in reach) - 1
    # the earlier steps each blending step's order reaches back to (k < p); unused slots are masked out
    back = arrays.indices([[max(i - k, 0) for k in range(1, k_max + 1)] for i in reach])
    used = np.array([[k < top[i] for k in range(1, k_max + 1)] for i in reach])
    hb = h[steps]
    ratio = arrays.amax(arrays.where(used, hb[:, None] / h[back], 0.0), 1)
    windows = [stable_window(solver, top[i]) for i in reach]
    lo = arrays.tensor(h, [w[0] for w in windows])
    hi = arrays.tensor(h, [w[1] for w in windows])
    a = ramp(hb, lo, hi) * ramp(ratio, *STABLE_RATIO)
    weight = arrays.put(arrays.ones_like(h), steps, a)
    return OrderPlan(top, weight, blend)


def mixed_rows(top: Sequence[Optional[int]], row_fn, weight: Optional[Tensor] = None,
               blend: Optional[Sequence[bool]] = None, tail: int = 0) -> list:
    """Per position i, the coefficient row of order top[i] (None: no row) as a 1-D tensor, blended where blend[i]
    with the first-order row: weight[i] row_p + (1 - weight[i]) row_1, the first-order row padded with p - 1 zeros
    just before its `tail` entries ([c_x, c_0, 0.., *tail]; a corrector's [c_x, c_new, c_0, 0..]) so the blend is
    one row over the same buffers. Each row is a view of its order's matrix (`mixed_groups`)."""
    return rows_of_groups(mixed_groups(top, row_fn, weight, blend, tail), len(top))


def rows_of_groups(groups: list, n: int) -> list:
    """The n rows of [(row indices, matrix)] groups, each row a view of its matrix (None where no group has it)."""
    out: list = [None] * n
    for idx, mat in groups:
        for r, row in zip(idx, arrays.unbind(mat, 0)):
            out[r] = row
    return out


def mixed_groups(top: Sequence[Optional[int]], row_fn, weight: Optional[Tensor] = None,
                 blend: Optional[Sequence[bool]] = None, tail: int = 0) -> list:
    """`mixed_rows` as [(positions, (len(positions), width) matrix)], one per order, row k of a matrix being the
    row of position positions[k] (Program.of_groups takes them as they are).

    row_fn(p, idx) gets an index array of positions (numpy int64) and returns a list of (len(idx),) tensors (one
    per row entry): the rows are computed once per order for all positions that use it (the first-order rows of
    the order-1 and the blending positions in one call), so a table costs a few dozen tensor ops whatever the
    number of steps. Which positions go where (`_mixed_layout`) depends only on top and blend, so it is worked out
    once per such plan."""
    need, groups = _mixed_layout(tuple(top), None if blend is None else tuple(blend))
    out = []
    first_all = None if need is None else arrays.stack(row_fn(1, need), dim=1)  # (positions, 2+tail)
    for p, idx, positions, pick, sel, at in groups:
        if p == 1:
            mat = first_all if pick is None else first_all[pick]
        else:
            mat = arrays.stack(row_fn(p, idx), dim=1)  # (positions, 1+p+tail)
            if sel is not None:  # the blending positions: rows sel of mat, first-order rows pick of first_all
                mat = blend_rows(mat, sel, weight[at][:, None], first_all[pick], tail)
        out.append((positions, mat))
    return out


def blend_rows(mat, rows, w, first, tail: int = 0):
    """mat with its rows `rows` (an index array, ascending; on the host also a slice) blended with the first-order
    rows `first`: w row + (1 - w) first, `first` padded with zeros just before its `tail` entries to mat's width. On
    the host mat is blended in place (it must be the caller's own array) and only first's columns are added (the
    padding's zeros add nothing); where `rows` is a slice or every row, without the gather and the scatter."""
    cut, pad = first.shape[1] - tail, mat.shape[1] - first.shape[1]
    if arrays.on_host(mat):
        view = type(rows) is slice
        every = view or len(rows) == len(mat)
        blended, share = (mat[rows] if view else mat if every else mat[rows]), (1 - w) * first
        blended *= w
        blended[:, :cut] += share[:, :cut]
        if tail:
            blended[:, cut + pad:] += share[:, cut:]
        if not every:
            mat[rows] = blended
        return mat
    first = arrays.cat([first[:, :cut], arrays.zeros(first, (len(rows), pad)), first[:, cut:]], dim=1)
    return arrays.put(mat, rows, w * mat[rows] + (1 - w) * first)


@functools.lru_cache(maxsize=256)
def _mixed_layout(top: tuple, blend: Optional[tuple]) -> tuple:
    """mixed_groups' bookkeeping for a plan (pure structure, cached: see Structure): (need, groups). need: the
    positions whose first-order row is computed (the order-1 and the blending ones, in order; None if none);
    groups: per order p, (p, positions as an index array, positions as a list, pick, sel, at) with, for p = 1,
    pick the rows of the first-order matrix that are its rows (None: all of them, in order), and for p > 1 sel
    the rows of its matrix that blend (None if none), pick their first-order rows and at their positions."""
    orders: dict = {}
    for i, p in enumerate(top):
        if p is not None:
            orders.setdefault(p, []).append(i)
    if blend is None:
        need = orders.get(1, [])
    else:
        need = [i for i, p in enumerate(top) if p == 1 or (p is not None and p > 1 and blend[i])]
    where = {i: k for k, i in enumerate(need)}
    groups = []
    for p, positions in orders.items():
        pick = sel = at = None
        if p == 1:
            if positions != need:
                pick = arrays.indices([where[i] for i in positions])
        elif blend is not None:
            rows = [j for j, i in enumerate(positions) if blend[i]]
            if rows:
                sel = arrays.indices(rows)
                at = arrays.indices([positions[j] for j in rows])
                pick = arrays.indices([where[positions[j]] for j in rows])
        groups.append((p, arrays.indices(positions), tuple(positions), pick, sel, at))
    return (arrays.indices(need) if need else None), tuple(groups)  # shared by every call: never written to


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
                  final_zero: bool, diffusers_rule, orders=None, allowed: Sequence[int] = (1, 2, 3)) -> OrderPlan:
    """The OrderPlan: explicit `orders`, else the stable rule (by step size, `stable_orders`) or diffusers' rule
    (by count, `diffusers_rule(n_steps, order, lower_order_final, final_zero)`); lower_order_final=False disables
    lowering (but for warm-up and a final step to sigma = 0)."""
    n = len(lam) - 1
    if orders is not None:
        return OrderPlan.pure(check_orders(solver, orders, n, allowed, final_zero))
    check_choice("order_rule", order_rule, ORDER_RULES)
    if order_rule == "diffusers":
        return OrderPlan.pure(diffusers_rule(n, order, lower_order_final, final_zero))
    if not lower_order_final:
        return OrderPlan.pure(multistep_orders(n, order, False, final_zero))
    return stable_orders(lam, order, final_zero, solver)


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
