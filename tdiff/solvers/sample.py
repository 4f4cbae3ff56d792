"""`sample`: run a solver over a timestep vector. The loop interprets a Program (program.py) built up front.

The loop does no solver arithmetic. The network's raw output m (eps, v, flow or x0; input preconditioning applied
inside the denoiser's call) converts to the data prediction D = p x_src + q m' (m' the guided output with
classifier-free guidance) with a (p, q) row computed once per run from the *sample's* grid point. Where that is
affine (no clip_x0 clamp) the conversion is fused: the loop keeps m, the sample x_src it was evaluated at and the
row (`Raw`), and the next update that reads it forms D and x_next in one pass of the fused
`tdiff::multistep_update` op (`multistep_update(x, [m, *earlier D], row, convert=pq, src=x_src, ...)`), which also
returns D to keep as history (SPEC_multistep). A clamped output, or one read as two targets (diffusers' DDIM with
use_clipped_model_output=False and a clamp; without one the Sampler builds the equal one-target step), converts in
a pass of its own (`to_prediction`), then updates. Every update uses a
coefficient row prepared before the loop (expanded to (B, 1+K) and made contiguous once). So the loop makes no host
syncs and allocates nothing beyond the denoiser's outputs, the conversions and the update outputs; eager and without
autograd, states from 1 MiB have their update outputs written into buffers the loop no longer needs (buffers.py), and
the loop runs as closures compiled once per program structure (shared by every call of that structure) that call
the C++ kernels directly (Execution.compile); those closures also update the loop's own buffers in place where
nothing else holds them (x_next over x, D over the history entry it retires). With autograd nothing is detached and
nothing is updated in place, so the result is differentiable in x_T, the timesteps (through every coefficient and
conversion row) and the denoiser's parameters.

Denoisers: a `tdiff.denoisers.Denoiser` (anything with `network_output(x, t)` and `conversion(t, target)`, and
optionally `clip_x0`) is called for its raw output and converted here; any other callable D(x, t) is taken to
return x0 (p = 0, q = 1), converted at whatever time it was given (a wrapper such as timesteps.remat's
RematDenoiser, which calls D(x, t_net), therefore converts at the network's time).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ..denoisers import Denoiser, convert, eps_coefficients, times_validated
from ..ops import dispatch
from ..schedules import NoiseSchedule
from ..ops.multistep_update import multistep_update
from ..recycled_views import RecycledViews
from . import arrays
from .buffers import BufferPool, writable
from .ddim import build_ddim, build_ddpm
from .dpmpp import build_multistep
from .grid import FINAL_SIGMAS_TYPES, check_timesteps, condition_times, host_grid
from .heun import build_heun
from .ipndm import build_ipndm
from .program import Alias, Eval, Noise, Program, Update, check_flag
from .unipc import build_unipc


@dataclass(frozen=True)
class SolverSpec:
    build: Callable  # build(grid, cond_times, order, schedule, **options) -> Program
    orders: Tuple[int, ...]
    default_order: int
    options: Tuple[str, ...]  # the keyword options the solver accepts (besides final_sigmas_type)
    stochastic: bool = False


_MULTISTEP = ("lower_order_final", "order_rule", "euler_at_final", "orders")


def _family(kind: str):
    return lambda g, cond, order, schedule, **o: build_multistep(kind, g, cond, order, **o)


SPECS = {
    "dpmpp": SolverSpec(_family("dpmpp"), (1, 2, 3), 2, _MULTISTEP + ("solver_type",)),
    "dpmpp_ab": SolverSpec(_family("dpmpp_ab"), (1, 2, 3), 3, _MULTISTEP),
    "dpmpp_sde": SolverSpec(_family("dpmpp_sde"), (1, 2, 3), 2, _MULTISTEP + ("solver_type",), True),
    "dpmsolver": SolverSpec(_family("dpmsolver"), (1, 2, 3), 2, _MULTISTEP + ("solver_type",)),
    "dpmsolver_sde": SolverSpec(_family("dpmsolver_sde"), (1, 2), 2, _MULTISTEP + ("solver_type",), True),
    "unipc": SolverSpec(lambda g, cond, order, schedule, **o: build_unipc(g, cond, order, **o), (1, 2, 3), 2,
                        ("variant", "lower_order_final", "order_rule", "use_corrector", "disable_corrector",
                         "final_corrector", "orders")),
    "ipndm": SolverSpec(lambda g, cond, order, schedule, **o: build_ipndm(g, cond, order, **o), (1, 2, 3, 4), 4,
                        ("lower_order_final", "order_rule", "orders")),
    "euler": SolverSpec(lambda g, cond, order, schedule: build_ddim(g, cond), (1,), 1, ()),
    "ddim": SolverSpec(lambda g, cond, order, schedule, **o: build_ddim(g, cond, **o), (1,), 1,
                       ("eta", "use_clipped_model_output", "targets"), True),
    "ddpm": SolverSpec(lambda g, cond, order, schedule, **o: build_ddpm(g, cond), (1,), 1, ("targets",), True),
    "heun": SolverSpec(lambda g, cond, order, schedule, **o: build_heun(g, cond, schedule=schedule, **o), (2,), 2,
                       ("s_churn", "s_min", "s_max", "s_noise", "order_rule"), True),
}
SOLVERS = tuple(SPECS)
DEFAULT_ORDER = {name: spec.default_order for name, spec in SPECS.items()}


def schedule_of(denoiser, schedule):
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if schedule is None:
        raise ValueError("denoiser must have a .schedule attribute (a tdiff NoiseSchedule), or pass schedule=")
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
    return schedule


def check_options(solver: str, opts: dict) -> None:
    """Unknown options are refused, naming the valid ones of that solver (nothing is silently ignored)."""
    valid = SPECS[solver].options
    unknown = sorted(set(opts) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for solver {solver!r}; its options are "
                         f"{sorted(valid + ('final_sigmas_type',))}")


def build_program(schedule, timesteps, solver: str = "dpmpp", order: Optional[int] = None, timesteps_cond=None,
                  final_sigmas_type: str = "sigma_min", fused_targets: bool = False, **opts) -> Program:
    """Validate the timesteps and build the solver's program (instructions + differentiable coefficient rows).
    fused_targets: the sampling loop runs the program on a denoiser that does not clamp its x0 prediction, so a
    history that is another target of the model output (iPNDM's slopes: the eps prediction) is read off the output
    in the fused update, one update per evaluation. False (the default) keeps every evaluation's output the data
    prediction D, the form linear in the D's that tdiff.timesteps.sensitivity reads (and the clamped one)."""
    if solver not in SPECS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a tdiff NoiseSchedule, got {type(schedule).__name__}")
    spec = SPECS[solver]
    check_options(solver, opts)
    order = spec.default_order if order is None else order
    if isinstance(order, bool) or not isinstance(order, int) or order not in spec.orders:
        allowed = f"must be {spec.orders[0]}" if len(spec.orders) == 1 else f"must be one of {spec.orders}"
        raise ValueError(f"order for solver {solver!r} {allowed}, got {order!r}")
    if final_sigmas_type not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
    ts = check_timesteps(schedule, timesteps)
    # coefficients are formed in float64 whatever the timesteps' dtype: expm1(-h)/h style terms cancel badly
    # in float32 at small steps. The cast is differentiable.
    ts = ts if ts.dtype == torch.float64 else ts.to(torch.float64)
    cond = condition_times(schedule, ts, timesteps_cond)
    targets = opts.pop("targets", None)
    if "order_rule" in spec.options:
        # the public path lowers orders by step size; the builders' own default is diffusers' rule, which keeps
        # direct callers' objectives (DM-NonUniform's solver rows) smooth in the steps
        opts.setdefault("order_rule", "stable")
    check_flag("fused_targets", fused_targets)
    if solver == "ipndm":
        opts["slopes"] = "eps" if fused_targets else "x0"
    grid = host_grid(schedule, ts, final_sigmas_type, targets)  # numpy tables unless differentiated
    with np.errstate(all="ignore"):  # as torch: a non-finite coefficient is reported by the rows' check
        return spec.build(grid, cond, order, schedule, **opts).seal_rows()


def _unpack_timesteps(timesteps, timesteps_cond, solver, order, opts: dict):
    """A LearnedSchedule / DiffusersTimesteps (anything with .timesteps) carries the decoupled times and may carry
    its final_sigmas_type and, from a diffusers scheduler, the solver that reproduces it (solver, order, options;
    used when solver= is not given)."""
    if hasattr(timesteps, "timesteps") and not isinstance(timesteps, Tensor):
        obj = timesteps
        if timesteps_cond is None:
            timesteps_cond = getattr(obj, "timesteps_cond", None)
        if getattr(obj, "final_sigmas_type", None) is not None:
            opts.setdefault("final_sigmas_type", obj.final_sigmas_type)
        carried = getattr(obj, "solver", None)
        if carried is not None and solver in (None, carried):
            solver = carried
            order = getattr(obj, "order", None) if order is None else order
            for k, v in (getattr(obj, "options", None) or {}).items():
                opts.setdefault(k, v)
        if hasattr(obj, "check_solver"):  # a LearnedSchedule refuses a solver it was not learned for
            obj.check_solver(solver or "dpmpp", order)
        timesteps = obj.timesteps
    return timesteps, timesteps_cond, solver or "dpmpp", order


def _conversion_table(denoiser, schedule, prog: Program) -> Tuple[Optional[Tensor], list]:
    """Per (evaluation, target): the (p, q) row as one (R, 2) float64 tensor, differentiable in the timesteps, and
    for every Eval a list of (buffer, target, row index or None when the conversion is the identity). The rows of
    a target are computed for all its evaluations at once (a handful of tensor ops, whatever the NFE)."""
    raw = _is_raw(denoiser)
    identity_x0 = not raw or (getattr(denoiser, "prediction", None) == "x0"
                              and getattr(denoiser, "precond", None) is None)
    plan, groups = _conversion_layout(prog, identity_x0)
    tables = []
    for target, ks, at, k_max in groups:
        t = prog.eval_points[at] if type(at) is slice else prog.eval_points[torch.tensor(ks)]
        known = prog.eval_alpha_sigma
        if isinstance(denoiser, Denoiser) and known is not None and k_max < len(known[0]):
            # alpha, sigma at those points from the grid (host arrays): tdiff's Denoiser accepts them
            table = denoiser.conversion(t, target, alpha=known[0][at], sigma=known[1][at])
        elif raw:
            table = denoiser.conversion(t, target)
        else:  # an x0 callable asked for eps: eps = (x - alpha D)/sigma
            p, q = eps_coefficients(torch.zeros_like(t), torch.ones_like(t), schedule.alpha(t), schedule.sigma(t))
            table = torch.stack([p, q], dim=-1)
        tables.append(table if table.dtype == torch.float64 else table.to(torch.float64))
    return (torch.cat(tables) if len(tables) > 1 else tables[0] if tables else None), plan


def _conversion_layout(prog: Program, identity_x0: bool) -> tuple:
    """(plan, groups): per Eval the (buffer, target, conversion row index or None) entries, and per target that
    needs a conversion (target, evaluation indices, where they are in the evaluation points (a slice when they are
    0..E-1 in order, as in every built-in solver: views, no index arrays), the last one), its rows numbered in that
    order. A function of the instructions alone, so kept with a cached program.Structure."""
    key = ("conversion_layout", identity_x0)
    if prog.structure is not None and key in prog.structure.derived:
        return prog.structure.derived[key]
    evals = prog.evals()
    plan = [[(name, target, None) for name, target in ((e.out, e.target), *e.extra)] for e in evals]
    by_target: dict = {}  # target -> [(eval index, entry index)]
    for k, entries in enumerate(plan):
        for j, (_, target, _) in enumerate(entries):
            if not (target == "x0" and identity_x0):  # else p = 0, q = 1
                by_target.setdefault(target, []).append((k, j))
    groups, base = [], 0
    for target, at in by_target.items():
        for r, (k, j) in enumerate(at):
            name, target, _ = plan[k][j]
            plan[k][j] = (name, target, base + r)
        base += len(at)
        ks = tuple(evals[k].k for k, _ in at)
        groups.append((target, ks, slice(len(ks)) if ks == tuple(range(len(ks))) else list(ks), max(ks)))
    layout = tuple(tuple(entries) for entries in plan), tuple(groups)
    if prog.structure is not None:
        prog.structure.derived[key] = layout
    return layout


def _is_raw(denoiser) -> bool:
    return callable(getattr(denoiser, "network_output", None)) and callable(getattr(denoiser, "conversion", None))


HALF_DTYPES = (torch.float16, torch.bfloat16)


def _state_dtype(x_T: Tensor, state_dtype) -> torch.dtype:
    if state_dtype is None:
        return torch.float32 if x_T.dtype in HALF_DTYPES else x_T.dtype
    if state_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"state_dtype must be None, torch.float32 or torch.float64, got {state_dtype!r}")
    return state_dtype


