"""One rank of the 2-process LD3 test (spawned by test_timesteps_ddp.py): learn and write the result."""
import os

import torch
import torch.distributed as dist


def run(rank: int, world: int, port: int, out_dir: str, settings: dict) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from tdiff.data import default_mixture_2d
        from tdiff.schedules import DiscreteVP
        from tdiff.timesteps import ld3_learn

        schedule = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        learned = ld3_learn(default_mixture_2d().denoiser(schedule), **settings)
        torch.save({"timesteps": learned.timesteps, "timesteps_cond": learned.timesteps_cond,
                    "val_history": learned.metadata["val_history"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
