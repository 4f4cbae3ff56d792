"""A learned mask as an artefact: the (steps, columns) 0/1 matrix plus everything needed to refuse using it
with the wrong model or sampler, saved atomically through tdiff.artefacts."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch

from tdiff._version import __version__
from tdiff.artefacts import fingerprint_module, load_json, save_json

from .units import check_granularity

MASK_FORMAT = "tdiff.cache.mask"
MASK_FORMAT_VERSION = 1


@dataclass
class LearnedMask:
    matrix: torch.Tensor  # (steps, columns) bool; row i is sampling step i (step 0 = the noisiest)
    granularity: str = "branch"
    fingerprint: Optional[str] = None  # tdiff.artefacts.fingerprint_module of the model it was trained for
    solver: Optional[str] = None
    timesteps: Optional[List[float]] = None
    threshold: float = 0.5
    tdiff_version: str = __version__
    extra: dict = field(default_factory=dict)  # e.g. training settings, MAC fraction

    def __post_init__(self):
        self.matrix = as_mask_matrix(self.matrix)
        check_granularity(self.granularity)

    @property
    def nfe(self) -> int:
        return self.matrix.shape[0]

    def check_model(self, model) -> None:
        if self.fingerprint is not None and fingerprint_module(model) != self.fingerprint:
            raise ValueError(
                f"this mask was trained for a model with fingerprint {self.fingerprint}, but the given model's "
                f"fingerprint is {fingerprint_module(model)}; train a mask for this model"
            )

    def check_nfe(self, nfe: int) -> None:
        if nfe != self.nfe:
            raise ValueError(
                f"this mask has {self.nfe} steps (NFE) but the sampler uses {nfe}; train a mask for that NFE or "
                f"resample it explicitly with tdiff.cache.resample_mask(mask, {nfe})"
            )


def as_mask_matrix(mask) -> torch.Tensor:
    m = torch.as_tensor(mask)
    if m.ndim != 2 or 0 in m.shape:
        raise ValueError(f"mask must be a non-empty (steps, units) matrix, got shape {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask entries must be 0 or 1 (binarise scores first with tdiff.cache.binarise)")
        m = m != 0
    return m.cpu()


def save_mask(path: str, mask: LearnedMask) -> None:
    save_json(path, MASK_FORMAT, MASK_FORMAT_VERSION, {
        "matrix": mask.matrix.int().tolist(),
        "granularity": mask.granularity,
        "fingerprint": mask.fingerprint,
        "solver": mask.solver,
        "nfe": mask.nfe,
        "timesteps": mask.timesteps,
        "threshold": mask.threshold,
        "mask_tdiff_version": mask.tdiff_version,
        "extra": mask.extra,
    })


def load_mask(path: str, model=None, nfe: Optional[int] = None, solver: Optional[str] = None) -> LearnedMask:
    """Load a mask file; with `model` / `nfe` / `solver` given, refuse one made for something else."""
    doc = load_json(path, MASK_FORMAT, MASK_FORMAT_VERSION)
    mask = LearnedMask(
        matrix=torch.tensor(doc["matrix"], dtype=torch.bool), granularity=doc["granularity"],
        fingerprint=doc.get("fingerprint"), solver=doc.get("solver"), timesteps=doc.get("timesteps"),
        threshold=doc.get("threshold", 0.5), tdiff_version=doc.get("mask_tdiff_version", doc["tdiff_version"]),
        extra=doc.get("extra") or {},
    )
    if doc.get("nfe") != mask.nfe:
        raise ValueError(f"{path!r} is inconsistent: nfe {doc.get('nfe')} but {mask.nfe} mask rows")
    if model is not None:
        mask.check_model(model)
    if nfe is not None:
        mask.check_nfe(nfe)
    if solver is not None and mask.solver is not None and solver != mask.solver:
        raise ValueError(f"this mask was trained for solver {mask.solver!r}, not {solver!r}")
    return mask


def resample_mask(mask: LearnedMask, nfe: int) -> LearnedMask:
    """The mask for another number of steps, by nearest step in normalised sampling progress: new step j
    (of nfe) takes row round(j (T-1) / (nfe-1)) of the T-step mask. Row 0 stays all ones (the first step has no
    cache). This is a heuristic starting point, not a trained mask: retrain for best quality."""
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    t = mask.nfe
    rows = [round(j * (t - 1) / (nfe - 1)) if nfe > 1 else 0 for j in range(nfe)]
    matrix = mask.matrix[rows].clone()
    matrix[0] = True
    return replace(mask, matrix=matrix, timesteps=None,
                   extra={**mask.extra, "resampled_from_nfe": t})
