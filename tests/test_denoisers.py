import pytest
import torch

import tdiff
from tdiff.denoisers import denoiser, from_diffusers
from tdiff.schedules import EDM, VE, DiscreteVP, RectifiedFlow, VPCosine, VPLinear


pytestmark = pytest.mark.usefixtures("one_thread")


SCHEDULES = {
    "vplinear": VPLinear(),
    "vpcosine": VPCosine(),
    "discrete": DiscreteVP(betas=torch.linspace(1e-4, 0.02, 1000)),
    "ve": VE(),
    "edm": EDM(),
    "flow": RectifiedFlow(),
}
TIMES = {"vplinear": [0.1, 0.5, 0.9], "vpcosine": [0.1, 0.5, 0.9], "discrete": [0.1, 0.5, 0.9],
         "ve": [0.1, 0.5, 0.9], "edm": [0.05, 1.0, 20.0], "flow": [0.1, 0.5, 0.9]}


class Oracle(torch.nn.Module):
    """Returns, for the stored (x0, eps) pair, exactly what a perfect network of each kind would output."""

    def __init__(self, x0, eps, schedule, t, prediction):
        super().__init__()
        a, s = schedule.alpha(t).view(-1, 1), schedule.sigma(t).view(-1, 1)
        da, ds = schedule.d_alpha(t).view(-1, 1), schedule.d_sigma(t).view(-1, 1)
        self.out = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "flow": da * x0 + ds * eps}[prediction]
        self.seen_t = None

    def forward(self, x, t_net, y=None):
        self.seen_t = t_net
        return self.out


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "flow"])
def test_every_prediction_converts_to_x0(name, prediction):
    sch = SCHEDULES[name]
    t = torch.tensor(TIMES[name], dtype=torch.float64)  # per-sample times
    x0, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    x = sch.alpha(t).view(-1, 1) * x0 + sch.sigma(t).view(-1, 1) * eps
    D = tdiff.denoiser(Oracle(x0, eps, sch, t, prediction), sch, prediction=prediction)
    torch.testing.assert_close(D(x, t), x0)
    torch.testing.assert_close(D.eps(x, t), eps)


def test_default_model_times():
    t = torch.tensor([0.25, 0.5], dtype=torch.float64)
    x = torch.zeros(2, 3, dtype=torch.float64)
    cases = [(SCHEDULES["discrete"], 1000 * t - 1), (SCHEDULES["vplinear"], 999 * t), (SCHEDULES["flow"], 1000 * t)]
    for sch, expected in cases:
        m = Oracle(x, x, sch, t, "eps")
        denoiser(m, sch)(x, t)
        torch.testing.assert_close(m.seen_t, expected)
    m = Oracle(x, x, EDM(), t, "x0")
    denoiser(m, EDM(), precond="edm")(x, t)
    torch.testing.assert_close(m.seen_t, 250 * t.log())  # 1000 x EDM c_noise
    m = Oracle(x, x, VPLinear(), t, "eps")
    denoiser(m, VPLinear(), model_time=lambda tt: tt * 7)(x, t)
    torch.testing.assert_close(m.seen_t, 7 * t)


def test_prepared_calls_feed_the_model_times_exactly():
    """network_calls' times (computed on the host for the arithmetic default model times, in torch otherwise) are
    model_time(t) bit for bit, per evaluation and sample, with and without grad mode, and after a refill."""
    t = torch.linspace(0.9, 0.05, 7, dtype=torch.float64)
    x = torch.zeros(2, 3)
    for sch, kw in [(SCHEDULES["discrete"], {}), (SCHEDULES["vplinear"], {}), (SCHEDULES["flow"], {}),
                    (EDM(), {"precond": "edm"}), (VPLinear(), {"model_time": lambda tt: tt * 7})]:
        seen = []
        den = denoiser(lambda xx, tt, y=None: seen.append(tt.clone()) or xx, sch, **kw)
        expected = den.model_time(t)
        for grad in (False, True, False):
            with torch.set_grad_enabled(grad):
                seen.clear()
                for call in den.network_calls(t, x):
                    call(x)
                assert all(torch.equal(s, e.expand(2)) for s, e in zip(seen, expected)) and len(seen) == 7


def test_edm_preconditioning_by_hand():
    net = torch.nn.Linear(3, 3, dtype=torch.float64)
    seen = {}

    def model(x, t_net, y=None):
        seen["x"], seen["t"] = x, t_net
        return net(x)

    sch = EDM(sigma_data=0.5)
    D = denoiser(model, sch, precond="edm")
    x, sigma = torch.randn(2, 3, dtype=torch.float64), torch.tensor([0.3, 5.0], dtype=torch.float64)
    out = D(x, sigma)
    s, sd = sigma.view(-1, 1), 0.5
    c_skip, c_out, c_in = sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (s**2 + sd**2).sqrt()
    torch.testing.assert_close(seen["x"], c_in * x)
    torch.testing.assert_close(out, c_skip * x + c_out * net(c_in * x))


