"""Learned caching as a diffusers hook, in each family's real pipeline built from tiny random components (DDPM,
Stable Diffusion, DiT, PixArt-alpha, SD3, Flux): an all-ones mask is bit-exact (and stays so on a second pipeline
call, with no reset), a sparse mask changes the output, per-sample rows equal each sample run alone, mask_columns /
macs (SDPA counted) / train_mask(pipe) work, split-CFG halves keep their own caches, the hook composes with
diffusers' FirstBlockCache and remove() restores the model exactly; bad input is refused."""
import numpy as np
import pytest
import torch

from tdiff.cache import (LearnedCacheConfig, apply_learned_cache, find_units, macs, mask_columns, record_calls,
                         train_mask)
from tdiff.integrations.diffusers import denoiser_network

from cache_pipelines import BUILDERS, STEPS

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend

# how many network rows one prompt / label occupies: 2 where the pipeline batches CFG's two halves together
CFG_ROWS = {"ddpm": 1, "sd": 2, "dit": 2, "pixart": 2, "sd3": 2, "flux": 1}
UNIT_NAMES = {
    "ddpm": ["down_blocks.0.resnets.0", "down_blocks.1.resnets.0", "down_blocks.1.attentions.0",
             "mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"],
    "sd": ["down_blocks.0.resnets.0", "down_blocks.0.attentions.0", "down_blocks.1.resnets.0"],
    "dit": ["transformer_blocks.0", "transformer_blocks.1"],
    "pixart": ["transformer_blocks.0", "transformer_blocks.1"],
    "sd3": ["transformer_blocks.0", "transformer_blocks.1"],
    "flux": ["transformer_blocks.0", "single_transformer_blocks.0"],
}
BRANCH_NAMES = {
    "dit": ["transformer_blocks.0.attn1", "transformer_blocks.0.ff", "transformer_blocks.1.attn1",
            "transformer_blocks.1.ff"],
    "sd3": ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
            "transformer_blocks.1.attn", "transformer_blocks.1.ff"],  # the last block's context stream ends early
    "flux": ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn"],
}


def _run(pipe, kwargs):
    out = pipe(**kwargs)
    out = out.images if hasattr(out, "images") else out[0]
    return torch.as_tensor(np.asarray(out)) if not torch.is_tensor(out) else out


def _equal(a, b):
    return torch.equal(a, b)


class _SDPACount:
    """Counts the MACs of every scaled_dot_product_attention call (QK^T + AV), independently of fvcore."""

    def __init__(self, monkeypatch):
        self.total = 0
        real = torch.nn.functional.scaled_dot_product_attention

        def counting(*args, **kwargs):
            q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key", "value")))
            self.total += q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_pipeline_family(name, monkeypatch):
    pipe, call = BUILDERS[name]()
    net = denoiser_network(pipe)
    units = find_units(net)
    assert [u.name for u in units] == UNIT_NAMES[name] if name in ("dit", "pixart", "sd3", "flux") \
        else [u.name for u in units][:len(UNIT_NAMES[name])] == UNIT_NAMES[name]
    cols = mask_columns(net)
    assert cols == len(units) and mask_columns(net, "block") <= cols
    with torch.no_grad():
        ref = _run(pipe, call())

        # all ones: bit-exact, twice in a row (the hook starts the second run by itself)
        handle = apply_learned_cache(net, LearnedCacheConfig(torch.ones(STEPS, cols)))
        assert _equal(_run(pipe, call()), ref) and _equal(_run(pipe, call()), ref)
        handle.remove()

        # a sparse mask changes the output
        sparse = torch.ones(STEPS, cols)
        sparse[1:, ::2] = 0
        handle = apply_learned_cache(net, LearnedCacheConfig(sparse))
        cached = _run(pipe, call())
        handle.remove()
        assert not torch.allclose(cached, ref, atol=1e-6)

        # per-sample rows: one mask per network row (both CFG halves of a prompt follow its own mask)
        rows = CFG_ROWS[name]
        per_sample = torch.ones(2 * rows, STEPS, cols)
        per_sample[0, 1:, ::2] = 0  # sample 0 (its conditional rows) skips, sample 1 computes everything
        per_sample[rows * 2 - 2, 1:, 1::2] = 0
        handle = apply_learned_cache(net, LearnedCacheConfig(per_sample))
        together = _run(pipe, call())
        alone = []
        for b in range(2):
            handle.remove()
            handle = apply_learned_cache(net, LearnedCacheConfig(per_sample[[b + 2 * h for h in range(rows)]]))
            alone.append(_run(pipe, call(index=b)))
        handle.remove()
        torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)

    # mask training straight from the pipeline (its scheduler loop and conditioning, guidance included)
    mask = train_mask(pipe, pipeline_kwargs=call(), iterations=2, lr=0.5, lambda1=1e3, progress=False)
    assert mask.nfe == STEPS and mask.solver == type(pipe.scheduler).__name__ and mask.network_times
    assert not mask.matrix[1:].all()  # strong sparsity pressure switched units off
    handle = apply_learned_cache(net, LearnedCacheConfig(mask))
    with torch.no_grad():
        trained = _run(pipe, call())
        assert _equal(_run(pipe, call()), trained)
        with pytest.raises(ValueError, match="network time"):  # another number of steps
            _run(pipe, call(steps=STEPS + 1))

        # MACs of the executed graph with the hook installed, SDPA counted exactly once
        first = record_calls(net, lambda m: _run(pipe, call()))[0]
        counted = macs(net, None, first.args, first.kwargs)
        handle.remove()
        sdpa = _SDPACount(monkeypatch)
        net(*first.args, **first.kwargs)
        monkeypatch.undo()
    from fvcore.nn import FlopCountAnalysis

    from tdiff.cache.mac_count import _Call

    plain_call = _Call(net, first.kwargs, [])
    plain = FlopCountAnalysis(plain_call, plain_call.inputs(first.args, first.kwargs)).unsupported_ops_warnings(False)
    plain = plain.uncalled_modules_warnings(False).tracer_warnings("none").total()
    full = counted["uncached_total"] / STEPS
    assert sdpa.total > 0 and full == plain + sdpa.total
    assert counted["fraction"] < 1.0 and counted["per_step"][0] == full


