"""`sample`: run a solver over a timestep vector. The loop interprets a Program (program.py) built up front.

The loop itself does no solver arithmetic: every update is one call of the fused `tdiff::multistep_update` op
with a coefficient row prepared before the loop (expanded to (B, 1+K) and made contiguous once), so it makes no
host syncs and allocates nothing beyond the denoiser's outputs and the update outputs. Nothing is detached and
nothing is updated in place, so the result is differentiable in x_T, the timesteps (through every coefficient)
and the denoiser's parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..denoisers import times_validated
from ..ops import dispatch
from ..ops.multistep_update import multistep_update
from .ddim import build_ddim
from .dpmpp import build_dpmpp
from .grid import check_timesteps, condition_times, make_grid
from .heun import build_heun
from .ipndm import build_ipndm
from .program import Alias, Eval, Noise, Program, Update
from .unipc import build_unipc

SOLVERS = ("dpmpp", "dpmpp_sde", "unipc", "ipndm", "euler", "ddim", "heun")
DEFAULT_ORDER = {"dpmpp": 2, "dpmpp_sde": 2, "unipc": 2, "ipndm": 4, "euler": 1, "ddim": 1, "heun": 2}


def schedule_of(denoiser, schedule):
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", None)
    if schedule is None:
        raise ValueError("denoiser must have a .schedule attribute (a tdiff NoiseSchedule), or pass schedule=")
    return schedule


def build_program(schedule, timesteps, solver: str = "dpmpp", order: Optional[int] = None, timesteps_cond=None,
                  final_sigmas_type: str = "sigma_min", **opts) -> Program:
    """Validate the timesteps and build the solver's program (instructions + differentiable coefficient rows)."""
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    order = DEFAULT_ORDER[solver] if order is None else order
    ts = check_timesteps(schedule, timesteps)
    # coefficients are formed in float64 whatever the timesteps' dtype: expm1(-h)/h style terms cancel badly
    # in float32 at small steps. The cast is differentiable.
    ts = ts.to(torch.float64)
    cond = condition_times(schedule, ts, timesteps_cond)
    grid = make_grid(schedule, ts, final_sigmas_type)
    if solver in ("euler", "ddim"):
        if order != 1:
            raise ValueError(f"order for solver {solver!r} must be 1, got {order!r}")
        return build_ddim(grid, cond)
    if solver in ("dpmpp", "dpmpp_sde"):
        return build_dpmpp(grid, cond, order=order, sde=solver == "dpmpp_sde", **opts)
    if solver == "unipc":
        return build_unipc(grid, cond, order=order, **opts)
    if solver == "ipndm":
        return build_ipndm(grid, cond, order=order, **opts)
    if order != 2:
        raise ValueError(f"order for solver 'heun' must be 2, got {order!r}")
    return build_heun(grid, cond, schedule=schedule, **opts)


def _unpack_timesteps(timesteps, timesteps_cond, opts: dict, solver=None, order=None):
    # a LearnedSchedule / DiffusersTimesteps (anything with .timesteps) carries the decoupled times and may carry
    # its final_sigmas_type
    if hasattr(timesteps, "timesteps") and not isinstance(timesteps, Tensor):
        if hasattr(timesteps, "check_solver"):  # a LearnedSchedule refuses a solver it was not learned for
            timesteps.check_solver(solver, order)
        if timesteps_cond is None:
            timesteps_cond = getattr(timesteps, "timesteps_cond", None)
        if getattr(timesteps, "final_sigmas_type", None) is not None:
            opts.setdefault("final_sigmas_type", timesteps.final_sigmas_type)
        timesteps = timesteps.timesteps
    return timesteps, timesteps_cond


