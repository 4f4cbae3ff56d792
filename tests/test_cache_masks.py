"""Rectification, binarisation, loss scaling and mask files."""
import pytest
import torch

from tdiff.cache import LearnedMask, binarise, load_mask, rectify, resample_mask, save_mask, uniform_interval_mask
from tdiff.cache.loss_scaling import loss_weights, relative_feature_variation

from test_cache_models import tiny_dit


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


def test_rectify_single_rule():
    # unit 0 at step 1: unit 1 at step 1 reuses (0) and unit 0 at step 2 recomputes (1) -> unit 0 skips
    m = M([[1, 1, 1], [1, 0, 1], [1, 1, 1], [1, 1, 1]])
    assert rectify(m).tolist() == M([[1, 1, 1], [0, 0, 1], [1, 1, 1], [1, 1, 1]]).tolist()


def test_rectify_leaves_first_and_last_step_and_last_unit():
    m = M([[1, 0, 1], [1, 1, 1], [1, 0, 0]])
    # step 0 has no cache; step 2 has no next step; unit 2 has no next unit
    assert rectify(m).tolist() == m.tolist()


def test_rectify_order_last_step_back_and_last_unit_down():
    # Step 2 first: unit 1 at step 2 skips (unit 2 reuses, unit 1 recomputes at step 3). That makes unit 0 at
    # step 2 skippable too (cascading down the units), and stops unit 1 at step 1 from being rectified
    # (unit 1 no longer recomputes at step 2).
    m = M([[1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 1, 1]])
    out = rectify(m)
    assert out.tolist() == M([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]]).tolist()
    # processed from the first step forwards instead, step 1 unit 1 would have been switched off first
    assert out[1, 1]


def test_binarise_threshold_and_budget():
    s = torch.tensor([[0.2, 0.1], [0.9, 0.4], [0.6, 0.7]])
    assert binarise(s).tolist() == [[True, True], [True, False], [True, True]]
    costs = [1.0, 3.0]
    m = binarise(s, unit_macs=costs, base_macs=0.0, target_mac_fraction=0.5)
    spent = float((m.double() * torch.tensor(costs)).sum())
    assert spent <= 0.5 * 3 * 4 and m[0].all()
    assert m.tolist() == [[True, True], [True, False], [False, False]]  # the two lowest scores went: 9 -> 5 MACs
    with pytest.raises(ValueError, match="unit_macs"):
        binarise(s, target_mac_fraction=0.5)


def test_binarise_budget_holds_after_the_transform_and_switches_off_no_more_than_needed():
    s = torch.tensor([[1.0, 1.0], [0.9, 0.8], [0.6, 0.7], [0.5, 0.95]])
    costs = [1.0, 1.0]

    def drop_step2_unit1(m):  # a transform that removes work, like rectify
        m = m.clone()
        m[2, 1] = False
        return m

    # budget 6 of 8: the transform alone brings 8 -> 7, so one more unit (the lowest score, (3, 0)) must go
    m = binarise(s, 0.0, costs, 0.0, 0.75, then=drop_step2_unit1)
    assert m.tolist() == [[True, True], [True, True], [True, False], [False, True]]
    # without accounting for the transform, two units would go before it removes a third
    plain = drop_step2_unit1(binarise(s, 0.0, costs, 0.0, 0.75))
    assert int(plain.sum()) == 5 and int(m.sum()) == 6
    with pytest.raises(ValueError, match="threshold"):
        binarise(s, threshold=2.0)


def test_uniform_interval_mask():
    assert uniform_interval_mask(5, 2, 2).tolist() == [[True] * 2, [False] * 2, [True] * 2, [False] * 2, [True] * 2]


def test_loss_weights_piecewise():
    assert loss_weights(torch.tensor([0.05, 0.2, 0.6, 1.0])).tolist() == [2.0, 1.5, 1.0, 1.0]
    f = [torch.ones(3), torch.ones(3) * 2, torch.ones(3) * 2]
    assert relative_feature_variation(f).tolist() == [1.0, 0.0, 0.0]


def test_mask_file_roundtrip_and_refusals(tmp_path):
    model = tiny_dit()
    from tdiff.artefacts import fingerprint_module

    mask = LearnedMask(M([[1] * 6, [0, 1] * 3, [1, 0] * 3]), fingerprint=fingerprint_module(model),
                       solver="ddim", timesteps=[999.0, 500.0, 1.0], threshold=0.4)
    path = tmp_path / "mask.json"
    save_mask(str(path), mask)
    back = load_mask(str(path), model=model, nfe=3, solver="ddim")
    assert torch.equal(back.matrix, mask.matrix) and back.threshold == 0.4 and back.timesteps == [999.0, 500.0, 1.0]
    with pytest.raises(ValueError, match="fingerprint"):
        load_mask(str(path), model=tiny_dit(seed=5))
    with pytest.raises(ValueError, match="resample"):
        load_mask(str(path), nfe=5)
    with pytest.raises(ValueError, match="solver"):
        load_mask(str(path), solver="dpmpp")
    from tdiff.cache import cached_dit

    with pytest.raises(ValueError, match="fingerprint"):
        cached_dit(tiny_dit(seed=5), str(path))
    fast = cached_dit(model, str(path))
    fast.remove()


def test_resample_mask():
    mask = LearnedMask(M([[1, 1], [0, 1], [1, 0], [0, 0]]))
    up = resample_mask(mask, 7)
    assert up.nfe == 7 and up.matrix[0].all() and up.matrix[-1].tolist() == [False, False]
    assert resample_mask(mask, 4).matrix.tolist() == mask.matrix.tolist()
    with pytest.raises(ValueError, match="nfe"):
        resample_mask(mask, 0)
