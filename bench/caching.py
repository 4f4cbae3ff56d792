"""Learned per-step block caching on the default digits DiT (issue 7).

For 50-step DDIM (and 20-step DPM-Solver++ in the full run): wall-clock speed-up, MAC fraction (fvcore, executed
graph), Fréchet distance and PSNR against the uncached samples from the same noise, for
  uncached | learned mask | learned without rectification | learned without loss scaling |
  uniform-interval caching at (about) the learned mask's MACs | diffusers FirstBlockCache (n/a: our DiT is not a
  diffusers model, so its hook registry does not apply)
plus the mask-training time, the per-sample ("mixed time step") batch path against the shared-step path at the
same MACs, a PNG of the learned mask and one of the speed/quality frontier.

--quick: few samples and steps; uses the default DiT only if its checkpoint already exists (never trains it),
otherwise a random tiny DiT, so the figures are then a smoke test only.
"""
from __future__ import annotations

import time

import torch

import tdiff
from tdiff.cache import binarise, cached_dit, macs, train_mask, uniform_interval_mask
from tdiff.cache.mac_count import unit_macs

from .common import plot_path, print_table, pyplot, write_result

NAME = "caching"


def _setup(quick: bool):
    from tdiff.models import defaults

    try:
        model, schedule, den = defaults.load_default("dit", train_if_missing=not quick, progress=not quick)
        trained = True
    except FileNotFoundError:
        from tdiff.models.dit import DiT, DiTConfig

        torch.manual_seed(0)
        model = DiT(DiTConfig(input_size=16, hidden_size=64, depth=4, num_heads=4)).eval()
        with torch.no_grad():  # adaLN-Zero would make every block the identity: give the gates some weight
            for blk in model.blocks:
                torch.nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
                torch.nn.init.normal_(blk.adaLN_modulation[-1].bias, std=0.5)
            torch.nn.init.normal_(model.final_layer.linear.weight, std=0.1)
        schedule = defaults.default_schedule()
        den = tdiff.denoiser(model, schedule)
        trained = False
    return model.eval(), schedule, den, trained


def _mixed_timestep_overhead(model, mask, x_eval, y_eval, schedule, ts, quick: bool) -> list:
    """Time per sampling run of a serving batch whose samples sit at different steps (sample k at step
    1 + (i + k) mod (T-1) on call i, each following its own mask row) against the same batch all at one step,
    over the T-1 cached calls: both spend exactly the same MACs. One thread, interleaved repetitions, minimum:
    2-thread timings on this VM stall whenever anything else runs."""
    from tdiff.cache.units import expand_to_units

    fast = cached_dit(model, mask)
    unit_mask = expand_to_units(mask, fast.cache.units, "branch")
    nfe, n_units = unit_mask.shape
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    try:
        for b in (4,) if quick else (8, 32, 128):
            xb, yb = x_eval[:b], y_eval[:b]
            t_net = [torch.full((b,), float(schedule.index_from_t(t))) for t in ts[:nfe]]
            mixed_rows = [torch.stack([unit_mask[1 + (i - 1 + k) % (nfe - 1)] for k in range(b)])
                          for i in range(1, nfe)]

            def shared():
                fast.reset()
                fast(xb, t_net[0], yb)
                t0 = time.perf_counter()
                for i in range(1, nfe):
                    fast(xb, t_net[i], yb)
                return time.perf_counter() - t0

            def mixed():
                fast.reset()
                with fast.sample_rows(torch.ones(b, n_units, dtype=torch.bool)):
                    fast(xb, t_net[0], yb)
                t0 = time.perf_counter()
                for i in range(1, nfe):
                    with fast.sample_rows(mixed_rows[i - 1]):
                        fast(xb, t_net[i], yb)
                return time.perf_counter() - t0

            with torch.no_grad():
                shared(), mixed()  # warm-up
                times = [(shared(), mixed()) for _ in range(2 if quick else 4)]
            t_shared, t_mixed = min(t for t, _ in times), min(t for _, t in times)
            out.append(dict(batch=b, shared_seconds=t_shared, mixed_seconds=t_mixed, overhead=t_mixed / t_shared - 1))
    finally:
        torch.set_num_threads(threads)
        fast.remove()
    return out


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _sampler(den, x_T, y, ts, solver):
    # the solver calls D(x, t); the class labels are bound here. The denoiser holds the (patched) model, so the
    # `model` argument only marks which network the run goes through
    return lambda model: tdiff.sample(lambda x, t: den(x, t, y=y), x_T, ts, solver=solver, schedule=den.schedule)


# fraction of uncached MACs the learned (rectified) mask may spend: the largest speed-up whose FD stayed within 5%
# in a sweep on the default DiT (DDIM-50, same scores: 0.50 -> +5.9%, 0.55 -> +5.0%, 0.60 -> +3.4%)
MAC_BUDGET = {"ddim": 0.57, "dpmpp": 0.55}


