# The Triton interpreter flag is read when @triton.jit runs, so it must be set before anything imports kernels.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TDIFF_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".tdiff_cache"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
