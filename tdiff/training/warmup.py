"""FDM's loss-weight warm-up (Wu et al., "Fast Diffusion Model", Eq. 17): lambda_hat = min(lambda, lambda_max tau^k).

k counts optimiser steps (call `step()` once per optimiser step, on every rank, so every rank clamps alike). The
cap grows geometrically from lambda_max to lambda_end over `warmup_steps` steps, tau = (lambda_end/lambda_max)^(1/W)
(the paper: 5 -> 500; FDM's CIFAR-10 code: W = 200 iterations), and is removed once it reaches lambda_end. The
counter is in `state_dict()`, so a resumed run clamps exactly as an uninterrupted one (FDM's reference loses it on
resume).
"""
from __future__ import annotations

import math

import torch

from .. import checks


class WeightWarmup:
    def __init__(self, warmup_steps: int, lambda_max: float = 5.0, lambda_end: float = 500.0):
        self.warmup_steps = checks.integer("warmup_steps", warmup_steps, low=1)
        self.lambda_max = checks.positive("lambda_max", lambda_max)
        self.lambda_end = checks.real("lambda_end", lambda_end, low=self.lambda_max, low_open=True)
        self.tau = math.exp(math.log(self.lambda_end / self.lambda_max) / self.warmup_steps)
        self.steps = 0

    @property
    def cap(self) -> float:
        """The current clamp, or inf once warm-up is over."""
        c = self.lambda_max * self.tau**self.steps
        return math.inf if self.steps >= self.warmup_steps or c >= self.lambda_end else c

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        cap = self.cap
        return weight if math.isinf(cap) else weight.clamp(max=cap)

    def step(self) -> None:
        self.steps += 1

    def config(self) -> dict:
        return {"warmup_steps": self.warmup_steps, "lambda_max": self.lambda_max, "lambda_end": self.lambda_end}

    def state_dict(self) -> dict:
        return {"steps": self.steps, **self.config()}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"warm-up state must be a dict from WeightWarmup.state_dict(), got {type(state).__name__}")
        missing = [k for k in ("steps", *self.config()) if k not in state]
        if missing:
            raise ValueError(f"warm-up state is missing {missing}; expected a dict from WeightWarmup.state_dict()")
        for key, mine in self.config().items():
            theirs = checks.real(f"warm-up state {key}", state[key])
            if theirs != float(mine):
                raise ValueError(f"warm-up state {key}={theirs} does not match this warm-up's {mine}")
        self.steps = checks.integer("warm-up state steps", state["steps"], low=0)
