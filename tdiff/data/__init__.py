"""Data: the digits dataset, an analytic Gaussian mixture (exact denoiser) and a reference ODE solution."""
from .digits import digits_loader, load_digits_tensor
from .gaussian_mixture import GaussianMixture, default_mixture_2d, image_mixture
from .reference import reference_ode_solution

__all__ = ["load_digits_tensor", "digits_loader", "GaussianMixture", "default_mixture_2d", "image_mixture", "reference_ode_solution"]
