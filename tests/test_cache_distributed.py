"""Mask training split over two gloo ranks (torch.multiprocessing spawn): every rank ends with the same gathered
mask, and each rank's slice of steps was trained (not left at its initial scores)."""
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from tdiff.cache import load_mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir):
    sys.path.insert(0, os.path.dirname(__file__))
    from ddp_cache_worker import worker

    worker(rank, world, port, out_dir)


def test_two_rank_training_gathers_one_mask(tmp_path):
    mp.spawn(_entry, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    m0, m1 = (load_mask(str(tmp_path / f"mask{r}.json")) for r in range(2))
    assert torch.equal(m0.matrix, m1.matrix) and m0.extra["scores"] == m1.extra["scores"]
    scores = torch.tensor(m0.extra["scores"])
    assert scores.shape == (4, 4)
    assert (scores[0] == 1).all()
    # rank 0 trained steps 1 (of 0-1), rank 1 steps 2-3; with strong sparsity every trained score fell to 0
    assert (scores[1:] == 0).all() and not m0.matrix[1:].any()
