"""train_mask: the objective's fixed points, scores that converge to {0, 1}, per-step detach, checkpoints keyed by
the trajectory, the MAC budget, rectification where it is exact, and bad arguments."""
import pytest
import torch

import tdiff
from tdiff.cache import macs, rectify, unit_graph
from tdiff.cache import train as train_module
from tdiff.cache.train import bimodal_weight, train_mask
from tdiff.models.defaults import default_schedule

from test_cache_models import tiny_dit

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend

STEPS = 4


def _sampler(model, batch=2, seed=0, solver="ddim"):
    sched = default_schedule()
    den = tdiff.denoiser(model, sched)
    ts = torch.linspace(sched.t_max, sched.t_min, STEPS + 1)
    x_T = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed))  # Gaussian noise only
    return lambda m: tdiff.sample(den, x_T, ts, solver=solver)


def test_objective_extremes_and_mask_metadata():
    model = tiny_dit(depth=2)
    keep = train_mask(model, _sampler(model), iterations=2, lambda1=0.0, lambda2=0.0, progress=False, solver="ddim")
    # no sparsity pressure: at s = 1 the sampled unit always computes, the feature loss is 0, nothing moves
    assert keep.matrix.all() and keep.nfe == STEPS and keep.solver == "ddim" and keep.formulation == "output"
    assert keep.fingerprint == tdiff.artefacts.fingerprint_module(model) and len(keep.network_times) == STEPS
    drop = train_mask(model, _sampler(model), iterations=3, lr=0.5, lambda1=1e3, progress=False)
    assert drop.matrix[0].all() and not drop.matrix[1:].any()
    s = torch.tensor(drop.extra["scores"])
    assert s.shape == (STEPS, 4) and bool(((s >= 0) & (s <= 1)).all())
    assert all(p.requires_grad for p in model.parameters())  # the model is restored unfrozen


@pytest.mark.parametrize("options", [dict(), dict(feature_loss="relative", lambda1=2e-3, lambda2=2e-3),
                                     dict(cache_update="hard", formulation="branch", relaxation="bernoulli")])
def test_scores_converge_to_zero_or_one(options):
    """The bimodal term's schedule drives the scores to {0, 1}, so the 0.5 threshold is decided by the loss."""
    model = tiny_dit(depth=2)
    mask = train_mask(model, _sampler(model), **{**dict(iterations=24, lr=0.1, lambda1=2e-2, progress=False),
                                                 **options})
    scores = torch.tensor(mask.extra["scores"])[1:]
    assert mask.extra["undecided_share"] <= 0.05
    assert 0 < int((scores > 0.5).sum()) < scores.numel()  # a real trade-off, not all on or all off
    # the schedule: off for the first half, then doubling every iteration
    assert [bimodal_weight(k, 8, 0.1, 0.5, 2.0) for k in range(8)] == [0, 0, 0, 0, 0.1, 0.2, 0.4, 0.8]


def test_output_masks_are_rectified_exactly_and_branch_needs_lossy():
    model = tiny_dit(depth=2)
    fn = _sampler(model)
    kw = dict(iterations=4, lr=0.3, lambda1=3e-2, progress=False)
    rect = train_mask(model, fn, **kw)
    raw = train_mask(model, fn, rectify=False, **kw)
    x = torch.randn(2, 1, 8, 8)
    graph = unit_graph(model, (x, torch.full((2,), 500.0), None))
    assert rect.extra["rectified"] and torch.equal(rect.matrix, rectify(raw.matrix, graph))
    with pytest.raises(ValueError, match="lossy"):
        train_mask(model, fn, formulation="branch", rectify=True, **kw)
    assert not train_mask(model, fn, formulation="branch", **kw).extra["rectified"]


def test_soft_caches_are_detached_between_steps():
    from tdiff.cache.api import build_cache

    model = tiny_dit(depth=2)
    cache = build_cache(model, "branch")
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    rows = [torch.full((4,), 0.5, requires_grad=True) for _ in range(2)]
    for i, row in enumerate(rows):
        with cache.soft(row, sample=False, commit=True, step=i):
            out = model(x, torch.full((2,), 500.0), y)
    assert all(not c.requires_grad for c in cache._contexts["default"].cache.values())
    (g0, g1) = torch.autograd.grad(out.sum(), rows, allow_unused=True)
    assert g0 is None and g1 is not None  # the step-1 loss reaches only step 1's scores
    cache.remove()


def test_checkpoint_resume_and_refusal_for_another_trajectory(tmp_path, monkeypatch):
    model = tiny_dit(depth=2)
    kwargs = dict(iterations=2, lambda1=0.2, progress=False)
    full = train_mask(model, _sampler(model), **kwargs)
    path = str(tmp_path / "partial.pt")
    real_save, saves = train_module.save_torch, []

    def crash_after_two(*a, **k):
        real_save(*a, **k)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_torch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_mask(model, _sampler(model), checkpoint=path, **kwargs)
    monkeypatch.setattr(train_module, "save_torch", real_save)
    with pytest.raises(ValueError, match="another sampling trajectory"):  # resuming with another x_T
        train_mask(model, _sampler(model, seed=1), checkpoint=path, **kwargs)
    with pytest.raises(ValueError, match="another sampling trajectory"):  # ... or another solver
        train_mask(model, _sampler(model, solver="dpmpp"), checkpoint=path, **kwargs)
    resumed = train_mask(model, _sampler(model), checkpoint=path, **kwargs)
    assert torch.equal(resumed.matrix, full.matrix)
    torch.testing.assert_close(torch.tensor(resumed.extra["scores"]), torch.tensor(full.extra["scores"]))
    # a finished checkpoint is not handed back for new data
    with pytest.raises(ValueError, match="another sampling trajectory"):
        train_mask(model, _sampler(model, seed=2), checkpoint=path, **kwargs)
    with pytest.raises(ValueError, match="another model or other settings"):
        train_mask(model, _sampler(model), checkpoint=path, iterations=3, progress=False)


def test_mac_budget():
    model = tiny_dit(depth=2)
    mask = train_mask(model, _sampler(model), iterations=1, lambda1=0.0, lambda2=0.0, progress=False,
                      target_mac_fraction=0.6)
    counted = macs(model, mask, (torch.randn(2, 1, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])))
    assert 0.4 < counted["fraction"] <= 0.6 + 1e-9  # lowest scores dropped one by one, not far below the budget


def test_bad_arguments():
    model = tiny_dit(depth=2)
    fn = _sampler(model)
    for bad, match in [(dict(iterations=0), "iterations"), (dict(iterations=2.5), "iterations"),
                       (dict(init_score=2.0), "init_score"), (dict(lr=float("nan")), "lr"),
                       (dict(lambda1=-1.0), "lambda1"), (dict(lambda2=float("inf")), "lambda2"),
                       (dict(threshold=1.5), "threshold"), (dict(feature_loss="l1"), "feature_loss"),
                       (dict(cache_update="lazy"), "cache_update"), (dict(relaxation="gumbel"), "relaxation"),
                       (dict(bimodal_growth=0.5), "bimodal_growth"),
                       (dict(formulation="gated"), "formulation"), (dict(granularity="layer"), "granularity"),
                       (dict(pipeline_kwargs={}), "pipeline")]:
        with pytest.raises(ValueError, match=match):
            train_mask(model, fn, progress=False, **bad)
    with pytest.raises(ValueError, match="never called the model"):
        train_mask(model, lambda m: None, progress=False)