def test_classifier_free_guidance_batches_once():
    calls = []

    def model(x, t_net, y=None):
        calls.append(x.shape[0])
        return x * (1 + y.view(-1, 1).double())  # label 0..9, null 10

    sch = SCHEDULES["discrete"]
    D = denoiser(model, sch, prediction="x0", guidance=2.5, null_label=10)
    x, y = torch.randn(3, 2, dtype=torch.float64), torch.tensor([1, 2, 3])
    out = D(x, 0.5, y=y)
    assert calls == [6]
    cond, uncond = x * (1 + y.view(-1, 1)), x * 11
    torch.testing.assert_close(out, uncond + 2.5 * (cond - uncond))
    # without labels: one plain call
    assert denoiser(lambda x, t, y=None: x, sch, prediction="x0", guidance=2.0, null_label=0)(x, 0.5).shape == x.shape


def test_edm_call_matches_schedule_call():
    from tdiff.data import default_mixture_2d

    for sch in (SCHEDULES["vplinear"], SCHEDULES["discrete"], SCHEDULES["flow"]):
        D = default_mixture_2d().denoiser(sch)
        t = torch.tensor([0.3, 0.7], dtype=torch.float64)
        x = torch.randn(2, 2, dtype=torch.float64)
        torch.testing.assert_close(D.edm_call(x / sch.alpha(t).view(-1, 1), sch.edm_sigma(t)), D(x, t))


def test_learned_sigma_channels_dropped_and_bad_inputs():
    D = denoiser(lambda x, t, y=None: torch.cat([x, x + 1], dim=1), SCHEDULES["discrete"], prediction="x0")
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(D(x, 0.5), x)
    with pytest.raises(ValueError, match="prediction"):
        denoiser(lambda x, t: x, VPLinear(), prediction="score")
    with pytest.raises(ValueError, match="precond"):
        denoiser(lambda x, t: x, VPLinear(), precond="vp")
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        D(x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="domain"):
        D(x, 1.5)
    with pytest.raises(ValueError, match="null_label"):
        denoiser(lambda x, t, y=None: x, VPLinear(), guidance=2.0)(x, 0.5, y=torch.tensor([0, 1]))


def test_wraps_tdiff_dit_with_guidance():
    from tdiff.models import DiT, DiTConfig

    m = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                      num_classes=3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sch = SCHEDULES["discrete"]
    D = denoiser(m, sch, guidance=2.0)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.8]), torch.tensor([0, 2])
    with torch.no_grad():
        eps = m.forward_with_cfg(x, 1000 * t - 1, y, 2.0)
        a, s = sch.alpha(t).float().view(-1, 1, 1, 1), sch.sigma(t).float().view(-1, 1, 1, 1)
        torch.testing.assert_close(D(x, t, y=y), (x - s * eps) / a, atol=1e-5, rtol=1e-4)


def _perturb(model):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_from_diffusers_dit_with_learned_sigma():
    from diffusers import DDPMScheduler, DiTTransformer2DModel

    model = _perturb(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                           out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                           num_embeds_ada_norm=10))
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type="epsilon", clip_sample=False)
    D = from_diffusers(model, sched)
    assert D.prediction == "eps" and D.null_label == 10 and isinstance(D.schedule, DiscreteVP)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.75]), torch.tensor([1, 7])
    with torch.no_grad():
        raw = model(x, timestep=1000 * t - 1, class_labels=y, return_dict=False)[0][:, :4]
        ac = sched.alphas_cumprod[(1000 * t - 1).long()].view(-1, 1, 1, 1)
        torch.testing.assert_close(D(x, t, y=y), (x - (1 - ac).sqrt() * raw) / ac.sqrt(), atol=1e-5, rtol=1e-4)
        assert D(x, t).shape == x.shape  # no label -> null class
        guided = from_diffusers(model, sched, guidance=3.0)(x, t, y=y)
        assert guided.shape == x.shape and not torch.allclose(guided, D(x, t, y=y))


def test_from_diffusers_unet_v_prediction():
    from diffusers import DDPMScheduler, UNet2DModel

    model = _perturb(UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                 norm_num_groups=4, attention_head_dim=8))
    config = dict(DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012, prediction_type="v_prediction", clip_sample=False).config)
    D = from_diffusers(model, config)
    assert D.prediction == "v" and D.clip_x0 is None
    assert from_diffusers(model, {**config, "clip_sample": True, "clip_sample_range": 2.0}).clip_x0 == 2.0
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.1, 0.6])
    with torch.no_grad():
        v = model(x, 1000 * t - 1, return_dict=False)[0]
        a, s = D.schedule.alpha(t).float().view(-1, 1, 1, 1), D.schedule.sigma(t).float().view(-1, 1, 1, 1)
        torch.testing.assert_close(D(x, t), a * x - s * v, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="prediction_type"):
        from_diffusers(model, {**config, "prediction_type": "score"})


def test_clip_x0_bounds_the_prediction():
    D = denoiser(lambda x, t, y=None: 5 * x, SCHEDULES["discrete"], prediction="x0", clip_x0=1.0)
    x = torch.randn(4, 3)
    torch.testing.assert_close(D(x, 0.5), (5 * x).clamp(-1, 1))
    with pytest.raises(ValueError, match="clip_x0"):
        denoiser(lambda x, t: x, VPLinear(), clip_x0=0.0)
