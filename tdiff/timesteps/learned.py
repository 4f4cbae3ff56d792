"""LearnedSchedule: a learned (or optimised) discretisation, portable and guarded against misuse.

It carries the solver times, the decoupled network times and what it was learned for (schedule, solver, order,
NFE in model calls, model fingerprint, guidance scale, loss, tdiff version). `tdiff.sample(D, x_T, learned,
solver=...)` reads `.timesteps` / `.timesteps_cond` / `.final_sigmas_type` directly, and refuses a solver or order
other than the one it was learned for unless the caller says so (`learned.for_any_solver()`).

Saved as versioned JSON through `tdiff.artefacts` (atomic). `load` always validates the whole file: the header,
the types, the metadata it needs (deleting it does not bypass anything), finite times inside the schedule's
domain, strictly decreasing `timesteps`, monotone `timesteps_cond`, and that the solver at that order makes
exactly the recorded number of model calls on these times. A DiscreteVP schedule is stored with its
alphas_cumprod, so every schedule can be rebuilt from the file alone (`to_diffusers` needs it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..artefacts import fingerprint_module, load_json, save_json
from ..schedules import DiscreteVP, NoiseSchedule, from_config

FORMAT, VERSION = "tdiff-learned-schedule", 2
#: metadata a file must carry, with the types they must have
REQUIRED_METADATA = {"schedule": dict, "solver": str, "order": int, "nfe": int, "model_fingerprint": (str, type(None))}


def model_fingerprint(model) -> Optional[str]:
    """Fingerprint of the network behind a denoiser (or of a module); None when there is no module (an analytic
    denoiser), in which case nothing can be checked."""
    net = getattr(model, "model", model)
    if isinstance(net, torch.nn.Module):
        return fingerprint_module(net)
    if isinstance(model, torch.nn.Module):
        return fingerprint_module(model)
    return None


def schedule_table(schedule: NoiseSchedule) -> Optional[dict]:
    """What a file needs beyond `schedule.config()` to rebuild the schedule (DiscreteVP's table), or None."""
    if isinstance(schedule, DiscreteVP):
        return {"alphas_cumprod": schedule.alphas_cumprod.tolist()}
    return None


def rebuild_schedule(config: dict, table: Optional[dict], where: str = "the file") -> NoiseSchedule:
    """The schedule a config (and, for DiscreteVP, its stored table) describes, checked against the config."""
    if not isinstance(config, dict) or not isinstance(config.get("class"), str):
        raise ValueError(f"{where}: metadata.schedule must be an object with a 'class' name, got {config!r}")
    if config["class"] != "DiscreteVP":
        try:
            return from_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: cannot rebuild the schedule {config!r}: {e}") from e
    ac = None if not isinstance(table, dict) else table.get("alphas_cumprod")
    if not isinstance(ac, list) or not all(_is_real(v) for v in ac):
        raise ValueError(f"{where}: a DiscreteVP schedule needs schedule_table.alphas_cumprod, a list of numbers "
                         f"(pass schedule= to load a file that lacks it)")
    try:
        schedule = DiscreteVP(alphas_cumprod=torch.tensor(ac, dtype=torch.float64))
    except ValueError as e:
        raise ValueError(f"{where}: schedule_table.alphas_cumprod is not a valid table: {e}") from e
    got = schedule.config()
    if got["n"] != config.get("n") or not _is_real(config.get("log_alpha_sum")) or \
            abs(got["log_alpha_sum"] - config["log_alpha_sum"]) > 1e-6 * max(1.0, abs(config["log_alpha_sum"])):
        raise ValueError(f"{where}: schedule_table does not match metadata.schedule ({got} vs {config})")
    return schedule


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _times(value, name: str, where: str) -> Tensor:
    if not isinstance(value, list) or len(value) < 2 or not all(_is_real(v) for v in value):
        raise ValueError(f"{where}: {name} must be a list of at least 2 numbers, got {str(value)[:80]}")
    t = torch.tensor(value, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {name} must be finite, got {value}")
    return t


@dataclass
class LearnedSchedule:
    timesteps: Tensor  # (N+1,) decreasing solver times
    timesteps_cond: Optional[Tensor]  # (N+1,) network times (decoupled), or None
    metadata: dict = field(default_factory=dict)
    schedule: object = None  # the NoiseSchedule (rebuilt from the file on load)
    final_sigmas_type: str = "sigma_min"
    any_solver: bool = False  # set by for_any_solver(): sample() then accepts any solver

    @property
    def steps(self) -> int:
        return self.timesteps.numel() - 1

    @property
    def nfe(self) -> int:
        """Model calls per sample (for Heun twice the steps), as recorded when it was learned."""
        return int(self.metadata["nfe"]) if "nfe" in self.metadata else self.steps

    @property
    def solver(self) -> Optional[str]:
        """The solver it was learned for: `sample(den, x, learned)` uses it when no solver is given."""
        return None if self.any_solver else self.metadata.get("solver")

    @property
    def order(self) -> Optional[int]:
        return None if self.any_solver else self.metadata.get("order")

    @property
    def options(self) -> dict:
        """The solver options it was learned with (e.g. Heun's fixed-call order rule), used by `sample()`."""
        return {} if self.any_solver else dict(self.metadata.get("solver_options") or {})

    def check_solver(self, solver: str, order: Optional[int] = None) -> None:
        """Refuse a solver (or order) other than the one this schedule was learned for: learned steps are tuned to
        one solver's error, and are no better than a heuristic (often worse) for another."""
        if self.any_solver or "solver" not in self.metadata:
            return
        from ..solvers.sample import DEFAULT_ORDER

        want, want_order = self.metadata["solver"], self.metadata.get("order")
        order = DEFAULT_ORDER.get(solver) if order is None else order
        if solver != want or (want_order is not None and order != want_order):
            raise ValueError(f"this schedule was learned for solver {want!r} order {want_order}, not {solver!r} order "
                             f"{order}; learned steps are tuned to one solver. To sample with another anyway, pass "
                             f"learned.for_any_solver() (or the tensors learned.timesteps, learned.timesteps_cond)")

    def for_any_solver(self) -> "LearnedSchedule":
        """A copy that `sample()` uses with any solver (an explicit override of `check_solver`)."""
        return dataclasses.replace(self, any_solver=True)

    def _resolved_schedule(self) -> NoiseSchedule:
        if self.schedule is not None:
            return self.schedule
        if "schedule" not in self.metadata:
            raise ValueError("this LearnedSchedule records no schedule: pass schedule=")
        return rebuild_schedule(self.metadata["schedule"], None, "metadata")

    def save(self, path: str) -> None:
        missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
        if missing:
            raise ValueError(f"cannot save a LearnedSchedule without metadata {missing} (load would refuse it)")
        schedule = self._resolved_schedule()
        payload = {
            "timesteps": self.timesteps.detach().double().tolist(),
            "timesteps_cond": None if self.timesteps_cond is None else self.timesteps_cond.detach().double().tolist(),
            "final_sigmas_type": self.final_sigmas_type,
            "metadata": self.metadata,
            "schedule_table": schedule_table(schedule),
        }
        _validate(payload, str(path), schedule)  # never write a file that load would refuse
        save_json(path, FORMAT, VERSION, payload)

    @classmethod
    def load(cls, path: str, model=None, solver: Optional[str] = None, schedule: Optional[NoiseSchedule] = None,
             order: Optional[int] = None) -> "LearnedSchedule":
        """Read and fully validate a saved schedule. model / solver / order / schedule, when given, must be what
        it was learned for (the model by fingerprint)."""
        where = repr(str(path))
        try:
            doc = load_json(path, FORMAT, VERSION)
        except UnicodeDecodeError as e:
            raise ValueError(f"cannot read learned schedule {where}: it is not UTF-8 JSON text ({e})") from e
        except AttributeError as e:  # the header check met a top-level value that is not an object
            raise ValueError(f"learned schedule {where} must hold a JSON object at the top level") from e
        if not isinstance(doc, dict):
            raise ValueError(f"learned schedule {where} must hold a JSON object at the top level")
        meta = doc.get("metadata")
        if not isinstance(meta, dict):
            raise ValueError(f"{where}: metadata must be an object recording what the schedule was learned for")
        if schedule is not None and meta.get("schedule") != schedule.config():
            raise ValueError(f"{where} was learned for schedule {meta.get('schedule')}, not {schedule.config()}")
        ts, tc, fst, sched = _validate(doc, where, schedule)
        if solver is not None and solver != meta["solver"]:
            raise ValueError(f"{where} was learned for solver {meta['solver']!r} (order {meta['order']}), not "
                             f"{solver!r}; a schedule learned for one solver is not tuned for another")
        if order is not None and order != meta["order"]:
            raise ValueError(f"{where} was learned for order {meta['order']}, not {order}")
        if model is not None:
            want, got = meta["model_fingerprint"], model_fingerprint(model)
            if got is not None and want != got:
                raise ValueError(f"{where} was learned for another model (fingerprint {want}, this model {got})")
        return cls(ts, tc, meta, sched, fst)

    def to_diffusers(self, kind: str = "sigmas", schedule=None) -> dict:
        """The step grid as a diffusers pipeline argument: {"sigmas": [...]} or {"timesteps": [...]} (DiscreteVP).
        diffusers cannot express decoupled network times, so only the solver times are exported."""
        from ..solvers import to_diffusers

        return to_diffusers(self.timesteps, schedule or self._resolved_schedule(), kind)


def _validate(doc: dict, where: str, schedule: Optional[NoiseSchedule]):
    """Check a file's payload; returns (timesteps, timesteps_cond, final_sigmas_type, schedule)."""
    from ..solvers.grid import FINAL_SIGMAS_TYPES
    from ..solvers.sample import SOLVERS, build_program

    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: metadata must be an object recording what the schedule was learned for")
    for key, kind in REQUIRED_METADATA.items():
        if key not in meta:
            raise ValueError(f"{where}: metadata.{key} is missing (a learned schedule must record it)")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ValueError(f"{where}: metadata.{key} has the wrong type ({type(meta[key]).__name__})")
    if meta["solver"] not in SOLVERS:
        raise ValueError(f"{where}: metadata.solver must be one of {SOLVERS}, got {meta['solver']!r}")
    if meta["nfe"] < 1:
        raise ValueError(f"{where}: metadata.nfe must be >= 1, got {meta['nfe']}")
    options = meta.get("solver_options", {})
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise ValueError(f"{where}: metadata.solver_options must be an object of solver options, got {options!r}")
    guidance = meta.get("guidance")
    if guidance is not None and not (_is_real(guidance) and math.isfinite(guidance)):
        raise ValueError(f"{where}: metadata.guidance must be a finite number or null, got {guidance!r}")
    sched = schedule or rebuild_schedule(meta["schedule"], doc.get("schedule_table"), where)
    if "timesteps" not in doc:
        raise ValueError(f"{where}: timesteps are missing")
    ts = _times(doc["timesteps"], "timesteps", where)
    tc = doc.get("timesteps_cond")
    tc = None if tc is None else _times(tc, "timesteps_cond", where)
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(f"{where}: timesteps must be strictly decreasing, got {ts.tolist()}")
    if tc is not None:
        if tc.shape != ts.shape:
            raise ValueError(f"{where}: timesteps_cond must hold as many times as timesteps ({ts.numel()})")
        if bool((tc[1:] > tc[:-1]).any()):
            raise ValueError(f"{where}: timesteps_cond must be decreasing, got {tc.tolist()}")
    fst = doc.get("final_sigmas_type", "sigma_min")
    if fst not in FINAL_SIGMAS_TYPES:
        raise ValueError(f"{where}: final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {fst!r}")
    try:
        for name, t in (("timesteps", ts), ("timesteps_cond", tc)):
            if t is not None:
                sched.check_t(t, name)
        program = build_program(sched, ts, meta["solver"], meta["order"], timesteps_cond=tc, final_sigmas_type=fst,
                                **options)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    if program.nfe != meta["nfe"]:
        raise ValueError(f"{where}: metadata.nfe = {meta['nfe']}, but {meta['solver']} order {meta['order']} makes "
                         f"{program.nfe} model calls on these {ts.numel()} times")
    return ts, tc, fst, sched
