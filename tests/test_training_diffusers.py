"""DiffusionLoss trains a diffusers UNet2DModel as it is (its output object, its timestep convention), and the
time-step samplers and weights drop into a stock diffusers training loop (the README's example)."""
import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from tdiff.schedules import DiscreteVP  # noqa: E402
from tdiff.training import DiffusionLoss, SpeedSampler, SpeedWeight  # noqa: E402


def _tiny_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4).double()


def test_diffusion_loss_takes_a_diffusers_unet_and_its_timesteps():
    unet = _tiny_unet()
    noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched = DiscreteVP.from_diffusers(noise_scheduler)
    loss_fn = DiffusionLoss(sched)  # eps target, uniform steps: diffusers' own training objective
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    timesteps = torch.tensor([0, 17, 500, 999])
    loss = loss_fn(unet, x0, t=sched.t_from_index(timesteps), noise=noise)
    # the same step written as in diffusers' train_unconditional.py
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    pred = unet(noisy, timesteps).sample
    torch.testing.assert_close(loss, F.mse_loss(pred, noise))
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)


def test_samplers_and_weights_drop_into_a_diffusers_training_loop():
    """The README's loop: SpeeD's steps and weights with diffusers' add_noise, against DiffusionLoss."""
    unet = _tiny_unet()
    noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    sched = DiscreteVP.from_diffusers(noise_scheduler)
    sampler, weight = SpeedSampler(sched), SpeedWeight(sched)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    for _ in range(2):
        timesteps = sampler.sample_indices(x0.shape[0], generator=g)  # diffusers' integer timesteps
        noise = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
        noisy = noise_scheduler.add_noise(x0, noise, timesteps)
        pred = unet(noisy, timesteps).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (weight(sched.t_from_index(timesteps)) * per_sample).mean()
        ref = DiffusionLoss(sched, sampler=sampler, weighting=weight)(
            unet, x0, t=sched.t_from_index(timesteps), noise=noise)
        torch.testing.assert_close(loss, ref)
        opt.zero_grad()
        loss.backward()
        opt.step()
    # the loop really used SpeeD's layout: the second half of the batch is reflected around ms = 642
    steps = sampler.sample_indices(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(steps[4:], (642 - steps[:4]).abs())
