"""Worker for tests/test_training_ddp.py: one gloo rank of a 2-process DDP run of DiffusionLoss.

Imported by the spawned processes; it writes each rank's losses, gradients and warm-up state to a .pt file.
"""
import os

import torch
import torch.distributed as dist
from torch import nn


class TinyDenoiser(nn.Module):
    """Small enough to be exact and fast, with a time input so that the time draws matter."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1)
        self.time = nn.Linear(1, 4)

    def forward(self, x, t):
        h = self.conv1(x) + self.time(t.view(-1, 1) / 1000.0).view(-1, 4, 1, 1)
        return self.conv2(torch.tanh(h))


CONFIGS = {
    "speed_stratified": dict(loss=dict(sampler="speed", weighting="speed"), stratified=True, schedule="discrete"),
    "fdm_edm_warmup": dict(loss=dict(sampler="lognormal", process="fdm", warmup=3), stratified=False,
                           schedule="edm"),
}
GLOBAL_BATCH, STEPS, SEED = 8, 2, 1234


def make_schedule(name):
    from tdiff import schedules as S

    return S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)) if name == "discrete" else S.EDM()


def data():
    g = torch.Generator().manual_seed(99)
    return torch.randn(STEPS, GLOBAL_BATCH, 1, 6, 6, generator=g)


def run_steps(model, loss_fn, step_fn):
    """Shared by the DDP ranks and the single-process reference: returns per-step losses and gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = {"loss": [], "grads": [], "warmup": []}
    for step in range(STEPS):
        t, noise, x0 = step_fn(step)
        opt.zero_grad()
        loss = loss_fn(model, x0, t=t, noise=noise)
        loss.backward()
        out["loss"].append(loss.detach().clone())
        out["grads"].append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
        loss_fn.step()
        out["warmup"].append(loss_fn.state_dict()["warmup"])
    return out


def worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from tdiff.training import DiffusionLoss, RankStreams

    results = {}
    x = data()
    b = GLOBAL_BATCH // world
    for name, cfg in CONFIGS.items():
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(TinyDenoiser())
        loss_fn = DiffusionLoss(make_schedule(cfg["schedule"]), **cfg["loss"])
        streams = RankStreams(SEED, stratified=cfg["stratified"])  # rank and world from torch.distributed

        def step_fn(step):
            t = streams.timesteps(loss_fn.sampler, b, step)
            noise = streams.noise((b, 1, 6, 6), step)
            return t, noise, x[step, rank * b:(rank + 1) * b]

        res = run_steps(model, loss_fn, step_fn)
        # DDP averages gradients; the batch loss is averaged here too so rank 0 can compare the global value
        for loss in res["loss"]:
            dist.all_reduce(loss)
            loss /= world
        results[name] = res
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
