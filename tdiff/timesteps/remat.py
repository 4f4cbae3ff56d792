"""Rematerialised backprop through a solve: network activations are never kept past one model call.

Plain autograd through `tdiff.sample` keeps every network call's activations until the backward pass, so memory
grows linearly with NFE. Here each model call is a custom autograd node that runs the network without a graph in
the forward pass and saves only its inputs (the state x_i and the time). The solver's own updates are the fused
`tdiff::multistep_update` op, whose backward needs only the states and the model-output history. So what the
graph holds is exactly the states x_i and the outputs D_i, and the backward pass walks the solve in reverse,
re-running one network call at a time with its inputs re-enabled and differentiating through just that call
(LD3 App. B.3; Watson et al. 2022).

Gradients reach x_T, the timesteps (through every coefficient row) and the decoupled network times. The
network's own parameters get no gradient through a rematerialised call: LD3 keeps them frozen, and accumulating
into `.grad` behind autograd's back would break `torch.autograd.grad` semantics.

A model in train mode (dropout, DiT's label dropout) draws random numbers in every call. As
`torch.utils.checkpoint` does, each call saves the CPU RNG state (and that of the input's accelerator) before its
forward pass and replays it for the recomputation, so the recomputed call draws the same masks and the gradient
is the gradient of the function that was evaluated; the caller's RNG stream is left as the forward pass left it.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import get_device_states, set_device_states

from ..denoisers import times_validated


class _RematCall(torch.autograd.Function):
    """out = denoiser(x, t), recomputed in backward instead of stored."""

    @staticmethod
    def forward(ctx, denoiser, x: Tensor, t: Tensor):
        ctx.denoiser = denoiser  # any callable (x, t): a D(x, t) or a raw network_output
        ctx.save_for_backward(x, t)
        # the RNG state the call starts from, replayed in backward (torch.utils.checkpoint's preserve_rng_state)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.device_type = x.device.type
        ctx.devices, ctx.device_rng = get_device_states(x) if x.device.type != "cpu" else ([], [])
        with torch.no_grad():
            out = denoiser(x, t)
        ctx.pair = isinstance(out, (tuple, list))
        return tuple(out) if ctx.pair else out

    @staticmethod
    def backward(ctx, *grads):
        x, t = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        # the times were checked when the solver program was built; the recomputation must not re-check them
        with torch.random.fork_rng(devices=ctx.devices, device_type=ctx.device_type), torch.enable_grad(), \
                times_validated():
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.devices:
                set_device_states(ctx.devices, ctx.device_rng, device_type=ctx.device_type)
            x_ = x.detach().requires_grad_(need_x)
            t_ = t.detach().requires_grad_(need_t)
            out = ctx.denoiser(x_, t_)
            outs = tuple(out) if ctx.pair else (out,)
            inputs = [v for v, need in ((x_, need_x), (t_, need_t)) if need]
            pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
            if not inputs or not pairs:
                return None, None, None
            got = list(torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs],
                                           allow_unused=True))
        gx = got.pop(0) if need_x else None
        gt = got.pop(0) if need_t else None
        if gt is not None and gt.shape != t.shape:
            gt = gt.sum_to_size(t.shape)
        return None, gx, gt


class RematDenoiser:
    """Wraps a denoiser so that `tdiff.sample` through it stores no network activations (see module doc).

    Without grad mode it is the plain denoiser. Per-call keyword conditions are not supported (bind them in the
    wrapped callable). A tdiff Denoiser (one with `network_output` and `conversion`) keeps that split through the
    wrapper: the rematerialised node is the raw network call, and the sampling loop converts its output at the
    sample's grid point exactly as it does without remat, so a rematerialised solve is the same function as a plain
    one."""

    def __init__(self, denoiser):
        if not callable(denoiser):
            raise ValueError("denoiser must be callable as D(x, t)")
        self.denoiser = denoiser
        self.schedule = getattr(denoiser, "schedule", None)
        if callable(getattr(denoiser, "network_output", None)) and callable(getattr(denoiser, "conversion", None)):
            self.network_output = self._network_output
            self.conversion = denoiser.conversion
            for name in ("prediction", "precond", "clip_x0"):
                if hasattr(denoiser, name):
                    setattr(self, name, getattr(denoiser, name))

    @staticmethod
    def _remat(fn, x: Tensor, t, cond: dict):
        if cond:
            raise ValueError("RematDenoiser takes no per-call conditions; bind them into the wrapped denoiser")
        if not torch.is_grad_enabled():
            return fn(x, t)
        return _RematCall.apply(fn, x, torch.as_tensor(t))

    def _network_output(self, x: Tensor, t: Tensor, **cond):
        return self._remat(self.denoiser.network_output, x, t, cond)

    def __call__(self, x: Tensor, t: Tensor, **cond):
        return self._remat(self.denoiser, x, t, cond)


def sample_remat(denoiser, x_T: Tensor, timesteps, solver: str = "unipc", order=None, timesteps_cond=None,
                 **opts) -> Tensor:
    """`tdiff.sample` with rematerialised backprop: same result, same gradients (w.r.t. x_T, timesteps and
    timesteps_cond), memory O(NFE * state) instead of O(NFE * network activations)."""
    from ..solvers import sample

    return sample(RematDenoiser(denoiser), x_T, timesteps, solver=solver, order=order,
                  timesteps_cond=timesteps_cond, **opts)  # RematDenoiser carries the denoiser's .schedule
