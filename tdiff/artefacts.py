"""Versioned, atomically written artefacts (learned schedules, masks, checkpoints, weights).

Every saved file carries `format` (what it is), `format_version` and `tdiff_version`, plus whatever metadata the
caller needs to refuse a mismatch later. Three containers: JSON, torch.save (loaded with weights_only=True) and
safetensors (tensors plus a JSON header, used for model weights).

Writing: to a temporary file `.tmp-tdiff-<host>-<pid>-*` in the target's directory, fsynced, then renamed into
place, so a crash never leaves a half-written artefact. A symlink is written through to its target (the link
stays). A failed write removes its temporary file; one left by a killed writer (its process is gone, or it is more
than a day old) is swept by the next write into that directory.

Reading: a file larger than `max_bytes` (default MAX_JSON_BYTES / MAX_TORCH_BYTES) is refused before it is read,
and every error names the file and what was expected.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import weakref
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch

from ._version import __version__

MAX_JSON_BYTES = 32 << 20  # schedules and masks are kilobytes; a DiT-XL mask over 1000 steps is ~0.3 MB
MAX_TORCH_BYTES = 512 << 20  # the embedded checkpoints are a few MB; checkpoints of DiT-XL size fit (2.7 GB: raise it)
STALE_TMP_AGE_S = 24 * 3600  # a temporary file from another host counts as abandoned after a day

_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_TMP = re.compile(r"^\.tmp-tdiff-([0-9a-f]{8})-(\d+)-")


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: rely on the age rule only
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def sweep_stale_temporaries(directory: str) -> list:
    """Remove temporary files that tdiff writers left in `directory` when they were killed: those of a process of
    this host that no longer runs, and any older than STALE_TMP_AGE_S. Returns the removed paths. Only files named
    by tdiff's writers are touched."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = _TMP.match(name)
        if m is None:
            continue
        path = os.path.join(directory, name)
        try:
            dead = m.group(1) == _HOST and not _process_alive(int(m.group(2)))
            if dead or now - os.lstat(path).st_mtime > STALE_TMP_AGE_S:
                os.unlink(path)
                removed.append(path)
        except OSError:  # another writer swept it first, or it is not ours to remove
            continue
    return removed


def _atomic_write(path: str, write: Callable[[Any], None], binary: bool) -> None:
    # realpath: saving over a symlink replaces its target, not the link
    path = os.path.realpath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    sweep_stale_temporaries(directory)
    try:
        mode = os.stat(path).st_mode & 0o777  # keep an existing file's permissions
    except OSError:
        mode = 0o644  # mkstemp creates 0600; artefacts are ordinary shareable files
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-tdiff-{_HOST}-{os.getpid()}-", dir=directory)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _header(fmt: str, version: int) -> dict:
    return {"format": fmt, "format_version": version, "tdiff_version": __version__}


def _check_size(path: str, fmt: str, max_bytes: Optional[int], default: int) -> None:
    limit = default if max_bytes is None else int(max_bytes)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise ValueError(f"cannot read {fmt} file {path!r}: {e}") from e
    if size > limit:
        raise ValueError(f"{fmt} file {path!r} is {size / 2**20:.1f} MiB, more than the {limit / 2**20:.1f} MiB "
                         f"limit; pass max_bytes= to read larger files")


def save_json(path: str, fmt: str, version: int, payload: dict) -> None:
    doc = {**_header(fmt, version), **payload}
    _atomic_write(path, lambda f: json.dump(doc, f, indent=1, sort_keys=True), binary=False)


def load_json(path: str, fmt: str, version: int, max_bytes: Optional[int] = None) -> dict:
    _check_size(path, fmt, max_bytes, MAX_JSON_BYTES)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {fmt} file {path!r}: it is not UTF-8 text ({e})") from e
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError
        raise ValueError(f"cannot read {fmt} file {path!r}: {e}") from e
    _check_header(doc, path, fmt, version)
    return doc


def save_torch(path: str, fmt: str, version: int, payload: dict) -> None:
    doc = {**_header(fmt, version), **payload}
    _atomic_write(path, lambda f: torch.save(doc, f), binary=True)


