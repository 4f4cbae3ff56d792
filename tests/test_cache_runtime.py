"""cached_dit / apply_learned_cache on tdiff's models: exactness, what a skipped unit returns in each formulation,
runs that start by themselves, contexts, per-sample rows, and config validation."""
import pytest
import torch

import tdiff
from tdiff.cache import LearnedCacheConfig, LearnedMask, apply_learned_cache, cached_dit

from test_cache_models import dit_inputs, tiny_dit, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


def _run(model, xs, ts, y=None):
    with torch.no_grad():
        return [model(x, t, y) for x, t in zip(xs, ts)]


@pytest.mark.parametrize("formulation", ["output", "branch"])
@pytest.mark.parametrize("granularity", ["unit", "block"])
def test_all_ones_mask_is_bit_identical(formulation, granularity):
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=4)
    ref = _run(model, xs, ts, y)
    cols = 6 if granularity == "unit" else 3
    fast = cached_dit(model, torch.ones(4, cols), granularity=granularity, formulation=formulation)
    for _ in range(2):  # the second run starts by itself (its first time is the first run's)
        assert all(torch.equal(a, b) for a, b in zip(ref, _run(fast, xs, ts, y)))
    fast.remove()
    assert all(torch.equal(a, b) for a, b in zip(ref, _run(model, xs, ts, y)))


def _manual_step(model, h, c, skip, cached, formulation):
    """One DiT forward written out, skipping units in `skip` ({(block, "attn"|"mlp")}) from `cached`."""
    for b, blk in enumerate(model.blocks):
        sm, cm, gm, sp, cp, gp = blk.modulation(c)
        for role, branch, shift, scale, gate in (("attn", blk.attn_branch, sm, cm, gm),
                                                 ("mlp", blk.mlp_branch, sp, cp, gp)):
            if (b, role) in skip:
                h = h + gate.unsqueeze(1) * cached[b, role] if formulation == "branch" else cached[b, role]
            else:
                r = branch(h, shift, scale)
                cached[b, role] = r if formulation == "branch" else h + gate.unsqueeze(1) * r
                h = h + gate.unsqueeze(1) * r
    return model.unpatchify(model.final_layer(h, c))


@pytest.mark.parametrize("formulation", ["output", "branch"])
def test_skipped_units_reuse_what_their_formulation_caches(formulation):
    """branch: the pre-gate branch is reused with the current step's gate; output: the unit's output (the
    residual stream after it) is returned as it was."""
    model = tiny_dit(depth=2)
    xs, ts, y = dit_inputs(steps=2)
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 0]])  # step 1 skips block 0's attention and block 1's MLP
    with torch.no_grad():
        cached = {}
        _manual_step(model, model.embed(xs[0]), model.condition(ts[0], y, 2, "cpu"), set(), cached, formulation)
        expected = _manual_step(model, model.embed(xs[1]), model.condition(ts[1], y, 2, "cpu"),
                                {(0, "attn"), (1, "mlp")}, cached, formulation)
        fast = cached_dit(model, mask, formulation=formulation)
        out = _run(fast, xs, ts, y)
        fast.remove()
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[1], model(xs[1], ts[1], y))


def test_runs_start_by_themselves_and_overruns_are_refused():
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=4)
    fast = cached_dit(model, torch.tensor([[1] * 6, [0] * 6, [1, 0] * 3]))
    first = _run(fast, xs[:3], ts[:3], y)
    assert fast.cache.step == 2
    with pytest.raises(ValueError, match="3 steps"):  # a fourth call continuing the run (its time still falls)
        _run(fast, xs[3:], ts[3:], y)
    again = _run(fast, xs[:3], ts[:3], y)  # refused calls leave no half run behind; a new run starts
    partial = _run(fast, xs[:2], ts[:2], y)  # an interrupted run ...
    restarted = _run(fast, xs[:3], ts[:3], y)  # ... is followed by a new one starting at the first time
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert all(torch.equal(a, b) for a, b in zip(first, restarted)) and torch.equal(partial[1], first[1])
    mask = LearnedMask(torch.ones(3, 6), network_times=[900.0, 700.0, 500.0])
    fast.remove()
    fast = cached_dit(model, mask)
    with pytest.raises(ValueError, match="network time 700"):  # a mask made for other time steps
        _run(fast, [xs[0], xs[1]], [ts[0], torch.full((2,), 650.0)], y)
    fast.remove()