def run(quick: bool = False) -> dict:
    torch.manual_seed(0)
    model, schedule, den, trained = _setup(quick)
    n_eval, n_train, n_time = (16, 4, 8) if quick else (256, 16, 64)
    configs = [("ddim", 10), ("dpmpp", 6)] if quick else [("ddim", 50), ("dpmpp", 20)]
    # quick: few iterations, so a larger step lets the scores actually leave 1
    iterations, lr = (3, 0.3) if quick else (20, 0.03)
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    gen = torch.Generator().manual_seed(1)
    x_eval = torch.randn(n_eval, *shape, generator=gen)
    y_eval = torch.arange(n_eval) % cfg.num_classes
    x_train = torch.randn(n_train, *shape, generator=gen)  # Gaussian noise is the only training input
    y_train = torch.arange(n_train) % cfg.num_classes
    example = (x_eval[:1], torch.full((1,), 500.0), y_eval[:1])

    from tdiff.metrics.errors import psnr

    fd_ok = True
    try:
        from tdiff.metrics.frechet import frechet_distance
    except ImportError:
        fd_ok = False

    def fd(samples):
        if not fd_ok or not trained:
            return float("nan")
        return float(frechet_distance(samples.clamp(-1, 1)))

    results, rows, masks_for_plot = {}, [], {}
    for solver, nfe in configs:
        ts = torch.linspace(schedule.t_max, schedule.t_min, nfe + 1)
        run_eval = _sampler(den, x_eval, y_eval, ts, solver)
        run_time = _sampler(den, x_eval[:n_time], y_eval[:n_time], ts, solver)

        def paired_seconds(mask):
            """(uncached, cached) seconds of one sampling run: the minimum over 3 interleaved pairs, on one
            thread, so that both sides see the same machine state (2-thread timings on this VM stall whenever
            anything else runs, and a reference timed once, minutes earlier, skews every ratio)."""
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            t_plain, t_cached = [], []
            try:
                for _ in range(3):
                    t_plain.append(_timed(lambda: run_time(model))[1])
                    fast = cached_dit(model, mask)
                    try:
                        t_cached.append(_timed(lambda: run_time(model))[1])
                    finally:
                        fast.remove()
            finally:
                torch.set_num_threads(threads)
            return min(t_plain), min(t_cached)

        with torch.no_grad():
            run_time(model)  # warm-up (allocator, first-call overheads) so the uncached time is not inflated
            ref = run_eval(model)
        variants = {}

        def evaluate(label, mask, extra=None):
            fast = cached_dit(model, mask)
            try:
                with torch.no_grad(), fast.sampling_run():
                    out = run_eval(model)
            finally:
                fast.remove()
            with torch.no_grad():
                t_ref, t = paired_seconds(mask)
            count = macs(model, mask, example)
            variants[label] = dict(speedup=t_ref / t, seconds=t, uncached_seconds=t_ref,
                                   mac_fraction=count["fraction"], fd=fd(out),
                                   psnr=float(psnr(out.clamp(-1, 1), ref.clamp(-1, 1))), **(extra or {}))

        variants["uncached"] = dict(speedup=1.0, mac_fraction=1.0, fd=fd(ref), psnr=float("inf"))
        train_fn = _sampler(den, x_train, y_train, ts, solver)
        # choose units by learned score rank (threshold 0) under a MAC budget that holds after rectification
        rank = dict(threshold=0.0, target_mac_fraction=MAC_BUDGET[solver])
        learned, t_train = _timed(lambda: train_mask(model, train_fn, iterations=iterations, lr=lr, **rank,
                                                     rectify=True, solver=solver, progress=not quick))
        rectified = learned.matrix
        evaluate("learned", rectified, dict(train_seconds=t_train))
        # the same scores and budget without the rectification rule: the ablation at equal MACs
        base, per_unit = unit_macs(model, example, {})
        evaluate("learned, no rectification", binarise(torch.tensor(learned.extra["scores"]), 0.0, per_unit, base,
                                                        MAC_BUDGET[solver]))
        no_scale = train_mask(model, train_fn, iterations=iterations, lr=lr, loss_scaling=False, solver=solver,
                              progress=False, rectify=True, **rank)
        evaluate("learned, no loss scaling", no_scale.matrix)
        # uniform interval caching with the interval whose MACs are closest to the learned mask's
        target = variants["learned"]["mac_fraction"]
        best = min(range(1, 6), key=lambda k: abs(macs(model, uniform_interval_mask(nfe, rectified.shape[1], k),
                                                       example)["fraction"] - target))
        evaluate(f"uniform interval {best}", uniform_interval_mask(nfe, rectified.shape[1], best))
        variants["diffusers FirstBlockCache"] = dict(note="n/a: applies to diffusers models only")
        masks_for_plot[f"{solver}-{nfe}"] = rectified

        mixed = _mixed_timestep_overhead(model, rectified, x_eval, y_eval, schedule, ts, quick)

        results[f"{solver}-{nfe}"] = dict(variants=variants, train_seconds=t_train, mixed_timestep=mixed)
        for label, v in variants.items():
            rows.append([f"{solver}-{nfe}", label] + ([f"{v['speedup']:.2f}x", f"{v['mac_fraction']:.3f}",
                                                       f"{v['fd']:.3f}", f"{v['psnr']:.2f}"] if "speedup" in v
                                                      else ["-", "-", "-", v["note"]]))

    print_table(f"learned caching ({'trained default DiT' if trained else 'UNTRAINED tiny DiT (quick smoke)'})",
                ["sampler", "variant", "speed-up", "MAC frac", "FD", "PSNR dB"], rows)
    for key, r in results.items():
        overheads = ", ".join(f"batch {m['batch']}: {100 * m['overhead']:+.1f}%" for m in r["mixed_timestep"])
        print(f"{key}: mask training {r['train_seconds']:.1f}s; mixed-timestep batch vs shared step at equal MACs "
              f"(1 thread): {overheads}")
    payload = dict(trained_model=trained, n_eval=n_eval, n_train=n_train, iterations=iterations, results=results,
                   op=op_bandwidth(quick))
    _plots(masks_for_plot, results, quick)
    write_result(NAME, payload, quick)
    return payload


