"""DDP with 2 CPU processes (gloo): every rank draws its own time steps from the (seed, rank, step) stream, and
loss and gradients equal the single-process run on the same global batch."""
import pytest
import torch
import torch.multiprocessing as mp

import ddp_training_worker as W
from tdiff.training import DiffusionLoss, RankStreams


def _single_process(name, cfg):
    torch.manual_seed(0)
    model = W.TinyDenoiser()
    loss_fn = DiffusionLoss(W.make_schedule(cfg["schedule"]), **cfg["loss"])
    streams = RankStreams(W.SEED, rank=0, world_size=2, stratified=cfg["stratified"])
    x = W.data()
    b = W.GLOBAL_BATCH // 2

    def step_fn(step):
        return (streams.global_timesteps(loss_fn.sampler, W.GLOBAL_BATCH, step),
                streams.global_noise((b, 1, 6, 6), step), x[step])

    return W.run_steps(model, loss_fn, step_fn)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_matches_single_process(tmp_path):
    mp.spawn(W.worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, cfg in W.CONFIGS.items():
        ref = _single_process(name, cfg)
        for step in range(W.STEPS):
            for r in range(2):
                torch.testing.assert_close(ranks[r][name]["loss"][step], ref["loss"][step], rtol=1e-5, atol=1e-6)
                for g_ddp, g_ref in zip(ranks[r][name]["grads"][step], ref["grads"][step]):
                    torch.testing.assert_close(g_ddp, g_ref, rtol=1e-4, atol=1e-6)
                assert ranks[r][name]["warmup"][step] == ref["warmup"][step]
        # the two ranks really drew different time steps
        streams = RankStreams(W.SEED, rank=0, world_size=2, stratified=cfg["stratified"])
        loss_fn = DiffusionLoss(W.make_schedule(cfg["schedule"]), **cfg["loss"])
        t0, t1 = streams.global_timesteps(loss_fn.sampler, W.GLOBAL_BATCH, 0).chunk(2)
        assert not torch.equal(t0, t1)


def test_streams_are_reproducible_and_rank_dependent():
    from tdiff.training import UniformSampler
    from tdiff.schedules import VPLinear

    s = UniformSampler(VPLinear())
    a = RankStreams(7, rank=0, world_size=2).timesteps(s, 16, step=3)
    assert torch.equal(a, RankStreams(7, rank=0, world_size=2).timesteps(s, 16, step=3))
    assert not torch.equal(a, RankStreams(7, rank=1, world_size=2).timesteps(s, 16, step=3))
    assert not torch.equal(a, RankStreams(7, rank=0, world_size=2).timesteps(s, 16, step=4))


def test_stratified_covers_every_stratum_once():
    world, b = 4, 8
    u = torch.cat([RankStreams(0, rank=r, world_size=world, stratified=True).uniforms(b, step=5) for r in range(world)])
    strata = torch.sort((u * world * b).floor().long()).values
    assert torch.equal(strata, torch.arange(world * b))


def test_stratified_indivisible_batch_raises():
    with pytest.raises(ValueError, match="not divisible by world_size=3"):
        RankStreams(0, rank=0, world_size=3, stratified=True).local_batch(8)
    with pytest.raises(ValueError, match="rank"):
        RankStreams(0, rank=2, world_size=2)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(seed=-1), ValueError, "seed"), (dict(seed=1.5), ValueError, "seed"), (dict(seed="0"), TypeError, "seed"),
    (dict(seed=0, rank=0, world_size=0), ValueError, "world_size"),
    (dict(seed=0, rank=-1, world_size=2), ValueError, "rank"),
    (dict(seed=0, rank=0, world_size=2, stratified="yes"), TypeError, "stratified"),
])
def test_rank_streams_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        RankStreams(**kwargs)
    with pytest.raises(ValueError, match="global_batch"):
        RankStreams(0, rank=0, world_size=1).local_batch(0)
