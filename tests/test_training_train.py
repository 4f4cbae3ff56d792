"""The sampling side agrees with the training side (an oracle network that outputs the exact regression target
has zero loss and denoises to x0, for every target and process), and the training script runs end to end."""
import json

import pytest
import torch

from tdiff import schedules as S
from tdiff.training import DiffusionLoss
from tdiff.training.eval_sampler import sample_images

DDPM = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))

CASES = [
    (DDPM, dict(target="eps")), (DDPM, dict(target="v")), (S.VPLinear(), dict(target="x0")),
    (S.RectifiedFlow(), dict(target="flow")), (S.EDM(), dict(target="edm")), (DDPM, dict(target="edm")),
    (S.EDM(), dict(process="fdm")), (S.VPLinear(), dict(process="fdm")), (S.VE(), dict(process="fdm")),
    (S.EDM(), dict(process="fdm", fdm_on="mean")),
]


def _expected_target(loss_fn, sched, x0, eps, t):
    v = lambda q: q.view(-1, 1, 1, 1)  # noqa: E731
    sig = sched.edm_sigma(t)
    if loss_fn.process == "fdm" or loss_fn.target == "edm":
        p = loss_fn.precond
        mu = loss_fn.mean_factor(sig)
        x = v(mu) * x0 + v(sig) * eps
        return (x0 - v(p.c_skip(sig)) * x) / v(p.c_out(sig)), x
    a, s = sched.alpha(t), sched.sigma(t)
    x = x0 + v(sig) * eps
    return {"eps": eps, "x0": x0, "v": v(a) * eps - v(s) * x0, "flow": eps - x0}[loss_fn.target], x


@pytest.mark.parametrize("sched, kw", CASES)
def test_oracle_network_has_zero_loss_and_denoises_to_x0(sched, kw):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    loss_fn = DiffusionLoss(sched, **kw)
    t = loss_fn.sample_t(4, "cpu", g)
    target, x = _expected_target(loss_fn, sched, x0, eps, t)
    oracle = lambda inp, nt, **_: target  # noqa: E731
    loss = loss_fn(oracle, x0, t=t, noise=eps)
    assert loss.item() < 1e-18 * max(1.0, loss_fn.last_weight.max().item())
    torch.testing.assert_close(loss_fn.denoise(oracle, x, t), x0)


def test_eval_sampler_runs_for_every_configuration():
    for sched, kw in CASES[:1] + CASES[4:7]:
        loss_fn = DiffusionLoss(sched, **kw)
        imgs = sample_images(loss_fn, lambda x, t, **_: torch.zeros_like(x), (3, 1, 4, 4), steps=3)
        assert imgs.shape == (3, 1, 4, 4) and torch.isfinite(imgs).all()


def test_train_script_end_to_end(tmp_path, monkeypatch):
    import tdiff.training.train as T

    monkeypatch.setattr(T, "evaluate_fd", lambda loss_fn, model, cfg: 123.0)  # the metric has its own tests
    monkeypatch.setattr(T, "build_model", lambda cfg: _tiny_dit())
    out = tmp_path / "run"
    T.main(["--model", "dit", "--sampler", "speed", "--weighting", "speed", "--iters", "3", "--eval-every", "2",
            "--batch-size", "4", "--out", str(out)])
    doc = json.loads((tmp_path / "run.json").read_text())
    assert doc["history"]["eval_iter"] == [2, 3] and doc["history"]["fd"] == [123.0, 123.0]
    assert len(doc["history"]["loss"]) == 3 and (tmp_path / "run.png").stat().st_size > 0
    assert doc["loss_config"]["sampler"]["name"] == "speed"


def _tiny_dit():
    from tdiff.models import DiT, DiTConfig

    return DiT(DiTConfig.preset("digits", hidden_size=16, depth=1, num_heads=2, patch_size=4))


@pytest.mark.parametrize("precond", ["edm", "vp", "ve"])
@pytest.mark.parametrize("sched", [S.VPLinear(), S.EDM()], ids=["VPLinear", "EDM"])
def test_denoise_feeds_the_network_what_training_fed_it(sched, precond):
    """At sampling time the network must see the same preconditioned input c_in x as in training."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64)
    loss_fn = DiffusionLoss(sched, target="edm", precond=precond)
    t = loss_fn.sample_t(4, "cpu", g)
    seen = []

    def net(inp, nt, **_):
        seen.append(inp)
        return inp

    loss_fn(net, x0, t=t, noise=eps)
    loss_fn.denoise(net, x0 + sched.edm_sigma(t).view(-1, 1, 1, 1) * eps, t)
    torch.testing.assert_close(seen[1], seen[0])