def op_bandwidth(quick: bool) -> dict:
    """tdiff::cached_block effective bandwidth (bytes it must move / time) next to dst.copy_(src) of the same
    bytes, eager PyTorch (index_copy + gate + residual) and torch.compile of that eager code."""
    import os

    from tdiff.ops import dispatch
    from tdiff.ops.cached_block import cached_block

    from .common import copy_seconds, median_seconds

    b, n, c = (16, 64, 128) if quick else (64, 256, 384)
    min_time = 0.2 if quick else 1.0
    x, cache = torch.randn(b, n, c), torch.randn(b, n, c)
    gate = torch.randn(b, c)
    idx = torch.arange(0, b, 2)  # half the batch computes
    fresh = torch.randn(idx.numel(), n, c)
    source = torch.full((b,), -1, dtype=torch.long)
    source[idx] = torch.arange(idx.numel())
    elem = x.element_size()
    # read x, cache rows that reuse, fresh, gate; write out and branch
    nbytes = elem * (x.numel() + (b - idx.numel()) * n * c + fresh.numel() + gate.numel() + 2 * x.numel())

    def eager(x, gate, fresh, cache, idx):
        branch = cache.index_copy(0, idx, fresh)
        return x + gate.unsqueeze(1) * branch, branch

    compiled = torch.compile(eager)
    timings = {"copy_ (same bytes)": copy_seconds(nbytes, min_run_time=min_time),
               "eager": median_seconds(lambda: eager(x, gate, fresh, cache, idx), min_time),
               "torch.compile": median_seconds(lambda: compiled(x, gate, fresh, cache, idx), min_time)}
    backends = (["cpp"] if dispatch.cpp_has("cached_block_cpu") else []) + ["torch"]
    before = os.environ.get("TDIFF_BACKEND")
    try:
        for backend in backends:
            os.environ["TDIFF_BACKEND"] = backend
            timings[f"tdiff[{backend}]"] = median_seconds(lambda: cached_block(x, gate, fresh, cache, source),
                                                          min_time)
    finally:
        if before is None:
            os.environ.pop("TDIFF_BACKEND", None)
        else:
            os.environ["TDIFF_BACKEND"] = before
    rows = [[k, f"{1e6 * v:.1f}", f"{nbytes / v / 1e9:.2f}"] for k, v in timings.items()]
    print_table(f"tdiff::cached_block, ({b}, {n}, {c}) float32, half the batch computing",
                ["implementation", "us", "GB/s"], rows)
    return {"shape": [b, n, c], "bytes": nbytes, "seconds": timings,
            "cpp_built": dispatch.cpp_has("cached_block_cpu")}


def _plots(masks, results, quick):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 4), squeeze=False)
    for ax, (key, m) in zip(axes[0], masks.items()):
        ax.imshow(m.int().T.numpy(), aspect="auto", cmap="Greys", interpolation="nearest")
        ax.set(title=f"learned mask {key} (black = compute)", xlabel="sampling step", ylabel="unit (attn/mlp)")
    fig.tight_layout()
    fig.savefig(plot_path(NAME + "_mask", quick))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, r in results.items():
        pts = [(v["speedup"], v["psnr"] if v["psnr"] != float("inf") else 60.0, label)
               for label, v in r["variants"].items() if "speedup" in v]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=key)
        for s, q, label in pts:
            ax.annotate(label, (s, q), fontsize=6)
    ax.set(xlabel="wall-clock speed-up", ylabel="PSNR vs uncached (dB, uncached drawn at 60)",
           title="speed / quality frontier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot_path(NAME + "_frontier", quick))
    plt.close(fig)
