"""Metrics: Fréchet distance for digits, pixel errors, and sample-based distribution distances."""
from .distribution import mmd, sliced_wasserstein
from .errors import per_sample_error, psnr, rmse
from .frechet import digits_classifier, frechet_distance

__all__ = ["frechet_distance", "digits_classifier", "rmse", "psnr", "per_sample_error", "sliced_wasserstein", "mmd"]
