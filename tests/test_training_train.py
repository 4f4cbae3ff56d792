"""The sampling side agrees with the training side (an oracle network that outputs the exact regression target
has zero loss and denoises to x0, for every target and process), the trainer resumes bit-identically after being
killed, and its command line exposes every method parameter."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tdiff import schedules as S
from tdiff.artefacts import load_json, load_torch
from tdiff.solvers import sample
from tdiff.timesteps import logsnr_uniform
from tdiff.training import DiffusionLoss

DDPM = S.DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))

CASES = [
    (DDPM, dict(target="eps")), (DDPM, dict(target="v")), (S.VPLinear(), dict(target="x0")),
    (S.RectifiedFlow(), dict(target="flow")), (S.VPLinear(), dict(target="flow")), (S.EDM(), dict(target="edm")),
    (DDPM, dict(target="edm")), (S.EDM(), dict(process="fdm")), (S.VPLinear(), dict(process="fdm")),
    (S.VE(), dict(process="fdm")), (S.EDM(), dict(process="fdm", fdm_on="mean")),
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
    flow = v(sched.d_alpha(t)) * x0 + v(sched.d_sigma(t)) * eps
    return {"eps": eps, "x0": x0, "v": v(a) * eps - v(s) * x0, "flow": flow}[loss_fn.target], x


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


@pytest.mark.parametrize("sched, kw", [c for c in CASES if c[1].get("fdm_on") != "mean"])
def test_trained_denoiser_samples_with_tdiff_sample(sched, kw):
    """loss.denoiser(model) is what tdiff.sample needs: with a network that always outputs the target of a fixed
    x0 (for the input it is given), the solver lands on that x0."""
    loss_fn = DiffusionLoss(sched, **kw)
    x0 = torch.full((3, 1, 4, 4), 0.25, dtype=torch.float64)
    now = {}

    def net(inp, nt):
        t = now["t"].expand(inp.shape[0])
        v = lambda q: q.view(-1, 1, 1, 1)  # noqa: E731
        sig, a, s = v(sched.edm_sigma(t)), v(sched.alpha(t)), v(sched.sigma(t))
        if loss_fn.fdm is not None:
            x = inp / loss_fn.fdm.factor(sig)  # the sigma-space sample the loss scaled
        elif loss_fn.target == "edm" and loss_fn.precond.input_sigma_data() is not None:
            x = inp / loss_fn.precond.c_in(sig)
        else:
            x = inp / a
        if loss_fn.target == "edm":
            p = loss_fn.precond
            return (x0 - p.c_skip(sig) * x) / p.c_out(sig)
        eps = (x - x0) / sig
        flow = v(sched.d_alpha(t)) * x0 + v(sched.d_sigma(t)) * eps
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": flow}[loss_fn.target]

    den = loss_fn.denoiser(net)

    def D(x, t):
        now["t"] = torch.as_tensor(t, dtype=torch.float64)
        return den(x, t)

    ts = logsnr_uniform(sched, 4)
    x_T = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    out = sample(D, x_T, ts, solver="ddim", schedule=sched, final_sigmas_type="zero")
    torch.testing.assert_close(out, x0)


def test_fdm_mean_mode_has_no_sampler_and_says_so():
    loss_fn = DiffusionLoss(S.EDM(), process="fdm", fdm_on="mean")
    with pytest.raises(ValueError, match="mean"):
        loss_fn.denoiser(lambda x, t: x)


# ---------------------------------------------------------------------------------------------------------------
# The trainer: kill, resume, flags
# ---------------------------------------------------------------------------------------------------------------
TINY = json.dumps({"hidden_size": 16, "depth": 1, "num_heads": 2, "patch_size": 4})
# FDM with its warm-up (loss state) on a DiT with label dropout (global RNG): every piece of state matters
RUN = ["--model", "dit", "--model-config", TINY, "--schedule", "edm", "--process", "fdm", "--warmup", "6",
       "--iters", "24", "--batch-size", "8", "--eval-every", "0", "--threads", "1", "--seed", "3"]


def _wait_for(path, newer_than=0.0, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if os.path.exists(path) and os.path.getmtime(path) > newer_than:
            return os.path.getmtime(path)
        time.sleep(0.02)
    raise AssertionError(f"{path} did not appear")


def _tensors_equal(a, b):
    if torch.is_tensor(a):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_killed_run_resumes_bit_identically(tmp_path):
    import tdiff.training.train as T

    # the reference: one uninterrupted run
    ref = str(tmp_path / "ref")
    assert T.main(RUN + ["--out", ref, "--checkpoint-every", "0"]) == 0
    # SIGTERM: the trainer checkpoints the iteration it is in and exits 143
    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "tdiff.training.train", *RUN, "--out", run, "--checkpoint-every", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(run + ".ckpt")
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == T.SIGTERM_EXIT, out
    first = load_torch(run + ".ckpt", T.CHECKPOINT_FORMAT, T.CHECKPOINT_VERSION)["iteration"]
    assert 3 <= first < 24 and not os.path.exists(run + ".json")
    # SIGKILL while resuming: the last checkpoint written atomically survives
    proc = subprocess.Popen(cmd + ["--resume"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(run + ".ckpt", newer_than=os.path.getmtime(run + ".ckpt"))
    proc.kill()
    proc.communicate(timeout=60)
    second = load_torch(run + ".ckpt", T.CHECKPOINT_FORMAT, T.CHECKPOINT_VERSION)["iteration"]
    assert first < second <= 24
    # resume to the end in this process
    assert T.main(RUN + ["--out", run, "--checkpoint-every", "3", "--resume"]) == 0
    a, b = load_json(ref + ".json", T.RESULTS_FORMAT, 1), load_json(run + ".json", T.RESULTS_FORMAT, 1)
    assert a["history"]["loss"] == b["history"]["loss"] and len(a["history"]["loss"]) == 24
    assert a["history"]["iter"] == b["history"]["iter"]
    ca = load_torch(ref + ".ckpt", T.CHECKPOINT_FORMAT, T.CHECKPOINT_VERSION)
    cb = load_torch(run + ".ckpt", T.CHECKPOINT_FORMAT, T.CHECKPOINT_VERSION)
    for key in ("model", "ema", "optimizer", "loss", "generator", "global_rng"):
        assert _tensors_equal(ca[key], cb[key]), key
    assert ca["loss"]["warmup"]["steps"] == 24


def test_resume_refuses_another_config(tmp_path):
    import tdiff.training.train as T

    out = str(tmp_path / "r")
    assert T.main(RUN + ["--iters", "2", "--out", out]) == 0
    with pytest.raises(ValueError, match="fdm_multiplier=2.0; this run has fdm_multiplier=3.0"):
        T.main(RUN + ["--iters", "3", "--out", out, "--resume", "--fdm-multiplier", "3"])
    # more iterations of the same configuration are fine
    assert T.main(RUN + ["--iters", "3", "--out", out, "--resume"]) == 0
    assert load_json(out + ".json", T.RESULTS_FORMAT, 1)["history"]["iter"] == [1, 2, 3]


def test_train_script_end_to_end_with_evaluation(tmp_path, monkeypatch):
    import tdiff.training.train as T

    seen = []

    def fake_fd(imgs, **_):  # the metric has its own tests; check what it is given
        seen.append(imgs)
        return 123.0

    monkeypatch.setattr("tdiff.metrics.frechet.frechet_distance", fake_fd)
    out = str(tmp_path / "run")
    T.main(["--model-config", TINY, "--sampler", "speed", "--weighting", "speed", "--speed-k", "3",
            "--speed-lambda", "0.7", "--iters", "3", "--eval-every", "2", "--eval-samples", "6", "--eval-steps", "2",
            "--batch-size", "4", "--out", out])
    doc = load_json(out + ".json", T.RESULTS_FORMAT, 1)
    assert doc["history"]["eval_iter"] == [2, 3] and doc["history"]["fd"] == [123.0, 123.0]
    assert len(doc["history"]["loss"]) == 3 and os.path.getsize(out + ".png") > 0
    assert doc["loss_config"]["sampler"]["k"] == 3.0 and doc["loss_config"]["weighting"]["lam"] == 0.7
    assert len(seen) == 2 and seen[0].shape == (6, 1, 16, 16) and bool((seen[0].abs() <= 1).all())


def test_every_method_parameter_has_a_flag_with_its_default():
    import tdiff.training.train as T

    text = T.make_parser().format_help()
    for flag, default in [("--speed-k", "2.0"), ("--speed-tau", "None"), ("--speed-lambda", "0.6"),
                          ("--min-snr-gamma", "5.0"), ("--p2-k", "1.0"), ("--p2-gamma", "1.0"),
                          ("--lognormal-mean", "-1.2"), ("--lognormal-std", "1.2"), ("--fdm-multiplier", "2.0"),
                          ("--fdm-on", "input"), ("--fdm-beta-min", "0.1"), ("--fdm-beta-d", "19.9"),
                          ("--warmup-lambda-max", "5.0"), ("--warmup-lambda-end", "500.0"),
                          ("--logitnormal-std", "1.0"), ("--speed-reflect", "True")]:
        block = text.split("\n  " + flag + " ", 1)[1].split("\n  --", 1)[0]
        assert f"default {default}" in " ".join(block.split()), (flag, block)


@pytest.mark.parametrize("argv, match", [
    (["--min-snr-gamma", "3"], "weighting=min_snr"),
    (["--speed-k", "3", "--sampler", "uniform"], "sampler=speed"),
    (["--fdm-multiplier", "3"], "process=fdm"),
    (["--speed-k", "inf", "--sampler", "speed"], "finite"),
    (["--warmup-lambda-max", "3"], "warm-up"),
])
def test_cli_refuses_flags_it_would_ignore(argv, match, capsys, tmp_path):
    import tdiff.training.train as T

    with pytest.raises((SystemExit, ValueError, TypeError)) as info:
        T.main(argv + ["--iters", "1", "--eval-every", "0", "--model-config", TINY, "--batch-size", "2",
                       "--checkpoint-every", "0", "--out", str(tmp_path / "x")])
    text = capsys.readouterr().err + (str(info.value) if not isinstance(info.value, SystemExit) else "")
    assert match in text
