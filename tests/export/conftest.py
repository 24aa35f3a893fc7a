import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is fastest, and spares the cores other test processes share."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
