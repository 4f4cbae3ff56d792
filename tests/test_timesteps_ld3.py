"""LD3 on the analytic Gaussian mixture (exact denoiser): the reference's loop, the x'_T scale, nfe counting, the
losses, and the LearnedSchedule the run returns."""
import json
import math

import pytest
import torch

import tdiff
from tdiff.data import default_mixture_2d
from tdiff.schedules import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear
from tdiff.solvers import build_program, sample
from tdiff.timesteps import HEURISTICS, LD3DivergedError, LearnedSchedule, ld3_learn, steps_for_nfe
from tdiff.timesteps.ld3 import fixed_call_options

DDPM = DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
TINY = dict(solver="unipc", order=2, nfe=3, teacher_nfe=10, shape=(2,), n_train=6, n_val=4, epochs=2,
            phase1_epochs=1, dtype=torch.float64, progress=False)


@pytest.fixture(scope="module")
def learned():
    torch.set_num_threads(1)
    den = default_mixture_2d().denoiser(DDPM)
    return den, ld3_learn(den, **TINY)


def _hard_val_loss(den, ts, settings, seed=0):
    """The validation loss of `ts` at x'_T = x_T, recomputed from outside ld3_learn (same noise, same teacher)."""
    n_train, n_val, nfe = settings["n_train"], settings["n_val"], settings["teacher_nfe"]
    eps = torch.randn((n_train + n_val, *settings["shape"]), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)[n_train:]
    x = eps * DDPM.sigma(DDPM.t_max)
    teacher = sample(den, x, HEURISTICS["logsnr_uniform"](DDPM, nfe), solver="unipc", order=3)
    out = sample(den, x, ts, solver=settings["solver"], order=settings["order"])
    return float((out - teacher).pow(2).mean())


