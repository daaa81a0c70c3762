"""Tiny assets for the TaCQ Lightning tests: a randomly initialised Llama with the world's tokenizer,
saved like any Hugging Face model, and the matching task-QA and corpus files."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.world import WorldConfig, build_world
from data.world_model import build_tokenizer
from data.world_writers import write_world_files

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def save_tiny_model(directory: Path, tokenizer, seed: int = 0) -> Path:
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> SimpleNamespace:
    """``model_dir``, ``task_qa`` and ``corpus`` paths of a 20-subject world and a random tiny Llama."""
    root = tmp_path_factory.mktemp("tiny_tacq")
    world = build_world(WorldConfig(num_subjects=20))
    paths = write_world_files(world, root / "world", num_edits=10)
    tokenizer = build_tokenizer(world)
    model_dir = save_tiny_model(root / "model", tokenizer)
    return SimpleNamespace(model_dir=str(model_dir), task_qa=str(paths["task_qa"]), corpus=str(paths["corpus"]),
                           tokenizer=tokenizer)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a shared 2-core machine, two spinning OpenMP threads make small matmuls
    a thousand times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
