"""LearnedSchedule: a learned (or optimised) discretisation, portable and guarded against misuse.

It carries the solver times, the decoupled network times and what it was learned for (schedule config, solver,
order, NFE, model fingerprint, guidance scale, tdiff version). `tdiff.sample(D, x_T, timesteps=learned)` reads
`.timesteps` / `.timesteps_cond` / `.final_sigmas_type` directly. Saved as versioned JSON through
`tdiff.artefacts` (atomic); `load` refuses a file made for another model, solver or schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ..artefacts import fingerprint_module, load_json, save_json

FORMAT, VERSION = "tdiff-learned-schedule", 1


def model_fingerprint(model) -> Optional[str]:
    """Fingerprint of the network behind a denoiser (or of a module); None when there is no module (an analytic
    denoiser), in which case nothing can be checked."""
    net = getattr(model, "model", model)
    if isinstance(net, torch.nn.Module):
        return fingerprint_module(net)
    if isinstance(model, torch.nn.Module):
        return fingerprint_module(model)
    return None


@dataclass
class LearnedSchedule:
    timesteps: Tensor  # (N+1,) decreasing solver times
    timesteps_cond: Optional[Tensor]  # (N+1,) network times (decoupled), or None
    metadata: dict = field(default_factory=dict)
    schedule: object = None  # the NoiseSchedule in memory (not saved; its config is in metadata)
    final_sigmas_type: str = "sigma_min"

    @property
    def nfe(self) -> int:
        return self.timesteps.numel() - 1

    def save(self, path: str) -> None:
        payload = {
            "timesteps": self.timesteps.detach().double().tolist(),
            "timesteps_cond": None if self.timesteps_cond is None else self.timesteps_cond.detach().double().tolist(),
            "final_sigmas_type": self.final_sigmas_type,
            "metadata": self.metadata,
        }
        save_json(path, FORMAT, VERSION, payload)

    @classmethod
    def load(cls, path: str, model=None, solver: Optional[str] = None, schedule=None) -> "LearnedSchedule":
        doc = load_json(path, FORMAT, VERSION)
        meta = dict(doc.get("metadata") or {})
        try:
            ts = torch.tensor(doc["timesteps"], dtype=torch.float64)
            tc = doc.get("timesteps_cond")
            tc = None if tc is None else torch.tensor(tc, dtype=torch.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path!r} is a damaged learned schedule: {e}") from e
        if ts.dim() != 1 or ts.numel() < 2 or bool((ts[1:] >= ts[:-1]).any()):
            raise ValueError(f"{path!r}: timesteps must be a strictly decreasing list of at least 2 times")
        if tc is not None and tc.shape != ts.shape:
            raise ValueError(f"{path!r}: timesteps_cond must have the shape of timesteps")
        if solver is not None and meta.get("solver") not in (None, solver):
            raise ValueError(f"{path!r} was learned for solver {meta.get('solver')!r} (order {meta.get('order')}), "
                             f"not {solver!r}; a schedule learned for one solver is not tuned for another")
        if model is not None:
            want, got = meta.get("model_fingerprint"), model_fingerprint(model)
            if want is not None and got is not None and want != got:
                raise ValueError(f"{path!r} was learned for another model (fingerprint {want}, this model {got})")
        if schedule is not None and meta.get("schedule") not in (None, schedule.config()):
            raise ValueError(f"{path!r} was learned for schedule {meta.get('schedule')}, not {schedule.config()}")
        return cls(ts, tc, meta, schedule, doc.get("final_sigmas_type", "sigma_min"))

    def to_diffusers(self, kind: str = "sigmas", schedule=None) -> dict:
        """The step grid as a diffusers pipeline argument: {"sigmas": [...]} or {"timesteps": [...]}.
        diffusers cannot express decoupled network times, so only the solver times are exported."""
        from ..schedules import from_config
        from ..solvers import to_diffusers

        schedule = schedule or self.schedule
        if schedule is None:
            if "schedule" not in self.metadata:
                raise ValueError("pass schedule= (this LearnedSchedule does not record one)")
            schedule = from_config(self.metadata["schedule"])
        return to_diffusers(self.timesteps, schedule, kind)
