"""The tiny TaCQ assets (a randomly initialised Llama with the world's tokenizer, saved like any Hugging Face
model, and the matching task-QA and corpus files), shared by the TaCQ tests and the TaCQ fault-injection test."""

from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data.world import WorldConfig, build_world
from data.world_model import build_tokenizer
from data.world_writers import write_world_files

TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


def save_tiny_model(directory: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY_LLAMA, **overrides})
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_tiny(root: Path, **model_overrides) -> SimpleNamespace:
    """``model_dir``, ``task_qa``, ``corpus`` and ``tokenizer`` of a 20-subject world and a random tiny Llama."""
    world = build_world(WorldConfig(num_subjects=20))
    paths = write_world_files(world, root / "world", num_edits=10)
    tokenizer = build_tokenizer(world)
    model_dir = save_tiny_model(root / "model", tokenizer, **model_overrides)
    return SimpleNamespace(model_dir=str(model_dir), task_qa=str(paths["task_qa"]), corpus=str(paths["corpus"]),
                           tokenizer=tokenizer)
