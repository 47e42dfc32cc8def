"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on shared CPUs this is many times faster than
    several threads fighting over the cores (Trainer steps: ~0.01 s instead of up to ~0.9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
