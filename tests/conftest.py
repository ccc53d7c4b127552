"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread for every test module: the networks here are tiny and gain nothing from
    more, and on a loaded 2-core machine two threads wait for each other at every operation
    (several times slower). Tests that start processes set OMP_NUM_THREADS for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
