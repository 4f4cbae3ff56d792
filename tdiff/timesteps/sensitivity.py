"""How the final sample of a solve depends on each model output, step by step.

Every ODE solver in `tdiff.solvers` is a straight-line program of linear updates over the model outputs (the
coefficient rows depend only on the timesteps). Interpreting that program over coefficient arrays instead of
tensors gives, exactly and for any solver/order/corrector, the weight P[s, n] with which the output D_n, as used
by the update(s) of program step s, reaches the final sample:

    x_N = a x_T + sum_s sum_n P[s, n] D_n        (the model's dependence on x is ignored: errors, not dynamics)

Each buffer is an (S, N+1) array: column 0 is x_T, column n+1 is D_n, the row says at which step a model output
entered an update. DM-NonUniform's objective is built on P (Xue et al. 2024, Eq. 35): an error e_n in D_n moves
the result by sum_s P[s, n] e_n.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..solvers.program import Alias, Eval, Noise, Program, Update


def step_output_weights(prog: Program) -> Tensor:
    """(S, N) weights P[s, n], differentiable in the program's rows."""
    n_steps, n_eval = len(prog.steps), prog.nfe
    dtype = prog.rows[0].dtype
    start = torch.zeros(n_steps, n_eval + 1, dtype=dtype)
    start[0, 0] = 1.0
    buf = {"x": start}
    for s, step in enumerate(prog.steps):
        for ins in step:
            if isinstance(ins, Eval):
                buf[ins.out] = ins.k  # a raw model output: tagged with the step that first combines it
            elif isinstance(ins, Alias):
                buf[ins.out] = buf[ins.src]
            elif isinstance(ins, Update):
                row = prog.rows[ins.row]
                acc = row[0] * _tagged(buf[ins.x], s, start)
                for j, name in enumerate(ins.hist):
                    acc = acc + row[j + 1] * _tagged(buf[name], s, start)
                buf[ins.out] = acc
            elif isinstance(ins, Noise):
                raise ValueError("output weights are defined for ODE solvers only (this program adds noise)")
    return buf["x"][:, 1:]


def _tagged(value, s: int, like: Tensor) -> Tensor:
    if isinstance(value, int):
        one_hot = torch.zeros_like(like)
        one_hot[s, value + 1] = 1.0
        return one_hot
    return value


def output_weights(prog: Program) -> Tensor:
    """(N,) total weight c_n of D_n in the final sample."""
    return step_output_weights(prog).sum(0)
