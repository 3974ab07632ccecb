import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny test models gain nothing from threads, and on a loaded machine spinning OpenMP
    threads make them many times slower; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