@pytest.mark.parametrize("name", list(BRANCH_NAMES))
def test_branch_formulation_units(name):
    pipe, call = BUILDERS[name]()
    net = denoiser_network(pipe)
    assert [u.name for u in find_units(net, "branch")] == BRANCH_NAMES[name]
    cols = mask_columns(net, formulation="branch")
    with torch.no_grad():
        ref = _run(pipe, call(true_cfg=False) if name == "flux" else call())
        handle = apply_learned_cache(net, LearnedCacheConfig(torch.ones(STEPS, cols), formulation="branch"))
        assert _equal(_run(pipe, call(true_cfg=False) if name == "flux" else call()), ref)
        handle.remove()


def test_split_cfg_contexts_compose_with_first_block_cache_and_remove_restores():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, call = BUILDERS["flux"]()
    net = pipe.transformer
    state = {k: v.clone() for k, v in net.state_dict().items()}
    attrs = {id(m): set(m.__dict__) for m in net.modules()}
    cols = mask_columns(net)
    with torch.no_grad():
        ref = _run(pipe, call())
        # FluxPipeline's true CFG calls the network twice per step, under cache_context("cond") / ("uncond"):
        # each half advances its own step counter, so a STEPS-row mask covers the run
        handle = apply_learned_cache(net, LearnedCacheConfig(torch.tensor([[1, 1]] + [[0, 1]] * (STEPS - 1))))
        calls = record_calls(net, lambda m: _run(pipe, call()))
        assert [(c.context, c.step) for c in calls] == [(h, s) for s in range(STEPS) for h in ("cond", "uncond")]
        handle.remove()

        net.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        fbc = _run(pipe, call())
        handle = apply_learned_cache(net, LearnedCacheConfig(torch.ones(STEPS, cols)))
        assert _equal(_run(pipe, call()), fbc)  # composes: all-ones learned cache + FBC == FBC alone
        handle.remove()
        assert _equal(_run(pipe, call()), fbc)
        net.disable_cache()
        handle = apply_learned_cache(net, LearnedCacheConfig(torch.ones(STEPS, cols)))
        handle.remove()
        assert _equal(_run(pipe, call()), ref)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    for m in net.modules():  # no attribute left behind by our hooks (diffusers' own registries may remain)
        assert not {a for a in set(m.__dict__) - attrs[id(m)] if "tdiff" in a}
        assert "forward" not in m.__dict__ or "forward" in attrs[id(m)] or "_diffusers_hook" in m.__dict__


def test_remove_leaves_no_trace_and_bad_input():
    pipe, call = BUILDERS["dit"]()
    net = pipe.transformer
    before = {id(m): dict(m.__dict__) for m in net.modules()}
    handle = apply_learned_cache(net, LearnedCacheConfig(torch.ones(STEPS, mask_columns(net))))
    with pytest.raises(ValueError, match="already has a learned cache"):
        apply_learned_cache(net, LearnedCacheConfig(torch.ones(STEPS, mask_columns(net))))
    handle.remove()
    for m in net.modules():
        assert set(m.__dict__) == set(before[id(m)])
    # a mask made for another model is refused
    mask = train_mask(pipe, pipeline_kwargs=call(), iterations=1, progress=False)
    with torch.no_grad():
        net.transformer_blocks[0].ff.net[2].weight.mul_(1.5)
    with pytest.raises(ValueError, match="fingerprint"):
        apply_learned_cache(net, LearnedCacheConfig(mask))
    # UNets cache outputs only; a pipeline without a known network names what is supported
    unet = denoiser_network(BUILDERS["ddpm"]()[0])
    with pytest.raises(ValueError, match="formulation"):
        find_units(unet, "branch")

    from diffusers import DiffusionPipeline

    class Empty(DiffusionPipeline):
        pass

    with pytest.raises(ValueError, match="Supported: pipelines"):
        train_mask(Empty(), pipeline_kwargs={})
    with pytest.raises(ValueError, match="sample_fn"):
        train_mask(net, None)
