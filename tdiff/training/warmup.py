"""FDM's loss-weight warm-up (Wu et al., "Fast Diffusion Model", Eq. 17): lambda_hat = min(lambda, lambda_max tau^k).

k counts optimiser steps (call `step()` once per optimiser step, on every rank, so every rank clamps alike). The
cap grows geometrically from lambda_max to lambda_end over `warmup_steps` steps, tau = (lambda_end/lambda_max)^(1/W)
(the paper: 5 -> 500 after 10k images), and is removed once it reaches lambda_end. The counter is in
`state_dict()`, so a resumed run clamps exactly as an uninterrupted one (FDM's reference loses it on resume).
"""
from __future__ import annotations

import math

import torch


class WeightWarmup:
    def __init__(self, warmup_steps: int, lambda_max: float = 5.0, lambda_end: float = 500.0):
        if int(warmup_steps) != warmup_steps or int(warmup_steps) < 1:
            raise ValueError(f"warmup_steps must be a positive integer, got {warmup_steps}")
        if not (0 < lambda_max < lambda_end):
            raise ValueError(f"need 0 < lambda_max < lambda_end, got {lambda_max}, {lambda_end}")
        self.warmup_steps, self.lambda_max, self.lambda_end = int(warmup_steps), float(lambda_max), float(lambda_end)
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

    def state_dict(self) -> dict:
        return {"steps": self.steps, "warmup_steps": self.warmup_steps, "lambda_max": self.lambda_max,
                "lambda_end": self.lambda_end}

    def load_state_dict(self, state: dict) -> None:
        for key in ("warmup_steps", "lambda_max", "lambda_end"):
            if key in state and float(state[key]) != float(getattr(self, key)):
                raise ValueError(f"state_dict {key}={state[key]} does not match this warm-up's {getattr(self, key)}")
        steps = int(state["steps"])
        if steps < 0:
            raise ValueError(f"state_dict steps must be >= 0, got {steps}")
        self.steps = steps
