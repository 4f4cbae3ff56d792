"""cached_dit / apply_learned_cache: exactness, skipping semantics, step counting, contexts, other models."""
import pytest
import torch

import tdiff
from tdiff.cache import LearnedCacheConfig, apply_learned_cache, cached_dit

from test_cache_models import dit_inputs, tiny_dit


def _run(model, xs, ts, y):
    return [model(x, t, y) for x, t in zip(xs, ts)]


@pytest.mark.parametrize("granularity", ["branch", "block"])
def test_all_ones_mask_is_bit_identical(granularity):
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=4)
    ref = _run(model, xs, ts, y)
    cols = 6 if granularity == "branch" else 3
    fast = cached_dit(model, torch.ones(4, cols), granularity=granularity)
    with fast.sampling_run():
        out = _run(fast, xs, ts, y)
    for a, b in zip(ref, out):
        assert torch.equal(a, b)
    fast.remove()
    for a, b in zip(ref, _run(model, xs, ts, y)):
        assert torch.equal(a, b)


def test_skipped_units_reuse_pre_gate_branch_with_fresh_gates():
    model = tiny_dit(depth=2)
    xs, ts, y = dit_inputs(steps=2)
    # step 0 computes everything; step 1 skips the attention of block 0 and the MLP of block 1
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])
    with torch.no_grad():
        cached_branches = {}
        c0 = model.condition(ts[0], y, 2, "cpu")
        h = model.embed(xs[0])
        for b, blk in enumerate(model.blocks):
            sm, cm, gm, sp, cp, gp = blk.modulation(c0)
            cached_branches[b, "attn"] = blk.attn_branch(h, sm, cm)
            h = h + gm.unsqueeze(1) * cached_branches[b, "attn"]
            cached_branches[b, "mlp"] = blk.mlp_branch(h, sp, cp)
            h = h + gp.unsqueeze(1) * cached_branches[b, "mlp"]
        c1 = model.condition(ts[1], y, 2, "cpu")
        h = model.embed(xs[1])
        for b, blk in enumerate(model.blocks):
            sm, cm, gm, sp, cp, gp = blk.modulation(c1)  # gates from the *current* conditioning
            a = cached_branches[b, "attn"] if b == 0 else blk.attn_branch(h, sm, cm)
            h = h + gm.unsqueeze(1) * a
            m = cached_branches[b, "mlp"] if b == 1 else blk.mlp_branch(h, sp, cp)
            h = h + gp.unsqueeze(1) * m
        expected = model.unpatchify(model.final_layer(h, c1))
        plain = model(xs[1], ts[1], y)
        fast = cached_dit(model, mask)
        out = _run(fast, xs, ts, y)
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[1], plain)


def test_step_counter_reset_and_overrun():
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=3)
    fast = cached_dit(model, torch.tensor([[1] * 6, [0] * 6, [1, 0] * 3]))
    with torch.no_grad():
        first = _run(fast, xs, ts, y)
        assert fast.cache.step == 2
        with pytest.raises(ValueError, match="reset"):
            fast(xs[0], ts[0], y)
        fast.reset()
        again = _run(fast, xs, ts, y)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_cfg_contexts_are_separate_and_batched_cfg_matches():
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=3)
    mask = torch.tensor([[1] * 6, [0, 1] * 3, [1, 0] * 3])
    with torch.no_grad():
        fast = cached_dit(model, mask)
        batched = [fast.forward_with_cfg(x, t, y, 2.0) for x, t in zip(xs, ts)]
        fast.reset()
        split = []
        null = torch.full_like(y, model.null_label)
        for x, t in zip(xs, ts):
            with fast.cache_context("cond"):
                cond = fast(x, t, y)
            with fast.cache_context("uncond"):
                uncond = fast(x, t, null)
            split.append(uncond + 2.0 * (cond - uncond))
    for a, b in zip(batched, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_block_granularity_equals_duplicated_branch_columns():
    xs, ts, y = dit_inputs(steps=3)
    block_mask = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 0, 0]])
    with torch.no_grad():
        a = _run(cached_dit(tiny_dit(), block_mask, granularity="block"), xs, ts, y)
        b = _run(cached_dit(tiny_dit(), block_mask.repeat_interleave(2, dim=1)), xs, ts, y)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_config_validation_and_double_install():
    model = tiny_dit()
    with pytest.raises(ValueError, match="shape"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 5)))
    with pytest.raises(ValueError, match="0 or 1"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.full((3, 6), 0.5)))
    with pytest.raises(ValueError, match="nfe"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6), nfe=4))
    handle = apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6)))
    with pytest.raises(ValueError, match="already"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6)))
    handle.remove()
    assert tdiff.cached_dit is cached_dit