class Sampler:
    """A solver bound to a denoiser and a timestep vector, with its coefficient tables built once.

    `Sampler(...)(x_T)` is `sample(...)`; keep the Sampler to draw many batches on the same timesteps (serving,
    benchmarks) without rebuilding the tables. The per-batch rows (expanded to B, cast to the op's dtype) are
    cached by (batch, dtype, device). Rebuild it when the timesteps change. The tables hold their autograd graph
    to the timesteps, so with timesteps that require grad, one Sampler serves one backward pass (as sample() does).
    """

    #: fuse the affine prediction conversion (and guidance) into the updates; False converts each output in a pass
    #: of its own before its update (the unfused path: the tests' oracle and the benches' comparison)
    fuse: bool = True
    #: let eager no-grad updates of states >= buffers.MIN_BYTES write into buffers the loop no longer needs
    #: (buffers.py); False allocates every update's outputs afresh (the benches' comparison)
    reuse_buffers: bool = True
    #: run eager no-grad loops as precompiled closures calling the C++ kernels (Execution.compile); False
    #: interprets every instruction (the benches' comparison; results are bit-identical)
    compiled_loop: bool = True

    def __init__(self, denoiser, timesteps, solver: Optional[str] = None, order: Optional[int] = None,
                 timesteps_cond=None, guidance=None, progress: bool = False, schedule=None,
                 state_dtype: Optional[torch.dtype] = None, **opts):
        if not callable(denoiser):
            raise ValueError(f"denoiser must be callable as D(x, t), got {type(denoiser).__name__}")
        if not isinstance(progress, bool):
            raise ValueError(f"progress must be True or False, got {progress!r}")
        timesteps, timesteps_cond, solver, order = _unpack_timesteps(timesteps, timesteps_cond, solver, order, opts)
        self.denoiser = denoiser
        self.schedule = schedule_of(denoiser, schedule)
        self._clip = getattr(denoiser, "clip_x0", None) if _is_raw(denoiser) else None
        if solver == "ddim" and opts.get("use_clipped_model_output") is False and self._clip is None:
            # without a clamp, eps from the raw output is eps = (x - alpha D)/sigma, so the step is the same
            # function of (x, D): the one-target form, whose conversion fuses into the update
            opts["use_clipped_model_output"] = True
        self.program = build_program(self.schedule, timesteps, solver, order, timesteps_cond,
                                     fused_targets=self._clip is None, **opts)
        self.solver = solver
        self.guidance, self.progress, self.state_dtype = guidance, progress, state_dtype
        self._conversion, self._plan = _conversion_table(denoiser, self.schedule, self.program)
        self._call = denoiser.network_output if _is_raw(denoiser) else denoiser
        # a tdiff Denoiser gives one prepared call per evaluation (network times, input scaling: computed once)
        self._per_eval = callable(getattr(denoiser, "network_calls", None))
        self._rows = {}

    @property
    def nfe(self) -> int:
        return self.program.nfe

    def start(self, x_T: Tensor, generator=None, check_finite: bool = False) -> "Execution":
        """A run from x_T, its rows prepared for x_T's batch, dtype and device: `__call__` drives it through the
        whole program; a diffusers scheduler (tdiff.schedulers.TdiffScheduler) drives it one model call at a time."""
        _check_x(x_T)
        if not isinstance(check_finite, bool):
            raise ValueError(f"check_finite must be True or False, got {check_finite!r}")
        gens = generator if isinstance(generator, (list, tuple)) else [generator]
        if not all(g is None or isinstance(g, torch.Generator) for g in gens) or (
                isinstance(generator, (list, tuple)) and None in gens):
            raise ValueError(f"generator must be None, a torch.Generator or a list of one per sample, got "
                             f"{type(generator).__name__} {generator!r}")
        state = _state_dtype(x_T, self.state_dtype)
        x = x_T if x_T.dtype == state else x_T.to(state)  # a no-op .to costs a dispatch
        key = (x.shape[0], state, x_T.dtype, x.device, torch.is_grad_enabled())
        if key not in self._rows:
            rows, conv, eval_times = _prepare_rows(self.program, x, self._conversion)
            calls = self.denoiser.network_calls(eval_times, x_T) if self._per_eval else None
            self._rows[key] = rows, conv, eval_times, calls
        rows, conv, eval_times, calls = self._rows[key]
        return Execution(self.program, rows, eval_times, x, scale=_prepare_scale(self.guidance, x),
                         generator=generator, conv=conv, plan=self._plan, clip=self._clip, io_dtype=x_T.dtype,
                         check_finite=check_finite, fuse=self.fuse, calls=calls, reuse=self.reuse_buffers)

    def __call__(self, x_T: Tensor, generator: Optional[torch.Generator] = None,
                 check_finite: bool = False) -> Tensor:
        if not hasattr(self, "_compiled"):  # the eager loop's closures for a program without a Structure
            self._compiled = {}
        run = self.start(x_T, generator, check_finite)
        cache = self._compiled if self.compiled_loop else None
        if run.calls is not None:  # prepared calls: no validation, no per-call time arithmetic
            out = _run(run, None, self.progress, cache)
        else:
            with times_validated():  # the program's times were checked once, when it was built
                out = _run(run, self._call, self.progress, cache)
        return out if out.dtype == x_T.dtype else out.to(x_T.dtype)


