"""Worker for test_cache_distributed: one of two gloo ranks training a slice of the mask's steps."""
import os
import sys

import torch
import torch.distributed as dist


def worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sys.path.insert(0, os.path.dirname(__file__))
        import tdiff
        from tdiff.cache import train_mask, save_mask
        from tdiff.models.defaults import default_schedule
        from test_cache_models import tiny_dit

        torch.manual_seed(0)
        model = tiny_dit(depth=2)
        sched = default_schedule()
        den = tdiff.denoiser(model, sched)
        ts = torch.linspace(sched.t_max, sched.t_min, 5)
        x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        mask = train_mask(model, lambda m: tdiff.sample(den, x_T, ts, solver="ddim"), iterations=2, lr=0.5,
                          lambda1=50.0, lambda2=0.01, progress=False, rectify=False)
        save_mask(os.path.join(out_dir, f"mask{rank}.json"), mask)
    finally:
        dist.destroy_process_group()
