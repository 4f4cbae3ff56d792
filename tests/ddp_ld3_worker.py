"""One rank of the 2-process LD3 test (spawned by test_timesteps_ddp.py): learn uninterrupted; learn again with a
checkpoint, SIGTERM arriving on rank 1 only mid-run; resume from the checkpoint rank 0 wrote; save the results."""
import os
import signal

import torch
import torch.distributed as dist


class _Terminated(Exception):
    pass


def _summary(learned) -> dict:
    return {"timesteps": learned.timesteps, "timesteps_cond": learned.timesteps_cond,
            "val_history": learned.metadata["val_history"]}


def run(rank: int, world: int, port: int, out_dir: str, settings: dict, sigterm_at_call: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from tdiff.data import default_mixture_2d
        from tdiff.schedules import DiscreteVP
        from tdiff.timesteps import LD3Interrupted, ld3_learn

        schedule = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
        exact = default_mixture_2d().denoiser(schedule)
        calls = [0]

        def den(x, t):  # SIGTERM on rank 1 at a given model call once armed
            calls[0] += 1
            if rank == 1 and calls[0] == armed[0]:
                os.kill(os.getpid(), signal.SIGTERM)
            return exact(x, t)

        den.schedule = schedule
        armed = [-1]
        plain = ld3_learn(den, **settings)

        def on_sigterm(signum, frame):  # stands in for the default action (ending the process)
            raise _Terminated()

        signal.signal(signal.SIGTERM, on_sigterm)
        ckpt = os.path.join(out_dir, "ld3.ckpt")
        stopped_by = None
        calls[0], armed[0] = 0, sigterm_at_call
        try:
            ld3_learn(den, **settings, checkpoint=ckpt)
        except (_Terminated, LD3Interrupted) as e:
            stopped_by = type(e).__name__
        dist.barrier()  # rank 0 has written the checkpoint
        armed[0] = -1
        resumed = ld3_learn(den, **settings, checkpoint=ckpt)
        torch.save({"plain": _summary(plain), "resumed": _summary(resumed), "stopped_by": stopped_by},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
