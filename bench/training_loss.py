"""The training loss hot path: tdiff's fused ops vs eager PyTorch.

Two comparisons, forward + backward, CPU:
  1. weighted per-sample MSE alone: tdiff::weighted_mse vs eager `w * ((p - q)**2).flatten(1).mean(1)`, with the
     copy bandwidth of the same bytes as the ceiling.
  2. the whole loss around a trivial network (pred = 0.5 x_t, so that the loss machinery is what is timed):
     DiffusionLoss (time draw + tdiff::noisy_sample + tdiff::weighted_mse) vs the same maths in eager PyTorch.
"""
from __future__ import annotations

import torch

from bench.common import best_seconds, copy_seconds, print_table, write_result
from tdiff.ops import dispatch
from tdiff.ops.weighted_mse import weighted_mse
from tdiff.models.defaults import default_schedule
from tdiff.training import DiffusionLoss

SHAPES_FULL = [(256, 1, 16, 16), (64, 4, 32, 32), (32, 4, 64, 64)]
SHAPES_QUICK = [(64, 1, 16, 16), (16, 4, 32, 32)]





def _eager_wmse(p, q, w):
    return (w * ((p - q) ** 2).flatten(1).mean(1)).mean()


def _bench_wmse(shape, min_time, compile_too):
    p = torch.randn(shape, requires_grad=True)
    q = torch.randn(shape)
    w = torch.rand(shape[0])

    def fused():
        weighted_mse(p, q, w).mean().backward()

    def eager():
        _eager_wmse(p, q, w).backward()

    torch.testing.assert_close(weighted_mse(p, q, w).mean(), _eager_wmse(p, q, w))
    # bytes that must move: forward reads p, q; backward reads p, q and writes grad
    nbytes = 5 * p.numel() * p.element_size()
    compiled_s = None
    if compile_too:
        try:  # inductor needs a C++ toolchain; report "-" rather than fail without one
            cfn = torch.compile(_eager_wmse)

            def compiled():
                cfn(p, q, w).backward()

            compiled_s = best_seconds(compiled, min_time)
        except Exception as e:  # noqa: BLE001
            print(f"torch.compile unavailable: {type(e).__name__}: {e}")
    kernel_s = None
    if dispatch.cpp_has("weighted_mse_cpu"):  # the C++ kernels alone, without the Python op/autograd layer
        g = torch.ones(shape[0])
        pd = p.detach()

        def kernels():
            torch.ops.tdiff.weighted_mse_cpu(pd, q, w)
            torch.ops.tdiff.weighted_mse_backward_cpu(g, pd, q, w)

        kernel_s = best_seconds(kernels, min_time)
    return (best_seconds(fused, min_time), best_seconds(eager, min_time), compiled_s, kernel_s,
            copy_seconds(nbytes, min_run_time=min_time, timer=best_seconds))


def _bench_loss(shape, min_time):
    sched = default_schedule()
    loss_fn = DiffusionLoss(sched, sampler="speed", weighting="speed")
    scale = torch.tensor(0.5, requires_grad=True)

    def model(x, t, **_):
        return scale * x

    x0 = torch.randn(shape)
    g = torch.Generator().manual_seed(0)
    ac = sched.alphas_cumprod.float()
    w_table = loss_fn.weighting.table().float()
    probs = loss_fn.sampler.probs.float()

    def fused():
        loss_fn(model, x0, generator=g).backward()

    def eager():
        # the usual training-script version: multinomial draw, gathers, broadcast arithmetic, mean over dims
        b = shape[0]
        idx = torch.multinomial(probs, b, replacement=True, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = ac[idx].sqrt().view(-1, 1, 1, 1)
        s = (1 - ac[idx]).sqrt().view(-1, 1, 1, 1)
        xt = a * x0 + s * eps
        pred = model(xt, idx.float())
        (w_table[idx] * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean().backward()

    return best_seconds(fused, min_time), best_seconds(eager, min_time)


def run(quick: bool = False) -> dict:
    # one intra-op thread: on an oversubscribed machine a 2-thread OpenMP region waits for a descheduled thread
    # for a whole scheduler slice (tens of ms), which then dominates every measurement
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = dispatch.backend_for(torch.empty(1), "weighted_mse_cpu")
    print(f"weighted_mse backend: {backend}; noisy_sample backend: {dispatch.backend_for(torch.empty(1), 'noisy_sample_cpu')}")
    shapes = SHAPES_QUICK if quick else SHAPES_FULL
    min_time = 0.2 if quick else 3.0
    rows_mse, rows_loss, records = [], [], []
    for shape in shapes:
        f, e, comp, k, c = _bench_wmse(shape, min_time, compile_too=not quick)
        gb = 5 * torch.Size(shape).numel() * 4 / 1e9
        rows_mse.append([str(shape), f * 1e3, e * 1e3, "-" if comp is None else comp * 1e3, e / f,
                         "-" if k is None else k * 1e3, "-" if k is None else gb / k, gb / c])
        lf, le = _bench_loss(shape, min_time)
        rows_loss.append([str(shape), lf * 1e3, le * 1e3, le / lf])
        records.append({"shape": list(shape), "wmse_fused_ms": f * 1e3, "wmse_eager_ms": e * 1e3,
                        "wmse_compiled_ms": None if comp is None else comp * 1e3,
                        "wmse_GBps": gb / f, "wmse_kernels_ms": None if k is None else k * 1e3,
                        "wmse_kernels_GBps": None if k is None else gb / k, "copy_GBps": gb / c, "loss_fused_ms": lf * 1e3,
                        "loss_eager_ms": le * 1e3})
    print_table("weighted per-sample MSE, forward+backward (CPU)",
                ["shape", "fused op ms", "eager ms", "compiled ms", "op speed-up vs eager", "C++ kernels ms",
                 "kernels GB/s", "copy GB/s"], rows_mse)
    print_table("training loss machinery around a trivial network, forward+backward (CPU)",
                ["shape", "DiffusionLoss ms", "eager ms", "speed-up"], rows_loss)
    torch.set_num_threads(threads)
    path = write_result("training_loss", {"rows": records, "weighted_mse_backend": backend, "threads": 1,
                                          "timing": "minimum over repeats (the 2 CPU cores were shared with other jobs)"},
                        quick)
    print(f"wrote {path}")
    return {"rows": records}


if __name__ == "__main__":
    import sys

    run(quick="--quick" in sys.argv)
