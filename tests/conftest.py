import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors everywhere in the suite: one intra-op thread avoids sync overhead."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