def _diffusers_models():
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1)
    pixart = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16,
                                      caption_channels=12, use_additional_conditions=False)
    return dit.eval(), pixart.eval()


def test_diffusers_dit_and_pixart():
    torch.manual_seed(0)
    dit, pixart = _diffusers_models()
    for model in (dit, pixart):
        for p in model.parameters():  # zero-initialised gates would hide the cache
            torch.nn.init.normal_(p, std=0.1)
    x = [torch.randn(2, 4, 8, 8) for _ in range(3)]
    t = [torch.tensor([900, 900]), torch.tensor([500, 500]), torch.tensor([100, 100])]
    text = [torch.randn(2, 5, 12) for _ in range(3)]  # PixArt's caption embeddings, fixed per step
    calls = {
        "dit": (dit, lambda m, i: m(x[i], timestep=t[i], class_labels=torch.tensor([1, 2])).sample),
        "pixart": (pixart, lambda m, i: m(x[i], encoder_hidden_states=text[i], timestep=t[i]).sample),
    }
    for name, (model, call) in calls.items():
        with torch.no_grad():
            ref = [call(model, i) for i in range(3)]
            units = tdiff.cache.find_units(model)
            assert [u.attribute for u in units] == ["attn1", "ff", "attn1", "ff"], name
            fast = cached_dit(model, torch.ones(3, 4))
            same = [call(fast, i) for i in range(3)]
            fast.remove()
            fast = cached_dit(model, torch.tensor([[1] * 4, [0] * 4, [0, 1, 1, 0]]))
            skipped = [call(fast, i) for i in range(3)]
            fast.remove()
        for a, b in zip(ref, same):
            assert torch.equal(a, b), name
        assert not torch.allclose(ref[1], skipped[1]), name


def _tiny_unet_config():
    from tdiff.models.unet import UNetConfig

    return UNetConfig(input_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(4,), num_groups=4)


def test_unet_resblocks_and_attnblocks():
    from tdiff.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(_tiny_unet_config()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    units = tdiff.cache.find_units(model)
    assert units and all(u.attribute == "branch" for u in units)
    size, ch = model.config.input_size, model.config.in_channels
    x = [torch.randn(1, ch, size, size) for _ in range(2)]
    with torch.no_grad():
        ref = [model(x[i], torch.tensor([900.0 - 500 * i])) for i in range(2)]
        fast = cached_dit(model, torch.ones(2, len(units)))
        same = [fast(x[i], torch.tensor([900.0 - 500 * i])) for i in range(2)]
        fast.remove()
        fast = cached_dit(model, torch.tensor([[1] * len(units), [0] * len(units)]))
        skipped = [fast(x[i], torch.tensor([900.0 - 500 * i])) for i in range(2)]
    for a, b in zip(ref, same):
        assert torch.equal(a, b)
    assert not torch.allclose(ref[1], skipped[1])


def test_per_sample_rows_generic_path_on_unet():
    """Blocks without the DiT interface (UNet branches, diffusers attn1/ff) merge per-sample rows with a gather
    and index_copy; the result equals each sample run alone."""
    from tdiff.models.unet import UNet, UNetConfig

    torch.manual_seed(0)
    model = UNet(_tiny_unet_config()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    n = len(tdiff.cache.find_units(model))
    size, ch = model.config.input_size, model.config.in_channels
    masks = torch.stack([torch.ones(2, n), torch.ones(2, n)]).bool()
    masks[0, 1, ::2] = False  # sample 0 reuses every other unit at step 1; sample 1 computes all
    x = [torch.randn(2, ch, size, size) for _ in range(2)]
    t = [torch.tensor([900.0, 600.0]), torch.tensor([500.0, 200.0])]
    with torch.no_grad():
        alone = []
        for b in range(2):
            fast = cached_dit(model, masks[b])
            alone.append([fast(x[i][b:b + 1], t[i][b:b + 1]) for i in range(2)])
            fast.remove()
        fast = cached_dit(model, torch.ones(2, n))
        for i in range(2):
            with fast.sample_rows(masks[:, i]):
                out = fast(x[i], t[i])
            for b in range(2):
                torch.testing.assert_close(out[b:b + 1], alone[b][i], rtol=1e-5, atol=1e-5)
