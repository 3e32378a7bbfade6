import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Every benchmark here compares routes on one core: torch runs one thread (peers that have their
    own thread pools, like FAISS, are pinned in their module)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
