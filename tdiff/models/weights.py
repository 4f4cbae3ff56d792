"""Weights files: a module's state as safetensors with a JSON header of metadata (tdiff.artefacts), and the files
that ship inside the package (tdiff/weights/: the default DiT and UNet, the metric classifier).

`python -m tdiff train-defaults` writes the shipped files; see tdiff.models.defaults for the recipe.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Tuple

import torch

from ..artefacts import hash_state, load_safetensors, save_safetensors

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")


def shipped_path(name: str) -> str:
    """The shipped weights file `name` (e.g. "default_dit"), inside the installed package."""
    return os.path.join(WEIGHTS_DIR, f"{name}.safetensors")


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block (building a module, for example) on torch's CPU RNG seeded with `seed`, then restore the
    caller's RNG state: constructing a network draws its initial weights from the global RNG, and a load must not
    shift the stream that the caller's later work (label dropout, noise) draws from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def save_weights(path: str, fmt: str, version: int, module: torch.nn.Module, payload: dict,
                 half: bool = False) -> None:
    """Write `module`'s state to `path` (atomically), floating tensors in float16 when `half`."""
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in module.state_dict().items()}
    save_safetensors(path, fmt, version, state, {**payload, "precision": "float16" if half else "float32"})


def load_weights(path: str, fmt: str, version: int, build: Callable[[dict], torch.nn.Module],
                 check: Optional[Callable[[dict], None]] = None) -> Tuple[torch.nn.Module, dict]:
    """-> (module in eval mode, metadata). `check(metadata)` raises on a mismatch before anything is built;
    `build(metadata)` makes the module (under a fixed seed, so the caller's RNG is untouched). Refused with a
    ValueError naming the file: another format, non-finite values (artefacts.load_safetensors), missing,
    unexpected or misshapen tensors."""
    doc, tensors = load_safetensors(path, fmt, version)
    if check is not None:
        check(doc)
    with seeded(0):
        module = build(doc)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise ValueError(f"{path!r} does not hold this network's weights: missing tensors {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected tensors {extra[:5]}"
                         f"{'...' if len(extra) > 5 else ''}")
    for name, t in expected.items():
        got = tensors[name]
        if got.shape != t.shape or got.is_floating_point() != t.is_floating_point():
            raise ValueError(f"{path!r}: tensor {name!r} is {got.dtype} {tuple(got.shape)}, the network expects "
                             f"{t.dtype} {tuple(t.shape)}")
    module.load_state_dict(tensors)  # copies into the module's own dtype (float16 files load as float32)
    return module.eval(), doc
