import math
import os

import pytest
import torch

from tdiff.data import load_digits_tensor
from tdiff.metrics import frechet
from tdiff.metrics import frechet_distance, mmd, per_sample_error, psnr, rmse, sliced_wasserstein


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def quick_classifier(tmp_path, monkeypatch):
    """A briefly trained metric classifier in a private cache dir: hermetic and fast."""
    monkeypatch.setenv("TDIFF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(frechet, "TRAIN_SETTINGS", {**frechet.TRAIN_SETTINGS, "iters": 60})
    frechet._classifier_for.cache_clear()
    frechet._reference_stats.cache_clear()
    yield tmp_path
    frechet._classifier_for.cache_clear()
    frechet._reference_stats.cache_clear()


def test_pixel_errors():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    torch.testing.assert_close(per_sample_error(a, b), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(per_sample_error(a, b, "max"), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rmse(a, b), torch.tensor(math.sqrt(0.5)))
    # mse 0.01 in [-1, 1] -> 20 log10(2) + 20 = 26.02 dB
    torch.testing.assert_close(psnr(a, a + 0.1), torch.tensor(20 * math.log10(2) + 20))
    assert psnr(a, b, reduction="none").shape == (2,)
    with pytest.raises(ValueError, match="same shape"):
        rmse(a, b[:1])
    with pytest.raises(ValueError, match="kind"):
        per_sample_error(a, b, "l3")


def test_sample_distances():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g)
    shifted = y + torch.tensor([2.0, 0.0, 0.0])
    assert sliced_wasserstein(x, x) == 0
    assert sliced_wasserstein(x, y) < 0.2 < sliced_wasserstein(x, shifted)
    assert sliced_wasserstein(x, y, seed=1) == sliced_wasserstein(x, y, seed=1)
    assert sliced_wasserstein(x, y[:300]) < 0.25  # unequal sizes
    assert abs(float(mmd(x, y))) < 0.02 < float(mmd(x, shifted))
    with pytest.raises(ValueError, match="dimension"):
        mmd(x, y[:, :2])


def test_classifier_training_is_deterministic():
    settings = {"iters": 5}
    a, acc_a = frechet.train_classifier(settings)
    b, acc_b = frechet.train_classifier(settings)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert acc_a == acc_b


def test_frechet_distance_real_vs_noise_and_determinism(quick_classifier):
    real = load_digits_tensor(16)[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(real), generator=g)
    noise = torch.rand(600, 1, 16, 16, generator=g) * 2 - 1
    fd_real = frechet_distance(real[idx[:600]])
    assert fd_real == frechet_distance(real[idx[:600]])  # deterministic
    fd_noise = frechet_distance(noise)
    assert fd_real * 20 < fd_noise
    assert frechet_distance(real[idx[:600]], reference=real[idx[600:1200]]) * 10 < \
        frechet_distance(noise, reference=real[idx[600:1200]])
    # 32x32 samples are resized to the classifier's 16x16
    assert frechet_distance(load_digits_tensor(32)[0][idx[:600]], size=32) * 20 < fd_noise
    assert os.path.exists(frechet.classifier_path())
    with pytest.raises(ValueError, match="samples"):
        frechet_distance(torch.zeros(10, 3, 16, 16))


def test_corrupt_classifier_cache_retrains_with_warning(quick_classifier):
    frechet.digits_classifier()
    path = frechet.classifier_path()
    with open(path, "wb") as f:
        f.write(b"\x00garbage")
    frechet._classifier_for.cache_clear()
    with pytest.warns(RuntimeWarning, match="retraining"):
        frechet.digits_classifier()
    frechet._classifier_for.cache_clear()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frechet.digits_classifier()  # the retrained file is good


@pytest.mark.parametrize("call, error, match", [
    (lambda x: sliced_wasserstein(x, x, n_projections=0), ValueError, "n_projections"),
    (lambda x: sliced_wasserstein(x, x, n_projections=2.5), ValueError, "n_projections"),
    (lambda x: sliced_wasserstein(x, x, p=0), ValueError, "p "),
    (lambda x: sliced_wasserstein(x, x, seed=-1), ValueError, "seed"),
    (lambda x: sliced_wasserstein(x.long(), x), TypeError, "floating-point"),
    (lambda x: mmd(x, x, bandwidths=[1.0, float("nan")]), ValueError, "bandwidths\\[1\\]"),
    (lambda x: mmd(x, x, bandwidths=[]), TypeError, "bandwidths"),
    (lambda x: mmd(x, x, bandwidths=2.0), TypeError, "bandwidths"),
    (lambda x: psnr(x, x, data_range=float("inf")), ValueError, "data_range"),
    (lambda x: psnr(x, x, data_range=0.0), ValueError, "data_range"),
    (lambda x: rmse(x.long(), x.long()), TypeError, "floating-point"),
])
def test_metric_arguments_are_validated(call, error, match):
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(error, match=match):
        call(x)
