"""Shared test setup: never reach for a hub, keep torch on few threads, a tiny world for fast tests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("LIT_TEST_THREADS", min(2, torch.get_num_threads()))))


@pytest.fixture(scope="session")
def world():
    from data.world import WorldConfig, build_world

    return build_world(WorldConfig(seed=0))


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny world (24 subjects) and a tiny Llama pretrained on it for a few epochs: the same kind of
    artefacts as the embedded default, small enough that module tests run in seconds."""
    from data.world import WorldConfig
    from data.world_model import PretrainConfig, build_assets

    root = tmp_path_factory.mktemp("tiny_world")
    card = build_assets(
        root / "model", root / "world",
        WorldConfig(seed=3, num_subjects=24, num_first_names=12, num_last_names=12, num_code_updates=3),
        PretrainConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, epochs=4, batch_size=64, warmup_steps=10),
        progress=False, num_edits=24,
    )
    return root, card


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny Llama as llama.cpp writes a GGUF (Q4_1 Linears, Q8_0 embedding, byte-level BPE tokenizer with a
    chat template): (path, the float32 HF model holding exactly the weights the file decodes to)."""
    from tests.common.tiny_gguf import write_tiny_gguf

    path = tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)
