import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny models: on a busy 2-core machine thread hand-offs cost 100x.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
