import contextlib
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


@contextlib.contextmanager
def global_state_restored() -> Iterator[None]:
    """Put back on exit what a test may change process-wide: thread count, default dtype, deterministic-algorithms
    mode, grad mode, RNG states (torch, numpy, random), environment variables and working directory."""
    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    grad = torch.is_grad_enabled()
    rng = torch.get_rng_state(), np.random.get_state(), random.getstate()
    environ, cwd = dict(os.environ), os.getcwd()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.set_grad_enabled(grad)
        torch.set_rng_state(rng[0])
        np.random.set_state(rng[1])
        random.setstate(rng[2])
        if dict(os.environ) != environ:
            os.environ.clear()
            os.environ.update(environ)
        os.chdir(cwd)


@pytest.fixture(autouse=True)
def restore_global_state():
    """Every test leaves the process as it found it: without this a `torch.set_num_threads(1)` or a seed in one test
    changes the numbers of every test that runs after it (the MoE round trip compared logits across thread counts)."""
    with global_state_restored():
        yield


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny models: on a busy 2-core machine thread hand-offs cost 100x.
    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_thread():
    """One intra-op thread for a single test (restore_global_state puts the count back after it)."""
    torch.set_num_threads(1)
