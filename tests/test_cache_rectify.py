"""Rectification (seed Eq. 12) is exact where it is applied: on random masks, every step's output is bit-identical
before and after, for each formulation that rectifies (the "output" formulation: tdiff DiT, tdiff UNet, diffusers
UNet2DModel); the "branch" formulation is refused unless lossy=True."""
import pytest
import torch

from tdiff.cache import UnitGraph, cached_dit, find_units, mask_columns, rectify, unit_graph

from test_cache_models import dit_inputs, tiny_dit, tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_chain_rule_is_eq12_and_covers_the_last_step():
    chain = UnitGraph.chain(3)
    # unit 0 at step 1: unit 1 at step 1 reuses and unit 0 at step 2 recomputes -> unit 0 skips
    assert rectify(M([[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]]), chain).tolist() == \
        M([[1, 1, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]).tolist()
    # the last step: nothing reads its caches afterwards, so unit 0 there skips too (the seed leaves it alone)
    last = M([[1, 1, 1], [1, 0, 1]])
    assert rectify(last, chain).tolist() == M([[1, 1, 1], [0, 0, 1]]).tolist()
    assert rectify(last, chain, lossy=True).tolist() == last.tolist()
    # order: from the last step back, and from the last unit down, each decision seeing the rectified entries
    m = M([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]])
    assert rectify(m, chain).tolist() == M([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]]).tolist()
    with pytest.raises(ValueError, match="columns"):
        rectify(m, UnitGraph.chain(4))
    with pytest.raises(ValueError, match="UnitGraph"):
        rectify(m, None)


def _outputs(model, mask, xs, ts, y=None, **kw):
    fast = cached_dit(model, mask, **kw)
    with torch.no_grad():
        out = [fast(x, t, y) for x, t in zip(xs, ts)]
        out = [o.sample if hasattr(o, "sample") else o for o in out]
    fast.remove()
    return out


def _assert_lossless(model, graph, xs, ts, y=None, n=4, seed=0, **kw):
    """Random masks give bit-identical outputs at every step before and after rectification, which switches
    something off."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, len(xs), graph.size, generator=g) < 0.6
    masks[:, 0] = True
    switched = 0
    for mask in masks:
        fixed = rectify(mask, graph)
        switched += int(mask.sum() - fixed.sum())
        before, after = _outputs(model, mask, xs, ts, y, **kw), _outputs(model, fixed, xs, ts, y, **kw)
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert switched > 0


@pytest.mark.parametrize("granularity", ["unit", "block"])
def test_rectified_dit_is_bit_identical(granularity):
    model = tiny_dit()
    xs, ts, y = dit_inputs(steps=5)
    graph = unit_graph(model, (xs[0], ts[0], y), granularity=granularity)
    assert graph == UnitGraph.chain(mask_columns(model, granularity))  # a transformer is a chain of outputs
    _assert_lossless(model, graph, xs, ts, y, seed=1, granularity=granularity)


def test_rectified_unet_is_bit_identical_and_follows_skip_connections():
    model = tiny_unet()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 1, 8, 8, generator=g) for _ in range(5)]
    ts = [torch.full((2,), 900.0 - 200 * i) for i in range(5)]
    graph = unit_graph(model, (xs[0], ts[0]))
    names = [u.name for u in find_units(model)]
    # the first ResBlock feeds the next one (through the Downsample) and, through skip connections, two up steps
    readers = {names[c] for c in graph.consumers[names.index("down_blocks.0.res")]}
    assert readers == {"down_blocks.2.res", "up_blocks.1.res", "up_blocks.3.res"}
    assert graph.feeds_output == [n == names[-1] for n in names]
    _assert_lossless(model, graph, xs, ts, seed=3)


def test_rectified_diffusers_unet_is_bit_identical():
    from cache_pipelines import ddpm

    unet = ddpm()[0].unet
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 3, 8, 8, generator=g) for _ in range(4)]
    ts = [torch.full((2,), 900 - 250 * i) for i in range(4)]
    graph = unit_graph(unet, (xs[0], ts[0]))
    _assert_lossless(unet, graph, xs, ts, n=3, seed=5)


def test_branch_formulation_is_refused_unless_lossy():
    """The issue's repro: in the branch formulation, Eq. 12 switches unit 0 off at step 1 and changes the output."""
    model = tiny_dit(depth=2)
    xs, ts, y = dit_inputs(steps=3)
    graph = unit_graph(model, (xs[0], ts[0], y), formulation="branch")
    assert all(graph.feeds_output)  # every branch reaches the output through the residual stream
    mask = M([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="not lossless.*lossy=True"):
        rectify(mask, graph)
    lossy = rectify(mask, graph, lossy=True)
    assert not lossy[1, 0]

    assert not torch.equal(_outputs(model, mask, xs, ts, y, formulation="branch")[1],
                           _outputs(model, lossy, xs, ts, y, formulation="branch")[1])
