"""Fused ops. Each module defines its schemas under tdiff::, a pure-PyTorch reference, register_fake and
register_autograd, and routes to the C++ (tdiff._C) or Triton (tdiff.kernels) kernel through dispatch.route."""
from .cached_block import cached_block  # noqa: F401
from .multistep_update import multistep_update  # noqa: F401
from .noisy_sample import noisy_sample  # noqa: F401
from .weighted_mse import weighted_mse  # noqa: F401
