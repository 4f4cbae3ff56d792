"""Versioned, atomically written artefacts (learned schedules, masks, checkpoints).

Every saved file carries `format` (what it is), `format_version` and `tdiff_version`, plus whatever metadata the
caller needs to refuse a mismatch later. Writes go to a temporary file in the same directory and are renamed
into place, so a crash never leaves a half-written artefact behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable

import torch

from ._version import __version__


def _atomic_write(path: str, write: Callable[[Any], None], binary: bool) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artefacts are ordinary shareable files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path: str, fmt: str, version: int, payload: dict) -> None:
    doc = {"format": fmt, "format_version": version, "tdiff_version": __version__, **payload}
    _atomic_write(path, lambda f: json.dump(doc, f, indent=1, sort_keys=True), binary=False)


def load_json(path: str, fmt: str, version: int) -> dict:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {fmt} file {path!r}: {e}") from e
    _check_header(doc, path, fmt, version)
    return doc


def save_torch(path: str, fmt: str, version: int, payload: dict) -> None:
    doc = {"format": fmt, "format_version": version, "tdiff_version": __version__, **payload}
    _atomic_write(path, lambda f: torch.save(doc, f), binary=True)


def load_torch(path: str, fmt: str, version: int, map_location="cpu") -> dict:
    try:
        doc = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ValueError(f"cannot read {fmt} file {path!r}: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path!r} is not a tdiff {fmt} file")
    _check_header(doc, path, fmt, version)
    return doc


def _check_header(doc: dict, path: str, fmt: str, version: int) -> None:
    if doc.get("format") != fmt:
        raise ValueError(f"{path!r} is a {doc.get('format')!r} file, expected a {fmt!r} file")
    if doc.get("format_version") != version:
        raise ValueError(f"{path!r} has format_version {doc.get('format_version')}, this tdiff reads {version}")


def fingerprint_module(module: torch.nn.Module) -> str:
    """A short hash of a model's architecture (parameter names and shapes) and weights, to refuse artefacts
    made for another model."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        if p.is_floating_point() and p.numel():
            # a cheap weight summary: sum and sum of squares in float64
            d = p.detach().double()
            h.update(f"{float(d.sum()):.6e},{float((d * d).sum()):.6e}".encode())
    return h.hexdigest()[:16]