def load_torch(path: str, fmt: str, version: int, map_location="cpu", max_bytes: Optional[int] = None) -> dict:
    _check_size(path, fmt, max_bytes, MAX_TORCH_BYTES)
    try:
        doc = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt file
        raise ValueError(f"cannot read {fmt} file {path!r}: {e}") from e
    _check_header(doc, path, fmt, version)
    return doc


def save_safetensors(path: str, fmt: str, version: int, tensors: Mapping[str, torch.Tensor], payload: dict) -> None:
    """Tensors as safetensors, with the header and `payload` as JSON in its metadata (key "tdiff")."""
    from safetensors.torch import save

    doc = json.dumps({**_header(fmt, version), **payload}, sort_keys=True, allow_nan=False)
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={"tdiff": doc})
    _atomic_write(path, lambda f: f.write(data), binary=True)


def load_safetensors(path: str, fmt: str, version: int,
                     max_bytes: Optional[int] = None) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """-> (metadata dict, tensors on CPU). Refuses a file of another format or version, and any non-finite value in
    a floating-point tensor (naming the tensor)."""
    from safetensors import safe_open

    _check_size(path, fmt, max_bytes, MAX_TORCH_BYTES)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"cannot read {fmt} file {path!r}: {e}") from e
    if "tdiff" not in meta:
        raise ValueError(f"{path!r} is a safetensors file without tdiff metadata, expected a {fmt!r} file")
    try:
        doc = json.loads(meta["tdiff"])
    except ValueError as e:
        raise ValueError(f"cannot read {fmt} file {path!r}: its metadata is not JSON ({e})") from e
    _check_header(doc, path, fmt, version)
    check_finite(tensors, path)
    return doc, tensors


def check_finite(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Raise ValueError naming the first floating-point tensor holding NaN or inf."""
    for name, t in tensors.items():
        if torch.is_tensor(t) and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{path!r}: tensor {name!r} holds NaN or inf")


def _check_header(doc, path: str, fmt: str, version: int) -> None:
    if not isinstance(doc, dict):
        raise ValueError(f"{path!r} holds a {type(doc).__name__}, expected a tdiff {fmt!r} file (an object)")
    if doc.get("format") != fmt:
        raise ValueError(f"{path!r} is a {doc.get('format')!r} file, expected a {fmt!r} file")
    if doc.get("format_version") != version:
        raise ValueError(f"{path!r} has format_version {doc.get('format_version')}, this tdiff reads {version}")


def require(doc: dict, path: str, fmt: str, **types) -> None:
    """Check that `doc` has each key with a value of the given type(s); a clear error otherwise."""
    for key, kind in types.items():
        if key not in doc:
            raise ValueError(f"{fmt} file {path!r} has no {key!r} entry")
        if not isinstance(doc[key], kind):
            raise ValueError(f"{fmt} file {path!r}: {key!r} must be a {getattr(kind, '__name__', kind)}, "
                             f"got {type(doc[key]).__name__}")


# module -> (state signature, digest). A module's weights change in place (optimiser steps, load_state_dict, copy_)
# through their version counters, or by reassignment through their data pointers; either changes the signature.
_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[tuple, str]]" = weakref.WeakKeyDictionary()


def _state_signature(state: Mapping[str, torch.Tensor]) -> tuple:
    return tuple((k, v.data_ptr(), v._version, tuple(v.shape), tuple(v.stride()), v.dtype, str(v.device))
                 for k, v in state.items())


def hash_state(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def fingerprint_module(module: torch.nn.Module, refresh: bool = False) -> str:
    """A short hash of a model's state (hash_state: every tensor's name, dtype, shape and bytes), to refuse
    artefacts made for another model. It is cached per module and recomputed when any tensor changes (its version
    counter or storage); writes through `param.data` bypass the version counter, so pass refresh=True after those."""
    state = module.state_dict(keep_vars=True)
    signature = _state_signature(state)
    cached = None if refresh else _FINGERPRINTS.get(module)
    if cached is not None and cached[0] == signature:
        return cached[1]
    digest = hash_state(state)[:16]
    _FINGERPRINTS[module] = (signature, digest)
    return digest
