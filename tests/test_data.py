
import pytest
import torch

from tdiff.data import GaussianMixture, default_mixture_2d, digits_loader, load_digits_tensor, reference_ode_solution
from tdiff.metrics import sliced_wasserstein
from tdiff.schedules import EDM, DiscreteVP, RectifiedFlow, VPLinear


pytestmark = pytest.mark.usefixtures("one_thread")


SCHEDULES = [VPLinear(), DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000)), EDM(), RectifiedFlow()]


@pytest.mark.parametrize("size", [16, 32])
def test_digits_tensor(size):
    x, y = load_digits_tensor(size)
    assert x.shape == (1797, 1, size, size) and x.dtype == torch.float32 and y.shape == (1797,)
    assert x.min() >= -1 and x.max() <= 1 and set(y.tolist()) == set(range(10))
    tr, te = load_digits_tensor(size, "train")[0], load_digits_tensor(size, "test")[0]
    assert len(tr) + len(te) == 1797 and len(te) > 300


def test_digits_bad_args_and_loader():
    with pytest.raises(ValueError, match="size"):
        load_digits_tensor(20)
    with pytest.raises(ValueError, match="split"):
        load_digits_tensor(16, "val")
    xb, yb = next(iter(digits_loader(batch_size=7)))
    assert xb.shape == (7, 1, 16, 16) and yb.shape == (7,)
    a, b = next(iter(digits_loader(batch_size=7, seed=3))), next(iter(digits_loader(batch_size=7, seed=3)))
    assert torch.equal(a[0], b[0])


def test_mixture_validates_inputs():
    with pytest.raises(ValueError, match="means"):
        GaussianMixture(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.zeros(3, 2), torch.ones(2))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture(torch.zeros(3, 2), torch.ones(3), torch.tensor([1.0, -1.0, 1.0]))
    gm = default_mixture_2d()
    with pytest.raises(ValueError, match="2 values"):
        gm.posterior_mean(torch.zeros(4, 3, dtype=torch.float64), 0.5, VPLinear())


@pytest.mark.parametrize("schedule", [VPLinear(), EDM()], ids=["vp", "edm"])
def test_exact_denoiser_matches_monte_carlo(schedule):
    gm = default_mixture_2d()
    g = torch.Generator().manual_seed(0)
    x0 = gm.sample(400_000, generator=g)
    t = torch.tensor(0.4 if isinstance(schedule, VPLinear) else 0.8, dtype=torch.float64)
    a, s = schedule.alpha(t), schedule.sigma(t)
    xt = a * gm.sample(5, generator=g) + s * torch.randn(5, 2, generator=g, dtype=torch.float64)
    exact = gm.denoiser(schedule)(xt, t)
    # importance weights p(x_t | x0) over prior samples give E[x0 | x_t]
    logw = -((xt[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s * s)
    w = torch.softmax(logw, dim=1)
    mc = w @ x0
    torch.testing.assert_close(exact, mc, atol=0.03, rtol=0)


def test_score_matches_autograd_and_denoiser():
    gm = GaussianMixture(torch.randn(4, 5, dtype=torch.float64), torch.rand(4, 5, dtype=torch.float64) + 0.1,
                         torch.tensor([1.0, 2.0, 3.0, 4.0]))  # diagonal variances, 5 dimensions
    for sch in SCHEDULES:
        t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64) * (10 if isinstance(sch, EDM) else 1)
        x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(gm.log_prob(x, t, sch).sum(), x)
        score = gm.score(x, t, sch)
        torch.testing.assert_close(score, grad)
        a, s = sch.alpha(t).view(-1, 1), sch.sigma(t).view(-1, 1)
        torch.testing.assert_close(score, (a * gm.posterior_mean(x, t, sch) - x) / s**2)


def test_denoiser_is_differentiable_in_x_and_t():
    gm = default_mixture_2d()
    sch = VPLinear()
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: gm.posterior_mean(x, t, sch), (x, t))


def test_mixture_sampling_statistics():
    gm = GaussianMixture(torch.tensor([[0.0, 0.0], [4.0, 0.0]]), torch.tensor([0.25, 1.0]), torch.tensor([1.0, 3.0]))
    x = gm.sample(200_000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x.mean(0), torch.tensor([3.0, 0.0], dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=["vplinear", "discrete", "edm", "flow"])
def test_reference_ode_matches_single_gaussian_closed_form(schedule):
    # for x0 ~ N(m, v I) the flow keeps (x_t - alpha m) / sqrt(alpha^2 v + sigma^2) fixed
    m, v = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64), 0.3
    gm = GaussianMixture(m, torch.tensor([v]))
    t0, t1 = torch.tensor(schedule.t_max, dtype=torch.float64), torch.tensor(schedule.t_min, dtype=torch.float64)
    x_T = torch.randn(4, 3, dtype=torch.float64) * schedule.sigma(t0)
    x = reference_ode_solution(gm.denoiser(schedule), schedule, x_T, t0, t1)

    def scale(t):
        return (schedule.alpha(t) ** 2 * v + schedule.sigma(t) ** 2).sqrt()

    expected = schedule.alpha(t1) * m + (x_T - schedule.alpha(t0) * m) * scale(t1) / scale(t0)
    torch.testing.assert_close(x, expected, atol=1e-7, rtol=1e-7)
    back = reference_ode_solution(gm.denoiser(schedule), schedule, x, t1, t0)  # and in reverse
    torch.testing.assert_close(back, x_T, atol=1e-6, rtol=1e-6)


def test_reference_ode_reaches_mixture_samples():
    gm = default_mixture_2d()
    sch = VPLinear()
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1000, 2, generator=g, dtype=torch.float64)
    x = reference_ode_solution(gm.denoiser(sch), sch, x_T, 1.0, 1e-3, rtol=1e-6, atol=1e-6)
    truth, truth2 = gm.sample(1000, generator=g), gm.sample(1000, generator=g)
    baseline = sliced_wasserstein(truth2, truth)  # what sampling noise alone gives
    assert sliced_wasserstein(x, truth) < 2 * baseline
    assert sliced_wasserstein(x_T, truth) > 5 * baseline


def test_reference_ode_rejects_bad_times():
    gm = default_mixture_2d()
    with pytest.raises(ValueError, match="t_start"):
        reference_ode_solution(gm.denoiser(VPLinear()), VPLinear(), torch.zeros(1, 2), 2.0, 0.1)
    with pytest.raises(ValueError, match="lambda"):
        reference_ode_solution(gm.denoiser(RectifiedFlow()), RectifiedFlow(), torch.zeros(1, 2), 1.0, 0.1)
