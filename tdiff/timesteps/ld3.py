"""LD3: learn a time discretisation by distilling a many-step teacher into a few-step student solve
(Tong et al. 2024, Algorithm 1, Sec. 3.3, App. B; the loop follows the reference, vinhsuhi/LD3 `trainer.py`).

  data      unit noise eps ~ N(0, I), x_T = sigma_T eps; teacher x0 = Psi_*(x_T), by default UniPC-3 on logSNR-uniform
            steps at 20 model calls (the paper's "best solver at 20 NFE"; the bench checks it against the exact ODE).
  student   N+1 times from xi (parameterisation.py) and decoupled network times from xi_c, solved with `solver`
            through the rematerialised backward (remat.py), so memory does not grow with NFE. `nfe` counts model
            calls for every solver (Heun makes two per step); the step count is read off the built solver Program.
  loss      soft teacher forcing: d(Psi_xi(sigma_T eps'), x0) with eps' inside the ball ||eps' - eps|| <= r,
            r = r_gamma * d / NFE^2 in unit-noise space (the paper's ball of radius r sigma_T around x_T). eps' takes a
            projected SGD step (lr 12/NFE), kept per sample only where it lowers that sample's loss; r = 0 is the
            hard (plain distillation) loss. d is L2 by default (see ld3_losses.py: the paper uses LPIPS).
  optimiser RMSprop on xi (lr 5e-3, momentum 0.9), SGD on xi_c (lr 0.1/NFE), gradient-norm clip 1.0 each. Phase 1
            (the first `phase1_epochs`) trains xi only, phase 2 trains xi_c too.
  loop      validation every `val_every` iterations (default 1, as the paper and the reference): the best state
            (xi, xi_c and every eps') is kept. After `patience` (5) validations without improvement the best state
            is reloaded and the learning rates decay x0.8 (floors 5e-5 and 1e-6); training stops once a decay finds
            the trained rates at their floor for the 5th time. Each epoch starts from the best xi / xi_c. At the end
            of each epoch the validation eps' take a kept-if-better step too; if none of them moved, the eps' rate
            halves. The start is the heuristic with the lowest validation loss.
  result    the best state by validation loss; if the starting schedule's validation loss at eps' = eps (what a
            fresh sample sees) is lower than the best state's, the start is returned (`metadata["returned"]`), so
            the result is never worse on validation than its initialisation.
  resume    with `checkpoint=path`, the full state is written atomically at the end of every epoch and on SIGTERM
            (then the signal is passed on, or LD3Interrupted is raised); calling ld3_learn again with the same
            arguments resumes bit-identically. A checkpoint of other settings, another model or another seed is
            refused, never overwritten.
  scale-out under torch.distributed every rank builds the same noise, computes teacher outputs only for its own
            shard, and the xi / xi_c gradients and the loss sums are all-reduced, so W ranks with batch B give the
            result of one process with batch W*B. Rank 0 writes the checkpoint (the eps' rows are gathered).

Deviations from the reference (also listed in the artefact's metadata): the L2 default loss; each sample's eps'
step uses that sample's own loss gradient (`x_grad="sample"`; the reference differentiates the batch mean, a step
lr/B per sample: `x_grad="batch_mean"` reproduces it); the kept-if-better test compares losses at the same xi
(the reference compares after its xi update); the final guard against a worse-than-start result.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Optional, Union

import torch
from torch import Tensor

from .._version import __version__
from ..artefacts import load_torch, save_torch
from ..integrations.diffusers.pipelines import from_pipeline, is_pipeline
from .distributed import all_reduce_sum, rank_and_world
from .heuristics import HEURISTICS, check_nfe, logsnr_uniform, sampling_interval
from .ld3_losses import LOSS_NOTES, resolve_loss
from .learned import LearnedSchedule, model_fingerprint
from .parameterisation import StepParameterisation
from .remat import sample_remat

CHECKPOINT_FORMAT, CHECKPOINT_VERSION = "tdiff-ld3-checkpoint", 1
#: the teacher's order when only teacher_solver is given: the highest each solver offers
TEACHER_ORDER = {"unipc": 3, "dpmpp": 3, "ipndm": 4}
X_GRADS = ("sample", "batch_mean")


class LD3DivergedError(RuntimeError):
    """The student produced a non-finite loss. `.best` holds the best LearnedSchedule found before that."""

    def __init__(self, message: str, best: Optional[LearnedSchedule]):
        super().__init__(message)
        self.best = best


class LD3Interrupted(RuntimeError):
    """SIGTERM arrived (on any rank): the state is in `.checkpoint`; call ld3_learn again with the same arguments
    to resume."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(message)
        self.checkpoint = checkpoint


def fixed_call_options(solver: str) -> dict:
    """Solver options under which the number of model calls does not depend on the steps. Heun's default (stable)
    order rule drops the correction's evaluation on long steps, so its call count moves with the grid; LD3 moves the
    grid while it learns, and `nfe` must mean the same model calls throughout, so Heun runs with diffusers' rule
    (a correction on every step but a final one to sigma = 0). The options are recorded in the LearnedSchedule, and
    `sample()` uses them with it."""
    return {"order_rule": "diffusers"} if solver == "heun" else {}


