"""How the final sample of a solve depends on each model output, step by step.

Every ODE solver in `tdiff.solvers` is a straight-line program of linear updates over the model outputs (the
coefficient rows depend only on the timesteps). Interpreting that program over coefficient arrays instead of
tensors gives, exactly and for any solver/order/corrector, the weight P[s, n] with which the output D_n, as used
by the update(s) of program step s, reaches the final sample:

    x_N = a x_T + sum_s sum_n P[s, n] D_n        (the model's dependence on x is ignored: errors, not dynamics)

Each buffer is an (S, N+1) array: column 0 is x_T, column n+1 is D_n, the row says at which step a model output
entered an update. DM-NonUniform's "solver" objective is built on P (Xue et al. 2024, Eq. 35): an error e_n in D_n
moves the result by sum_s P[s, n] e_n.

The interpretation runs in numpy, with a hand-written reverse sweep (an autograd Function over the rows) and a
forward sweep of tangents (the Jacobian of P in the program's inputs): the arrays are tiny, so torch's per-op and
per-autograd-node cost would be nearly all of DM-NonUniform's run time.
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from ..solvers.program import Alias, Eval, Noise, Program, Update


def step_output_weights(prog: Program) -> Tensor:
    """(S, N) weights P[s, n], differentiable in the program's rows."""
    return _StepOutputWeights.apply(prog, torch.cat([r.reshape(-1) for r in prog.rows]))


def step_output_weight_tangents(build: Callable[[Tensor], Program], inputs: Tensor, jacobian: bool = True):
    """P (S, N) for the program build(inputs) makes and, if asked, dP/d inputs (S, N, L), both as numpy arrays.

    The rows' Jacobian in the (L,) inputs comes from torch (reverse mode, vectorised over the rows); it is pushed
    forward through the program in numpy, one tangent per input."""
    if not jacobian:
        with torch.no_grad():
            prog = build(inputs)
        weights, _, _ = _interpret(prog, [r.detach().double().numpy() for r in prog.rows])
        return weights[:, 1:], None
    built = {}

    def flat_rows(x):
        built["prog"] = build(x)  # the instructions are plain data; the rows come back through jacrev
        flat = torch.cat([r.reshape(-1) for r in built["prog"].rows])
        return flat, flat

    flat_jac, flat = torch.func.jacrev(flat_rows, has_aux=True)(inputs)
    prog = built["prog"]
    split = np.cumsum([r.numel() for r in prog.rows])[:-1]
    rows = np.split(flat.detach().double().numpy(), split)
    drows = np.split(flat_jac.detach().double().numpy(), split)
    weights, _, tangent = _interpret(prog, rows, drows)
    return weights[:, 1:], np.moveaxis(tangent[:, :, 1:], 0, -1)


