"""A learned mask as an artefact: the (steps, columns) 0/1 matrix plus everything needed to refuse using it with
the wrong model, formulation or sampler, saved atomically through tdiff.artefacts and validated fully on load.

Format version 2 adds `formulation` and `network_times`; version-1 files (written before the formulations
existed) load as the "branch" formulation they were made for.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch

from tdiff._version import __version__
from tdiff.artefacts import fingerprint_module, load_json, save_json

from .units import check_formulation, check_granularity

MASK_FORMAT = "tdiff.cache.mask"
MASK_FORMAT_VERSION = 2


@dataclass
class LearnedMask:
    matrix: torch.Tensor  # (steps, columns) bool; row i is sampling step i (step 0 = the noisiest)
    granularity: str = "unit"
    formulation: str = "output"
    fingerprint: Optional[str] = None  # tdiff.artefacts.fingerprint_module of the model it was trained for
    solver: Optional[str] = None
    timesteps: Optional[List[float]] = None  # the sampler's time steps, as the caller gave them
    threshold: float = 0.5
    tdiff_version: str = __version__
    extra: dict = field(default_factory=dict)  # training settings, scores, MAC fraction, ...
    network_times: Optional[List[float]] = None  # the network time input at each step; other calls are refused

    def __post_init__(self):
        self.matrix = as_mask_matrix(self.matrix)
        self.granularity = check_granularity(self.granularity)
        check_formulation(self.formulation)
        if self.network_times is not None and len(self.network_times) != self.nfe:
            raise ValueError(f"network_times has {len(self.network_times)} entries for {self.nfe} mask rows")

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


def as_mask_matrix(mask, allow_per_sample: bool = False) -> torch.Tensor:
    """A bool (steps, columns) matrix (or (batch, steps, columns) with allow_per_sample) from 0/1 entries."""
    if mask is None:
        raise ValueError("mask is None; expected a (steps, columns) 0/1 matrix")
    m = torch.as_tensor(mask)
    dims = (2, 3) if allow_per_sample else (2,)
    if m.ndim not in dims or 0 in m.shape:
        shape = "(steps, columns) or (batch, steps, columns)" if allow_per_sample else "(steps, columns)"
        raise ValueError(f"mask must be a non-empty {shape} matrix, got shape {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if m.is_complex() or not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask entries must be 0 or 1 (binarise scores first with tdiff.cache.binarise)")
        m = m != 0
    return m.cpu()


def save_mask(path: str, mask: LearnedMask) -> None:
    save_json(path, MASK_FORMAT, MASK_FORMAT_VERSION, {
        "matrix": mask.matrix.int().tolist(),
        "granularity": mask.granularity,
        "formulation": mask.formulation,
        "fingerprint": mask.fingerprint,
        "solver": mask.solver,
        "nfe": mask.nfe,
        "timesteps": mask.timesteps,
        "network_times": mask.network_times,
        "threshold": mask.threshold,
        "mask_tdiff_version": mask.tdiff_version,
        "extra": mask.extra,
    })


def _peek_version(path: str):
    try:
        with open(path) as f:
            doc = json.load(f)
        return doc.get("format_version") if isinstance(doc, dict) else None
    except Exception:  # load_json reports unreadable files with their reason
        return None


def _field(doc: dict, path: str, name: str, check, expected: str, required: bool = False):
    if name not in doc or doc[name] is None:
        if required:
            raise ValueError(f"mask file {path!r} has no {name!r} field ({expected})")
        return None
    value = doc[name]
    if not check(value):
        raise ValueError(f"mask file {path!r}: {name!r} must be {expected}, got {value!r}")
    return value


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_times(v) -> bool:
    return isinstance(v, list) and all(_is_number(t) for t in v)


def _is_01_matrix(v) -> bool:
    return (isinstance(v, list) and len(v) > 0 and all(isinstance(r, list) and len(r) == len(v[0]) > 0 for r in v)
            and all(type(e) in (int, bool) and e in (0, 1) for r in v for e in r))


def load_mask(path: str, model=None, nfe: Optional[int] = None, solver: Optional[str] = None) -> LearnedMask:
    """Load a mask file, validating every field; with `model` / `nfe` / `solver` given, refuse one made for
    something else."""
    version = 1 if _peek_version(path) == 1 else MASK_FORMAT_VERSION
    doc = load_json(path, MASK_FORMAT, version)
    matrix = _field(doc, path, "matrix", _is_01_matrix, "a non-empty rectangular list of rows of 0/1 entries",
                    required=True)
    granularity = _field(doc, path, "granularity", lambda v: isinstance(v, str), "a string", required=True)
    formulation = "branch" if version == 1 else _field(doc, path, "formulation", lambda v: isinstance(v, str),
                                                         "a string", required=True)
    rows = len(matrix)
    if _field(doc, path, "nfe", lambda v: type(v) is int, "an integer", required=True) != rows:
        raise ValueError(f"{path!r} is inconsistent: nfe {doc['nfe']} but {rows} mask rows")
    network_times = _field(doc, path, "network_times", lambda v: _is_times(v) and len(v) == rows,
                           f"a list of {rows} finite numbers")
    try:
        mask = LearnedMask(
            matrix=torch.tensor(matrix, dtype=torch.bool), granularity=granularity, formulation=formulation,
            fingerprint=_field(doc, path, "fingerprint", lambda v: isinstance(v, str), "a string"),
            solver=_field(doc, path, "solver", lambda v: isinstance(v, str), "a string"),
            timesteps=_field(doc, path, "timesteps", _is_times, "a list of finite numbers"),
            threshold=_field(doc, path, "threshold", lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]",
                             required=True),
            tdiff_version=_field(doc, path, "mask_tdiff_version", lambda v: isinstance(v, str), "a string") or
            doc.get("tdiff_version", "unknown"),
            extra=_field(doc, path, "extra", lambda v: isinstance(v, dict), "an object") or {},
            network_times=network_times,
        )
    except ValueError as e:
        raise ValueError(f"mask file {path!r}: {e}") from e
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
    if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    t = mask.nfe
    rows = [round(j * (t - 1) / (nfe - 1)) if nfe > 1 else 0 for j in range(nfe)]
    matrix = mask.matrix[rows].clone()
    matrix[0] = True
    return replace(mask, matrix=matrix, timesteps=None, network_times=None,
                   extra={**mask.extra, "resampled_from_nfe": t})