def _check_x(x_T) -> None:
    if not isinstance(x_T, Tensor) or x_T.dim() < 1 or x_T.shape[0] == 0:
        raise ValueError("x_T must be a tensor with a non-empty batch dimension")
    dispatch.check_float("x_T", x_T)


def sample(denoiser, x_T: Tensor, timesteps, solver: Optional[str] = None, order: Optional[int] = None,
           timesteps_cond=None, guidance=None, progress: bool = False, generator: Optional[torch.Generator] = None,
           schedule=None, check_finite: bool = False, state_dtype: Optional[torch.dtype] = None, **opts) -> Tensor:
    """Solve the probability-flow ODE (or the SDE of a stochastic solver) from x_T at timesteps[0].

    denoiser: a tdiff Denoiser (raw network + conversion, converted here at each sample's grid point) or any
        callable D(x, t) -> x0 prediction, with a .schedule (or pass schedule=). t is a 0-dim tensor.
    timesteps: N+1 strictly decreasing schedule times (1-D tensor), or an object with .timesteps (and optionally
        .timesteps_cond, .final_sigmas_type, .solver/.order/.options), e.g. a LearnedSchedule or
        `from_diffusers_timesteps(scheduler)`. The denoiser is called at the first N.
    solver/order: dpmpp (1, 2, 3), dpmpp_ab (1, 2, 3: true order), dpmpp_sde (1, 2, 3), dpmsolver (1, 2, 3),
        dpmsolver_sde (1, 2), unipc (1, 2, 3), ipndm (1-4), euler / ddim / ddpm (1), heun (2). Default: the
        solver carried by `timesteps`, else dpmpp.
    timesteps_cond: the time handed to the denoiser instead of timesteps[i] (LD3's decoupled time); N or N+1 values.
        The output is still converted at timesteps[i], the sample's own noise level.
    guidance: classifier-free guidance scale w (float or (B,) tensor). The denoiser must then return a pair
        (cond, uncond); the guided uncond + w (cond - uncond) is formed inside the fused update.
    generator: for the noise of the stochastic solvers and Heun's churn (a list: one generator per sample, drawn
        as diffusers' randn_tensor draws them).
    check_finite: check every model output and update for NaN/inf, with one host sync at the end; raises naming
        the first step where a non-finite value appeared.
    state_dtype: the dtype of the solver state (x and the history). Default: float32 for float16/bfloat16 x_T
        (a half-precision state loses the small per-step changes at large NFE), x_T's dtype otherwise. The
        denoiser is fed x in x_T's dtype and the result is returned in x_T's dtype.
    opts: final_sigmas_type ("sigma_min": land on timesteps[-1]; "zero": land on sigma = 0) and the solver's own
        options (an unknown one is an error that lists them): lower_order_final, order_rule ("stable": lower the
        order where a step outgrows the earlier ones in lambda; "diffusers": diffusers' count rule), orders
        (explicit per-step orders), euler_at_final, solver_type ("midpoint"/"heun"), variant ("bh1"/"bh2"),
        use_corrector, disable_corrector, final_corrector (unipc), eta, use_clipped_model_output, targets
        (ddim/ddpm), s_churn, s_min, s_max, s_noise (heun).
    Differentiable in x_T, the timesteps (through every coefficient) and the denoiser's parameters.
    """
    _check_x(x_T)
    sampler = Sampler(denoiser, timesteps, solver, order, timesteps_cond, guidance, progress, schedule, state_dtype,
                      **opts)
    return sampler(x_T, generator, check_finite=check_finite)