def step_output_weight_columns(prog: Program) -> np.ndarray:
    """(B, S, N) weights P of a program whose rows are numpy (K, B) arrays: B columns of coefficients that the
    builder evaluated at once (a batch of time-step vectors, or complex-step tangents of one; any dtype).

    One reverse sweep: the adjoint of each value is a (B,) vector, since the result depends linearly on every
    buffer; a raw model output D_n read by step s then receives P[s, n] = adjoint(update) * its row entry. For a
    chain (each update reads the one before, as every multistep solver's program does) the adjoints are one
    cumulative product, and the whole sweep a handful of array operations whatever N and B."""
    width = prog.rows[0].shape[-1] if prog.rows else 1
    if any(type(r) is not np.ndarray or r.ndim != 2 or r.shape[1] != width for r in prog.rows):
        raise ValueError("step_output_weight_columns needs every row as a numpy (K, B) array of B columns (a "
                         "builder run on a Grid of (N+1, B) host arrays)")
    plan = _sweep_plan(tuple(map(tuple, prog.steps)), tuple(len(r) for r in prog.rows))
    weights = np.zeros((len(prog.steps), prog.nfe, width), dtype=prog.rows[0].dtype if prog.rows else np.float64)
    if plan.chain:
        flat = np.concatenate(prog.rows)  # (sum K, B)
        factor = flat[plan.x_entry]  # each update's coefficient on the value before it
        adjoint = np.empty_like(factor)
        adjoint[-1] = 1.0
        adjoint[:-1] = np.cumprod(factor[:0:-1], axis=0)[::-1]  # the product of the later updates' factors
        weights[plan.raw_step, plan.raw_output] = flat[plan.raw_entry] * adjoint[plan.raw_update]
        return np.moveaxis(weights, -1, 0)
    adjoint = {plan.final: None}  # None: 1 (the result itself)
    for row_index, out, reads in reversed(plan.tape):
        if out not in adjoint:
            continue  # this value never reaches the final sample
        a = adjoint.pop(out)
        coefficients = prog.rows[row_index] if a is None else prog.rows[row_index] * a  # (K, B)
        for j, read in enumerate(reads):
            if read[0] == "raw":
                weights[read[1], read[2]] += coefficients[j]
            elif read[1] is not None:  # None: the initial noise x_T, not a model output
                adjoint[read[1]] = coefficients[j] if adjoint.get(read[1]) is None else \
                    adjoint[read[1]] + coefficients[j]
    return np.moveaxis(weights, -1, 0)


@functools.lru_cache(maxsize=64)
def _sweep_plan(steps: tuple, widths: tuple):
    """The program's data flow without arithmetic (it depends on the instructions only, the same at every point):
    per Update, (row index, the value it makes, its reads), each read ("raw", step s, output n) for a model output
    read by step s, or ("value", id) for an earlier Update's value (id None: the initial x_T); the id of the final
    value; and, for a chain, the flat entries (in the rows concatenated) of each update's factor on the value before
    it and of every raw read, with that read's update, step and output."""
    buf, tape = {"x": ("value", None)}, []
    for s, step in enumerate(steps):
        for ins in step:
            if type(ins) is Eval:
                buf[ins.out] = ("raw", ins.k)
            elif type(ins) is Alias:
                buf[ins.out] = buf[ins.src]
            elif type(ins) is Update:
                reads = [buf[name] for name in (ins.x, *ins.hist)]
                tape.append((ins.row, len(tape), [("raw", s, r[1]) if r[0] == "raw" else r for r in reads]))
                buf[ins.out] = ("value", len(tape) - 1)
            elif type(ins) is Noise:
                raise ValueError("output weights are defined for ODE solvers only (this program adds noise)")
    if buf["x"][0] != "value" or buf["x"][1] is None:
        raise ValueError("the program's result is not an update of the model outputs")
    final = buf["x"][1]
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.intp)
    x_entry, raw = [], []  # raw: (flat entry, update, step, output)
    chain = final == len(tape) - 1
    for u, (row_index, _, reads) in enumerate(tape):
        values = [j for j, read in enumerate(reads) if read[0] == "value"]
        chain = chain and len(values) == 1 and reads[values[0]][1] == (u - 1 if u else None)
        x_entry += [offsets[row_index] + j for j in values[:1]]
        raw += [(offsets[row_index] + j, u, read[1], read[2]) for j, read in enumerate(reads) if read[0] == "raw"]
    pairs = [(r[2], r[3]) for r in raw]
    chain = chain and len(set(pairs)) == len(pairs)  # one write per (step, output)
    columns = [np.asarray(c, dtype=np.intp) for c in zip(*raw)] if raw else [np.zeros(0, np.intp)] * 4
    return types.SimpleNamespace(tape=tape, final=final, chain=chain, x_entry=np.asarray(x_entry, dtype=np.intp),
                                 raw_entry=columns[0], raw_update=columns[1], raw_step=columns[2],
                                 raw_output=columns[3])


