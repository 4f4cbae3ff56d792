"""python -m bench gpu: every fused op on a CUDA GPU (the Triton kernels), checked against its pure-PyTorch
reference and timed against eager PyTorch, torch.compile and the copy ceiling (bytes the op must move / time,
against dst.copy_(src) moving the same bytes). Writes bench/results/gpu.json; about 8 minutes at most (a time
guard drops the remaining torch.compile comparisons, and says so, if compiling runs long).

Without a CUDA device it runs its tiny mode instead, in a subprocess under the Triton interpreter
(TRITON_INTERPRET=1): the same checks and the same code paths at toy sizes, timings meaningless. That mode is what
the test suite runs (tests/test_op_gpu_bench.py); it writes gpu.quick.json.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch

from bench.common import interleaved, load_average, median_ci, print_table, write_result
from bench.multistep_update import eager_update as _eager_update
from tdiff import schedules as S
from tdiff.ops import dispatch
from tdiff.ops.cached_block import cached_block, cached_block_backward_reference, cached_block_reference
from tdiff.ops.multistep_update import (multistep_update, multistep_update_backward_reference,
                                        multistep_update_convert_reference, multistep_update_reference)
from tdiff.ops.noisy_sample import noisy_sample, noisy_sample_backward_reference
from tdiff.ops.weighted_mse import weighted_mse_backward_reference, weighted_mse_reference, weighted_mse_with_mse

GPU_SIZES = {"small": (16, 4, 64, 64), "large": (64, 4, 128, 128)}
GPU_BLOCK_SIZES = {"small": (8, 256, 1152), "large": (32, 1024, 1152)}  # DiT-XL-like (B, tokens, channels)
TINY_SIZES = {"tiny": (3, 2, 5, 7)}
TINY_BLOCK_SIZES = {"tiny": (3, 4, 10)}
COMPILE_BUDGET_S = 330.0  # after this, torch.compile comparisons are skipped (the run must stay under 8 minutes)
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


class Case:
    """One op at one size: the tdiff call, the eager PyTorch equivalent, the reference outputs to check against,
    and the bytes it must move."""

    def __init__(self, name: str, tdiff_fn: Callable, eager_fn: Callable, reference: Callable, nbytes: int):
        self.name, self.tdiff_fn, self.eager_fn = name, tdiff_fn, eager_fn
        self.reference, self.nbytes = reference, nbytes


def _view(x):
    return (-1,) + (1,) * (x.dim() - 1)


def cases(shape, block_shape, dtype, device) -> List[Case]:
    acc = dispatch.coef_dtype(torch.empty(0, dtype=dtype))
    r = lambda *s, d=dtype: torch.randn(*s, device=device).to(d)  # noqa: E731
    x, h0, h1, h2, h3, u = (r(*shape) for _ in range(6))
    b, es, n = shape[0], x.element_size(), x.numel()
    out = []
    for k, hist in ((2, [h0, h1]), (4, [h0, h1, h2, h3])):
        c = torch.randn(b, 1 + k, device=device, dtype=acc)
        out.append(Case(f"multistep_update K={k}", lambda hist=hist, c=c: multistep_update(x, hist, c, check=False),
                        lambda hist=hist, c=c: _eager_update(x, hist, c.to(dtype)),
                        lambda hist=hist, c=c: multistep_update_reference(x, hist, c), (k + 2) * n * es))
    c2, pq, w = torch.randn(b, 3, device=device, dtype=acc), torch.randn(b, 2, device=device, dtype=acc), \
        torch.rand(b, device=device, dtype=acc) + 1
    out.append(Case("multistep_update convert+cfg K=2",
                    lambda: multistep_update(x, [h0, h1], c2, uncond=u, scale=w, convert=pq, check=False),
                    lambda: _eager_convert(x, [h0, h1], c2.to(dtype), u, w.to(dtype), pq.to(dtype)),
                    lambda: multistep_update_convert_reference(x, [h0, h1], c2, u, w, x, pq), 6 * n * es))
    out.append(Case("multistep_update backward K=2",
                    lambda: torch.ops.tdiff.multistep_update_backward(u, x, [h0, h1], c2),
                    lambda: _eager_update_backward(u, x, [h0, h1], c2.to(dtype)),
                    lambda: multistep_update_backward_reference(u, x, [h0, h1], c2), 7 * n * es))
    sched = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000))
    t = torch.rand(b, device=device, dtype=torch.float64) * 0.98 + 0.01
    out.append(Case("noisy_sample (x_t, input)",
                    lambda: noisy_sample(x, h0, t, sched, write_input=True, precond_sigma_data=1.0, check=False),
                    lambda: _eager_noisy(sched, x, h0, t), lambda: _noisy_reference(sched, x, h0, t), 4 * n * es))
    coefs = torch.rand(b, 3, device=device, dtype=acc)
    out.append(Case("noisy_sample backward", lambda: torch.ops.tdiff.noisy_sample_backward(x, h0, coefs),
                    lambda: _eager_noisy_backward(x, h0, coefs.to(dtype)),
                    lambda: noisy_sample_backward_reference(x, h0, coefs), 4 * n * es))
    weight, g = torch.rand(b, device=device), torch.randn(b, device=device)
    out.append(Case("weighted_mse", lambda: weighted_mse_with_mse(x, h0, weight),
                    lambda: _eager_wmse(x, h0, weight), lambda: weighted_mse_reference(x, h0, weight), 2 * n * es))
    out.append(Case("weighted_mse backward", lambda: torch.ops.tdiff.weighted_mse_backward(g, x, h0, weight),
                    lambda: _eager_wmse_backward(g, x, h0, weight),
                    lambda: weighted_mse_backward_reference(g, x, h0, weight), 3 * n * es))
    bb, nt, ch = block_shape
    xb, cache, gbr = (r(bb, nt, ch) for _ in range(3))
    gate = r(bb, ch)
    source = torch.full((bb,), -1, dtype=torch.long)
    source[::2] = torch.arange((bb + 1) // 2)
    source = source.to(device)
    fresh = r((bb + 1) // 2, nt, ch)
    bn = xb.numel() * es
    out.append(Case("cached_block", lambda: cached_block(xb, gate, fresh, cache, source),
                    lambda: _eager_block(xb, gate, fresh, cache, source),
                    lambda: cached_block_reference(xb, gate, fresh, cache, source), 4 * bn))
    computed = fresh.shape[0]
    out.append(Case("cached_block backward",
                    lambda: torch.ops.tdiff.cached_block_backward(xb, gbr, gate, cache, source, computed),
                    lambda: _eager_block_backward(xb, gbr, gate, cache, source, computed),
                    lambda: cached_block_backward_reference(xb, gbr, gate, cache, source, computed),
                    int(5.5 * bn)))  # reads 3, writes grad_x, the selected gradient, and zeros for half the rows
    return out


# eager PyTorch, as a user writes each op without tdiff ------------------------------------------------------------
def _eager_convert(x, hist, c, u, w, pq):
    v = _view(x)
    d = pq[:, 0].view(v) * x + pq[:, 1].view(v) * (u + w.view(v) * (hist[0] - u))
    return _eager_update(x, [d, *hist[1:]], c), d


def _eager_update_backward(g, x, hist, c):
    v = _view(x)
    return ([c[:, 0].view(v) * g] + [c[:, j + 1].view(v) * g for j in range(len(hist))],
            torch.stack([(g * t).flatten(1).sum(1) for t in [x, *hist]], 1))


def _eager_noisy(sched, x0, eps, t):
    a = sched.alpha(t).to(x0.dtype).view(_view(x0))
    s = sched.sigma(t).to(x0.dtype).view(_view(x0))
    xt = a * x0 + s * eps
    return xt, xt / torch.sqrt(s * s + a * a)


def _noisy_reference(sched, x0, eps, t):
    spec = sched.kernel_spec()
    from tdiff.ops.noisy_sample import kernel_table, noisy_sample_reference

    return noisy_sample_reference(x0, eps, t, spec.kind, list(spec.params), kernel_table(spec, x0.device), 1.0, [],
                                  0, True)[:2]


def _eager_noisy_backward(g, gin, coefs):
    v = _view(g)
    tot = g + coefs[:, 2].view(v) * gin
    return coefs[:, 0].view(v) * tot, coefs[:, 1].view(v) * tot


def _eager_wmse(p, q, w):
    mse = ((p.float() - q.float()) ** 2).flatten(1).mean(1)
    return w * mse, mse


def _eager_wmse_backward(g, p, q, w):
    return ((2.0 / p[0].numel()) * (g * w)).view(_view(p)).to(p.dtype) * (p - q)


def _eager_block(x, gate, fresh, cache, source):
    branch = cache.clone()
    rows = (source >= 0).nonzero().squeeze(1)
    branch.index_copy_(0, rows, fresh.index_select(0, source.index_select(0, rows)))
    return x + gate.unsqueeze(1) * branch, branch


def _eager_block_backward(gout, gbr, gate, branch, source, computed):
    total = gout * gate.unsqueeze(1) + gbr
    rows = (source >= 0).nonzero().squeeze(1)
    gfresh = total.new_zeros((computed,) + tuple(total.shape[1:]))
    gfresh.index_copy_(0, source.index_select(0, rows), total.index_select(0, rows))
    gcache = total.clone()
    gcache.index_fill_(0, rows, 0)
    return gout.clone(), (gout * branch).sum(1), gfresh, gcache


# -------------------------------------------------------------------------------------------------------------------
def _flat(outs):
    outs = outs if isinstance(outs, (tuple, list)) else [outs]
    flat = []
    for o in outs:
        flat.extend(_flat(o) if isinstance(o, (tuple, list)) else [o])
    return flat


def check(case: Case, dtype) -> float:
    """Largest absolute difference between the Triton path and the reference (raises past the tolerance)."""
    got, want = _flat(case.tdiff_fn()), _flat(case.reference())
    worst = 0.0
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), **TOL.get(dtype, TOL[torch.float32]),
                                   msg=lambda m: f"{case.name}: {m}")
        worst = max(worst, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
    return worst


def _timer(on_gpu: bool):
    if on_gpu:
        from triton.testing import do_bench

        def time_fns(fns: Dict[str, Callable]) -> Dict[str, dict]:
            res = {}
            for _ in range(3):  # three interleaved rounds of every candidate; keep each one's medians
                for name, fn in fns.items():
                    q = do_bench(fn, warmup=10, rep=40, quantiles=[0.5, 0.025, 0.975])
                    res.setdefault(name, []).append(q)
            return {n: {"ms": sorted(v[0] for v in qs)[1], "ms_lo": min(v[1] for v in qs),
                        "ms_hi": max(v[2] for v in qs)} for n, qs in res.items()}
    else:
        def time_fns(fns: Dict[str, Callable]) -> Dict[str, dict]:
            # the interpreter's timings mean nothing: one round, to run the code path
            times = interleaved(fns, rounds=1, block_seconds=1e-3, warmup=0)
            return {n: {"ms": median_ci(t)["median"] * 1e3, "ms_lo": min(t) * 1e3, "ms_hi": max(t) * 1e3}
                    for n, t in times.items()}
    return time_fns


def measure(tiny: bool) -> dict:
    on_gpu = torch.cuda.is_available() and not tiny
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        assert dispatch.triton_interpreting(), "the tiny mode runs under TRITON_INTERPRET=1"
        os.environ["TDIFF_BACKEND"] = "triton"
    sizes, block_sizes = (TINY_SIZES, TINY_BLOCK_SIZES) if tiny else (GPU_SIZES, GPU_BLOCK_SIZES)
    dtypes = [torch.float32] if tiny else [torch.float32, torch.bfloat16]
    time_fns = _timer(on_gpu)
    started = time.perf_counter()
    records, skipped_compile = [], []
    for size in sizes:
        for dtype in dtypes:
            for case in cases(sizes[size], block_sizes[size], dtype, device):
                worst = check(case, dtype)
                nbytes = case.nbytes
                src = torch.empty(max(1, nbytes // 2), dtype=torch.uint8, device=device)
                dst = torch.empty_like(src)
                fns = {"copy": lambda: dst.copy_(src), "eager": case.eager_fn, "tdiff": case.tdiff_fn}
                if dtype == torch.float32 and time.perf_counter() - started < COMPILE_BUDGET_S:
                    # tiny mode: dynamo's eager backend (the code path without the minutes of inductor compiles)
                    fns["torch.compile"] = torch.compile(case.eager_fn, dynamic=False,
                                                         backend="eager" if tiny else "inductor")
                elif dtype == torch.float32:
                    skipped_compile.append(f"{case.name} {size}")
                with torch.no_grad():
                    timing = time_fns(fns)
                copy_ms = timing["copy"]["ms"]
                for impl, t in timing.items():
                    records.append({"op": case.name, "size": size, "dtype": str(dtype).replace("torch.", ""),
                                    "impl": impl, **t, "GBps": nbytes / (t["ms"] * 1e-3) / 1e9,
                                    "frac_of_copy": copy_ms / t["ms"], "max_abs_err_vs_reference": worst})
    print_table("Fused ops on " + (torch.cuda.get_device_name() if on_gpu else "CPU, Triton interpreter (tiny mode: "
                                   "checks only, timings meaningless)"),
                ["op", "size", "dtype", "impl", "ms", "GB/s", "of copy"],
                [[r["op"], r["size"], r["dtype"], r["impl"], r["ms"], r["GBps"], f"{r['frac_of_copy']:.2f}"]
                 for r in records])
    return {"device": torch.cuda.get_device_name() if on_gpu else "cpu (Triton interpreter)",
            "mode": "gpu" if on_gpu else "interpreter", "records": records, "compile_skipped": skipped_compile,
            "seconds": time.perf_counter() - started}


def run(quick: bool = False, tiny: bool = False) -> dict:
    """On a CUDA machine: the full run (`quick` is accepted for the harness; the sizes are already bounded).
    Elsewhere: the tiny interpreter mode, in a subprocess unless this process already interprets Triton."""
    if not tiny and not torch.cuda.is_available():
        print("[bench gpu] no CUDA device: running the tiny interpreter mode (checks only; timings meaningless)")
        if not dispatch.triton_interpreting():
            env = dict(os.environ, TRITON_INTERPRET="1")
            code = "from bench.gpu import run; run(tiny=True)"
            subprocess.run([sys.executable, "-c", code], env=env, check=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            return {"mode": "interpreter (subprocess)"}
        tiny = True
    load_before = load_average()
    backend_before = os.environ.get("TDIFF_BACKEND")
    try:
        payload = measure(tiny)
    finally:
        if backend_before is None:
            os.environ.pop("TDIFF_BACKEND", None)
        else:
            os.environ["TDIFF_BACKEND"] = backend_before
    payload["loadavg_before"], payload["loadavg_after"] = load_before, load_average()
    path = write_result("gpu", payload, quick or tiny)
    print(f"wrote {path} in {payload['seconds']:.0f}s")
    return payload


if __name__ == "__main__":
    run(quick="--quick" in sys.argv, tiny="--tiny" in sys.argv)
