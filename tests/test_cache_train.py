"""train_mask: the objective's fixed points, per-step detach, checkpoint resume, MAC budget."""
import pytest
import torch

import tdiff
from tdiff.cache import LearnedCache, macs
from tdiff.cache import train as train_module
from tdiff.cache.train import train_mask
from tdiff.models.defaults import default_schedule

from test_cache_models import tiny_dit

STEPS = 4


def _sampler(model, batch=2):
    sched = default_schedule()
    den = tdiff.denoiser(model, sched)
    ts = torch.linspace(sched.t_max, sched.t_min, STEPS + 1)
    x_T = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # Gaussian noise only
    return lambda m: tdiff.sample(den, x_T, ts, solver="ddim")


def test_objective_extremes_and_mask_metadata():
    model = tiny_dit(depth=2)
    keep = train_mask(model, _sampler(model), iterations=2, lambda1=0.0, lambda2=0.0, progress=False, solver="ddim")
    # no sparsity pressure: at s = 1 the sampled unit always computes, the feature loss is 0, nothing moves
    assert keep.matrix.all() and keep.nfe == STEPS and keep.solver == "ddim"
    assert keep.fingerprint == tdiff.artefacts.fingerprint_module(model)
    drop = train_mask(model, _sampler(model), iterations=3, lr=0.5, lambda1=50.0, progress=False, rectify=False)
    assert drop.matrix[0].all() and not drop.matrix[1:].any()
    s = torch.tensor(drop.extra["scores"])
    assert s.shape == (STEPS, 4) and bool(((s >= 0) & (s <= 1)).all())
    assert all(p.requires_grad for p in model.parameters())  # the model is restored unfrozen


def test_soft_caches_are_detached_between_steps():
    model = tiny_dit(depth=2)
    cache = LearnedCache(model, None)
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    rows = [torch.full((4,), 0.5, requires_grad=True) for _ in range(2)]
    for i, row in enumerate(rows):
        cache._context().step = i - 1
        cache._soft = dict(scores=row, sample=False, commit=True)
        out = model(x, torch.full((2,), 500.0), y)
    assert all(not c.requires_grad for c in cache._context().cache.values())
    (g0, g1) = torch.autograd.grad(out.sum(), rows, allow_unused=True)
    assert g0 is None and g1 is not None  # the step-1 loss reaches only step 1's scores
    cache.remove()


def test_checkpoint_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch):
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
    resumed = train_mask(model, _sampler(model), checkpoint=path, **kwargs)
    assert torch.equal(resumed.matrix, full.matrix)
    torch.testing.assert_close(torch.tensor(resumed.extra["scores"]), torch.tensor(full.extra["scores"]))
    with pytest.raises(ValueError, match="another model or other settings"):
        train_mask(model, _sampler(model), checkpoint=path, iterations=3, progress=False)


def test_mac_budget():
    model = tiny_dit(depth=2)
    mask = train_mask(model, _sampler(model), iterations=1, lambda1=0.0, lambda2=0.0, progress=False,
                      target_mac_fraction=0.6, rectify=False)
    counted = macs(model, mask, (torch.randn(2, 1, 8, 8), torch.full((2,), 500.0), torch.tensor([0, 1])))
    assert counted["fraction"] <= 0.6 + 1e-9
    assert counted["fraction"] > 0.4  # not far below the budget: lowest scores are dropped one by one


def test_bad_arguments():
    model = tiny_dit(depth=2)
    with pytest.raises(ValueError, match="iterations"):
        train_mask(model, _sampler(model), iterations=-1)
    with pytest.raises(ValueError, match="init_score"):
        train_mask(model, _sampler(model), init_score=2.0)
    with pytest.raises(ValueError, match="never called the model"):
        train_mask(model, lambda m: None, progress=False)
