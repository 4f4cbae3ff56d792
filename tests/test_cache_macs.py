"""fvcore MACs of the executed graph vs an analytic count of the DiT, with the SDPA handler; a model with caching
installed is counted through its cache, work whose result goes unused included."""
import pytest
import torch

from tdiff.cache import cached_dit, macs, unit_macs

from test_cache_models import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


def analytic_dit_macs(batch, tokens, hidden, depth, heads, mlp_hidden, patch, in_ch, out_ch, freq=256):
    """Multiply-adds of our DiT per call, counted by hand (fvcore's convention: LayerNorm without affine costs
    4 per element; SiLU / GELU / adds / modulate are not counted)."""
    n, c = tokens, hidden
    attn = 4 * n * c + n * c * 3 * c + n * n * c * 2 + n * c * c  # norm1, qkv, QK^T + AV over all heads, proj
    mlp = 4 * n * c + 2 * n * c * mlp_hidden  # norm2, fc1, fc2
    ada = c * 6 * c
    embed = n * (patch * patch * in_ch) * c  # patchify conv
    temb = freq * c + c * c
    final = 4 * n * c + c * 2 * c + n * c * patch * patch * out_ch
    return batch * (embed + temb + depth * (attn + mlp + ada) + final), batch * attn, batch * mlp


class _Unpatchify(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.unpatchify(tokens)


def _unpatchify_charge(model, batch):
    # unpatchify is a pure permutation written as an einsum, to which fvcore's einsum handler still assigns a
    # nominal cost; measure it alone rather than hard-code fvcore's rule
    from fvcore.nn import FlopCountAnalysis

    return FlopCountAnalysis(_Unpatchify(model), (torch.randn(batch, 16, 4),)).unsupported_ops_warnings(False).total()


def test_total_matches_analytic_count_and_skips_are_absent():
    model = tiny_dit(depth=3, hidden=32)
    batch = 2
    inputs = (torch.randn(batch, 1, 8, 8), torch.full((batch,), 500.0), torch.tensor([0, 1]))
    full, attn, mlp = analytic_dit_macs(batch, 16, 32, 3, 2, 128, 2, 1, 1)
    full += _unpatchify_charge(model, batch)
    mask = torch.tensor([[1] * 6, [0, 1] * 3, [0] * 6, [1, 1, 0, 0, 1, 0]])
    counted = macs(model, mask, inputs, formulation="branch")
    assert counted["per_step"][0] == full
    assert counted["per_step"][1] == full - 3 * attn
    assert counted["per_step"][2] == full - 3 * (attn + mlp)
    assert counted["per_step"][3] == full - attn - 2 * mlp
    assert counted["total"] == sum(counted["per_step"]) and counted["uncached_total"] == 4 * full
    base, per_unit = unit_macs(model, inputs[:2] + (inputs[2],), formulation="branch")
    assert per_unit == [attn, mlp] * 3 and base == full - 3 * (attn + mlp)
    # fvcore alone drops attention: the handler is what makes the totals agree
    from fvcore.nn import FlopCountAnalysis
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FlopCountAnalysis(model, inputs).unsupported_ops_warnings(False).total()
    assert plain == full - batch * 3 * (16 * 16 * 32 * 2)  # exactly the three blocks' attention matmuls


def test_output_formulation_counts_the_executed_graph_with_the_cache_installed():
    """Under the output formulation a skipped unit also saves its block's modulation when its partner skips, and
    units whose result is unused (here: everything before a skipped last unit) still run and are counted."""
    model = tiny_dit(depth=2, hidden=32)
    batch = 2
    inputs = (torch.randn(batch, 1, 8, 8), torch.full((batch,), 500.0), torch.tensor([0, 1]))
    full, attn, mlp = analytic_dit_macs(batch, 16, 32, 2, 2, 128, 2, 1, 1)
    full += _unpatchify_charge(model, batch)
    ada = batch * 32 * 6 * 32
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])
    fast = cached_dit(model, mask)
    counted = macs(model, None, inputs)  # the installed cache's mask and formulation
    assert counted == macs(model, mask, inputs, formulation="output")
    assert counted["per_step"] == [full, full - attn - mlp - ada, full - mlp, full - 2 * (attn + mlp + ada)]
    with pytest.raises(ValueError, match="formulation"):
        macs(model, mask, inputs, formulation="branch")
    fast.remove()
    with pytest.raises(ValueError, match="pass the mask"):
        macs(model, None, inputs)
