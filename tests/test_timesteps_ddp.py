"""LD3 data-parallel: 2 gloo ranks with batch 2 each give the single-process result with batch 4, and a run that
SIGTERM stops on one rank resumes from the checkpoint rank 0 wrote, bit-identically."""
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from tdiff.data import default_mixture_2d
from tdiff.schedules import DiscreteVP
from tdiff.timesteps import ld3_learn

SETTINGS = dict(solver="unipc", order=2, nfe=3, teacher_nfe=8, shape=(2,), n_train=8, n_val=6, epochs=2,
                phase1_epochs=1, dtype=torch.float64, progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_match_one_process(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from ddp_ld3_worker import run

    mp.spawn(run, args=(2, _free_port(), str(tmp_path), dict(SETTINGS, batch_size=2), 40), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # SIGTERM on rank 1 stopped both ranks (rank 1 through its own handler, rank 0 with LD3Interrupted)
    assert [r["stopped_by"] for r in ranks] == ["LD3Interrupted", "_Terminated"]
    for got in ranks:
        torch.testing.assert_close(got["resumed"]["timesteps"], got["plain"]["timesteps"], rtol=0, atol=0)
        torch.testing.assert_close(got["resumed"]["timesteps_cond"], got["plain"]["timesteps_cond"], rtol=0, atol=0)
        assert got["resumed"]["val_history"] == got["plain"]["val_history"]
    ranks = [r["plain"] for r in ranks]
    torch.set_num_threads(1)
    schedule = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    single = ld3_learn(default_mixture_2d().denoiser(schedule), **dict(SETTINGS, batch_size=4))
    for got in ranks:
        torch.testing.assert_close(got["timesteps"], single.timesteps, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got["timesteps_cond"], single.timesteps_cond, rtol=1e-9, atol=1e-12)
        assert len(got["val_history"]) == len(single.metadata["val_history"])
        for a, b in zip(got["val_history"], single.metadata["val_history"]):
            assert abs(a - b) <= 1e-9 * max(1.0, abs(b))
