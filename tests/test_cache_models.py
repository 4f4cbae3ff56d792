"""Small models for the caching tests (imported by the other test_cache_* files) and the unit-discovery tests."""
import pytest
import torch
from torch import nn

from tdiff.cache import find_blocks, find_units, mask_columns
from tdiff.models.dit import DiT, DiTConfig


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


def dit_inputs(batch=2, steps=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(steps)]
    ts = [torch.full((batch,), 900.0 - 200.0 * i) for i in range(steps)]
    y = torch.arange(batch) % 4
    return xs, ts, y


def test_units_of_dit_branch_and_block():
    model = tiny_dit(depth=3)
    units = find_units(model)
    assert [u.name for u in units[:2]] == ["blocks.0.attn_branch", "blocks.0.mlp_branch"]
    assert mask_columns(model, "branch") == 6 and mask_columns(model, "block") == 3


def test_model_without_blocks_names_what_was_searched():
    with pytest.raises(ValueError, match="blocks.*transformer_blocks.*branch"):
        find_blocks(nn.Sequential(nn.Linear(3, 3)))


def test_bad_granularity():
    with pytest.raises(ValueError, match="granularity"):
        mask_columns(tiny_dit(), "layer")