def test_cfg_contexts_are_separate_and_batched_cfg_matches():
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=3)
    mask = torch.tensor([[1] * 6, [0, 1] * 3, [1, 0] * 3])
    with torch.no_grad():
        fast = cached_dit(model, mask, formulation="branch")
        batched = [fast.forward_with_cfg(x, t, y, 2.0) for x, t in zip(xs, ts)]
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


@pytest.mark.parametrize("formulation", ["output", "branch"])
def test_block_granularity_equals_duplicated_unit_columns(formulation):
    xs, ts, y = dit_inputs(steps=3)
    block_mask = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 0, 0]])
    a = _run(cached_dit(tiny_dit(), block_mask, granularity="block", formulation=formulation), xs, ts, y)
    b = _run(cached_dit(tiny_dit(), block_mask.repeat_interleave(2, dim=1), formulation=formulation), xs, ts, y)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_config_validation_and_double_install():
    model = tiny_dit()
    with pytest.raises(ValueError, match="shape"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 5)))
    with pytest.raises(ValueError, match="0 or 1"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.full((3, 6), 0.5)))
    with pytest.raises(ValueError, match="nfe"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6), nfe=4))
    with pytest.raises(ValueError, match="formulation"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6), formulation="gated"))
    with pytest.raises(ValueError, match="mask is None"):
        cached_dit(model, None)
    with pytest.raises(ValueError, match="contradicts"):
        cached_dit(model, LearnedMask(torch.ones(3, 6), formulation="branch"), formulation="output")
    handle = apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6)))
    with pytest.raises(ValueError, match="already"):
        apply_learned_cache(model, LearnedCacheConfig(mask=torch.ones(3, 6)))
    handle.remove()
    assert tdiff.cached_dit is cached_dit


@pytest.mark.parametrize("formulation", ["output", "branch"])
def test_unet_all_ones_exact_and_skips_change(formulation):
    model = tiny_unet()
    n = tdiff.cache.mask_columns(model, formulation=formulation)
    x = [torch.randn(1, 1, 8, 8) for _ in range(2)]
    t = [torch.tensor([900.0]), torch.tensor([400.0])]
    ref = _run(model, x, t)
    fast = cached_dit(model, torch.ones(2, n), formulation=formulation)
    assert all(torch.equal(a, b) for a, b in zip(ref, _run(fast, x, t)))
    fast.remove()
    skipped = _run(cached_dit(model, torch.tensor([[1] * n, [0] * n]), formulation=formulation), x, t)
    assert not torch.allclose(ref[1], skipped[1])


@pytest.mark.parametrize("model_fn, formulation", [(tiny_dit, "output"), (tiny_dit, "branch"),
                                                   (tiny_unet, "output"), (tiny_unet, "branch")])
def test_per_sample_rows_equal_each_sample_alone(model_fn, formulation):
    """sample_rows (serving) and a (batch, steps, units) mask: each sample follows its own row; the DiT branch
    formulation goes through the fused cached_block op, the others through gather + index_copy."""
    model = model_fn()
    n = tdiff.cache.mask_columns(model, formulation=formulation)
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(2, 3, n, generator=g) > 0.5
    masks[:, 0] = True
    if model_fn is tiny_dit:
        xs, ts, y = dit_inputs(batch=2, steps=3)
    else:
        xs, ts, y = [torch.randn(2, 1, 8, 8, generator=g) for _ in range(3)], [torch.full((2,), 900.0 - 300 * i)
                                                                               for i in range(3)], None
    alone = []
    for b in range(2):
        fast = cached_dit(model, masks[b], formulation=formulation)
        alone.append(_run(fast, [x[b:b + 1] for x in xs], [t[b:b + 1] for t in ts],
                          None if y is None else y[b:b + 1]))
        fast.remove()
    fast = cached_dit(model, masks, formulation=formulation)  # one mask per sample
    together = _run(fast, xs, ts, y)
    fast.remove()
    fast = cached_dit(model, torch.ones(3, n), formulation=formulation)
    served = []
    for i in range(3):
        with fast.sample_rows(masks[:, i]):
            served.append(_run(fast, xs[i:i + 1], ts[i:i + 1], y)[0])
    fast.remove()
    for i in range(3):
        for out in (together[i], served[i]):
            torch.testing.assert_close(out, torch.cat([alone[0][i], alone[1][i]]), rtol=1e-5, atol=1e-5)
