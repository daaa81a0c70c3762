"""Build, pretrain, evaluate and save the tiny Llama that knows the synthetic world.

The result is an ordinary Hugging Face model directory (``config.json``, ``model.safetensors``,
tokenizer files): the rest of the project loads it with ``from_pretrained`` exactly as it would load
Llama-3-8B. A copy is committed under ``data/assets/world_model`` so that demos and tests start at once;
``python -m data.world_model`` regenerates it (and the world's benchmark files) in a few minutes on CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from data.world import World, WorldConfig, build_world
from data.world_writers import write_world_files
from lit_common.scoring import answer_accuracy
from lit_common.sources import MODEL_DIR, WORLD_DIR
from lit_common.tokenization import right_padded

CARD_NAME = "world_card.json"

SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclass(frozen=True)
class PretrainConfig:
    """Size of the tiny Llama and how long to train it.

    Small on purpose: a model with room to spare shrugs off quantization (a 1.7M-parameter build kept
    99.8 % of its task accuracy at 2-bit RTN, so no quantization method could be told apart), while this
    0.28M-parameter one loses about a quarter; every Linear input width is a multiple of 64, as
    bitsandbytes' CPU NF4 kernels need. Fact recall arrives abruptly rather than gradually (seen-template
    accuracy 82 % at epoch 15, 94 % at epoch 20; a 30-epoch run of a wider model at another learning rate
    ended before its jump, at 66 %): 40 epochs leave a margin. ``world_card.json`` records the result.
    """

    hidden_size: int = 64
    intermediate_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    seed: int = 0


def _vocabulary_texts(world: World) -> Iterable[str]:
    """Every string any world file can contain, so the word-level vocabulary has no unknown words."""
    yield from world.pretraining_texts()
    for relation in world.relations.values():
        yield from relation.objects
        yield from relation.templates
        yield from relation.questions
    for update in world.code_updates:
        for example in update.examples:
            yield from (example.problem, example.ref_solution, example.old_solution, example.solution_signature)


def build_tokenizer(world: World) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (words and punctuation runs) that prepends ``<s>``; decoding joins tokens
    with spaces, which keeps the world's one-line programs valid Python."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS.values()), min_frequency=1)
    tokenizer.train_from_iterator(_vocabulary_texts(world), trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, model_max_length=256, **SPECIAL_TOKENS
    )


def build_model(tokenizer: PreTrainedTokenizerFast, config: PretrainConfig) -> LlamaForCausalLM:
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama)


def _batches(encoded: list[list[int]], batch_size: int, pad_id: int, rng: random.Random):
    order = list(range(len(encoded)))
    rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        batch = right_padded([[] for _ in rows], rows, pad_id)  # every token is a target
        yield batch["input_ids"], batch["attention_mask"], batch["labels"]


def pretrain(world: World, config: PretrainConfig = PretrainConfig(), progress: bool = True):
    """Train the tiny Llama on the world's corpus (every token, causal LM loss); returns model, tokenizer."""
    tokenizer = build_tokenizer(world)
    model = build_model(tokenizer, config)
    texts = list(world.pretraining_texts())
    encoded = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total_steps = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)

    def lr_factor(step: int) -> float:  # linear warm-up, cosine decay to 0
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / (total_steps - config.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = random.Random(config.seed)
    model.train()
    bar = tqdm(total=total_steps, desc="pretraining world model", disable=not progress)
    for _ in range(config.epochs):
        for ids, mask, labels in _batches(encoded, config.batch_size, tokenizer.pad_token_id, rng):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    return model, tokenizer


def chance_accuracy(world: World) -> float:
    """Accuracy of a model that knows each relation's objects but not the facts: mean of 1/#objects."""
    return sum(1 / len(world.relations[f.relation_id].objects) for f in world.facts) / len(world.facts)


def evaluate_world_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, world: World) -> dict[str, float]:
    return {
        "seen_template_accuracy": answer_accuracy(model, tokenizer, world.probes(heldout=False)),
        "unseen_template_accuracy": answer_accuracy(model, tokenizer, world.probes(heldout=True)),
        "chance_accuracy": chance_accuracy(world),
    }


def build_assets(
    model_dir: Path = MODEL_DIR,
    world_dir: Path = WORLD_DIR,
    world_config: WorldConfig = WorldConfig(),
    pretrain_config: PretrainConfig = PretrainConfig(),
    progress: bool = True,
    num_edits: int = 200,
) -> dict:
    """Regenerate the world files and the world model; the model directory is replaced only when complete."""
    start = time.perf_counter()
    world = build_world(world_config)
    write_world_files(world, world_dir, num_edits)
    model, tokenizer = pretrain(world, pretrain_config, progress=progress)
    card = {
        "world_fingerprint": world.fingerprint(),
        "world_config": asdict(world_config),
        "pretrain_config": asdict(pretrain_config),
        "world_statistics": world.statistics(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocabulary_size": len(tokenizer),
        **evaluate_world_model(model, tokenizer, world),
        "build_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
    }
    staging = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / CARD_NAME).write_text(json.dumps(card, indent=1) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    staging.rename(model_dir)
    return card


def load_card(model_dir: Path = MODEL_DIR) -> dict:
    return json.loads((model_dir / CARD_NAME).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description="Regenerate the embedded world files and world model.")
    parser.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    parser.add_argument("--world-dir", type=Path, default=WORLD_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=PretrainConfig.epochs)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads (1 avoids thrashing when other jobs share the cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    card = build_assets(
        args.model_dir, args.world_dir, WorldConfig(seed=args.seed), PretrainConfig(epochs=args.epochs, seed=args.seed)
    )
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