def _prepare_rows(prog: Program, x: Tensor, conversion: Optional[Tensor] = None) -> tuple:
    """Coefficient rows as contiguous (B, 1+K) tensors of the op's dtype, the conversion rows as (B, 2), and the
    network times on x's device, all checked for NaN/inf once. Rows of equal width are cast and expanded together;
    each row is then a contiguous slice of its group. The tables built on the host (no gradient) are checked there
    and become one tensor, in one transfer and cast, that every group and the conversion rows are views of (on the
    CPU without autograd, the views of an earlier run of the same layout where nothing holds them: `_host_views`)."""
    dtype, b = dispatch.coef_dtype(x), x.shape[0]
    groups = prog.row_groups()
    out: list = [None] * prog.num_rows
    host_conv = conversion is not None and arrays.readable_on_host(conversion)
    host = [(idx, mat) for idx, mat in groups if isinstance(mat, np.ndarray)]
    if host_conv:
        host.append((None, conversion.numpy()))
    finite, host_finite, conv = [], True, None
    if host:
        # (rows, B, width) per matrix, flattened one after the other
        flat = np.concatenate([mat if b == 1 else np.repeat(mat[:, None], b, axis=1) for _, mat in host], axis=None)
        host_finite = bool(np.isfinite(flat).all())
        if x.is_cpu:
            all_views = _host_views(flat, [mat.shape for _, mat in host], b, dtype)
        else:
            table = torch.from_numpy(flat).to(device=x.device, dtype=dtype)
            all_views, offset = [], 0
            for _, mat in host:
                size = mat.size * b
                all_views.append(table[offset:offset + size].view(len(mat), b, mat.shape[1]).unbind(0))
                offset += size
        for (idx, _), views in zip(host, all_views):
            if idx is None:
                conv = list(views)
            else:  # numpy's int64 as a list index costs twice a Python int
                for r, row in zip(idx.tolist() if type(idx) is np.ndarray else idx, views):
                    out[r] = row
    for idx, mat in groups:
        if not isinstance(mat, np.ndarray):  # differentiable: cast and expanded in torch
            finite.append(torch.isfinite(mat).all())
            group = mat.to(device=x.device, dtype=dtype).unsqueeze(1).expand(-1, b, -1).contiguous()  # (rows, B, 1+K)
            for r, row in zip(idx, group.unbind(0)):  # one op for all the views
                out[r] = row
    if conversion is not None and not host_conv:
        finite.append(torch.isfinite(conversion).all())
        conv = conversion.to(device=x.device, dtype=dtype).unsqueeze(1).expand(-1, b, -1).contiguous().unbind(0)
    if not host_finite or (finite and not bool(torch.stack(finite).all())):
        raise ValueError("the solver coefficients are not finite for these timesteps (are two steps too close, is a "
                         "step at a point where sigma = 0, or does the prediction type need alpha > 0 there?)")
    times = prog.eval_times
    return out, conv, times if times.device == x.device else times.to(x.device)


#: coef_dtype's torch dtypes as numpy's
_NUMPY_COEF = {torch.float32: np.float32, torch.float64: np.float64}

#: the host tables' row views, per layout (matrix shapes, batch, dtype): see tdiff.recycled_views
_RECYCLED = RecycledViews()


def _host_views(flat: np.ndarray, shapes: list, b: int, dtype: torch.dtype) -> tuple:
    """Per (rows, width) matrix shape, its rows as (B, width) CPU tensors of dtype holding the values of `flat`
    (the float64 matrices flattened one after the other, each repeated over the batch): the views of the layout's
    last run, their table overwritten, where `RecycledViews.take` allows, else fresh ones."""
    key = (tuple(shapes), b, dtype, torch.is_inference_mode_enabled())  # inference tensors stay in inference mode
    entry = _RECYCLED.take(key)
    if entry is not None:
        table, views, users = entry
        np.copyto(table, flat, casting="same_kind")  # numpy's cast rounds as torch's does (to nearest)
    else:
        users = None
        table = flat.astype(_NUMPY_COEF[dtype], copy=False)
        views, offset = [], 0
        for n, width in shapes:
            size = n * b * width
            # each matrix a numpy view of the cast table, then a tensor (cheaper than torch slicing)
            views.append(torch.from_numpy(table[offset:offset + size].reshape(n, b, width)).unbind(0))
            offset += size
        views = tuple(views)
    del entry
    _RECYCLED.keep(key, table, views, users)
    return views


