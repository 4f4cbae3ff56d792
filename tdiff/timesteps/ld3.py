"""LD3: learn a time discretisation by distilling a many-step teacher into a few-step student solve
(Tong et al. 2024, Algorithm 1, Sec. 3.3, App. B).

  data      x_T ~ N(0, sigma_T^2 I), teacher x0 = Psi_*(x_T) from `teacher_solver` at `teacher_nfe` steps.
  student   timesteps from xi (parameterisation.py), decoupled network times from xi_c, solved with `solver`
            through the rematerialised backward (remat.py), so memory does not grow with NFE.
  loss      soft teacher forcing: d(Psi_xi(x'_T), x0) with x'_T kept inside the ball ||x'_T - x_T|| <= r sigma_T,
            r = r_gamma * d / NFE^2. x'_T takes a projected SGD step (lr 12/NFE) that is kept only where it lowers
            that sample's loss. r = 0 is the hard (plain distillation) loss.
  optimiser RMSprop on xi (lr 5e-3, momentum 0.9), SGD on xi_c (lr 0.1/NFE), grad-norm clip 1.0 each, learning
            rates x0.8 after 5 validation checks without improvement. Phase 1 trains xi (and x'_T) only; phase 2
            trains xi_c too. The start is the heuristic with the lowest validation loss; the best schedule by
            validation loss is returned.
  scale-out under torch.distributed, every rank builds the same x_T, computes teacher outputs only for its own
            shard, and the xi / xi_c gradients and the loss sums are all-reduced, so W ranks with batch B give the
            result of one process with batch W*B.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from .._version import __version__
from ..integrations.diffusers.pipelines import from_pipeline, is_pipeline
from .distributed import all_reduce_sum, rank_and_world
from .heuristics import HEURISTICS, check_nfe, sampling_interval
from .learned import LearnedSchedule, model_fingerprint
from .parameterisation import StepParameterisation
from .remat import sample_remat

LOSSES = ("l2", "l1")


class LD3DivergedError(RuntimeError):
    """The student produced a non-finite loss. `.best` holds the best LearnedSchedule found before that."""

    def __init__(self, message: str, best: Optional[LearnedSchedule]):
        super().__init__(message)
        self.best = best


def _per_sample_loss(loss) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(loss):
        return loss
    if loss == "l2":
        return lambda a, b: (a - b).pow(2).flatten(1).mean(1)
    if loss == "l1":
        return lambda a, b: (a - b).abs().flatten(1).mean(1)
    raise ValueError(f"loss must be one of {LOSSES} or a callable (pred, target) -> (B,) losses, got {loss!r}")


def _project(x: Tensor, centre: Tensor, radius: float) -> Tensor:
    """The point of the ball ||x - centre|| <= radius (per sample) nearest to x."""
    d = x - centre
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = (radius / norm).clamp(max=1.0).reshape(-1, *([1] * (x.dim() - 1)))
    return centre + d * scale


def _check_args(nfe, teacher_nfe, r_gamma, r, epochs, phase1_epochs, n_train, n_val, batch_size):
    check_nfe(nfe, "nfe", minimum=2)
    check_nfe(teacher_nfe, "teacher_nfe", minimum=1)
    if teacher_nfe <= nfe:
        raise ValueError(f"teacher_nfe must be greater than the student's nfe ({nfe}), got {teacher_nfe}")
    if r_gamma < 0 or (r is not None and r < 0):
        raise ValueError(f"the ball radius must be >= 0, got r_gamma={r_gamma}, r={r}")
    check_nfe(epochs, "epochs")
    if not 0 <= phase1_epochs <= epochs:
        raise ValueError(f"phase1_epochs must be in [0, epochs={epochs}], got {phase1_epochs}")
    check_nfe(n_train, "n_train")
    check_nfe(n_val, "n_val")
    check_nfe(batch_size, "batch_size")


def ld3_learn(denoiser, schedule=None, solver: str = "unipc", order: Optional[int] = None, nfe: int = 5,
              teacher_solver: Optional[str] = None, teacher_order: Optional[int] = None, teacher_nfe: int = 20,
              teacher_timesteps: Union[str, Tensor] = "logsnr_uniform", shape=None, n_train: int = 50,
              n_val: int = 50, loss="l2", epochs: int = 7, phase1_epochs: int = 2, batch_size: int = 2,
              space: str = "time", decoupled: bool = True, r_gamma: float = 0.001, r: Optional[float] = None,
              lr_xi: float = 5e-3, lr_xi_c: Optional[float] = None, lr_x: Optional[float] = None,
              init: Union[str, Tensor] = "best", val_every: Optional[int] = None, remat: bool = True,
              t_max=None, t_min=None, dtype: torch.dtype = torch.float32, seed: int = 0,
              progress: bool = True, pipeline_kwargs: Optional[dict] = None) -> LearnedSchedule:
    """Learn N+1 timesteps (and decoupled network times) for `solver` at `nfe` model calls. See module doc.

    denoiser: D(x, t) -> x0 prediction with a .schedule (or pass schedule=).
    shape: the shape of one sample (e.g. (1, 16, 16)); required.
    teacher_timesteps: a heuristic name (see HEURISTICS) or a tensor of teacher_nfe+1 times.
    r: the ball radius factor directly (overrides r_gamma * d / nfe^2); 0 gives the hard loss.
    init: "best" (the heuristic with the lowest validation loss), a heuristic name, or a tensor of times.
    val_every: validate every this many iterations (default: once per epoch).
    A diffusers pipeline in place of the denoiser (with pipeline_kwargs, its conditioning: prompt, class_labels,
    guidance_scale, ...) learns from its network and returns a TdiffScheduler (tdiff.integrations.diffusers.pipelines).
    """
    if is_pipeline(denoiser, pipeline_kwargs):
        return from_pipeline(ld3_learn, locals())
    from ..solvers import sample
    from ..solvers.sample import DEFAULT_ORDER, SOLVERS, schedule_of

    _check_args(nfe, teacher_nfe, r_gamma, r, epochs, phase1_epochs, n_train, n_val, batch_size)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    teacher_solver = teacher_solver or solver
    order = DEFAULT_ORDER[solver] if order is None else order
    teacher_order = DEFAULT_ORDER[teacher_solver] if teacher_order is None else teacher_order
    schedule = schedule_of(denoiser, schedule)
    if shape is None:
        raise ValueError("shape (the shape of one sample, e.g. (1, 16, 16)) is required")
    shape = tuple(int(s) for s in shape)
    loss_fn = _per_sample_loss(loss)
    hi, lo = sampling_interval(schedule, t_max, t_min)
    param = StepParameterisation(schedule, nfe, hi, lo, space)
    rank, world = rank_and_world()
    dim = math.prod(shape)
    ball = (r if r is not None else r_gamma * dim / nfe**2) * float(schedule.sigma(hi))
    lr_xi_c = 0.1 / nfe if lr_xi_c is None else lr_xi_c
    lr_x = 12.0 / nfe if lr_x is None else lr_x
    started = time.perf_counter()

    # ---- data: the same x_T on every rank; teacher outputs only for this rank's shard ----
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.randn((n_train + n_val, *shape), generator=gen, dtype=torch.float64).to(dtype)
    x_all = x_all * schedule.sigma(hi).to(dtype)
    group = batch_size * world
    batches = [list(range(b, min(b + group, n_train))) for b in range(0, n_train, group)]
    mine = [b[rank * batch_size:(rank + 1) * batch_size] for b in batches]  # this rank's slice of each batch
    train_idx = sorted(i for b in mine for i in b)
    val_idx = [n_train + j for j in range(n_val) if j % world == rank]
    owned = train_idx + val_idx
    if isinstance(teacher_timesteps, str):
        if teacher_timesteps not in HEURISTICS:
            raise ValueError(f"teacher_timesteps must be one of {tuple(HEURISTICS)} or a tensor of times")
        t_teacher = HEURISTICS[teacher_timesteps](schedule, teacher_nfe, t_max=float(hi), t_min=float(lo))
    else:
        t_teacher = torch.as_tensor(teacher_timesteps, dtype=torch.float64)
        if t_teacher.numel() != teacher_nfe + 1:
            raise ValueError(f"teacher_timesteps must hold teacher_nfe+1 = {teacher_nfe + 1} times")
    target = {}
    with torch.no_grad():
        for c in range(0, len(owned), 64):
            chunk = owned[c:c + 64]
            out = sample(denoiser, x_all[chunk], t_teacher, solver=teacher_solver, order=teacher_order,
                         schedule=schedule)
            target.update(zip(chunk, out))
    if any(not bool(torch.isfinite(v).all()) for v in target.values()):
        raise ValueError("the teacher produced non-finite samples; check the denoiser and teacher settings")
    x_prime = {i: x_all[i].clone() for i in owned}  # the soft starting points x'_T

    def student(x, t, tc, grad: bool):
        run = sample_remat if (grad and remat) else sample
        return run(denoiser, x, t, solver=solver, order=order, timesteps_cond=tc, schedule=schedule)

    def stack(idx, table):
        return torch.stack([table[i] for i in idx])

    def losses(idx, t, tc, x_grad: bool):
        """Per-sample losses at the current x'_T (with a graph when anything needs a gradient), and x'_T."""
        xr = stack(idx, x_prime).detach().requires_grad_(x_grad)
        grad = x_grad or t.requires_grad
        with torch.set_grad_enabled(grad):
            per = loss_fn(student(xr, t, tc, grad=grad), stack(idx, target))
        return per, xr

    def step_x_prime(idx, xr, gx, per, t, tc) -> Tensor:
        """The projected SGD step on x'_T, kept per sample only where it lowers that sample's loss (at the current
        timesteps). Returns the per-sample losses after the step."""
        cand = _project(xr.detach() - lr_x * gx, x_all[idx], ball)
        with torch.no_grad():
            per_c = loss_fn(student(cand, t.detach(), None if tc is None else tc.detach(), grad=False),
                            stack(idx, target))
        better = per_c < per.detach()
        for j, i in enumerate(idx):
            if bool(better[j]):
                x_prime[i] = cand[j]
        return torch.where(better, per_c, per.detach())

    def times(xi, xi_c):
        t = param.timesteps(xi)
        tc = StepParameterisation.condition_times(t, xi_c) if decoupled else None
        return t, tc

    def validate(t, tc, soft: bool) -> float:
        """Mean validation loss over all ranks; with soft, after one kept-if-better step of the val x'_T."""
        total = torch.zeros(1, dtype=torch.float64)
        t, tc = t.detach(), None if tc is None else tc.detach()
        for c in range(0, len(val_idx), 64):
            idx = val_idx[c:c + 64]
            per, xr = losses(idx, t, tc, x_grad=soft and ball > 0)
            if soft and ball > 0:
                (gx,) = torch.autograd.grad(per.sum(), xr)
                per = step_x_prime(idx, xr, gx, per, t, tc)
            total += per.detach().double().sum()
        return float(all_reduce_sum(total)) / n_val

    # ---- start: the heuristic with the lowest validation loss (hard loss: x'_T = x_T) ----
    init_losses = {}
    if isinstance(init, str):
        names = list(HEURISTICS) if init == "best" else [init]
        if init != "best" and init not in HEURISTICS:
            raise ValueError(f"init must be 'best', one of {tuple(HEURISTICS)}, or a tensor of times")
        for name in names:
            t0 = HEURISTICS[name](schedule, nfe, t_max=float(hi), t_min=float(lo))
            init_losses[name] = validate(t0, None, soft=False)
        init_name = min(init_losses, key=lambda k: init_losses[k] if math.isfinite(init_losses[k]) else math.inf)
        t_init = HEURISTICS[init_name](schedule, nfe, t_max=float(hi), t_min=float(lo))
    else:
        init_name, t_init = "given", torch.as_tensor(init, dtype=torch.float64)
        if t_init.numel() != nfe + 1:
            raise ValueError(f"init must hold nfe+1 = {nfe + 1} times")
    xi = param.xi_from_timesteps(t_init).requires_grad_(True)
    xi_c = torch.zeros(nfe + 1, dtype=torch.float64, requires_grad=True)
    opt_xi = torch.optim.RMSprop([xi], lr=lr_xi, momentum=0.9)
    opt_c = torch.optim.SGD([xi_c], lr=lr_xi_c)
    plateau = [torch.optim.lr_scheduler.ReduceLROnPlateau(opt_xi, factor=0.8, patience=5, min_lr=5e-5),
               torch.optim.lr_scheduler.ReduceLROnPlateau(opt_c, factor=0.8, patience=5, min_lr=1e-6)]

    meta = {
        "schedule": schedule.config(), "solver": solver, "order": order, "nfe": nfe,
        "model_fingerprint": model_fingerprint(denoiser), "guidance": getattr(denoiser, "guidance", None),
        "tdiff_version": __version__, "space": space, "decoupled": decoupled,
        "loss": loss if isinstance(loss, str) else getattr(loss, "__name__", "callable"), "r": ball,
        "teacher": {"solver": teacher_solver, "order": teacher_order, "nfe": teacher_nfe,
                    "timesteps": teacher_timesteps if isinstance(teacher_timesteps, str) else "given"},
        "n_train": n_train, "n_val": n_val, "epochs": epochs, "batch_size": batch_size, "world_size": world,
        "seed": seed, "init": init_name, "init_val_losses": init_losses,
    }
    with torch.no_grad():
        t_best, tc_best = times(xi, xi_c)
    best_val = validate(t_best, tc_best, soft=ball > 0)
    history = [best_val]

    def result(val):
        m = dict(meta, best_val_loss=val, val_history=list(history),
                 train_seconds=round(time.perf_counter() - started, 3))
        return LearnedSchedule(t_best.detach().clone(), None if tc_best is None else tc_best.detach().clone(), m,
                               schedule)

    bar = None
    n_iters = epochs * len(batches)
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_iters, desc=f"LD3 {solver} NFE={nfe}", leave=False)
    order_gen = torch.Generator().manual_seed(seed + 1)
    it = 0
    for epoch in range(epochs):
        phase2 = epoch >= phase1_epochs
        for b in torch.randperm(len(batches), generator=order_gen).tolist():
            idx = mine[b]
            t, tc = times(xi, xi_c)
            loss_sum = torch.zeros(1, dtype=torch.float64)
            if idx:
                per, xr = losses(idx, t, tc, x_grad=ball > 0)
                obj = per.sum() / len(batches[b])  # the mean over the whole (all-rank) batch
                params = ([xi, xi_c] if decoupled else [xi]) + ([xr] if ball > 0 else [])
                got = torch.autograd.grad(obj, params, allow_unused=True)  # one backward for all three
                grads = got[:2] if decoupled else (got[0], None)
                if ball > 0:
                    step_x_prime(idx, xr, got[-1] * len(batches[b]), per, t, tc)  # per-sample gradient
                loss_sum += per.detach().double().sum()
            else:
                grads = (None, None)
            flat = torch.cat([torch.zeros_like(xi) if grads[0] is None else grads[0],
                              torch.zeros_like(xi_c) if len(grads) < 2 or grads[1] is None else grads[1],
                              loss_sum])
            flat = all_reduce_sum(flat)
            if not bool(torch.isfinite(flat).all()):
                raise LD3DivergedError(
                    f"LD3 stopped at epoch {epoch}, iteration {it}: the loss or its gradient is not finite (the "
                    f"model returned NaN/inf at these timesteps: {t.detach().tolist()}). The best schedule so far "
                    f"(validation loss {best_val:.4g}) is attached as .best", result(best_val))
            n = nfe + 1
            xi.grad, xi_c.grad = flat[:n].clone(), flat[n:2 * n].clone()
            torch.nn.utils.clip_grad_norm_([xi], 1.0)
            torch.nn.utils.clip_grad_norm_([xi_c], 1.0)
            opt_xi.step()
            if phase2 and decoupled:
                opt_c.step()
            opt_xi.zero_grad(set_to_none=True)
            opt_c.zero_grad(set_to_none=True)
            it += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=float(flat[-1]) / len(batches[b]), best_val=best_val)
            if (val_every and it % val_every == 0) or (not val_every and it % len(batches) == 0):
                with torch.no_grad():
                    tv, tcv = times(xi, xi_c)
                val = validate(tv, tcv, soft=ball > 0)
                history.append(val)
                if not math.isfinite(val):
                    raise LD3DivergedError(
                        f"LD3 stopped at epoch {epoch}: the validation loss is not finite (the model returned "
                        f"NaN/inf). The best schedule so far (validation loss {best_val:.4g}) is attached as .best",
                        result(best_val))
                if val < best_val:
                    best_val, t_best, tc_best = val, tv, tcv
                for p in plateau:
                    p.step(val)
    if bar is not None:
        bar.close()
    return result(best_val)
