"""The test harness itself: what one test changes process-wide is put back before the next one runs."""

import os
import random

import numpy as np
import torch

from conftest import global_state_restored


def test_every_process_wide_setting_a_test_changes_is_put_back(tmp_path):
    threads, dtype, cwd = torch.get_num_threads(), torch.get_default_dtype(), os.getcwd()
    deterministic, grad = torch.are_deterministic_algorithms_enabled(), torch.is_grad_enabled()
    draws = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    os.environ["PRUNEKIT_TEST_ADDED"] = "1"  # set and removed in this test, so the outer fixture sees no change
    home = os.environ.get("HOME")
    with global_state_restored():
        torch.set_num_threads(threads + 1)
        torch.set_default_dtype(torch.float64)
        torch.use_deterministic_algorithms(not deterministic)
        torch.set_grad_enabled(not grad)
        torch.manual_seed(123), np.random.seed(123), random.seed(123)
        torch.rand(3), np.random.rand(3), random.random()
        os.environ["PRUNEKIT_TEST_OTHER"] = "x"
        os.environ.pop("PRUNEKIT_TEST_ADDED")
        os.environ["HOME"] = str(tmp_path)
        os.chdir(tmp_path)
    assert torch.get_num_threads() == threads and torch.get_default_dtype() == dtype
    assert torch.are_deterministic_algorithms_enabled() == deterministic and torch.is_grad_enabled() == grad
    assert torch.equal(torch.get_rng_state(), draws[0]) and np.array_equal(np.random.get_state()[1], draws[1])
    assert random.getstate() == draws[2]
    assert os.environ["PRUNEKIT_TEST_ADDED"] == "1" and "PRUNEKIT_TEST_OTHER" not in os.environ
    assert os.environ.get("HOME") == home and os.getcwd() == cwd
    del os.environ["PRUNEKIT_TEST_ADDED"]


def test_a_failing_test_body_still_restores():
    threads = torch.get_num_threads()
    try:
        with global_state_restored():
            torch.set_num_threads(threads + 1)
            raise RuntimeError("the test failed")
    except RuntimeError:
        pass
    assert torch.get_num_threads() == threads
