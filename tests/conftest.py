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


@pytest.fixture
def one_thread():
    """Pin torch to one thread for the test (deterministic reductions; no OpenMP stalls on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
