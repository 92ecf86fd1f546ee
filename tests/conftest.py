"""Shared by every test module: the top-level modules (common.py and the method files) importable, one intra-op
thread, and the TF32 flags restored at each module's end."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_module():
    """One intra-op thread: the networks here are tiny, and spinning OpenMP threads on a busy 2-core machine (two
    pytest workers) costs up to 10x. Module scope, so that a module's module-scoped runs get it too; the previous
    setting is restored at the module's end."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _one_thread(_one_thread_per_module):
    """And again after each test: a test that changes it (common.setup on another machine) does not pass its
    setting on to the next."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _restore_tf32_flags():
    """The TF32 flags (torch.backends.cuda.matmul / cudnn.allow_tf32) as found, again at each module's end: training
    runs call common.setup, which sets them from --precision, and a module's setting must not reach the next module.
    Module scope, so that a module's module-scoped runs are covered too."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
