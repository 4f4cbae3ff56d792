"""Binarisation, the uniform-interval baselines, loss scaling and mask files (validated on load)."""
import json

import pytest
import torch

from tdiff.cache import (LearnedMask, binarise, cached_dit, load_mask, resample_mask, save_mask,
                         uniform_interval_mask, uniform_mask_at_fraction)
from tdiff.cache.loss_scaling import loss_weights, relative_feature_variation

from test_cache_models import tiny_dit


def M(rows):
    return torch.tensor(rows, dtype=torch.bool)


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

    m = binarise(s, 0.0, costs, 0.0, 0.75, then=drop_step2_unit1)
    assert m.tolist() == [[True, True], [True, True], [True, False], [False, True]]
    plain = drop_step2_unit1(binarise(s, 0.0, costs, 0.0, 0.75))
    assert int(plain.sum()) == 5 and int(m.sum()) == 6
    with pytest.raises(ValueError, match="threshold"):
        binarise(s, threshold=2.0)


def test_uniform_interval_masks():
    assert uniform_interval_mask(5, 2, 2).tolist() == [[True] * 2, [False] * 2, [True] * 2, [False] * 2, [True] * 2]
    costs, base = [3.0, 1.0, 2.0, 2.0], 2.0
    for fraction in (0.31, 0.45, 0.57, 0.8):
        m = uniform_mask_at_fraction(20, costs, base, fraction)
        spent = 20 * base + float((m.double() * torch.tensor(costs)).sum())
        assert m[0].all() and abs(spent / (20 * (base + sum(costs))) - fraction) <= max(costs) / (2 * 20 * 10)
    with pytest.raises(ValueError, match="fraction"):
        uniform_mask_at_fraction(10, costs, base, 0.0)


def test_loss_weights_and_backward_feature_variation():
    assert loss_weights(torch.tensor([0.05, 0.2, 0.6, 1.0])).tolist() == [2.0, 1.5, 1.0, 1.0]
    # delta[i] compares step i with step i - 1, whose cache step i reuses; step 0 takes step 1's value
    f = [torch.ones(3), torch.ones(3) * 2, torch.ones(3) * 2, torch.ones(3) * 4]
    assert relative_feature_variation(f).tolist() == [0.5, 0.5, 0.0, 0.5]


def test_mask_file_roundtrip_and_refusals(tmp_path):
    model = tiny_dit()
    from tdiff.artefacts import fingerprint_module

    mask = LearnedMask(M([[1] * 6, [0, 1] * 3, [1, 0] * 3]), fingerprint=fingerprint_module(model),
                       formulation="branch", solver="ddim", timesteps=[999.0, 500.0, 1.0], threshold=0.4,
                       network_times=[999.0, 500.0, 1.0])
    path = tmp_path / "mask.json"
    save_mask(str(path), mask)
    back = load_mask(str(path), model=model, nfe=3, solver="ddim")
    assert torch.equal(back.matrix, mask.matrix) and back.threshold == 0.4 and back.timesteps == [999.0, 500.0, 1.0]
    assert back.formulation == "branch" and back.network_times == [999.0, 500.0, 1.0]
    with pytest.raises(ValueError, match="fingerprint"):
        load_mask(str(path), model=tiny_dit(seed=5))
    with pytest.raises(ValueError, match="resample"):
        load_mask(str(path), nfe=5)
    with pytest.raises(ValueError, match="solver"):
        load_mask(str(path), solver="dpmpp")
    with pytest.raises(ValueError, match="fingerprint"):
        cached_dit(tiny_dit(seed=5), str(path))
    fast = cached_dit(model, str(path))
    assert fast.cache.formulation == "branch"
    fast.remove()


def _write(path, **changes):
    doc = {"format": "tdiff.cache.mask", "format_version": 2, "tdiff_version": "0", "matrix": [[1, 1], [0, 1]],
           "granularity": "unit", "formulation": "output", "nfe": 2, "threshold": 0.5, "fingerprint": None,
           "solver": None, "timesteps": None, "network_times": None, "extra": {}, "mask_tdiff_version": "0"}
    for k, v in changes.items():
        if v is KeyError:
            doc.pop(k)
        else:
            doc[k] = v
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.mark.parametrize("changes, message", [
    (dict(matrix=[[1, 2], [0, 1]]), "0/1"),
    (dict(matrix=[[1, 0.5], [0, 1]]), "0/1"),
    (dict(matrix=[[1, -1], [0, 1]]), "0/1"),
    (dict(matrix=[[1, 1], [0]]), "rectangular"),
    (dict(matrix=[]), "non-empty"),
    (dict(matrix=KeyError), "no 'matrix'"),
    (dict(granularity=KeyError), "no 'granularity'"),
    (dict(granularity="layer"), "granularity"),
    (dict(formulation=KeyError), "no 'formulation'"),
    (dict(formulation="gated"), "formulation"),
    (dict(threshold="0.5"), "threshold"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=True), "threshold"),
    (dict(timesteps="999,1"), "timesteps"),
    (dict(timesteps=[999, None]), "timesteps"),
    (dict(network_times=[1.0]), "network_times"),
    (dict(extra=[1, 2]), "extra"),
    (dict(solver=3), "solver"),
    (dict(fingerprint=7), "fingerprint"),
    (dict(nfe=3), "nfe 3"),
    (dict(nfe="2"), "nfe"),
    (dict(format="tdiff.schedule"), "expected a 'tdiff.cache.mask'"),
])
def test_bad_mask_files_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_mask(_write(tmp_path / "bad.json", **changes))


def test_version_1_files_load_as_the_branch_formulation(tmp_path):
    path = _write(tmp_path / "v1.json", format_version=1, formulation=KeyError, granularity="branch")
    mask = load_mask(path)
    assert mask.formulation == "branch" and mask.granularity == "unit"


def test_resample_mask():
    mask = LearnedMask(M([[1, 1], [0, 1], [1, 0], [0, 0]]), network_times=[4.0, 3.0, 2.0, 1.0])
    up = resample_mask(mask, 7)
    assert up.nfe == 7 and up.matrix[0].all() and up.matrix[-1].tolist() == [False, False]
    assert up.network_times is None
    assert resample_mask(mask, 4).matrix.tolist() == mask.matrix.tolist()
    with pytest.raises(ValueError, match="nfe"):
        resample_mask(mask, 0)
