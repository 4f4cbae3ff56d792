from .noisy_sample import noisy_sample  # noqa: F401
