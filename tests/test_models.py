import warnings

import pytest
import torch

from tdiff.models import DiT, DiTConfig, UNet, UNetConfig
from tdiff.models.dit import modulate
from tdiff.models.unet import AttnBlock, ResBlock


# the CPU is shared; one intra-op thread avoids oversubscription stalls on these tiny models
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    return DiT(DiTConfig(**{**cfg, **kw}))


def tiny_unet(**kw):
    cfg = dict(input_size=8, in_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), num_classes=3, num_groups=4)
    return UNet(UNetConfig(**{**cfg, **kw}))


def randomise(model):
    # zero-initialised layers hide bugs; give every parameter a nonzero value
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_shapes_and_zero_output_at_init(make):
    m = make()
    x = torch.randn(3, 2, 8, 8)
    out = m(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 2, 3]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero / zero-init output layers
    assert m(x, 10.0).shape == x.shape  # scalar t, y=None -> null class


def test_dit_learn_sigma_doubles_channels():
    m = tiny_dit(learn_sigma=True)
    assert m(torch.randn(2, 2, 8, 8), torch.zeros(2)).shape == (2, 4, 8, 8)


def test_dit_blocks_are_identity_at_init():
    m = tiny_dit()
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for blk in m.blocks:
        torch.testing.assert_close(blk(h, c), h)


def test_dit_block_interface_composes_to_forward():
    m = randomise(tiny_dit())
    blk = m.blocks[0]
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    sm, cm, gm, sp, cp, gp = blk.modulation(c)
    assert sm.shape == (2, 32)
    manual = h + gm.unsqueeze(1) * blk.attn_branch(h, sm, cm)
    manual = manual + gp.unsqueeze(1) * blk.mlp_branch(manual, sp, cp)
    torch.testing.assert_close(blk(h, c), manual)
    torch.testing.assert_close(blk.attn_branch(h, sm, cm), blk.attn(modulate(blk.norm1(h), sm, cm)))
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 2


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_per_sample_time_and_labels(make):
    m = randomise(make())
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 400.0, 900.0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        batched = m(x, t, y)
        single = torch.cat([m(x[i: i + 1], t[i: i + 1], y[i: i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], m(x[:1], t[1:2], y[:1])[0])  # time matters


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_forward_with_cfg(make):
    m = randomise(make())
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])
    with torch.no_grad():
        cond, uncond = m(x, t, y), m(x, t, None)
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0), uncond + 3.0 * (cond - uncond),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_bad_inputs_name_the_expected_value(make):
    m = make()
    with pytest.raises(ValueError, match="8x8"):
        m(torch.randn(1, 2, 16, 16), 0.0)
    with pytest.raises(ValueError, match="2 channels"):
        m(torch.randn(1, 3, 8, 8), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        m(torch.randn(1, 2, 8, 8), 0.0, torch.tensor([4]))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 2, 8, 8), torch.zeros(3))


def test_presets():
    s = DiTConfig.preset("DiT-S/2")
    assert (s.hidden_size, s.depth, s.num_heads, s.patch_size) == (384, 12, 6, 2)
    xl = DiTConfig.preset("DiT-XL/2")
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.patch_size) == (1152, 28, 16, 2)
    d = DiTConfig.preset("digits")
    assert d.input_size == 16 and d.in_channels == 1 and d.num_classes == 10
    with pytest.raises(ValueError, match="DiT-XL/2"):
        DiTConfig.preset("DiT-B/3")
    with pytest.raises(ValueError, match="digits"):
        UNetConfig.preset("nope")
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(input_size=9, patch_size=2)


def test_unet_exposes_branches_and_block_lists():
    m = randomise(tiny_unet())
    res = [b for b in m.modules() if isinstance(b, ResBlock)]
    attn = [b for b in m.modules() if isinstance(b, AttnBlock)]
    assert res and attn
    for name in ("down_blocks", "mid_blocks", "up_blocks"):
        assert isinstance(getattr(m, name), torch.nn.ModuleList)
    x, emb = torch.randn(2, res[0].norm1.num_channels, 8, 8), torch.randn(2, 32)
    torch.testing.assert_close(res[0](x, emb), res[0].skip(x) + res[0].branch(x, emb))
    a = attn[0]
    xa = torch.randn(2, a.norm.num_channels, 4, 4)
    torch.testing.assert_close(a(xa), xa + a.branch(xa))


def test_unconditional_unet_rejects_labels():
    m = tiny_unet(num_classes=0)
    assert m(torch.randn(1, 2, 8, 8), 1.0).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(1, 2, 8, 8), 1.0, torch.tensor([0]))


@pytest.mark.parametrize("which", ["dit", "unet"])
def test_training_step_gives_finite_decreasing_loss(which):
    from tdiff.models.defaults import default_schedule
    from tdiff.models.trainer import train_diffusion

    model = tiny_dit(in_channels=1) if which == "dit" else tiny_unet(in_channels=1)
    images = torch.randn(32, 1, 8, 8).clamp(-1, 1)
    labels = torch.randint(0, 3, (32,))
    ema, info = train_diffusion(model, default_schedule(), images, labels, iters=20, batch_size=8, lr=2e-3,
                                warmup=5, progress=False)
    losses = torch.tensor(info["losses"])
    assert torch.isfinite(losses).all() and info["iters"] == 20
    assert losses[-5:].mean() < losses[:5].mean()
    assert not any(p.requires_grad for p in ema.parameters())


TINY_DIGITS_DIT = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                       num_classes=10)


def test_default_checkpoint_roundtrip_corrupt_and_mismatch(tmp_path, monkeypatch):
    from tdiff.models import defaults

    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    kw = dict(config=TINY_DIGITS_DIT, iters=2, progress=False, evaluate=False)
    model, schedule, den = defaults.load_default("dit", **kw)
    path = defaults.checkpoint_path("dit")
    assert path.startswith(str(tmp_path))
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good checkpoint loads silently
        model2, _, den2 = defaults.load_default("dit", **kw)
    torch.testing.assert_close(den(x, 0.5), den2(x, 0.5))
    assert den.schedule.n == 1000

    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="unusable"):
        defaults.load_default("dit", **kw)
    defaults.load_default("dit", **kw)  # retrained file is good again

    with pytest.warns(RuntimeWarning, match="config"):
        defaults.load_default("dit", **{**kw, "config": {**TINY_DIGITS_DIT, "hidden_size": 32}})

    with pytest.raises(ValueError, match="which"):
        defaults.load_default("vae")


def test_missing_checkpoint_without_training(tmp_path, monkeypatch):
    from tdiff.models import defaults

    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        defaults.load_default("unet", train_if_missing=False)
