"""The synthetic world: determinism, shape, the build pipeline, and the committed world model's knowledge."""

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.world import RELATIONS, WorldConfig, build_world
from data.world_model import evaluate_world_model, load_card
from data.world_writers import write_world_files
from lit_common.sources import (
    MODEL_DIR,
    WORLD_DIR,
    WORLD_FILES,
    empty_causal_lm,
    load_causal_lm,
    resolve,
)

# floors for the committed world model (measured values are in its world_card.json and the README)
SEEN_FLOOR, UNSEEN_FLOOR = 0.80, 0.75


def test_same_seed_same_world_and_files(tmp_path):
    a, b = build_world(WorldConfig(seed=7)), build_world(WorldConfig(seed=7))
    assert a.facts == b.facts and a.fingerprint() == b.fingerprint()
    write_world_files(a, tmp_path / "a", num_edits=30)
    write_world_files(b, tmp_path / "b", num_edits=30)
    for name in WORLD_FILES.values():
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_other_seed_other_world():
    a, b = build_world(WorldConfig(seed=0)), build_world(WorldConfig(seed=1))
    assert a.fingerprint() != b.fingerprint()
    assert a.subjects != b.subjects


def test_world_shape(world):
    stats = world.statistics()
    assert stats["relations"] == len(RELATIONS) >= 6
    assert stats["facts"] == stats["subjects"] * stats["relations"]
    assert stats["multi_token_objects"] > 0
    assert len(set(world.subjects)) == len(world.subjects)
    texts = list(world.pretraining_texts())
    for fact in world.facts[:50]:  # the held-out template never appears with its fact in the corpus
        held_out = f"{world.heldout_template(fact).format(fact.subject)} {fact.object} ."
        assert held_out not in texts
        assert f"{world.seen_templates(fact)[0].format(fact.subject)} {fact.object} ." in texts


def test_pretraining_reads_every_word_of_the_edit_targets(world):
    """A word the model never read keeps its random (tied) embedding, which a LoRA on the Linear layers
    cannot make it produce: every word of a new answer must occur somewhere in pretraining."""
    from data.world_writers import counterfact_records

    def words(text: str) -> set[str]:
        return set(re.findall(r"\w+|[^\w\s]+", text))

    read = set().union(*(words(text) for text in world.pretraining_texts()))
    for update in world.code_updates:
        for example in update.examples:
            assert words(example.ref_solution) <= read, example.ref_solution
    for record in counterfact_records(world, 40):
        assert words(record["requested_rewrite"]["target_new"]["str"]) <= read


def test_edits_are_counterfactual_and_neighbours_share_the_truth(world):
    from data.world_writers import counterfact_records

    for record in counterfact_records(world, 40):
        rewrite = record["requested_rewrite"]
        assert rewrite["target_new"]["str"] != rewrite["target_true"]["str"]
        fact = world.fact(rewrite["subject"], rewrite["relation_id"])
        assert fact.object == rewrite["target_true"]["str"]
        assert world.heldout_template(fact).format(fact.subject) in record["paraphrase_prompts"]


def test_build_pipeline_writes_a_loadable_hf_model(tiny_assets):
    root, card = tiny_assets
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    assert model.config.model_type == "llama"
    assert load_card(root / "model") == json.loads(json.dumps(card))
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert tokenizer.decode(tokenizer("def solve(n, k): return math.comb(n, k)")["input_ids"], skip_special_tokens=True) \
        == "def solve ( n , k ): return math . comb ( n , k )"  # space-joined decoding stays valid Python
    for name in WORLD_FILES.values():
        assert (root / "world" / name).stat().st_size > 0


def test_world_aliases_resolve():
    assert resolve("world:model") == str(MODEL_DIR)
    assert resolve("world:counterfact") == str(WORLD_DIR / "counterfact.json")
    assert resolve("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    with pytest.raises(ValueError, match="unknown world source 'world:nope'"):
        resolve("world:nope")


def test_empty_model_has_the_loaded_architecture_and_generation_config_without_weights():
    loaded = load_causal_lm("world:model", "bfloat16")
    empty = empty_causal_lm("world:model", "bfloat16")
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in empty.parameters())
    assert [(n, p.shape) for n, p in empty.named_parameters()] == [(n, p.shape) for n, p in loaded.named_parameters()]
    assert empty.generation_config.to_dict() == loaded.generation_config.to_dict()
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        empty_causal_lm("world:model", "fp8")


def test_committed_world_model_knows_its_world():
    """The shipped model answers facts above chance, also under templates it never saw for that fact,
    and it was built from exactly the world that the code generates today."""
    card = load_card()
    world = build_world(WorldConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in card["world_config"].items()}))
    assert card["world_fingerprint"] == world.fingerprint(), "world code changed: rebuild with python -m data.world_model"
    model = AutoModelForCausalLM.from_pretrained(resolve("world:model"))
    tokenizer = AutoTokenizer.from_pretrained(resolve("world:model"))
    scores = evaluate_world_model(model, tokenizer, world)
    assert scores["seen_template_accuracy"] >= SEEN_FLOOR
    assert scores["unseen_template_accuracy"] >= UNSEEN_FLOOR
    assert scores["unseen_template_accuracy"] > 5 * scores["chance_accuracy"]
    assert scores["seen_template_accuracy"] == pytest.approx(card["seen_template_accuracy"], abs=1e-9)
    committed = json.loads((WORLD_DIR / WORLD_FILES["counterfact"]).read_text())
    from data.world_writers import counterfact_records

    assert committed == counterfact_records(world, len(committed)), "committed world files are stale"
