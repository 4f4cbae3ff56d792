"""Small models for the caching tests (imported by the other test_cache_* files) and the unit adapters."""
import pytest
import torch
from torch import nn

from tdiff.cache import CacheAdapter, find_units, mask_columns, register_adapter
from tdiff.models.dit import DiT, DiTConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


def tiny_dit(depth=3, hidden=32, seed=0) -> DiT:
    """Our reference DiT at test size, with random (non-zero) adaLN weights so every gate matters."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=hidden, depth=depth,
                          num_heads=2, num_classes=4)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            nn.init.normal_(blk.adaLN_modulation[-1].weight, std=0.05)
            nn.init.normal_(blk.adaLN_modulation[-1].bias, std=0.5)
        nn.init.normal_(model.final_layer.linear.weight, std=0.1)
    return model


def tiny_unet(seed=0):
    """Our reference UNet at test size (two levels, attention at 4x4), random weights everywhere."""
    from tdiff.models.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    model = UNet(UNetConfig(input_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            attn_resolutions=(4,), num_groups=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            nn.init.normal_(p, std=0.05)
    return model


def dit_inputs(batch=2, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(steps)]
    ts = [torch.full((batch,), 900.0 - 200.0 * i) for i in range(steps)]
    y = torch.arange(batch) % 4
    return xs, ts, y


def test_units_of_dit_and_unet_in_execution_order():
    model = tiny_dit(depth=3)
    assert [u.name for u in find_units(model)[:2]] == ["blocks.0.attn", "blocks.0.mlp"]
    assert mask_columns(model) == 6 and mask_columns(model, "block") == 3
    assert mask_columns(model, "branch") == 6  # the old name of the "unit" granularity
    unet = tiny_unet()
    names = [u.name for u in find_units(unet)]
    assert names[:3] == ["down_blocks.0.res", "down_blocks.2.res", "down_blocks.2.attn"]  # 1: Downsample
    assert names[3:6] == ["mid_blocks.0", "mid_blocks.1", "mid_blocks.2"]
    assert [u.name for u in find_units(unet, "branch")][0] == "down_blocks.0.res.branch"


def test_a_wrapper_resolves_to_the_network_inside():
    wrapper = nn.Sequential(nn.Identity(), tiny_dit(depth=2))
    assert mask_columns(wrapper) == 4


def test_model_without_units_lists_classes_and_attributes():
    with pytest.raises(ValueError, match=r"tdiff.models.dit.DiT \(blocks\[i\].*UNet2DModel.*down_blocks"):
        find_units(nn.Sequential(nn.Linear(3, 3), nn.Conv2d(1, 1, 1)))


def test_register_adapter_for_a_new_model_class():
    from tdiff.cache.units import Unit

    class TwoLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x, t):
            return self.b(self.a(x))

    class Adapter(CacheAdapter):
        searched = "a, b"

        def units(self, model, formulation):
            return [Unit(0, "a", 0, model.a, None), Unit(1, "b", 1, model.b, None)]

    register_adapter(TwoLayer, Adapter())
    assert [u.name for u in find_units(TwoLayer())] == ["a", "b"]
    with pytest.raises(ValueError, match="adapter"):
        register_adapter(TwoLayer, object())


def test_bad_granularity_and_formulation():
    with pytest.raises(ValueError, match="granularity"):
        mask_columns(tiny_dit(), "layer")
    with pytest.raises(ValueError, match="formulation"):
        mask_columns(tiny_dit(), formulation="gated")