def _prepare_scale(guidance, x: Tensor) -> Optional[Tensor]:
    if guidance is None:
        return None
    if isinstance(guidance, (bool, str, bytes)) or not isinstance(guidance, (int, float, list, tuple, Tensor)):
        raise ValueError(f"guidance must be a number or a ({x.shape[0]},) tensor, got {type(guidance).__name__} "
                         f"{guidance!r}")
    scale = torch.as_tensor(guidance, dtype=dispatch.coef_dtype(x), device=x.device)
    if scale.dim() == 0:
        scale = scale.expand(x.shape[0])
    if scale.shape != (x.shape[0],):
        raise ValueError(f"guidance must be a number or a ({x.shape[0]},) tensor, got shape {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("guidance must be finite")
    return scale.contiguous()


def to_prediction(src: Tensor, m: Tensor, pq: Optional[Tensor]) -> Tensor:
    """D = p src + q m: the raw network output m at the sample src converted with the per-sample (B, 2) row pq
    (None: the identity, p = 0, q = 1), as a separate pass. The loop's unfused conversion (a clamp follows it,
    or a second target of the same output needs it; `Raw` and `_update` fuse it into the update otherwise)."""
    if pq is None:
        return m.to(src.dtype)
    return convert(src, m, pq[:, 0], pq[:, 1])


@dataclass
class Raw:
    """A model output not converted yet: the next update that reads it forms D = p src + q m' (m' = m, or
    uncond + w (m - uncond) with guidance) in its own pass and returns D to keep as history (SPEC_multistep).
    pq None: the identity conversion (only guidance is pending)."""

    m: Tensor
    uncond: Optional[Tensor]
    src: Tensor
    pq: Optional[Tensor]

    def tensors(self) -> tuple:
        return (self.m,) if self.uncond is None else (self.m, self.uncond)


def _output_parts(src: Tensor, out, guided: bool) -> tuple:
    """The model's output as (cond,) or, with guidance, (cond, uncond), each checked to be shaped like src."""
    if not guided:
        _expected(src, out, "an output")
        return (out,)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("with guidance, the denoiser must return a pair (cond, uncond)")
    for part in out:
        _expected(src, part, "a guidance output")
    return tuple(out)


def _expected(x: Tensor, out, what: str) -> None:
    if not isinstance(out, Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the denoiser returned {what} of shape {got}; expected {tuple(x.shape)} (the shape of x)")


def _run(run: "Execution", denoiser, progress: bool, cache: Optional[dict] = None) -> Tensor:
    """Drive a run through its program: as compiled closures where Execution.compile allows (cache: the
    Sampler's dict of them; None interprets), else instruction by instruction."""
    steps = run.prog.steps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    compiled = run.compile(denoiser, cache) if cache is not None else None
    if compiled is not None:  # eager, no autograd: the precompiled steps
        if not progress:
            for fn in run.flat:
                fn(run)
            return run.result()
        for s, _ in enumerate(steps):
            for fn in compiled[s]:
                fn(run)
        return run.result()
    for s, step in enumerate(steps):
        for ins in step:
            run.execute(ins, s, call=denoiser)
    return run.result()


def draw_noise(like: Tensor, generator=None) -> Tensor:
    """Standard normal noise shaped like `like`: drawn on the generator's device and moved (diffusers'
    randn_tensor convention), one sample per generator when given a list of them (one per batch row)."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            raise ValueError(f"a list of generators must hold one per sample ({like.shape[0]}), got {len(generator)}")
        return torch.cat([draw_noise(like[i:i + 1], g) for i, g in enumerate(generator)])
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, dtype=like.dtype, device=device, generator=generator).to(like.device)


class Execution:
    """One run of a Program from x_T: the named buffers and the interpreter of its instructions (conversion of the
    network's raw output, guidance, the fused update, noise). The sampling loop (`_run`) and diffusers' scheduler
    protocol (TdiffScheduler: one `step()` per Eval, the pipeline calling the network) share it, so the solver
    machinery exists once. Instructions must be executed in program order (`n` counts them)."""

    def __init__(self, prog: Program, rows, eval_times, x_T: Tensor, scale=None, generator=None, conv=None,
                 plan=None, clip=None, io_dtype=None, check_finite: bool = False, fuse: bool = True,
                 calls=None, reuse: bool = True):
        self.prog, self.rows, self.eval_times, self.fuse, self.calls = prog, rows, eval_times, fuse, calls
        self.scale, self.generator, self.conv, self.clip, self.io_dtype = scale, generator, conv, clip, io_dtype
        # a bare program: every evaluation returns x0 as is
        self.plan = plan if plan is not None else [[(e.out, e.target, None)] for e in prog.evals()]
        self.check_finite = check_finite
        self.frees = prog.frees()
        self.buf = {"x": x_T}
        # eager no-grad updates write into buffers the loop no longer needs (buffers.py); x_T itself is never one
        self.pool = BufferPool(x_T, enabled=reuse)
        self.pending = {}  # name -> Raw: conversion and guidance not yet applied (fused into the next update)
        self.flags = []  # (step, what, 0-dim bool) for check_finite
        self.n = 0  # index of the next instruction in the flat program

    def network_input(self, ins: Eval) -> Tensor:
        """The sample an Eval hands to the network, in the caller's dtype."""
        src = self.buf[ins.src]
        return src if self.io_dtype is None or self.io_dtype == src.dtype else src.to(self.io_dtype)

    def execute(self, ins, step: int, call=None, out=None) -> None:
        """Interpret the next instruction. An Eval calls calls[k](network input) (a Denoiser's calls prepared for
        this run) or call(network input, network time) for the raw output, unless the output is given (`out`: the
        network was called by someone else, a diffusers pipeline)."""
        buf = self.buf
        if isinstance(ins, Eval):
            src = buf[ins.src]
            if out is None:
                x = self.network_input(ins)
                out = call(x, self.eval_times[ins.k]) if self.calls is None else self.calls[ins.k](x)
            _store_eval(ins, src, out, self.plan[ins.k], self.conv, self.scale, self.clip, buf, self.pending,
                        self.fuse)
            if self.check_finite:
                self.flags.append((step, f"the denoiser's output at evaluation {ins.k}",
                                   _finite(buf, self.pending, ins)))
        elif isinstance(ins, Update):
            new, h0 = _update(ins, buf, self.pending, self.rows[ins.row], self.scale, self.pool)
            if h0 is not None:  # the converted output, kept as history
                self.pool.release(buf, ins.hist[0])  # a value of that name from an earlier step
                buf[ins.hist[0]] = h0
            self.pool.release(buf, ins.out)  # the value it replaces, if nothing else holds it
            buf[ins.out] = new
            del new, h0
            if self.check_finite:
                self.flags.append((step, "the solver update", torch.isfinite(buf[ins.out]).all()))
        elif isinstance(ins, Noise):
            buf[ins.out] = draw_noise(buf["x"], self.generator)
        elif isinstance(ins, Alias):
            buf[ins.out] = buf[ins.src]
        # free buffers nobody reads any more (the history of a multistep solver stays bounded)
        for name in self.frees[self.n]:
            self.pool.release(buf, name)
        self.n += 1

    def compile(self, call=None, cache: Optional[dict] = None) -> Optional[list]:
        """The whole run as one list per step of closures f(run), or None where the interpreter must run
        (autograd, torch.compile, check_finite, an unfused loop, a backend other than the C++ kernels).

        The sampling loop's per-step Python (the isinstance dispatch, the option checks, the op wrapper, the
        BufferPool's checks on small states) cost more than the fused update at 16x4x32x32 (256 KiB a tensor,
        ~20 us an update). Each closure has its instruction's names, row index and kernel bound once; it
        calls the C++ kernel directly, with the same arguments as the interpreter, so results are bit-identical.
        An evaluation whose raw output the next update reads first (every step of the built-in solvers; Heun's two)
        is one closure with that update (`_compiled_pair`): model call, converting kernel, buffer writes, with no
        record of the pending output in between. Instructions the closures do not specialise (clamped or
        two-target evaluations, noise) run through `execute`. Must be called before the first instruction runs.

        The closures read everything of this run (buffers, coefficient and conversion rows, network calls or call
        and times, guidance scale, pool) from their argument and bind only what the instructions and the key below
        decide, so they are cached on the program's Structure (shared by every program of that structure: a
        one-shot `tdiff.sample` call of a structure seen before compiles nothing) and hold no tensor, model or row
        of a run. `cache` (a Sampler's dict) keeps them for a program without a Structure."""
        if (self.n != 0 or self.check_finite or not self.fuse or torch.is_grad_enabled()
                or torch.compiler.is_compiling()):
            return None
        x = self.buf["x"]
        plain, fused = _kernels(x)
        if plain is None or fused is None:
            return None
        self.call = call  # the closures read the run's per-run data (call, calls, rows, conversion rows)
        calls, plan = self.calls, self.plan
        if calls is None and self.eval_times is not None:  # one view per network time, for call(x, time)
            self.times = self.eval_times.unbind(0)
        # prepared calls that check their own output (Denoiser.network_calls flags the list when all do)
        checked = calls is not None and (getattr(calls, "checks_output", False) or
                                          all(getattr(c, "checks_output", False) for c in calls))
        # everything the closures' choices depend on besides the instructions, never a value of this run: the
        # kernels and the conversion plan by id, both kept alive by the entry (a builtin in a key would break
        # torch.compile's tracing of a Sampler; the plan is the Structure's own, `_conversion_table`)
        key = ("compiled", id(plain), id(fused), x.dtype, x.device, self.pool.enabled,
               self.pool.out_kernel is not None, self.scale is None,
               self.io_dtype, calls is None, checked, self.clip is None, id(plan))
        struct = self.prog.structure
        shared = struct.derived if struct is not None and struct.steps is self.prog.steps else None
        for store in (cache, shared):  # the Sampler's own first: a reused Sampler hashes the key once
            hit = None if store is None else store.get(key)
            if hit is not None and hit[0] is plan and hit[1] is plain and hit[2] is fused:
                if store is shared and cache is not None:  # the Sampler's record of what its runs used
                    cache[key] = hit
                self.flat = hit[4]
                return hit[3]
        compiled, n, pending = [], 0, set()  # pending: the raw outputs an unpaired evaluation leaves
        own: set = set()  # names whose value here is a pooled output of a paired closure (BufferPool.recycle)
        for s, step in enumerate(self.prog.steps):
            fns, i = [], 0
            while i < len(step):
                ins, nxt = step[i], step[i + 1] if i + 1 < len(step) else None
                kept = self._raw_kept(ins)
                pairs = kept if kept is not None else self._identity(ins)
                if (pairs is not None and type(nxt) is Update and nxt.hist[0] == ins.out
                        and ins.out not in nxt.hist[1:] and pending.isdisjoint(nxt.hist[1:])):
                    # every built-in solver's step: an evaluation and the update that reads its output first
                    fns.append(self._compiled_pair(ins, nxt, n, pairs, checked, plain if kept is None else fused,
                                                   own, identity=kept is None))
                    i, n = i + 2, n + 2
                    continue
                if kept is not None:
                    pending.add(ins.out)
                elif type(ins) is Update:
                    pending.difference_update(ins.hist)
                own.difference_update(_writes(ins), self.frees[n])  # another writer: released with every check
                fns.append(self._compiled(ins, n, s, plain, fused))
                i, n = i + 1, n + 1
            compiled.append(fns)
        self.flat = tuple(fn for fns in compiled for fn in fns)  # the loop without a progress bar: no per-step index
        for store in (cache, shared):
            if store is not None:
                store[key] = (plan, plain, fused, compiled, self.flat)
        return compiled

    def _raw_kept(self, ins) -> Optional[tuple]:
        """(name, conversion row index or None) for an Eval whose one raw output stays pending for the next update to
        convert (and guide), else None (an instruction of another kind, a clamped or several-target evaluation,
        or an identity conversion without guidance: those run through `execute`)."""
        if type(ins) is not Eval or ins.extra or len(self.plan[ins.k]) != 1:
            return None
        name, target, r = self.plan[ins.k][0]
        if (self.clip is not None and target == "x0") or (self.scale is None and r is None):
            return None
        return name, r

    def _identity(self, ins) -> Optional[tuple]:
        """(name, None) for an Eval whose one output is the data prediction as is (an x0 callable or x0-predicting
        network, no clamp, no guidance), which `_store_eval` stores cast to the state's dtype, else None."""
        if type(ins) is not Eval or ins.extra or len(self.plan[ins.k]) != 1 or self.scale is not None:
            return None
        name, target, r = self.plan[ins.k][0]
        return (name, None) if r is None and not (self.clip is not None and target == "x0") else None

    def _compiled_pair(self, ev: Eval, up: Update, n: int, kept: tuple, checked: bool, fused, own: set,
                       identity: bool = False) -> Callable:
        """Instructions n (an evaluation whose raw output stays pending) and n + 1 (the update that reads it
        first) as one closure: the model call, then the converting C++ kernel on the raw output, with no `Raw`
        record and no `pending` entry in between (see `compile`). The same kernel arguments as the two closures
        of `_compiled`, so bit-identical. A tdiff Denoiser's prepared calls check their output's shape themselves
        (Denoiser.network_calls), so the loop checks it only for other denoisers.

        With the pool on, a buffer that an earlier paired closure wrote (`own`, tracked here in program order and
        updated for what this pair writes and frees) is handed back with `BufferPool.recycle`'s two checks; any
        other value (x_T, an interpreted instruction's output) with `release`'s full ones.

        In place (buffers.py; any size, unless reuse is off): x_next is written over x where x is such a buffer,
        and D over a freed one (the oldest history entry this update reads last), each where `writable` finds
        nothing else holding it (a model that kept its input, a view); otherwise into a fresh or pooled buffer.

        identity: the evaluation's output is D itself (`_identity`); it is stored, cast to the state's dtype, and
        the update is the plain kernel (`fused` is then the plain one), as `execute` runs the two."""
        name, r = kept
        # the evaluation's frees move after the update: but not a name the update writes (its new value stays)
        frees = tuple(dict.fromkeys((*(f for f in self.frees[n] if f not in (name, up.out)), *self.frees[n + 1])))
        # which releases may take the fast path: in the order they run (name, out_name, then the frees)
        name_own = name in own
        if identity:  # the model's output, not a pooled buffer
            own.discard(name)
        else:
            own.add(name)
        out_own = up.out in own
        own.add(up.out)
        frees_own = tuple(f for f in frees if f in own)
        frees_other = tuple(f for f in frees if f not in own)
        own.difference_update(frees)
        pooled, guided = self.pool.enabled, self.scale is not None
        state, io = self.buf["x"].dtype, self.io_dtype
        cast = io is not None and io != state
        # the run's prepared calls (then they all check their output: `checked`), or its call(x, time)
        k, prepared, checked = ev.k, self.calls is not None, checked and not guided
        src_name, x_name, rest, out_name = ev.src, up.x, up.hist[1:], up.out
        row_i, converts = up.row, r is not None
        # in place, over buffers a paired closure wrote: x_next over the value it replaces (x itself in a multistep
        # step), D over the value it replaces or else over one this pair frees, preferably one the update reads (its
        # lines are in cache); `writable` decides at run time, where buf, the local and src may hold them
        reuse = self.pool.out_kernel is not None
        o_in = out_name if reuse and out_own else None
        spare = ([name] if name_own else []) + [f for f in frees_own if f not in (name, src_name, x_name, out_name)]
        d_in = None if identity or not reuse else next((f for f in spare if f in rest), spare[0] if spare else None)
        # below the pool's size, only where every output can be in place (`_in_place`)
        in_place = o_in is not None and (identity or d_in is not None) if not pooled else \
            o_in is not None or d_in is not None
        o_holders, d_holders = 2 + (src_name == o_in), 2 + (src_name == d_in)

        # the output's dtype is known where the prepared call returns x's dtype and x is the state's
        retype = cast or not checked
        r0 = rest[0] if len(rest) == 1 else None
        rest_of = operator.itemgetter(*rest) if len(rest) > 1 else None  # a tuple of buf[h] for h in rest
        alone = not rest  # the update reads only this output

        if not (guided or pooled or identity):  # the common case, kept lean: every statement here is per step
            def evaluate_update(run):
                buf = run.buf
                src = buf[src_name]
                v = src.to(io) if cast else src
                cond = run.calls[k](v) if prepared else run.call(v, run.times[k])
                del v
                if not checked:
                    cond = _output_parts(src, cond, False)[0]
                if retype and cond.dtype != state:
                    cond = cond.to(state)
                new, h0 = _in_place(buf, o_in, o_holders, d_in, d_holders) if in_place else (None, None)
                hist = [cond] if alone else [cond, buf[r0]] if r0 is not None else \
                    [cond, *rest_of(buf)]
                # unguided and not the identity: the output converts (`_raw_kept`), so pq is a row
                x, pq, row = buf[x_name], run.conv[r], run.rows[row_i]
                try:
                    if new is None or h0 is None:  # fresh outputs (see `_in_place`)
                        new, h0 = fused(x, hist, row, None, None, src, pq)
                    else:
                        run.pool.out_kernel(x, hist, row, None, None, src, pq, new, h0)
                except (RuntimeError, TypeError, ValueError):  # the public function names the bad argument
                    multistep_update(x, hist, row, check=False, src=src, convert=pq)
                    raise
                buf[name] = h0
                buf[out_name] = new
                for f in frees:
                    buf.pop(f, None)

            return evaluate_update

        def evaluate_update(run):
            buf = run.buf
            src = buf[src_name]
            v = src.to(io) if cast else src
            out = run.calls[k](v) if prepared else run.call(v, run.times[k])
            del v
            new, h0 = _in_place(buf, o_in, o_holders, d_in, d_holders) if in_place else (None, None)
            if guided:
                cond, uncond = _output_parts(src, out, True)
                cond = cond if cond.dtype == state else cond.to(state)
                uncond = uncond if uncond.dtype == state else uncond.to(state)
                scale = run.scale
            else:
                cond = out if checked else _output_parts(src, out, False)[0]
                if retype and cond.dtype != state:
                    cond = cond.to(state)
                uncond = scale = None
            if identity:  # as `_store_eval`: D (the output as is) replaces the name's value
                buf[name] = cond
            hist = [cond] if alone else [cond, buf[r0]] if r0 is not None else \
                [cond, *rest_of(buf)]
            x, csrc, pq, row = buf[x_name], src if converts else None, run.conv[r] if converts else None, \
                run.rows[row_i]
            del out, cond, src
            try:
                if pooled:
                    pool = run.pool
                    new = pool.take() if new is None else new
                    h0 = None if identity else pool.take() if h0 is None else h0
                    pool.kernel(x, hist, row, uncond, scale, csrc, pq, new, h0)
                elif new is not None and (identity or h0 is not None):  # every output in place (see `_in_place`)
                    run.pool.out_kernel(x, hist, row, uncond, scale, csrc, pq, new, h0)
                elif identity:  # the plain kernel
                    new, h0 = fused(x, hist, row), None
                else:
                    new, h0 = fused(x, hist, row, uncond, scale, csrc, pq)
            except (RuntimeError, TypeError, ValueError):  # the public function names the bad argument
                multistep_update(x, hist, row, check=False, uncond=uncond, scale=scale, src=csrc, convert=pq)
                raise
            del x, hist, uncond, csrc  # before the releases: the pool keeps only what nothing else holds
            if pooled:
                pool = run.pool
                if h0 is not None:
                    (pool.recycle if name_own else pool.release)(buf, name)
                    buf[name] = h0
                (pool.recycle if out_own else pool.release)(buf, out_name)
                buf[out_name] = new
                del new, h0
                for f in frees_own:
                    pool.recycle(buf, f)
                for f in frees_other:
                    pool.release(buf, f)
            else:
                if h0 is not None:
                    buf[name] = h0
                buf[out_name] = new
                for f in frees:
                    buf.pop(f, None)

        return evaluate_update

    def _compiled(self, ins, n: int, step: int, plain, fused) -> Callable[["Execution"], None]:
        """Instruction number n as a closure (see `compile`)."""
        frees = tuple(self.frees[n])
        pooled, guided = self.pool.enabled, self.scale is not None
        state = self.buf["x"].dtype
        kept = self._raw_kept(ins)
        if kept is not None:  # one target, conversion (and guidance) fused into the next update: keep the raw output
            name, r = kept
            src_name, io, k, prepared = ins.src, self.io_dtype, ins.k, self.calls is not None
            cast = io is not None and io != state

            def evaluate(run):
                buf = run.buf
                src = buf[src_name]
                v = src.to(io) if cast else src
                parts = _output_parts(src, run.calls[k](v) if prepared else run.call(v, run.times[k]), guided)
                m = tuple(part if part.dtype == state else part.to(state) for part in parts)
                run.pending[name] = Raw(m[0], m[1] if guided else None, src, None if r is None else run.conv[r])
                release = run.pool.release if pooled else _drop
                for f in frees:
                    release(buf, f)

            return evaluate
        if type(ins) is Update:
            row_i, x_name, names, rest, out_name = ins.row, ins.x, ins.hist, ins.hist[1:], ins.out

            def kernel(pool, args, converted: bool):
                """(x_next, h_0 or None) from the C++ kernel, into recycled buffers when the pool is on."""
                if not pooled:
                    return fused(*args) if converted else (plain(*args), None)
                new = pool.take()
                if not converted:
                    pool.kernel(*args, None, None, None, None, new, None)
                    return new, None
                h0 = pool.take()
                pool.kernel(*args, new, h0)
                return new, h0

            def update(run):
                buf, pending, pool = run.buf, run.pending, run.pool
                release = pool.release if pooled else _drop
                for h in rest:
                    if h in pending:  # not reached by the built-in solvers
                        buf[h] = _materialise(pending.pop(h), run.scale)
                raw, row = pending.pop(names[0], None), run.rows[row_i]
                if raw is None:
                    args = (buf[x_name], [buf[h] for h in names], row)
                else:
                    args = (buf[x_name], [raw.m, *[buf[h] for h in rest]], row, raw.uncond,
                            None if raw.uncond is None else run.scale, None if raw.pq is None else raw.src, raw.pq)
                del raw
                try:
                    new, h0 = kernel(pool, args, len(args) == 7)
                except (RuntimeError, TypeError, ValueError):  # the public function names the bad argument
                    multistep_update(*args[:3], check=False,
                                     **dict(zip(("uncond", "scale", "src", "convert"), args[3:])))
                    raise
                del args  # before the releases: the pool keeps only what nothing else holds
                if h0 is not None:
                    release(buf, names[0])
                    buf[names[0]] = h0
                release(buf, out_name)
                buf[out_name] = new
                del new, h0
                for f in frees:
                    release(buf, f)

            return update

        def interpreted(run):
            run.n = n
            run.execute(ins, step, call=run.call)

        return interpreted

    def result(self) -> Tensor:
        if self.check_finite and self.flags:
            ok = torch.stack([f for _, _, f in self.flags]).tolist()  # the one host sync
            if not all(ok):
                s, what, _ = self.flags[ok.index(False)]
                raise FloatingPointError(f"sampling produced a non-finite value (NaN or inf) first at step {s} of "
                                         f"{len(self.prog.steps)}, in {what}")
        return self.buf["x"]


def _kernels(x: Tensor) -> tuple:
    """The C++ update kernels the compiled loop calls for states like x: (plain, converting), None where the C++
    backend does not serve x."""
    return dispatch.eager_kernel(x, "multistep_update_cpu"), dispatch.eager_kernel(x, "multistep_update_convert_cpu")


def _in_place(buf: dict, o_in: Optional[str], o_holders: int, d_in: Optional[str], d_holders: int) -> tuple:
    """(x_next's buffer, D's buffer) for an update in place: the values of o_in and d_in where `writable` finds
    nothing but buf, the local here and the caller's src (counted in the holders) holding them; None for a
    fresh or pooled one. Called before the caller binds them to anything else. Below the pool's size an update
    runs in place only where every output does: a buffer allocated from Python for the other one costs more
    than the in-place write saves on a small state (1x4x32x32, first order: 2.1x the floor fresh, 3x with
    x_next in place and D in a torch.empty)."""
    new = buf[o_in] if o_in is not None else None
    if new is not None and not writable(new, o_holders):
        new = None
    h0 = buf[d_in] if d_in is not None else None
    if h0 is not None and not writable(h0, d_holders):
        h0 = None
    return new, h0


def _writes(ins) -> tuple:
    """The buffers an instruction may write (an update also its first history entry: the converted output)."""
    kind = type(ins)
    if kind is Eval:
        return (ins.out, *(name for name, _ in ins.extra))
    if kind is Update:
        return (ins.out, *ins.hist)
    return (ins.out,)


def _drop(buf: dict, name: str) -> None:
    """Forget buf[name] (a small state: no pool; BufferPool.release's signature)."""
    buf.pop(name, None)


def _finite(buf: dict, pending: dict, ins: Eval) -> Tensor:
    names = (ins.out, *(name for name, _ in ins.extra))
    vals = [t for name in names for t in (pending[name].tensors() if name in pending else (buf[name],))]
    return torch.stack([torch.isfinite(v).all() for v in vals]).all()


def _store_eval(ins: Eval, src: Tensor, out, entries, conv, scale, clip, buf: dict, pending: dict,
                fuse: bool = True) -> None:
    """Store one model output for each of the targets the Eval asks for. Where the conversion is affine (no
    clamp) and the output has one target, it stays raw (`Raw`) and the next update that reads it converts and
    guides it in its own pass; otherwise it is converted here (and clamped), guidance staying pending unless a
    clamp or a second target needs the guided value now. fuse=False converts here always (the unfused path,
    kept for the clamp and as the tests' oracle)."""
    parts = _output_parts(src, out, scale is not None)
    single = not ins.extra
    for name, target, r in entries:
        pq = None if r is None else conv[r]
        clamp = clip is not None and target == "x0"
        if single and not clamp and (scale is not None or pq is not None):
            if fuse:  # the update converts (and guides): the fused path
                m = tuple(part if part.dtype == src.dtype else part.to(src.dtype) for part in parts)
                pending[name] = Raw(m[0], m[1] if scale is not None else None, src, pq)
                continue
            if scale is not None:  # converted here, guided in the update
                cond, uncond = (to_prediction(src, part, pq) for part in parts)
                pending[name] = Raw(cond, uncond, src, None)
                continue
        if scale is None:
            value = to_prediction(src, out, pq)
        else:
            value = _guided(tuple(to_prediction(src, part, pq) for part in parts), scale)
        buf[name] = value.clamp(-clip, clip) if clamp else value


def _guided(pair, scale: Tensor) -> Tensor:
    cond, uncond = pair
    row = torch.stack([1 - scale, scale], dim=1)  # a plain update: (1-w) uncond + w cond
    return multistep_update(uncond, [cond], row, check=False)


def _materialise(raw: Raw, scale) -> Tensor:
    """D of a pending output that an update does not read first (not reached by the built-in solvers)."""
    m = raw.m if raw.uncond is None else _guided((raw.m, raw.uncond), scale)
    return to_prediction(raw.src, m, raw.pq)


def _update(ins: Update, buf: dict, pending: dict, row: Tensor, scale,
            pool: Optional[BufferPool] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """(x_next, D): D is the converted output formed in the pass when the first history entry was pending, else
    None. Eager no-grad updates write into the pool's recycled buffers."""
    for name in ins.hist[1:]:
        if name in pending:
            buf[name] = _materialise(pending.pop(name), scale)
    first = ins.hist[0]
    x = buf[ins.x]
    if first in pending:  # one pass: convert (and guide) the raw output, keep D, update
        raw = pending.pop(first)
        history = [raw.m] + [buf[h] for h in ins.hist[1:]]
        kw = dict(uncond=raw.uncond, scale=None if raw.uncond is None else scale,
                  src=None if raw.pq is None else raw.src, convert=raw.pq)
        if pool is not None and pool.enabled and dispatch.fast_call(x, row, *history, *kw.values()):
            return pool.update(x, history, row, **kw)
        return multistep_update(x, history, row, check=False, **kw)
    history = [buf[h] for h in ins.hist]
    if pool is not None and pool.enabled and dispatch.fast_call(x, row, *history):
        return pool.update(x, history, row), None
    return multistep_update(x, history, row, check=False), None
