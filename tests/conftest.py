"""Suite-wide test settings."""

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread_torch():
    """One torch thread: on a 2-core machine shared with NVFlare's processes, small steps run
    an order of magnitude faster than with torch's default of one thread per core."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(previous)
