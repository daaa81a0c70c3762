"""Shared test setup: never reach for a hub, keep torch on few threads, a tiny world for fast tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def world():
    from data.world import WorldConfig, build_world

    return build_world(WorldConfig(seed=0))