def steps_for_nfe(schedule, solver: str, order: Optional[int], nfe: int, name: str = "nfe") -> int:
    """The number of steps at which `solver` makes exactly `nfe` model calls, read off the built Program."""
    from ..solvers import build_program

    made = []
    for steps in range(1, nfe + 1):
        calls = build_program(schedule, logsnr_uniform(schedule, steps), solver, order,
                              **fixed_call_options(solver)).nfe
        if calls == nfe:
            return steps
        made.append(calls)
        if calls > nfe:
            break
    raise ValueError(f"{name}={nfe}: solver {solver!r} (order {order}) cannot make exactly {nfe} model calls; with "
                     f"1, 2, ... steps it makes {made} calls")


def _project(x: Tensor, centre: Tensor, radius: float) -> Tensor:
    """The point of the ball ||x - centre|| <= radius (per sample) nearest to x."""
    d = x - centre
    norm = d.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = (radius / norm).clamp(max=1.0).reshape(-1, *([1] * (x.dim() - 1)))
    return centre + d * scale


def _epoch_order(seed: int, epoch: int, n: int) -> list:
    # a pure function of (seed, epoch): a resumed run draws the same batch order without saving generator state
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch + 1)).tolist()


def _probe(denoiser, x: Tensor, t: Tensor) -> list:
    """A short, rounded summary of one model call, so that a checkpoint is not resumed with another (even
    analytic) denoiser; seeded, so a model with dropout gives the same summary."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        out = denoiser(x, t)
    out = (out[0] if isinstance(out, (tuple, list)) else out).double()
    return [float(f"{float(v):.6g}") for v in (out.mean(), out.norm())]


class _SigTerm:
    """Notes a SIGTERM instead of dying at once, so the loop can checkpoint first (main thread only)."""

    def __init__(self, enabled: bool):
        self.received, self.prev = False, None
        if enabled and threading.current_thread() is threading.main_thread():
            prev = signal.signal(signal.SIGTERM, self._note)
            self.prev = signal.SIG_DFL if prev is None else prev

    def _note(self, signum, frame):
        self.received = True

    def restore(self) -> None:
        if self.prev is not None:
            signal.signal(signal.SIGTERM, self.prev)
            self.prev = None


def _check_args(nfe, teacher_nfe, r_gamma, r, epochs, phase1_epochs, n_train, n_val, batch_size, val_every,
                patience, min_lr_hits, lr_decay, lr_x_decay, x_grad):
    check_nfe(nfe, "nfe", minimum=2)
    check_nfe(teacher_nfe, "teacher_nfe", minimum=1)
    if teacher_nfe <= nfe:
        raise ValueError(f"teacher_nfe must be greater than the student's nfe ({nfe}), got {teacher_nfe}")
    for name, v in (("r_gamma", r_gamma), ("r", 0.0 if r is None else r)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"the ball radius must be finite and >= 0, got {name}={v!r}")
    check_nfe(epochs, "epochs")
    if not 0 <= phase1_epochs <= epochs:
        raise ValueError(f"phase1_epochs must be in [0, epochs={epochs}], got {phase1_epochs}")
    for name, v in (("n_train", n_train), ("n_val", n_val), ("batch_size", batch_size), ("val_every", val_every),
                    ("patience", patience), ("min_lr_hits", min_lr_hits)):
        check_nfe(v, name)
    for name, v in (("lr_decay", lr_decay), ("lr_x_decay", lr_x_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    if x_grad not in X_GRADS:
        raise ValueError(f"x_grad must be one of {X_GRADS}, got {x_grad!r}")


def ld3_learn(denoiser, schedule=None, solver: str = "unipc", order: Optional[int] = None, nfe: int = 5,
              teacher_solver: str = "unipc", teacher_order: Optional[int] = None, teacher_nfe: int = 20,
              teacher_timesteps: Union[str, Tensor] = "logsnr_uniform", shape=None, n_train: int = 50,
              n_val: int = 50, loss="l2", lpips_weights: Optional[str] = None, epochs: int = 7,
              phase1_epochs: int = 2, batch_size: int = 2, space: str = "time", decoupled: bool = True,
              r_gamma: float = 0.001, r: Optional[float] = None, lr_xi: float = 5e-3, lr_xi_c: Optional[float] = None,
              lr_x: Optional[float] = None, x_grad: str = "sample", init: Union[str, Tensor] = "best",
              val_every: int = 1, patience: int = 5, lr_decay: float = 0.8, min_lr_xi: float = 5e-5,
              min_lr_xi_c: float = 1e-6, min_lr_hits: int = 5, lr_x_decay: float = 0.5,
              keep_init_if_better: bool = True, remat: bool = True, t_max=None, t_min=None,
              dtype: torch.dtype = torch.float32, seed: int = 0, checkpoint: Optional[str] = None,
              progress: bool = True, pipeline_kwargs: Optional[dict] = None) -> LearnedSchedule:
    """Learn the timesteps (and decoupled network times) for `solver` at `nfe` model calls. See the module doc.

    denoiser: D(x, t) -> x0 prediction with a .schedule (or pass schedule=).
    shape: the shape of one sample (e.g. (1, 16, 16)); required.
    teacher_solver / teacher_order / teacher_nfe / teacher_timesteps: the teacher (default UniPC-3, 20 model calls,
        logSNR-uniform); teacher_timesteps is a heuristic name (see HEURISTICS) or a tensor of times.
    loss: "l2" (default), "l1", "lpips" (needs the lpips package and local VGG weights: lpips_weights=), or
        "digits_perceptual", or a callable (pred, target) -> (B,) losses. See ld3_losses.py.
    r: the ball radius in unit-noise space directly (overrides r_gamma * d / nfe^2); 0 gives the hard loss.
    x_grad: "sample" (each eps' steps on its own loss gradient) or "batch_mean" (the reference's step).
    init: "best" (the heuristic with the lowest validation loss), a heuristic name, or a tensor of times.
    val_every / patience / lr_decay / min_lr_xi / min_lr_xi_c / min_lr_hits / lr_x_decay: the reference's loop.
    keep_init_if_better: return the start when the learned state is worse on validation at eps' = eps.
    checkpoint: a file path; the run is checkpointed there and resumed from it (see the module doc). Under
        torch.distributed every rank must see the same file (rank 0 writes it, every rank reads it on resume).

    A diffusers pipeline in place of the denoiser (with pipeline_kwargs, its conditioning: prompt, class_labels,
    guidance_scale, ...) learns from its network and returns a TdiffScheduler (tdiff.integrations.diffusers.pipelines).
    """
    if is_pipeline(denoiser, pipeline_kwargs):
        return from_pipeline(ld3_learn, locals())
    from ..solvers.sample import DEFAULT_ORDER, SOLVERS, schedule_of

    _check_args(nfe, teacher_nfe, r_gamma, r, epochs, phase1_epochs, n_train, n_val, batch_size, val_every,
                patience, min_lr_hits, lr_decay, lr_x_decay, x_grad)
    for name, s in (("solver", solver), ("teacher_solver", teacher_solver)):
        if s not in SOLVERS:
            raise ValueError(f"{name} must be one of {SOLVERS}, got {s!r}")
    if shape is None:
        raise ValueError("shape (the shape of one sample, e.g. (1, 16, 16)) is required")
    if not isinstance(shape, (tuple, list, torch.Size)) or not shape or \
            not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ValueError(f"shape must be a non-empty sequence of positive integers (one sample), got {shape!r}")
    for name, v in (("lr_xi", lr_xi), ("lr_xi_c", lr_xi_c), ("lr_x", lr_x), ("min_lr_xi", min_lr_xi),
                    ("min_lr_xi_c", min_lr_xi_c)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    order = DEFAULT_ORDER[solver] if order is None else order
    if teacher_order is None:
        teacher_order = TEACHER_ORDER.get(teacher_solver, DEFAULT_ORDER[teacher_solver])
    run = _LD3Run(denoiser, schedule_of(denoiser, schedule), locals())
    sig = _SigTerm(enabled=checkpoint is not None)
    run.sig = sig
    try:
        return run.learn()
    finally:
        sig.restore()


def _check_state(s: dict, path: str, n_times: int, data_shape) -> None:
    """The types, shapes and finiteness of a checkpoint's state (a damaged file must not resume, or return, NaN
    steps)."""
    def bad(what: str):
        raise ValueError(f"{path!r} is a damaged LD3 checkpoint: {what}")

    for key in ("epoch", "pos", "it", "bad", "min_hits"):
        if isinstance(s.get(key), bool) or not isinstance(s.get(key), int) or s[key] < 0:
            bad(f"state {key!r} must be an integer >= 0, got {s.get(key)!r}")
    for key in ("stopped", "done"):
        if not isinstance(s.get(key), bool):
            bad(f"state {key!r} must be True or False, got {s.get(key)!r}")
    for key in ("history", "x_steps"):
        if not isinstance(s.get(key), list):
            bad(f"state {key!r} must be a list, got {type(s.get(key)).__name__}")
    best = s.get("best")
    tensors = {"xi": (s.get("xi"), (n_times,)), "xi0": (s.get("xi0"), (n_times,)), "xi_c": (s.get("xi_c"), (n_times,)),
               "eps_prime": (s.get("eps_prime"), tuple(data_shape)), "target": (s.get("target"), tuple(data_shape))}
    if isinstance(best, dict) and "xi" in best:
        tensors.update({"best.xi": (best.get("xi"), (n_times,)), "best.xi_c": (best.get("xi_c"), (n_times,)),
                        "best.eps_prime": (best.get("eps_prime"), tuple(data_shape))})
    elif not isinstance(best, dict):
        bad(f"state 'best' must be a dict, got {type(best).__name__}")
    for name, (t, shape) in tensors.items():
        if not torch.is_tensor(t) or tuple(t.shape) != shape:
            bad(f"state {name!r} must be a tensor of shape {shape}, got "
                f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        if not bool(torch.isfinite(t).all()):
            bad(f"state {name!r} holds NaN or inf")


class _LD3Run:
    """One ld3_learn call: the data, the trained state and the loop (see the module doc)."""

    def __init__(self, denoiser, schedule, a: dict):
        self.denoiser, self.schedule = denoiser, schedule
        self.solver, self.order, self.nfe = a["solver"], a["order"], a["nfe"]
        self.loss_fn, self.loss_name = resolve_loss(a["loss"], a["lpips_weights"])
        self.shape = tuple(int(s) for s in a["shape"])
        self.dtype, self.seed, self.remat, self.decoupled = a["dtype"], a["seed"], a["remat"], a["decoupled"]
        self.epochs, self.phase1_epochs, self.batch_size = a["epochs"], a["phase1_epochs"], a["batch_size"]
        self.val_every, self.patience, self.lr_decay = a["val_every"], a["patience"], a["lr_decay"]
        self.min_lr_xi, self.min_lr_xi_c, self.min_lr_hits = a["min_lr_xi"], a["min_lr_xi_c"], a["min_lr_hits"]
        self.lr_x_decay, self.x_grad, self.keep_init = a["lr_x_decay"], a["x_grad"], a["keep_init_if_better"]
        self.checkpoint, self.progress, self.n_val = a["checkpoint"], a["progress"], a["n_val"]
        self.hi, self.lo = sampling_interval(schedule, a["t_max"], a["t_min"])
        self.steps = steps_for_nfe(schedule, self.solver, self.order, self.nfe)
        if self.steps < 2:
            raise ValueError(f"nfe={self.nfe} gives {self.solver} a single step, which leaves no time to learn")
        self.param = StepParameterisation(schedule, self.steps, self.hi, self.lo, a["space"])
        self.rank, self.world = rank_and_world()
        dim = math.prod(self.shape)
        self.ball = float(a["r"] if a["r"] is not None else a["r_gamma"] * dim / self.nfe**2)
        self.sigma_T = schedule.sigma(self.hi).to(self.dtype)
        self.started = time.perf_counter()

        # ---- data: the same unit noise on every rank; each rank owns a shard of the batches and of validation ----
        n_total = a["n_train"] + a["n_val"]
        gen = torch.Generator().manual_seed(self.seed)
        self.eps = torch.randn((n_total, *self.shape), generator=gen, dtype=torch.float64).to(self.dtype)
        group = self.batch_size * self.world
        self.batches = [list(range(b, min(b + group, a["n_train"]))) for b in range(0, a["n_train"], group)]
        self.mine = [b[self.rank * self.batch_size:(self.rank + 1) * self.batch_size] for b in self.batches]
        self.val_idx = [a["n_train"] + j for j in range(a["n_val"]) if j % self.world == self.rank]
        self.owned = torch.zeros(n_total, dtype=torch.bool)
        self.owned[[i for b in self.mine for i in b] + self.val_idx] = True

        # ---- teacher, init and settings (what a checkpoint must match) ----
        self.teacher = dict(solver=a["teacher_solver"], order=a["teacher_order"], nfe=a["teacher_nfe"])
        teacher_steps = steps_for_nfe(schedule, a["teacher_solver"], a["teacher_order"], a["teacher_nfe"],
                                      "teacher_nfe")
        tt = a["teacher_timesteps"]
        if isinstance(tt, str):
            if tt not in HEURISTICS:
                raise ValueError(f"teacher_timesteps must be one of {tuple(HEURISTICS)} or a tensor of times")
            self.t_teacher = HEURISTICS[tt](schedule, teacher_steps, t_max=float(self.hi), t_min=float(self.lo))
        else:
            self.t_teacher = torch.as_tensor(tt, dtype=torch.float64)
            if self.t_teacher.numel() != teacher_steps + 1:
                raise ValueError(f"teacher_timesteps must hold {teacher_steps + 1} times ({a['teacher_nfe']} model "
                                 f"calls of {a['teacher_solver']})")
        self.teacher["timesteps"] = tt if isinstance(tt, str) else self.t_teacher.tolist()
        init = a["init"]
        if isinstance(init, str):
            if init != "best" and init not in HEURISTICS:
                raise ValueError(f"init must be 'best', one of {tuple(HEURISTICS)}, or a tensor of times")
        else:
            init = torch.as_tensor(init, dtype=torch.float64)
            if init.numel() != self.steps + 1:
                raise ValueError(f"init must hold {self.steps + 1} times ({self.nfe} model calls of {self.solver})")
        self.init = init
        self.lr = dict(xi=a["lr_xi"], xi_c=0.1 / self.nfe if a["lr_xi_c"] is None else a["lr_xi_c"],
                       x=12.0 / self.nfe if a["lr_x"] is None else a["lr_x"])
        probe_x = torch.randn((1, *self.shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        probe_x = (probe_x * self.sigma_T).to(self.dtype)
        self.settings = {
            "solver": self.solver, "order": self.order, "nfe": self.nfe, "teacher": self.teacher,
            "shape": list(self.shape), "n_train": a["n_train"], "n_val": a["n_val"], "loss": self.loss_name,
            "epochs": self.epochs, "phase1_epochs": self.phase1_epochs, "batch_size": self.batch_size,
            "space": a["space"], "decoupled": self.decoupled, "r": self.ball, "lr": dict(self.lr),
            "x_grad": self.x_grad,
            "init": init if isinstance(init, str) else init.tolist(), "val_every": self.val_every,
            "patience": self.patience, "lr_decay": self.lr_decay, "min_lr": [self.min_lr_xi, self.min_lr_xi_c],
            "min_lr_hits": self.min_lr_hits, "lr_x_decay": self.lr_x_decay, "keep_init_if_better": self.keep_init,
            "remat": self.remat, "interval": [float(self.hi), float(self.lo)], "dtype": str(self.dtype),
            "seed": self.seed, "world_size": self.world, "schedule": schedule.config(),
            "model_fingerprint": model_fingerprint(denoiser), "model_probe": _probe(denoiser, probe_x, self.hi),
        }

    # ------------------------------------------------------------------------------------------------------------
    # the student and its losses
    # ------------------------------------------------------------------------------------------------------------
    def times(self, xi: Tensor, xi_c: Tensor):
        t = self.param.timesteps(xi)
        tc = StepParameterisation.condition_times(t, xi_c) if self.decoupled else None
        return t, tc

    def student(self, x, t, tc, grad: bool) -> Tensor:
        from ..solvers import sample

        run = sample_remat if (grad and self.remat) else sample
        return run(self.denoiser, x, t, solver=self.solver, order=self.order, timesteps_cond=tc,
                   schedule=self.schedule, **fixed_call_options(self.solver))

    def losses(self, idx: list, t, tc, eps_grad: bool, hard: bool = False):
        """Per-sample losses at the current eps' (or at eps when hard), with a graph when anything needs one."""
        e = (self.eps if hard else self.eps_prime)[idx].detach().requires_grad_(eps_grad)
        grad = eps_grad or t.requires_grad
        with torch.set_grad_enabled(grad):
            per = self.loss_fn(self.student(self.sigma_T * e, t, tc, grad), self.target[idx])
        return per, e

    def step_eps(self, idx: list, e: Tensor, g: Tensor, per: Tensor, t, tc, record: bool) -> int:
        """The projected SGD step on eps' (unit-noise space), kept per sample only where it lowers that sample's
        loss at the same timesteps. Returns how many moved."""
        step = self.lr_x_now * g
        if record:
            self.x_steps.extend((step.detach().flatten(1).norm(dim=1).double() / self.ball).tolist())
        cand = _project(e.detach() - step, self.eps[idx], self.ball)
        tc = None if tc is None else tc.detach()
        with torch.no_grad():
            per_c = self.loss_fn(self.student(self.sigma_T * cand, t.detach(), tc, grad=False), self.target[idx])
        better = per_c < per.detach()
        rows = torch.tensor(idx)[better]
        self.eps_prime[rows] = cand[better]
        return int(better.sum())

    def validate(self, xi: Tensor, xi_c: Tensor, hard: bool = False) -> float:
        """Mean validation loss over all ranks at the current validation eps' (or at eps when hard)."""
        total = torch.zeros(1, dtype=torch.float64)
        with torch.no_grad():
            t, tc = self.times(xi, xi_c)
        for c in range(0, len(self.val_idx), 64):
            per, _ = self.losses(self.val_idx[c:c + 64], t, tc, eps_grad=False, hard=hard)
            total += per.double().sum()
        return float(all_reduce_sum(total)) / self.n_val

    # ------------------------------------------------------------------------------------------------------------
    # set-up: teacher data and the starting point (or a checkpoint)
    # ------------------------------------------------------------------------------------------------------------
    def compute_teacher(self) -> None:
        from ..solvers import sample

        self.target = torch.zeros_like(self.eps)
        owned = self.owned.nonzero().flatten().tolist()
        with torch.no_grad():
            for c in range(0, len(owned), 64):
                chunk = owned[c:c + 64]
                self.target[chunk] = sample(self.denoiser, self.sigma_T * self.eps[chunk], self.t_teacher,
                                            solver=self.teacher["solver"], order=self.teacher["order"],
                                            schedule=self.schedule,
                                            **fixed_call_options(self.teacher["solver"])).to(self.dtype)
        if not bool(torch.isfinite(self.target[self.owned]).all()):
            raise ValueError("the teacher produced non-finite samples; check the denoiser and teacher settings")

    def start(self) -> None:
        self.compute_teacher()
        self.eps_prime = self.eps.clone()
        self.init_losses = {}
        zeros = torch.zeros(self.steps + 1, dtype=torch.float64)
        if isinstance(self.init, str):
            names = list(HEURISTICS) if self.init == "best" else [self.init]
            for name in names:
                t0 = HEURISTICS[name](self.schedule, self.steps, t_max=float(self.hi), t_min=float(self.lo))
                self.init_losses[name] = self.validate(self.param.xi_from_timesteps(t0), zeros)
            finite = {k: v for k, v in self.init_losses.items() if math.isfinite(v)}
            if not finite:
                raise ValueError(f"every starting heuristic gives a non-finite validation loss: {self.init_losses}")
            self.init_name = min(finite, key=finite.get)
            t_init = HEURISTICS[self.init_name](self.schedule, self.steps, t_max=float(self.hi), t_min=float(self.lo))
        else:
            self.init_name, t_init = "given", self.init
        self.xi0 = self.param.xi_from_timesteps(t_init)
        self.xi = self.xi0.clone().requires_grad_(True)
        self.xi_c = zeros.clone().requires_grad_(True)
        self.make_optimisers()
        self.epoch = self.pos = self.it = self.bad = self.min_hits = 0
        self.stopped, self.done = False, False
        self.lr_x_now = self.lr["x"]
        self.x_steps, self.history = [], []
        self.best = {"val": math.inf}
        self.seconds_before = 0.0
        self.examine()  # the start's validation loss (eps' = eps) is the first record and the first best
        self.init_val = self.history[0]

    def make_optimisers(self) -> None:
        self.opt_xi = torch.optim.RMSprop([self.xi], lr=self.lr["xi"], momentum=0.9)
        self.opt_c = torch.optim.SGD([self.xi_c], lr=self.lr["xi_c"])

    # ------------------------------------------------------------------------------------------------------------
    # the reference's loop
    # ------------------------------------------------------------------------------------------------------------
    def snapshot(self, val: float) -> dict:
        return {"val": val, "xi": self.xi.detach().clone(), "xi_c": self.xi_c.detach().clone(),
                "eps_prime": self.eps_prime.clone()}

    def restore_best(self, latents: bool) -> None:
        with torch.no_grad():
            self.xi.copy_(self.best["xi"])
            self.xi_c.copy_(self.best["xi_c"])
        if latents:
            self.eps_prime = self.best["eps_prime"].clone()

    def examine(self) -> None:
        """Validate; keep the best state; on patience reload it and decay the learning rates."""
        val = self.validate(self.xi, self.xi_c)
        self.history.append(val)
        if not math.isfinite(val):
            raise LD3DivergedError(
                f"LD3 stopped at epoch {self.epoch}: the validation loss is not finite (the model returned NaN/inf). "
                f"The best schedule so far (validation loss {self.best['val']:.4g}) is attached as .best",
                self.result())
        if val < self.best["val"]:
            self.best, self.bad = self.snapshot(val), 0
            return
        self.bad += 1
        if self.bad < self.patience:
            return
        self.restore_best(latents=True)
        self.bad = 0
        group = self.opt_xi.param_groups[0]
        group["lr"] = max(self.lr_decay * group["lr"], self.min_lr_xi)
        hit = group["lr"] <= self.min_lr_xi and not self.decoupled
        if self.decoupled and self.epoch >= self.phase1_epochs:
            group = self.opt_c.param_groups[0]
            group["lr"] = max(self.lr_decay * group["lr"], self.min_lr_xi_c)
            hit = group["lr"] <= self.min_lr_xi_c
        self.min_hits += int(hit)
        self.stopped = self.min_hits >= self.min_lr_hits

    def train_step(self, b: int) -> bool:
        """One iteration on batch b; returns whether some rank received SIGTERM."""
        idx, n = self.mine[b], len(self.batches[b])
        t, tc = self.times(self.xi, self.xi_c)
        gxi, gxc = torch.zeros_like(self.xi), torch.zeros_like(self.xi_c)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        if idx:
            soft = self.ball > 0
            per, e = self.losses(idx, t, tc, eps_grad=soft)
            params = [self.xi] + ([self.xi_c] if self.decoupled else []) + ([e] if soft else [])
            got = torch.autograd.grad(per.sum() / n, params, allow_unused=True)  # one backward for all
            gxi = got[0] if got[0] is not None else gxi
            if self.decoupled and got[1] is not None:
                gxc = got[1]
            if soft:  # d(mean)/d eps'_j is (1/n) d loss_j / d eps'_j
                self.step_eps(idx, e, got[-1] * (n if self.x_grad == "sample" else 1), per, t, tc, record=True)
            loss_sum += per.detach().double().sum()
        stop = torch.tensor([float(self.sig.received)], dtype=torch.float64)
        flat = all_reduce_sum(torch.cat([gxi.detach(), gxc.detach(), loss_sum, stop]))
        if not bool(torch.isfinite(flat).all()):
            raise LD3DivergedError(
                f"LD3 stopped at epoch {self.epoch}, iteration {self.it}: the loss or its gradient is not finite "
                f"(the model returned NaN/inf at these timesteps: {t.detach().tolist()}). The best schedule so far "
                f"(validation loss {self.best['val']:.4g}) is attached as .best", self.result())
        k = self.steps + 1
        self.xi.grad, self.xi_c.grad = flat[:k].clone(), flat[k:2 * k].clone()
        torch.nn.utils.clip_grad_norm_([self.xi], 1.0)
        torch.nn.utils.clip_grad_norm_([self.xi_c], 1.0)
        self.opt_xi.step()
        if self.decoupled and self.epoch >= self.phase1_epochs:
            self.opt_c.step()
        self.opt_xi.zero_grad(set_to_none=True)
        self.opt_c.zero_grad(set_to_none=True)
        self.last_loss = float(flat[-2]) / n
        return bool(flat[-1] > 0)

    def move_val_latents(self) -> bool:
        """End of epoch: a kept-if-better step for every validation eps'; halve the eps' rate if none moved.
        Returns whether some rank received SIGTERM."""
        moved = 0
        if self.ball > 0:
            with torch.no_grad():
                t, tc = self.times(self.xi, self.xi_c)
            for c in range(0, len(self.val_idx), 64):
                idx = self.val_idx[c:c + 64]
                per, e = self.losses(idx, t, tc, eps_grad=True)
                (g,) = torch.autograd.grad(per.sum(), e)  # each sample's own gradient
                if self.x_grad == "batch_mean":
                    g = g / self.batch_size
                moved += self.step_eps(idx, e, g, per, t, tc, record=False)
        flat = all_reduce_sum(torch.tensor([float(moved), float(self.sig.received)], dtype=torch.float64))
        if self.ball > 0 and flat[0] == 0:
            self.lr_x_now *= self.lr_x_decay
        return bool(flat[1] > 0)

    def loop(self) -> None:
        bar = None
        if self.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.epochs * len(self.batches), initial=self.it, leave=False,
                       desc=f"LD3 {self.solver} NFE={self.nfe}")
        try:
            while self.epoch < self.epochs and not self.stopped:
                if self.pos == 0 and self.epoch > 0:  # each epoch starts from the best xi / xi_c
                    self.restore_best(latents=False)
                    self.bad = 0
                    self.examine()
                order = _epoch_order(self.seed, self.epoch, len(self.batches))
                while self.pos < len(order) and not self.stopped:
                    signalled = self.train_step(order[self.pos])
                    self.pos, self.it = self.pos + 1, self.it + 1
                    if self.it % self.val_every == 0:
                        self.examine()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=self.last_loss, best_val=self.best["val"])
                    if signalled:
                        self.interrupt()
                if self.stopped:
                    break
                signalled = self.move_val_latents()
                self.epoch, self.pos = self.epoch + 1, 0
                self.save()
                if signalled:
                    self.interrupt()
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------
    def gathered(self, x: Tensor) -> Tensor:
        """x with every rank's own rows filled in (each row is owned by exactly one rank, the rest are zero)."""
        if self.world == 1:
            return x.clone()
        mask = self.owned.reshape(-1, *([1] * len(self.shape)))
        return all_reduce_sum(torch.where(mask, x, torch.zeros_like(x)))

    def state(self) -> dict:
        best = dict(self.best, eps_prime=self.gathered(self.best["eps_prime"]))
        return {
            "epoch": self.epoch, "pos": self.pos, "it": self.it, "bad": self.bad, "min_hits": self.min_hits,
            "stopped": self.stopped, "done": self.done, "xi": self.xi.detach().clone(),
            "xi_c": self.xi_c.detach().clone(), "xi0": self.xi0, "opt_xi": self.opt_xi.state_dict(),
            "opt_c": self.opt_c.state_dict(), "lr_x_now": self.lr_x_now, "history": list(self.history),
            "x_steps": list(self.x_steps), "eps_prime": self.gathered(self.eps_prime),
            "target": self.gathered(self.target), "best": best, "init_name": self.init_name,
            "init_losses": self.init_losses, "init_val": self.init_val, "rng": torch.get_rng_state(),
            "seconds": self.seconds_before + time.perf_counter() - self.started,
        }

    def save(self) -> None:
        if self.checkpoint is None:
            return
        state = self.state()  # a collective under torch.distributed: every rank takes part
        if self.rank == 0:
            save_torch(self.checkpoint, CHECKPOINT_FORMAT, CHECKPOINT_VERSION,
                       {"settings": self.settings, "state": state})

    def resume(self) -> bool:
        """Load the checkpoint when there is one; False when the run starts from scratch."""
        if self.checkpoint is None or not os.path.exists(self.checkpoint):
            return False
        doc = load_torch(self.checkpoint, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
        if not isinstance(doc.get("settings"), dict) or not isinstance(doc.get("state"), dict):
            raise ValueError(f"{self.checkpoint!r} is a damaged LD3 checkpoint (no settings or state)")
        if doc["settings"] != self.settings:
            diff = sorted(k for k in set(doc["settings"]) | set(self.settings)
                          if doc["settings"].get(k) != self.settings.get(k))
            raise ValueError(f"{self.checkpoint!r} is the checkpoint of another LD3 run (it differs in {diff}); "
                             f"pass another checkpoint path, or delete the file to start afresh")
        s = doc["state"]
        _check_state(s, self.checkpoint, self.steps + 1, self.eps.shape)
        try:
            for key in ("epoch", "pos", "it", "bad", "min_hits", "stopped", "done", "history", "x_steps",
                        "init_name", "init_losses", "init_val"):
                setattr(self, key, s[key])
            self.xi0 = s["xi0"].to(torch.float64)
            self.xi = s["xi"].to(torch.float64).clone().requires_grad_(True)
            self.xi_c = s["xi_c"].to(torch.float64).clone().requires_grad_(True)
            self.make_optimisers()
            self.opt_xi.load_state_dict(s["opt_xi"])
            self.opt_c.load_state_dict(s["opt_c"])
            self.lr_x_now = float(s["lr_x_now"])
            self.eps_prime, self.target = s["eps_prime"].to(self.dtype), s["target"].to(self.dtype)
            self.best = dict(s["best"], eps_prime=s["best"]["eps_prime"].to(self.dtype))
            self.seconds_before = float(s["seconds"])
            torch.set_rng_state(s["rng"])
        except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{self.checkpoint!r} is a damaged LD3 checkpoint: {e}") from e
        if self.eps_prime.shape != self.eps.shape or self.target.shape != self.eps.shape:
            raise ValueError(f"{self.checkpoint!r} is a damaged LD3 checkpoint: wrong data shape")
        return True

    def interrupt(self) -> None:
        self.save()
        self.sig.restore()
        if self.sig.received:  # pass the signal on to whoever handled it before (by default: the process ends)
            os.kill(os.getpid(), signal.SIGTERM)
        raise LD3Interrupted(f"LD3 interrupted by SIGTERM at epoch {self.epoch}, iteration {self.it}; the state is "
                             f"in {self.checkpoint!r}: call ld3_learn again with the same arguments to resume",
                             self.checkpoint)

    # ------------------------------------------------------------------------------------------------------------
    # result
    # ------------------------------------------------------------------------------------------------------------
    def learn(self) -> LearnedSchedule:
        if not self.resume():
            self.start()
        if not self.done:
            self.loop()
            self.done = True
            self.save()
        return self.result()

    def result(self) -> LearnedSchedule:
        zeros = torch.zeros(self.steps + 1, dtype=torch.float64)
        xi, xi_c, returned = self.best.get("xi", self.xi0), self.best.get("xi_c", zeros), "best"
        # the start's validation loss at eps' = eps is the first record (init_val)
        if self.keep_init and "xi" in self.best and self.validate(xi, xi_c, hard=True) > self.init_val:
            xi, xi_c, returned = self.xi0, zeros, "init"
        with torch.no_grad():
            t, tc = self.times(xi, xi_c)
        guidance = getattr(self.denoiser, "guidance", None)
        deviations = [] if self.loss_name == "lpips" else [f"loss: {self.loss_name} instead of LPIPS"]
        if self.x_grad == "sample":
            deviations.append("eps' steps on each sample's own loss gradient (the reference: the batch mean)")
        if self.keep_init:
            deviations.append("the start is returned when it is better on validation at eps' = eps")
        meta = {
            "schedule": self.schedule.config(), "solver": self.solver, "order": self.order, "nfe": self.nfe,
            "solver_options": fixed_call_options(self.solver), "steps": self.steps,
            "model_fingerprint": self.settings["model_fingerprint"],
            "guidance": float(guidance) if isinstance(guidance, (int, float)) else None,
            "tdiff_version": __version__, "space": self.settings["space"], "decoupled": self.decoupled,
            "loss": self.loss_name, "loss_note": LOSS_NOTES.get(self.loss_name, "a user-supplied callable"),
            "r": self.ball, "r_x_space": self.ball * float(self.sigma_T), "teacher": self.teacher,
            "n_train": self.settings["n_train"], "n_val": self.n_val, "epochs": self.epochs,
            "epochs_run": self.epoch, "iterations": self.it, "stopped_early": self.stopped,
            "batch_size": self.batch_size, "world_size": self.world, "seed": self.seed, "init": self.init_name,
            "init_val_losses": self.init_losses, "best_val_loss": self.best["val"], "val_history": list(self.history),
            "returned": returned, "lr_final": {"xi": self.opt_xi.param_groups[0]["lr"],
                                               "xi_c": self.opt_c.param_groups[0]["lr"], "x": self.lr_x_now},
            "x_step_over_radius_median": (float(torch.tensor(self.x_steps, dtype=torch.float64).median())
                                          if self.x_steps else None),
            "train_seconds": round(self.seconds_before + time.perf_counter() - self.started, 3),
            "deviations_from_paper": deviations,
        }
        return LearnedSchedule(t.detach().clone(), None if tc is None else tc.detach().clone(), meta, self.schedule)