def output_weights(prog: Program) -> Tensor:
    """(N,) total weight c_n of D_n in the final sample."""
    return step_output_weights(prog).sum(0)


class _StepOutputWeights(torch.autograd.Function):
    """Over the rows concatenated into one vector: one numpy conversion and one autograd edge, not one per row."""

    @staticmethod
    def forward(ctx, prog: Program, flat_rows: Tensor) -> Tensor:
        flat = flat_rows.detach().cpu().double().numpy()
        np_rows = np.split(flat, np.cumsum([r.numel() for r in prog.rows])[:-1])
        weights, tape, _ = _interpret(prog, np_rows)
        ctx.tape, ctx.np_rows, ctx.final, ctx.dtype = tape, np_rows, weights, flat_rows.dtype
        return torch.from_numpy(weights[:, 1:].copy()).to(flat_rows.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = np.zeros((grad.shape[0], grad.shape[1] + 1))
        g[:, 1:] = grad.detach().cpu().double().numpy()
        grads = _reverse(ctx.tape, ctx.np_rows, ctx.final, g)
        return None, torch.from_numpy(np.concatenate(grads)).to(ctx.dtype)


def _interpret(prog: Program, rows: list, drows: Optional[list] = None):
    """Forward pass over (S, N+1) arrays; the tape lists (row index, output array, read arrays) per Update. With
    drows (each row's (K, L) Jacobian), also the (L, S, N+1) tangent of the result (None while it is zero)."""
    n_steps = len(prog.steps)
    start = np.zeros((n_steps, prog.nfe + 1))
    start[0, 0] = 1.0
    buf, tangent, tape = {"x": start}, {"x": None}, []
    for s, step in enumerate(prog.steps):
        for ins in step:
            if isinstance(ins, Eval):
                buf[ins.out] = ins.k  # a raw model output: tagged with the step that first combines it
                tangent[ins.out] = None
            elif isinstance(ins, Alias):
                buf[ins.out], tangent[ins.out] = buf[ins.src], tangent[ins.src]
            elif isinstance(ins, Update):
                row, names = rows[ins.row], (ins.x, *ins.hist)
                reads = [_tagged(buf[name], s, start.shape) for name in names]
                acc = row[0] * reads[0]
                for j in range(1, len(reads)):
                    acc = acc + row[j] * reads[j]
                buf[ins.out] = acc
                tape.append((ins.row, acc, reads))
                if drows is not None:  # d(sum_j row_j read_j) = sum_j drow_j read_j + row_j dread_j
                    d_acc = np.einsum("jl,jsn->lsn", drows[ins.row], np.stack(reads))
                    for j, name in enumerate(names):
                        if tangent[name] is not None:
                            d_acc = d_acc + row[j] * tangent[name]
                    tangent[ins.out] = d_acc
            elif isinstance(ins, Noise):
                raise ValueError("output weights are defined for ODE solvers only (this program adds noise)")
    return buf["x"], tape, tangent["x"]


def _reverse(tape: list, rows: list, final: np.ndarray, grad_out: np.ndarray) -> list:
    """d(sum grad_out * final x)/d rows, sweeping the tape backwards; adjoints are keyed by array identity, since
    buffer names are reused from step to step while each Update makes a new array."""
    grads = [np.zeros_like(r) for r in rows]
    adjoint = {id(final): grad_out}
    for row_index, out, reads in reversed(tape):
        a = adjoint.pop(id(out), None)
        if a is None:
            continue  # this value never reaches the final sample
        row = rows[row_index]
        for j, value in enumerate(reads):
            grads[row_index][j] += float(np.vdot(a, value))
            key = id(value)
            adjoint[key] = adjoint[key] + row[j] * a if key in adjoint else row[j] * a
    return grads


def _tagged(value, s: int, shape) -> np.ndarray:
    if isinstance(value, int):
        one_hot = np.zeros(shape)
        one_hot[s, value + 1] = 1.0
        return one_hot
    return value
