"""bench/training_speedup's scorer: the samplers the protocol was fixed with, and cached runs that were measured with
another sampler program are rerun rather than mixed with new ones."""
import pytest
import torch

import bench.training_speedup as B


@pytest.mark.parametrize("family,evals", [("ddpm", 11), ("edm", 20), ("vp", 20)])
def test_scorer_samplers_are_the_protocols(family, evals, one_thread):
    # DPM-Solver++(2M): one evaluation per step; EDM's Heun: every one of the 10 steps corrected (the grid ends at
    # sigma_min). tdiff.sample's default "stable" rule would drop 3-4 corrections and change the metric's weights.
    scorer = B.MixtureScorer(B.image_mixture(**B.MIXTURE), family, n=4, steps=10, n_sensitivity=2)
    assert len(scorer.times) == evals
    if family != "ddpm":  # Euler at t_i, correction at t_{i+1}, for every step
        assert torch.equal(scorer.times[1::2], scorer.ts[1:])


def test_cached_run_from_another_scorer_is_rerun(monkeypatch, tmp_path):
    monkeypatch.setattr(B, "cache_dir", lambda: str(tmp_path))
    runs = []

    def run_fn():
        runs.append(1)
        return {"iter": [1], "cpu_seconds": 0.0, "eval_times": [1.0, 0.5], "eval_weights": [0.25, 2.0]}

    same = {"eval_times": [1.0, 0.5], "eval_weights": [0.25, 2.0 * (1 + 1e-6)]}
    B._cached("mixture", "edm", 0, True, run_fn, lambda s: None, same)
    B._cached("mixture", "edm", 0, True, run_fn, lambda s: None, same)
    assert len(runs) == 1  # the cached run is reused when its scorer is the current one
    logs = []
    B._cached("mixture", "edm", 0, True, run_fn, logs.append, {"eval_times": [1.0, 0.6, 0.5]})
    assert len(runs) == 2 and "another sampler program" in logs[0]
    B._cached("mixture", "edm", 0, True, run_fn, logs.append, {"eval_times": [1.0, 0.5], "eval_weights": [0.3, 2.0]})
    assert len(runs) == 3
