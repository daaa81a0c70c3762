"""Tiny assets for the TaCQ Lightning tests (built by ``tests/tacq/tiny.py``) and one intra-op thread."""

from types import SimpleNamespace

import pytest
import torch

from tests.tacq.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """``model_dir``, ``task_qa`` and ``corpus`` paths of a 20-subject world and a random tiny Llama."""
    return build_tiny(tmp_path_factory.mktemp("tiny_tacq"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads make small matmuls
    a thousand times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