def test_ld3_returns_a_usable_schedule_no_worse_than_its_start(learned):
    den, ls = learned
    meta = ls.metadata
    assert ls.timesteps.shape == (4,) and bool((ls.timesteps[1:] < ls.timesteps[:-1]).all())
    assert float(ls.timesteps[0]) == DDPM.t_max and float(ls.timesteps[-1]) == DDPM.t_min
    assert ls.timesteps_cond.shape == (4,)
    assert meta["best_val_loss"] == min(meta["val_history"]) <= meta["val_history"][0]
    assert len(meta["val_history"]) == 1 + meta["iterations"] + (TINY["epochs"] - 1)  # every iteration + epoch starts
    assert meta["init"] in meta["init_val_losses"] and meta["val_history"][0] == meta["init_val_losses"][meta["init"]]
    assert meta["solver"] == "unipc" and meta["order"] == 2 and meta["nfe"] == 3 and meta["steps"] == 3
    assert meta["teacher"] == {"solver": "unipc", "order": 3, "nfe": 10, "timesteps": "logsnr_uniform"}
    assert meta["loss"] == "l2" and "LPIPS" in meta["loss_note"]
    assert any("LPIPS" in d for d in meta["deviations_from_paper"])
    # never worse than the start on validation at x'_T = x_T, checked from outside
    start = HEURISTICS[meta["init"]](DDPM, 3)
    assert _hard_val_loss(den, ls, TINY) <= _hard_val_loss(den, start, TINY) + 1e-15
    x = torch.randn(5, 2, dtype=torch.float64)
    out = tdiff.sample(den, x, ls, solver="unipc", order=2)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_learned_schedule_round_trips_and_refuses_mismatches(learned, tmp_path):
    _, ls = learned
    path = tmp_path / "ld3.json"
    ls.save(path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "tdiff-learned-schedule" and doc["format_version"] == 2
    back = LearnedSchedule.load(path, solver="unipc", schedule=DDPM)
    torch.testing.assert_close(back.timesteps, ls.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(back.timesteps_cond, ls.timesteps_cond, rtol=0, atol=0)
    assert back.metadata == json.loads(json.dumps(ls.metadata))
    with pytest.raises(ValueError, match="solver"):
        LearnedSchedule.load(path, solver="dpmpp")
    with pytest.raises(ValueError, match="order"):
        LearnedSchedule.load(path, order=3)
    with pytest.raises(ValueError, match="schedule"):
        LearnedSchedule.load(path, schedule=VPLinear())
    net_a, net_b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    stamped = LearnedSchedule(ls.timesteps, None, dict(ls.metadata, model_fingerprint=tdiff.artefacts.
                                                       fingerprint_module(net_a)), DDPM)
    stamped.save(path)
    LearnedSchedule.load(path, model=net_a)
    with pytest.raises(ValueError, match="another model"):
        LearnedSchedule.load(path, model=net_b)
    # a schedule learned on an analytic denoiser (no fingerprint) is refused for a network
    ls.save(path)
    with pytest.raises(ValueError, match="another model"):
        LearnedSchedule.load(path, model=net_a)


def test_sample_refuses_a_schedule_learned_for_another_solver_unless_overridden(learned):
    den, ls = learned
    x = torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="learned for solver 'unipc' order 2"):
        tdiff.sample(den, x, ls, solver="dpmpp", order=2)
    with pytest.raises(ValueError, match="for_any_solver"):
        tdiff.sample(den, x, ls, solver="unipc", order=3)
    with pytest.raises(ValueError, match="learned for solver"):
        tdiff.solvers.Sampler(den, ls, solver="euler")
    out = tdiff.sample(den, x, ls.for_any_solver(), solver="dpmpp", order=2)
    ref = tdiff.sample(den, x, ls.timesteps, solver="dpmpp", order=2, timesteps_cond=ls.timesteps_cond)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_ld3_rejects_bad_arguments():
    den = default_mixture_2d().denoiser(DDPM)
    kw = dict(TINY)
    cases = [(dict(nfe=1), "nfe"), (dict(teacher_nfe=3), "teacher_nfe"), (dict(r_gamma=-1.0), "radius"),
             (dict(r=float("nan")), "radius"), (dict(loss="lpipz"), "loss"), (dict(shape=None), "shape"),
             (dict(val_every=0), "val_every"), (dict(patience=0), "patience"), (dict(lr_decay=1.5), "lr_decay"),
             (dict(x_grad="mean"), "x_grad"), (dict(teacher_solver="rk4"), "teacher_solver"),
             (dict(solver="heun", order=2, nfe=5), "cannot make exactly 5 model calls"),
             (dict(init=torch.linspace(1, 0.01, 3)), "init must hold 4 times"),
             (dict(teacher_timesteps=torch.linspace(1, 0.01, 5)), "teacher_timesteps must hold 11 times")]
    for bad, match in cases:
        with pytest.raises(ValueError, match=match):
            ld3_learn(den, **dict(kw, **bad))


def test_lpips_loss_explains_what_it_needs(tmp_path):
    """`lpips` imports torchvision; where that cannot be imported the error says so, and without local VGG weights
    it says where to put them. Nothing is downloaded either way."""
    den = default_mixture_2d().denoiser(DDPM)
    try:
        import lpips  # noqa: F401
    except Exception:
        with pytest.raises(ImportError, match="torchvision"):
            ld3_learn(den, **dict(TINY, loss="lpips"))
    else:
        with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
            ld3_learn(den, **dict(TINY, loss="lpips", lpips_weights=str(tmp_path)))


def test_digits_perceptual_loss_is_a_distance_in_classifier_features():
    from tdiff.timesteps.ld3_losses import resolve_loss

    fn, name = resolve_loss("digits_perceptual")
    assert name == "digits_perceptual"
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    b = a + 0.3 * torch.randn(a.shape, generator=g)
    d_same, d_diff = fn(a, a), fn(a, b)
    assert d_same.shape == (4,) and float(d_same.abs().max()) < 1e-10 and bool((d_diff > 0).all())
    d_more = fn(a, a + 0.6 * (b - a) / 0.3)
    assert bool((d_more > d_diff).all())  # further away in pixels here is further away in features
    a.requires_grad_(True)
    (g_a,) = torch.autograd.grad(fn(a, b).sum(), a)
    assert bool(torch.isfinite(g_a).all()) and float(g_a.abs().sum()) > 0
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fn(torch.zeros(2, 3), torch.zeros(2, 3))


def test_ld3_stops_on_nan_and_keeps_the_best_schedule():
    mixture = default_mixture_2d()
    exact = mixture.denoiser(DDPM)

    def flaky(x, t):  # fine for the teacher and validation (no grad), NaN inside a training step
        out = exact(x, t)
        return out * float("nan") if torch.is_grad_enabled() else out

    flaky.schedule = DDPM
    with pytest.raises(LD3DivergedError, match="not finite") as info:
        ld3_learn(flaky, **dict(TINY, remat=False, r=0.0))
    best = info.value.best
    assert isinstance(best, LearnedSchedule) and best.timesteps.shape == (4,)
    assert bool(torch.isfinite(best.timesteps).all())


def test_patience_reloads_the_best_state_and_the_result_is_the_best_seen():
    """A training loss that pushes the wrong way (the negated error) makes validation worse: after `patience`
    validations the best state (the start) is reloaded and the rates decay; the result is the best state seen."""
    den = default_mixture_2d().denoiser(DDPM)

    def backwards(pred, target):  # ascends the error while training, measures it honestly otherwise
        err = (pred - target).pow(2).flatten(1).mean(1)
        return -err if torch.is_grad_enabled() else err

    kw = dict(TINY, n_train=12, epochs=3, loss=backwards, init="uniform_t", r=0.0, lr_xi=0.05, lr_xi_c=0.05,
              keep_init_if_better=False)
    ls = ld3_learn(den, **kw)
    meta = ls.metadata
    hist = meta["val_history"]
    assert max(hist) > hist[0] and meta["best_val_loss"] == hist[0]  # it got worse, and the start stayed best
    torch.testing.assert_close(ls.timesteps, HEURISTICS["uniform_t"](DDPM, 3), rtol=1e-12, atol=0)
    assert hist.count(hist[0]) == kw["epochs"]  # every epoch starts from the reloaded best state, exactly
    assert meta["lr_final"]["xi"] < 0.05 and meta["lr_final"]["xi_c"] < 0.05  # patience decayed the rates


def test_decay_to_the_floor_stops_training_after_five_hits():
    """With frozen rates validation never improves: a decay (and reload) every `patience` validations, each at the
    floor, and the run stops at the 5th. Epochs start with a validation and a fresh patience count."""
    den = default_mixture_2d().denoiser(DDPM)
    kw = dict(TINY, n_train=12, epochs=20, init="uniform_t", r=0.0, decoupled=False, lr_xi=0.0, min_lr_xi=0.0)
    meta = ld3_learn(den, **kw).metadata
    # 6 iterations per epoch; epoch 0 decays once (5 bad); each later epoch: 1 epoch-start check + 4 iterations
    assert meta["stopped_early"] and meta["epochs_run"] == 4 and meta["iterations"] == 4 * 6 + 4
    assert len(set(meta["val_history"])) == 1


@pytest.mark.parametrize("solver,order", [("unipc", 3), ("dpmpp", 2), ("ipndm", 4), ("euler", 1), ("heun", 2)])
def test_nfe_counts_model_calls_for_every_solver(solver, order):
    """steps_for_nfe reads the step count off the built Program, so nfe stays the number of model calls, on any
    grid (Heun runs with its fixed-call options: its default rule drops corrections on long steps)."""
    for nfe in (4, 6):
        steps = steps_for_nfe(DDPM, solver, order, nfe)
        for grid in ("uniform_t", "logsnr_uniform"):
            prog = build_program(DDPM, HEURISTICS[grid](DDPM, steps), solver, order, **fixed_call_options(solver))
            assert prog.nfe == nfe
    assert steps_for_nfe(DDPM, solver, order, 6) == (3 if solver == "heun" else 6)


def test_heun_schedule_is_learned_for_model_calls_not_steps():
    den = default_mixture_2d().denoiser(DDPM)
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return den(x, t)

    counted.schedule = DDPM
    ls = ld3_learn(den, **dict(TINY, solver="heun", order=2, nfe=6, teacher_nfe=12, n_train=4, epochs=1))
    meta = ls.metadata
    assert meta["nfe"] == 6 and meta["steps"] == 3 and ls.timesteps.numel() == 4 and ls.nfe == 6
    assert meta["r"] == pytest.approx(0.001 * 2 / 6**2, rel=1e-12)  # the radius uses model calls
    tdiff.sample(counted, torch.randn(2, 2, dtype=torch.float64), ls, solver="heun")
    assert calls[0] == 6


# the same noise-level range for every family: in (x/alpha, sigma/alpha) the whole LD3 problem is then identical
SIGMA_RANGE = (80.0, 0.02)
FAMILIES = {"VPLinear": VPLinear(), "VPCosine": VPCosine(), "DiscreteVP": DDPM, "VE": VE(0.002, 100.0),
            "EDM": EDM(), "RectifiedFlow": RectifiedFlow()}


def test_x_prime_step_is_taken_in_unit_noise_space_for_every_schedule():
    """x'_T moves in eps = x_T / sigma_T space with the paper's radius, so the step-to-radius ratio is a property of
    the problem, not of the schedule's parametrisation: equal across VP, VE, EDM and flow schedules (an x-space
    step would differ by sigma_T^2, 6400x between VP and EDM here). The one schedule-dependent factor left is the
    loss's own scale: the student lands on x = alpha(t_min) (x/alpha), so the L2 gradient carries alpha(t_min)^2."""
    ratios, radii = {}, {}
    for name, sch in FAMILIES.items():
        t_max, t_min = (sch.t_from_edm_sigma(torch.tensor(s, dtype=torch.float64)) for s in SIGMA_RANGE)
        den = default_mixture_2d().denoiser(sch)
        meta = ld3_learn(den, sch, **dict(TINY, space="lambda", decoupled=False, init="logsnr_uniform",
                                          t_max=float(t_max), t_min=float(t_min), epochs=1, n_train=4)).metadata
        ratios[name] = meta["x_step_over_radius_median"] / float(sch.alpha(t_min)) ** 2
        radii[name] = meta["r_x_space"]
    ref = ratios["VPLinear"]
    assert 1e-3 < ref < 1e6 and all(math.isclose(v, ref, rel_tol=1e-6) for v in ratios.values()), ratios
    assert radii["EDM"] / radii["VPLinear"] > 50  # while the x-space ball follows sigma_T


@pytest.mark.parametrize("space", ["time", "lambda"])
def test_parameterisation_starts_uniform_and_inverts_heuristics(space):
    from tdiff.timesteps import edm_rho, logsnr_uniform, uniform_t
    from tdiff.timesteps.parameterisation import StepParameterisation

    hi, lo = torch.tensor(DDPM.t_max, dtype=torch.float64), torch.tensor(DDPM.t_min, dtype=torch.float64)
    p = StepParameterisation(DDPM, 5, hi, lo, space)
    start = p.timesteps(torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(start, (uniform_t if space == "time" else logsnr_uniform)(DDPM, 5))
    target = edm_rho(DDPM, 5)
    torch.testing.assert_close(p.timesteps(p.xi_from_timesteps(target)), target)
    # decoupled times move at most half the smallest gap and never at the ends
    tc = StepParameterisation.condition_times(target, torch.full((6,), 10.0, dtype=torch.float64))
    half = 0.5 * (target[:-1] - target[1:]).min()
    assert float(tc[0]) == float(target[0]) and float(tc[-1]) == float(target[-1])
    torch.testing.assert_close(tc[1:-1] - target[1:-1], half.expand(4))
