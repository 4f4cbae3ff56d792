import os
import warnings

import pytest
import torch

from tdiff.models import DiT, DiTConfig, UNet, UNetConfig
from tdiff.models.dit import modulate
from tdiff.models.unet import AttnBlock, ResBlock


# the CPU is shared; one intra-op thread avoids oversubscription stalls on these tiny models
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(**kw):
    cfg = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3)
    return DiT(DiTConfig(**{**cfg, **kw}))


def tiny_unet(**kw):
    cfg = dict(input_size=8, in_channels=2, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
               attn_resolutions=(4,), num_classes=3, num_groups=4)
    return UNet(UNetConfig(**{**cfg, **kw}))


def randomise(model):
    # zero-initialised layers hide bugs; give every parameter a nonzero value
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_shapes_and_zero_output_at_init(make):
    m = make()
    x = torch.randn(3, 2, 8, 8)
    out = m(x, torch.tensor([0.0, 500.0, 999.0]), torch.tensor([0, 2, 3]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero / zero-init output layers
    assert m(x, 10.0).shape == x.shape  # scalar t, y=None -> null class


def test_dit_learn_sigma_doubles_channels():
    m = tiny_dit(learn_sigma=True)
    assert m(torch.randn(2, 2, 8, 8), torch.zeros(2)).shape == (2, 4, 8, 8)


def test_dit_blocks_are_identity_at_init():
    m = tiny_dit()
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for blk in m.blocks:
        torch.testing.assert_close(blk(h, c), h)


def test_dit_block_interface_composes_to_forward():
    m = randomise(tiny_dit())
    blk = m.blocks[0]
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    sm, cm, gm, sp, cp, gp = blk.modulation(c)
    assert sm.shape == (2, 32)
    manual = h + gm.unsqueeze(1) * blk.attn_branch(h, sm, cm)
    manual = manual + gp.unsqueeze(1) * blk.mlp_branch(manual, sp, cp)
    torch.testing.assert_close(blk(h, c), manual)
    torch.testing.assert_close(blk.attn_branch(h, sm, cm), blk.attn(modulate(blk.norm1(h), sm, cm)))
    assert isinstance(m.blocks, torch.nn.ModuleList) and len(m.blocks) == 2


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_per_sample_time_and_labels(make):
    m = randomise(make())
    x, t, y = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 400.0, 900.0]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        batched = m(x, t, y)
        single = torch.cat([m(x[i: i + 1], t[i: i + 1], y[i: i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[0], m(x[:1], t[1:2], y[:1])[0])  # time matters


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_forward_with_cfg(make):
    m = randomise(make())
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([0, 2])
    with torch.no_grad():
        cond, uncond = m(x, t, y), m(x, t, None)
        torch.testing.assert_close(m.forward_with_cfg(x, t, y, 3.0), uncond + 3.0 * (cond - uncond),
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_bad_inputs_name_the_expected_value(make):
    m = make()
    with pytest.raises(ValueError, match="8x8"):
        m(torch.randn(1, 2, 16, 16), 0.0)
    with pytest.raises(ValueError, match="2 channels"):
        m(torch.randn(1, 3, 8, 8), 0.0)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        m(torch.randn(1, 2, 8, 8), 0.0, torch.tensor([4]))
    with pytest.raises(ValueError, match="shape"):
        m(torch.randn(2, 2, 8, 8), torch.zeros(3))


def test_presets():
    s = DiTConfig.preset("DiT-S/2")
    assert (s.hidden_size, s.depth, s.num_heads, s.patch_size) == (384, 12, 6, 2)
    xl = DiTConfig.preset("DiT-XL/2")
    assert (xl.hidden_size, xl.depth, xl.num_heads, xl.patch_size) == (1152, 28, 16, 2)
    d = DiTConfig.preset("digits")
    assert d.input_size == 16 and d.in_channels == 1 and d.num_classes == 10
    with pytest.raises(ValueError, match="DiT-XL/2"):
        DiTConfig.preset("DiT-B/3")
    with pytest.raises(ValueError, match="digits"):
        UNetConfig.preset("nope")
    with pytest.raises(ValueError, match="divisible"):
        DiTConfig(input_size=9, patch_size=2)


def test_unet_exposes_branches_and_block_lists():
    m = randomise(tiny_unet())
    res = [b for b in m.modules() if isinstance(b, ResBlock)]
    attn = [b for b in m.modules() if isinstance(b, AttnBlock)]
    assert res and attn
    for name in ("down_blocks", "mid_blocks", "up_blocks"):
        assert isinstance(getattr(m, name), torch.nn.ModuleList)
    x, emb = torch.randn(2, res[0].norm1.num_channels, 8, 8), torch.randn(2, 32)
    torch.testing.assert_close(res[0](x, emb), res[0].skip(x) + res[0].branch(x, emb))
    a = attn[0]
    xa = torch.randn(2, a.norm.num_channels, 4, 4)
    torch.testing.assert_close(a(xa), xa + a.branch(xa))


def test_unconditional_unet_rejects_labels():
    m = tiny_unet(num_classes=0)
    assert m(torch.randn(1, 2, 8, 8), 1.0).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        m(torch.randn(1, 2, 8, 8), 1.0, torch.tensor([0]))


@pytest.mark.parametrize("which", ["dit", "unet"])
def test_training_step_gives_finite_decreasing_loss(which):
    from tdiff.models.defaults import default_schedule
    from tdiff.models.trainer import train_diffusion

    model = tiny_dit(in_channels=1) if which == "dit" else tiny_unet(in_channels=1)
    images = torch.randn(32, 1, 8, 8).clamp(-1, 1)
    labels = torch.randint(0, 3, (32,))
    ema, info = train_diffusion(model, default_schedule(), images, labels, iters=20, batch_size=8, lr=2e-3,
                                warmup=5, progress=False)
    losses = torch.tensor(info["losses"])
    assert torch.isfinite(losses).all() and info["iters"] == 20
    assert losses[-5:].mean() < losses[:5].mean()
    assert not any(p.requires_grad for p in ema.parameters())


TINY_DIGITS_DIT = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                       num_classes=10)


def _no_training(*a, **k):
    raise AssertionError("load_default trained a model it should have loaded")


def test_default_checkpoint_roundtrip_corrupt_and_mismatch(tmp_path, monkeypatch):
    from tdiff.models import defaults

    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    kw = dict(config=TINY_DIGITS_DIT, iters=2, progress=False, evaluate=False)
    with pytest.raises(FileNotFoundError, match="train_if_missing=True"):
        defaults.load_default("dit", **kw)  # never trains unless asked
    model, schedule, den = defaults.load_default("dit", train_if_missing=True, **kw)
    path = defaults.checkpoint_path("dit", TINY_DIGITS_DIT, iters=2)
    assert path.startswith(str(tmp_path)) and os.path.exists(path)
    x = torch.randn(2, 1, 8, 8)
    with warnings.catch_warnings(), monkeypatch.context() as mp:
        warnings.simplefilter("error")  # a good checkpoint loads silently, without training
        mp.setattr(defaults, "train_default", _no_training)
        model2, _, den2 = defaults.load_default("dit", **kw)
    torch.testing.assert_close(den(x, 0.5), den2(x, 0.5))
    assert den.schedule.n == 1000

    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        defaults.load_default("dit", **kw)
    with pytest.warns(RuntimeWarning, match="unusable"):
        defaults.load_default("dit", train_if_missing=True, **kw)
    defaults.load_default("dit", **kw)  # the retrained file is good again
    with pytest.raises(ValueError, match="which"):
        defaults.load_default("vae")


def test_other_configs_get_their_own_files_and_never_touch_the_shipped_ones(tmp_path, monkeypatch):
    from tdiff.models import defaults

    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    shipped = defaults.shipped_default_path("dit")
    with open(shipped, "rb") as f:
        shipped_bytes = f.read()
    kw = dict(progress=False, evaluate=False, train_if_missing=True)
    wide = {**TINY_DIGITS_DIT, "hidden_size": 32}
    runs = [(TINY_DIGITS_DIT, 2), (wide, 2), (TINY_DIGITS_DIT, 3)]
    dens = [defaults.load_default("dit", config=c, iters=i, **kw)[2] for c, i in runs]
    assert len({defaults.checkpoint_path("dit", c, iters=i) for c, i in runs}) == 3
    assert len(os.listdir(tmp_path)) == 3
    monkeypatch.setattr(defaults, "train_default", _no_training)
    x = torch.randn(2, 1, 8, 8)
    for (c, i), den in zip(runs, dens):  # each file still holds its own model
        torch.testing.assert_close(defaults.load_default("dit", config=c, iters=i)[2](x, 0.5), den(x, 0.5))
    with open(shipped, "rb") as f:
        assert f.read() == shipped_bytes


def test_damaged_default_checkpoints_are_refused_with_clear_errors(tmp_path, monkeypatch):
    from tdiff.artefacts import load_safetensors, save_safetensors
    from tdiff.models import defaults

    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    kw = dict(config=TINY_DIGITS_DIT, iters=2, progress=False, evaluate=False)
    defaults.load_default("dit", train_if_missing=True, **kw)
    path = defaults.checkpoint_path("dit", TINY_DIGITS_DIT, iters=2)
    doc, tensors = load_safetensors(path, defaults.FORMAT, defaults.VERSION)
    payload = {k: v for k, v in doc.items() if k not in ("format", "format_version", "tdiff_version")}
    first = sorted(tensors)[0]

    def write(new_tensors, new_payload=payload):
        save_safetensors(path, defaults.FORMAT, defaults.VERSION, new_tensors, new_payload)

    write({**tensors, first: torch.full_like(tensors[first], float("nan"))})
    with pytest.raises(ValueError, match=f"{first}.*NaN"):
        defaults.load_default("dit", **kw)
    write({})  # no weights at all
    with pytest.raises(ValueError, match="missing tensors"):
        defaults.load_default("dit", **kw)
    write({**tensors, first: tensors[first][:1]})
    with pytest.raises(ValueError, match=f"{first}.*expects"):
        defaults.load_default("dit", **kw)
    write(tensors, {k: v for k, v in payload.items() if k != "recipe"})
    with pytest.raises(ValueError, match="no 'recipe' entry"):
        defaults.load_default("dit", **kw)
    write(tensors, {**payload, "which": "unet"})
    with pytest.raises(ValueError, match="holds a 'unet' model"):
        defaults.load_default("dit", **kw)
    with pytest.warns(RuntimeWarning, match="unusable"):  # asked to: retrained in place
        defaults.load_default("dit", train_if_missing=True, **kw)
    defaults.load_default("dit", **kw)


def test_missing_checkpoint_without_training(tmp_path, monkeypatch):
    from tdiff.models import defaults

    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="train_if_missing"):
        defaults.load_default("unet", config=dict(input_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                                                  num_res_blocks=1, attn_resolutions=(4,), num_classes=10,
                                                  num_groups=4))
    monkeypatch.setattr(defaults, "shipped_default_path", lambda which: str(tmp_path / "gone.safetensors"))
    with pytest.raises(FileNotFoundError, match="broken install"):
        defaults.load_default("unet")


# The shipped weights (tdiff/weights): written by `python -m tdiff train-defaults`.

@pytest.mark.parametrize("which", ["dit", "unet"])
def test_shipped_default_loads_untrained_matches_its_config_and_its_recorded_fd(which, monkeypatch):
    from tdiff.models import defaults

    monkeypatch.setattr(defaults, "train_default", _no_training)
    rng = torch.get_rng_state()
    model, schedule, den = defaults.load_default(which)
    assert torch.equal(rng, torch.get_rng_state())  # loading does not shift the caller's random stream
    meta = defaults.shipped_metadata(which)
    assert model.config == defaults.default_config(which) and meta["config"] == model.config.to_dict()
    assert meta["recipe"]["iters"] == defaults.DEFAULT_ITERS and meta["recipe"]["time_budget_s"] is None
    assert meta["metrics"]["iters"] == defaults.DEFAULT_ITERS
    m = meta["metrics"]
    # stored in float16 only because that moved the FD by less than 1%
    assert meta["precision"] == "float16"
    for key in ("fd", "fd_clip_x0"):
        assert m[key] == m["fd_float16"][key] and abs(m[key] - m[key.replace("fd", "fd_trained")]) <= \
            0.01 * m[key.replace("fd", "fd_trained")]
    assert m["fd_clip_x0"] * 4 < m["fd_untrained_clip_x0"]  # trained: far from the untrained network
    check = m["fd_check"]
    assert {k: check[k] for k in defaults.FD_CHECK} == defaults.FD_CHECK
    assert defaults.fd_check(model, schedule) == pytest.approx(check["value"], rel=2e-3)


def test_the_recipe_replays_the_start_of_the_shipped_runs(monkeypatch):
    """The first PROBE_ITERS iterations of `train-defaults` reproduce the probe recorded in the shipped files
    during their own training run (any CPU; bit for bit on one), whatever the caller's RNG state, and a
    different recipe does not."""
    from tdiff.models import defaults

    runs = {}
    for which, caller_seed in [("dit", 1), ("unet", 2), ("unet", 3)]:
        torch.manual_seed(caller_seed)
        runs.setdefault(which, []).append(defaults.train_default(
            which, progress=False, num_threads=1, stop_after=defaults.PROBE_ITERS)[1])
    for which, (first, *again) in runs.items():
        shipped = defaults.shipped_metadata(which)["probe"]
        assert shipped["iters"] == defaults.PROBE_ITERS
        assert defaults.probes_agree(first["probe"], shipped["rows"])
        assert all(a["weights_sha256"] == first["weights_sha256"] for a in again)
    other = defaults.train_default("unet", progress=False, num_threads=1, stop_after=defaults.PROBE_ITERS,
                                   seed=1)[1]
    assert not defaults.probes_agree(other["probe"], defaults.shipped_metadata("unet")["probe"]["rows"])


def test_shipped_metric_classifier_loads_without_touching_rng_and_matches_a_retrain():
    from tdiff.artefacts import load_safetensors
    from tdiff.data import load_digits_tensor
    from tdiff.metrics import frechet
    from tdiff.models.weights import shipped_path

    path = frechet.classifier_path()
    assert path == shipped_path("digits_classifier")
    rng = torch.get_rng_state()
    net = frechet._load_classifier(path, frechet.SHIPPED_SETTINGS)
    assert torch.equal(rng, torch.get_rng_state())
    meta = load_safetensors(path, frechet.FORMAT, frechet.VERSION)[0]
    retrained, accuracy = frechet.train_classifier()
    assert torch.equal(rng, torch.get_rng_state())
    assert accuracy == pytest.approx(meta["test_accuracy"], abs=0.01)
    x = load_digits_tensor(frechet.FEATURE_SIZE, "test")[0]
    with torch.no_grad():
        agree = (net(x).argmax(1) == retrained(x).argmax(1)).float().mean()
    assert agree > 0.99