class Sampler:
    """A solver bound to a denoiser and a timestep vector, with its coefficient tables built once.

    `Sampler(...)(x_T)` is `sample(...)`; keep the Sampler to draw many batches on the same timesteps (serving,
    benchmarks) without rebuilding the tables. The per-batch rows (expanded to B, cast to the op's dtype) are
    cached by (batch, dtype, device). Rebuild it when the timesteps change. The tables hold their autograd graph
    to the timesteps, so with timesteps that require grad, one Sampler serves one backward pass (as sample() does).
    """

    def __init__(self, denoiser, timesteps, solver: str = "dpmpp", order: Optional[int] = None, timesteps_cond=None,
                 guidance=None, progress: bool = False, schedule=None, **opts):
        timesteps, timesteps_cond = _unpack_timesteps(timesteps, timesteps_cond, opts, solver, order)
        self.denoiser = denoiser
        self.schedule = schedule_of(denoiser, schedule)
        self.program = build_program(self.schedule, timesteps, solver, order, timesteps_cond, **opts)
        self.guidance, self.progress = guidance, progress
        self._rows = {}

    @property
    def nfe(self) -> int:
        return self.program.nfe

    def __call__(self, x_T: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if not isinstance(x_T, Tensor) or x_T.dim() < 1 or x_T.shape[0] == 0:
            raise ValueError("x_T must be a tensor with a non-empty batch dimension")
        dispatch.check_float("x_T", x_T)
        key = (x_T.shape[0], x_T.dtype, x_T.device, torch.is_grad_enabled())
        if key not in self._rows:
            self._rows[key] = (_prepare_rows(self.program, x_T), self.program.eval_times.to(x_T.device))
        rows, eval_times = self._rows[key]
        scale = _prepare_scale(self.guidance, x_T)
        with times_validated():  # the program's times were checked once, when it was built
            return _run(self.program, rows, eval_times, self.denoiser, x_T, scale, self.progress, generator)


def sample(denoiser, x_T: Tensor, timesteps, solver: str = "dpmpp", order: Optional[int] = None,
           timesteps_cond=None, guidance=None, progress: bool = False, generator: Optional[torch.Generator] = None,
           schedule=None, **opts) -> Tensor:
    """Solve the probability-flow ODE (or the SDE for dpmpp_sde / Heun churn) from x_T at timesteps[0].

    denoiser: D(x, t) -> x0 prediction, with a .schedule (or pass schedule=). t is a 0-dim tensor.
    timesteps: N+1 strictly decreasing schedule times (1-D tensor), or an object with .timesteps (and optionally
        .timesteps_cond, .final_sigmas_type), e.g. a LearnedSchedule. The denoiser is called at the first N.
    solver/order: dpmpp (1, 2, 3), dpmpp_sde (1, 2), unipc (1, 2, 3), ipndm (1-4), euler / ddim (1), heun (2).
    timesteps_cond: the time handed to the denoiser instead of timesteps[i] (LD3's decoupled time); N or N+1 values.
    guidance: classifier-free guidance scale w (float or (B,) tensor). The denoiser must then return a pair
        (D_cond, D_uncond); the guided D_uncond + w (D_cond - D_uncond) is formed inside the fused update.
    generator: for the noise of dpmpp_sde and Heun's churn.
    opts: final_sigmas_type ("sigma_min": land on timesteps[-1]; "zero": land on sigma = 0),
        lower_order_final, variant ("bh1"/"bh2", unipc), use_corrector, disable_corrector (unipc),
        euler_at_final (dpmpp), s_churn, s_min, s_max, s_noise (heun).
    Differentiable in x_T, the timesteps (through every coefficient) and the denoiser's parameters.
    """
    if not isinstance(x_T, Tensor) or x_T.dim() < 1 or x_T.shape[0] == 0:
        raise ValueError("x_T must be a tensor with a non-empty batch dimension")
    dispatch.check_float("x_T", x_T)
    sampler = Sampler(denoiser, timesteps, solver, order, timesteps_cond, guidance, progress, schedule, **opts)
    return sampler(x_T, generator)


def _prepare_rows(prog: Program, x: Tensor) -> list:
    """Coefficient rows as contiguous (B, 1+K) tensors of the op's dtype, checked for NaN/inf once (one sync).
    Rows of equal width are cast and expanded together; each row is then a contiguous slice of its group."""
    dtype, b = dispatch.coef_dtype(x), x.shape[0]
    by_width: dict = {}
    for r, row in enumerate(prog.rows):
        by_width.setdefault(row.numel(), []).append(r)
    out: list = [None] * len(prog.rows)
    finite = []
    for idx in by_width.values():
        mat = torch.stack([prog.rows[r] for r in idx])  # (rows, 1+K)
        finite.append(torch.isfinite(mat).all())
        group = mat.to(device=x.device, dtype=dtype).unsqueeze(1).expand(-1, b, -1).contiguous()  # (rows, B, 1+K)
        for j, r in enumerate(idx):
            out[r] = group[j]
    if not bool(torch.stack(finite).all()):
        raise ValueError("the solver coefficients are not finite for these timesteps (are two steps too close, or "
                         "is a step at a point where sigma = 0?)")
    return out


def _prepare_scale(guidance, x: Tensor) -> Optional[Tensor]:
    if guidance is None:
        return None
    scale = torch.as_tensor(guidance, dtype=dispatch.coef_dtype(x), device=x.device)
    if scale.dim() == 0:
        scale = scale.expand(x.shape[0])
    if scale.shape != (x.shape[0],):
        raise ValueError(f"guidance must be a number or a ({x.shape[0]},) tensor, got shape {tuple(scale.shape)}")
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("guidance must be finite")
    return scale.contiguous()


def _run(prog: Program, rows, eval_times, denoiser, x_T, scale, progress, generator) -> Tensor:
    last_use = prog.last_uses()
    buf = {"x": x_T}
    pending = {}  # name -> (cond, uncond): guidance not yet applied (it is fused into the first update)
    steps = prog.steps
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="sampling", leave=False)
    n = 0
    for step in steps:
        for ins in step:
            if isinstance(ins, Eval):
                out = denoiser(buf[ins.src], eval_times[ins.k])
                if scale is not None:
                    if not (isinstance(out, (tuple, list)) and len(out) == 2):
                        raise ValueError("with guidance, the denoiser must return a pair (D_cond, D_uncond)")
                    pending[ins.out] = out
                else:
                    buf[ins.out] = out
            elif isinstance(ins, Update):
                buf[ins.out] = _update(ins, buf, pending, rows[ins.row], scale)
            elif isinstance(ins, Noise):
                x = buf["x"]
                buf[ins.out] = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
            elif isinstance(ins, Alias):
                buf[ins.out] = buf[ins.src]
            # free buffers nobody reads any more (the history of a multistep solver stays bounded)
            for name in [k for k in buf if k != "x" and last_use.get(k, -1) <= n]:
                del buf[name]
            n += 1
    return buf["x"]


def _guided(pair, scale: Tensor) -> Tensor:
    cond, uncond = pair
    row = torch.stack([1 - scale, scale], dim=1)  # a plain update: (1-w) uncond + w cond
    return multistep_update(uncond, [cond], row, check=False)


def _update(ins: Update, buf: dict, pending: dict, row: Tensor, scale) -> Tensor:
    for name in ins.hist[1:]:
        if name in pending:  # guidance not fused here: materialise it (not reached by the built-in solvers)
            buf[name] = _guided(pending.pop(name), scale)
    first = ins.hist[0]
    if first in pending:
        cond, uncond = pending.pop(first)
        history = [cond] + [buf[h] for h in ins.hist[1:]]
        out, buf[first] = multistep_update(buf[ins.x], history, row, uncond=uncond, scale=scale, check=False)
        return out
    return multistep_update(buf[ins.x], [buf[h] for h in ins.hist], row, check=False)
