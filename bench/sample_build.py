"""The cost of `tdiff.sample` with its tables built inside the call (issue 18.3: <= 25 us/step at 1x4x32x32, 20
steps, one thread), against the same program run from a reused Sampler (the loop alone), per solver and order.

The model returns a precomputed eps, so only tdiff's own work is timed: validating the timesteps, building the
program and its tables, preparing the rows and network calls (the build), and the loop (eps -> x0 conversion fused
into the update). CPU time of this thread (time.thread_time), interleaved: each round times a block of `sample`
calls and a block of reused-Sampler calls in turn, for every config (round-robin, so all see the same
host phases); the build is sample - loop, paired round by round.
Ceiling: sample >= loop (the build cannot be negative), so a build below 0 would be a measurement error.

python -m bench sample_build  (--quick: fewer rounds)
"""
from __future__ import annotations

import time

import torch

SHAPE = (1, 4, 32, 32)
STEPS = 20
TARGET_US_PER_STEP = 25.0
#: name -> sample() keywords: every solver and order issue 18.3 names
CONFIGS = {
    "dpmpp-1": dict(solver="dpmpp", order=1), "dpmpp-2": dict(solver="dpmpp", order=2),
    "dpmpp-3": dict(solver="dpmpp", order=3), "unipc-1": dict(solver="unipc", order=1),
    "unipc-2": dict(solver="unipc", order=2), "unipc-3": dict(solver="unipc", order=3),
    "ipndm": dict(solver="ipndm"), "ddim": dict(solver="ddim"), "euler": dict(solver="euler"),
    "heun": dict(solver="heun"),
}


def _block(fn, n: int) -> float:
    t0 = time.thread_time()
    for _ in range(n):
        fn()
    return (time.thread_time() - t0) / n


def measure(rounds: int = 15, block: int = 5, names=None) -> dict:
    """Per config: us/step of sample (tables built inside) and of the reused Sampler's loop, and the build in us
    per call (sample - loop, paired per round), each a median with a 95% interval over the rounds."""
    import tdiff
    from tdiff.schedules import DiscreteVP
    from tdiff.solvers.sample import Sampler

    from .common import median_ci

    torch.set_num_threads(1)
    schedule = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(SHAPE, generator=gen)
    x = torch.randn(SHAPE, generator=gen)
    den = tdiff.denoiser(lambda x_t, t, y=None: eps, schedule, prediction="eps")
    ts = torch.linspace(1.0, 1e-3, STEPS + 1, dtype=torch.float64)
    names = list(names or CONFIGS)
    fns = {}
    nfe = {}
    with torch.no_grad():
        for name in names:
            kw = CONFIGS[name]
            sampler = Sampler(den, ts, **kw)
            nfe[name] = sampler.nfe
            fns[name] = {"sample": lambda kw=kw: tdiff.sample(den, x, ts, **kw), "loop": lambda s=sampler: s(x)}
            for fn in fns[name].values():
                for _ in range(3):
                    fn()
        # every round times every config in turn: this host's speed drifts by up to 1.7x within seconds, and a
        # config timed in a block of its own would see only the phase it happened to fall in
        per = {name: {"sample": [], "loop": []} for name in names}
        for _ in range(rounds):
            for name in names:
                for k, fn in fns[name].items():
                    per[name][k].append(_block(fn, block))
    out = {}
    for name in names:
        p = per[name]
        out[name] = {
            "nfe": nfe[name],
            "sample_us_per_step": median_ci([v / STEPS * 1e6 for v in p["sample"]]),
            "loop_us_per_step": median_ci([v / STEPS * 1e6 for v in p["loop"]]),
            "build_us": median_ci([(a - b) * 1e6 for a, b in zip(p["sample"], p["loop"])]),
        }
    return out


def run(quick: bool = False) -> None:
    from .common import load_average, print_table, write_result

    load_before = load_average()
    res = measure(rounds=5 if quick else 61, block=2 if quick else 3)
    rows = [[name, r["nfe"], f"{r['sample_us_per_step']['median']:.1f}", f"{r['loop_us_per_step']['median']:.1f}",
             f"{r['build_us']['median']:.0f}", "yes" if r["sample_us_per_step"]["median"] <= TARGET_US_PER_STEP
             else "no"] for name, r in res.items()]
    print_table(f"tdiff.sample at {'x'.join(map(str, SHAPE))}, {STEPS} steps, one thread (CPU time, median)",
                ["solver", "NFE", "sample us/step", "loop us/step", "build us/call",
                 f"<= {TARGET_US_PER_STEP:g} us/step"], rows)
    write_result("sample_build", {"shape": list(SHAPE), "steps": STEPS, "target_us_per_step": TARGET_US_PER_STEP,
                                  "timer": "time.thread_time, one thread, interleaved sample/loop blocks",
                                  "load_average": {"before": load_before, "after": load_average()},
                                  "results": res}, quick)
