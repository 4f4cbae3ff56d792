"""The main job (`python -m tdiff demo`): each section shows one tdiff method on the embedded defaults and adds
rows to one side-by-side table; figures go to the output folder."""
from __future__ import annotations

import os
import time


def _section_ops(out: str, quick: bool, table: list) -> None:
    import torch

    from . import schedules as S
    from .ops import dispatch
    from .ops.noisy_sample import noisy_sample

    shape = (16, 4, 32, 32) if quick else (64, 4, 32, 32)
    x0, eps, t = torch.randn(shape), torch.randn(shape), torch.rand(shape[0]) * 0.98 + 0.01
    sched = S.VPLinear()

    def eager():
        a, s = sched.alpha(t).float().view(-1, 1, 1, 1), sched.sigma(t).float().view(-1, 1, 1, 1)
        return a * x0 + s * eps

    def fused():
        return noisy_sample(x0, eps, t, sched, check=False)[0]

    torch.testing.assert_close(fused(), eager())
    for name, fn in [("eager PyTorch", eager), (f"tdiff fused [{dispatch.backend_for(x0, 'noisy_sample_cpu')}]", fused)]:
        fn()
        n = 20 if quick else 100
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        table.append(("noisy-sample op " + "x".join(map(str, shape)), name, f"{(time.perf_counter() - t0) / n * 1e6:.0f} us", ""))


SECTIONS = [_section_ops]


def run_demo(out: str = "tdiff_demo", quick: bool = False) -> int:
    os.makedirs(out, exist_ok=True)
    table: list = []
    figures: list = []
    for section in SECTIONS:
        section(out, quick, table) if section.__code__.co_argcount == 3 else section(out, quick, table, figures)
    widths = [max(len(str(r[i])) for r in table + [("what", "method", "time", "quality")]) for i in range(4)]
    print()
    for row in [("what", "method", "time", "quality"), tuple("-" * w for w in widths)] + table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for f in figures:
        print(f"figure: {os.path.abspath(f)}")
    return 0
