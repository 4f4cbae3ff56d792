
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


def test_digits_read_from_the_bundled_csv_equal_sklearns_loader():
    from sklearn.datasets import load_digits

    from tdiff.data import digits

    assert digits._bundled_csv() is not None  # read directly, without importing scikit-learn
    images, labels = digits._raw()
    d = load_digits()
    assert torch.equal(images, torch.as_tensor(d.images, dtype=torch.float32)[:, None] / 8.0 - 1.0)
    assert torch.equal(labels, torch.as_tensor(d.target))


def _full_cov_mixture():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    cov = a @ a.transpose(1, 2) * 0.2 + 0.01 * torch.eye(4, dtype=torch.float64)
    return GaussianMixture(torch.randn(3, 4, generator=g, dtype=torch.float64), covariances=cov,
                           weights=torch.tensor([1.0, 2.0, 3.0])), cov


def test_full_covariance_mixture_samples_scores_and_denoises_exactly():
    gm, cov = _full_cov_mixture()
    x = gm.sample(200_000, generator=torch.Generator().manual_seed(1), return_labels=True)
    sel = x[0][x[1] == 2]
    torch.testing.assert_close(torch.cov(sel.T), cov[2], atol=0.03, rtol=0.03)
    for sch in SCHEDULES:
        t = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64) * (10 if isinstance(sch, EDM) else 1)
        xt = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(gm.log_prob(xt, t, sch).sum(), xt)
        torch.testing.assert_close(gm.score(xt, t, sch), grad)
        a, s = sch.alpha(t).view(-1, 1), sch.sigma(t).view(-1, 1)
        torch.testing.assert_close(gm.score(xt, t, sch), (a * gm.posterior_mean(xt, t, sch) - xt) / s**2)
    # a diagonal covariance given in full form is the diagonal mixture
    v = torch.rand(3, 4, dtype=torch.float64) + 0.1
    diag = GaussianMixture(gm.means, v, gm.weights)
    full = GaussianMixture(gm.means, covariances=torch.diag_embed(v), weights=gm.weights)
    xt = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(full.posterior_mean(xt, 0.4, VPLinear()), diag.posterior_mean(xt, 0.4, VPLinear()))


def test_full_covariance_denoiser_matches_monte_carlo():
    gm, _ = _full_cov_mixture()
    sch = VPLinear()
    g = torch.Generator().manual_seed(2)
    x0 = gm.sample(400_000, generator=g)
    t = torch.tensor(0.5, dtype=torch.float64)
    a, s = sch.alpha(t), sch.sigma(t)
    xt = a * gm.sample(4, generator=g) + s * torch.randn(4, 4, generator=g, dtype=torch.float64)
    w = torch.softmax(-((xt[:, None, :] - a * x0[None]) ** 2).sum(-1) / (2 * s * s), dim=1)
    torch.testing.assert_close(gm.posterior_mean(xt, t, sch), w @ x0, atol=0.03, rtol=0)


def test_image_mixture_is_structured_and_reproducible():
    from tdiff.data import image_mixture

    gm = image_mixture()
    assert (gm.k, gm.dim) == (10, 64) and gm.basis.shape == (10, 64, 64)
    x = gm.sample(20_000, generator=torch.Generator().manual_seed(0))
    assert abs(x.std().item() - 0.5) < 0.05
    # each class is a rank-6 subspace over an isotropic floor of 0.02^2
    top = gm.variances.sort(dim=1, descending=True).values
    torch.testing.assert_close(top[:, 6:], torch.full_like(top[:, 6:], 0.02**2))
    stds = 0.25 / (1.0 + 0.5 * torch.arange(6, dtype=torch.float64))
    torch.testing.assert_close(top[:, :6], (stds**2 + 0.02**2).expand(10, 6))
    assert torch.equal(image_mixture().means, gm.means) and not torch.equal(image_mixture(seed=1).means, gm.means)
    with pytest.raises(ValueError, match="rank"):
        image_mixture(side=2, rank=5)
    with pytest.raises(ValueError, match="floor"):
        image_mixture(floor=float("nan"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(means=torch.zeros(2, 3)), "exactly one"),
    (dict(means=torch.zeros(2, 3), variances=torch.ones(2), covariances=torch.eye(3).expand(2, 3, 3)), "exactly one"),
    (dict(means=torch.zeros(2, 3), covariances=torch.ones(2, 3, 3) + torch.arange(3.0)), "symmetric"),
    (dict(means=torch.zeros(2, 3), covariances=-torch.eye(3).expand(2, 3, 3)), "positive semi-definite"),
    (dict(means=torch.zeros(2, 3), covariances=torch.eye(3)), "covariances must have shape"),
    (dict(means=torch.full((2, 3), float("nan")), variances=torch.ones(2)), "finite"),
    (dict(means=torch.zeros(2, 3), variances=torch.tensor([1.0, float("inf")])), "finite"),
    (dict(means=torch.zeros(2, 3), variances=torch.ones(2), weights=torch.tensor([1.0, float("nan")])), "weights"),
    (dict(means=torch.zeros(0, 3), variances=torch.ones(0)), "means"),
])
def test_mixture_refuses_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)
