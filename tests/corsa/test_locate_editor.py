"""The locate-then-edit pipelines on a real (tiny) model: edit sites by type, targets, MEMIT vs ROME."""

import json
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lit_common.sources import load_causal_lm, load_tokenizer, resolve
from lit_corsa.locate import covariance
from lit_corsa.locate.covariance import cached_key_covariances
from lit_corsa.locate.edited import EditedModel
from lit_corsa.locate.editor import LocateEditor
from lit_corsa.locate.settings import LocateSettings
from lit_corsa.locate.sites import edit_sites, paper_layers, weight_matrix
from lit_corsa.locate.targets import Fact, contexts, encode_rows
from lit_corsa.losses import sequence_logprobs


def test_edit_sites_are_the_mlp_down_projections_found_by_type():
    llama = load_causal_lm("world:model")
    assert [name for name, _, _ in edit_sites(llama, [0, 2]).values()] == ["model.layers.0.mlp.down_proj",
                                                                          "model.layers.2.mlp.down_proj"]
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    (name, layer, _), = edit_sites(gpt2, [1]).values()
    assert name == "transformer.h.1.mlp.c_proj" and weight_matrix(layer).shape == (16, 64)  # Conv1D stores Wᵀ
    assert paper_layers(llama, "memit") == [0, 1] and paper_layers(llama, "rome") == [0]  # 4-8 / 5 of 32 blocks
    with pytest.raises(ValueError, match="last decoder block"):
        edit_sites(llama, [3])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One covariance cache for the module's tests (the world model's keys on its corpus)."""
    return tmp_path_factory.mktemp("covariance")


def _facts(count):
    rows = json.loads(Path(resolve("world:counterfact")).read_text())[:count]
    return [Fact(r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]),
                 r["requested_rewrite"]["subject"], r["requested_rewrite"]["target_new"]["str"]) for r in rows]


def _edited(method, layers, tmp_path, **settings):
    base = load_causal_lm("world:model")
    sites = edit_sites(base, layers)
    model = EditedModel(base, [f"{name}.weight" for name, _, _ in sites.values()], "world:model", method)
    editor = LocateEditor(method, LocateSettings(layers=layers, covariance_source="world:corpus", covariance_tokens=6000,
                                                 covariance_window=128, covariance_cache=str(tmp_path),
                                                 context_prefixes=2, prefix_tokens=5, **settings), layers)
    tokenizer = load_tokenizer("world:model")
    editor.prepare(model, tokenizer, seed=0)
    return model, editor, tokenizer, sites


def test_memit_with_one_edit_and_one_layer_equals_rome_in_a_model(cache):
    """Same prefixes, key and target (no weight decay, no clamp): MEMIT's one-layer update with λ → 0 is
    ROME's; with the paper's λ it is the same rank-one direction, shorter."""
    common = {"v_lr": 0.5, "v_steps": 10, "v_weight_decay": 0.0, "clamp_norm_factor": 100.0}
    (fact,) = _facts(1)
    rome, rome_editor, tokenizer, _ = _edited("rome", [1], cache, **common)
    memit, memit_editor, _, _ = _edited("memit", [1], cache, mom2_weight=1e-6, **common)
    rome_editor.edit(rome, tokenizer, [fact])
    memit_editor.edit(memit, tokenizer, [fact])
    name = "model.layers.1.mlp.down_proj.weight"
    original = rome._original[name]
    rome_update, memit_update = rome.edited[name] - original, memit.edited[name] - original
    assert rome_update.norm() > 1e-3 * original.norm()
    torch.testing.assert_close(memit_update, rome_update, rtol=1e-3, atol=1e-6)
    assert torch.linalg.matrix_rank(rome_update.double(), rtol=1e-6) == 1


def _answer_logprobs(model, tokenizer, facts):
    rows = encode_rows(tokenizer, [contexts(f, [])[0] for f in facts], [f.target for f in facts])
    with torch.no_grad():
        logits = model(input_ids=rows.batch["input_ids"], attention_mask=rows.batch["attention_mask"]).logits
    return sequence_logprobs(logits, rows.batch["labels"])


def test_memit_spreads_the_edit_over_its_layers_and_teaches_the_facts(cache):
    facts = _facts(3)
    model, editor, tokenizer, _ = _edited("memit", [0, 1, 2], cache, mom2_weight=1.0)
    before = _answer_logprobs(model, tokenizer, facts)
    editor.edit(model, tokenizer, facts)
    after = _answer_logprobs(model, tokenizer, facts)
    assert all(c > 1e-3 for c in model.changed().values())  # every layer took a share
    assert (after > before).all() and (after - before).mean() > 1.0
    with model.disable_adapter():  # the unedited model, inside the block only
        torch.testing.assert_close(_answer_logprobs(model, tokenizer, facts), before)
    torch.testing.assert_close(_answer_logprobs(model, tokenizer, facts), after)


def test_the_key_covariance_is_computed_once_and_read_back(tmp_path, monkeypatch):
    model, tokenizer = load_causal_lm("world:model"), load_tokenizer("world:model")
    sites = {i: layer for i, (_, layer, _) in edit_sites(model, [0, 1]).items()}
    first = cached_key_covariances(model, tokenizer, sites, "world:corpus", 2000, 128, str(tmp_path))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    monkeypatch.setattr(covariance, "key_covariances", lambda *a: pytest.fail("recomputed a cached covariance"))
    again = cached_key_covariances(model, tokenizer, sites, "world:corpus", 2000, 128, str(tmp_path))
    for i in sites:
        torch.testing.assert_close(again[i], first[i], rtol=0, atol=0)
        assert torch.linalg.eigvalsh(first[i]).min() > -1e-6  # a second moment: positive semi-definite
    with torch.no_grad():  # another model (its weights differ) does not read this one's covariance
        next(model.parameters()).add_(1.0)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        cached_key_covariances(model, tokenizer, sites, "world:corpus", 2000, 128, str(tmp_path))


def test_a_prompt_without_its_subject_is_refused_by_name():
    tokenizer = load_tokenizer("world:model")
    fact = Fact("Fakroul Braimouth holds a passport from", "Fakroul Braimouth", "Ostmark")
    rows = encode_rows(tokenizer, contexts(fact, ["Braimouth a. "]), [None, None])
    # the subject's last token in each row: "Braimouth" of the prompt, not of the prefix
    tokens = [tokenizer.convert_ids_to_tokens(int(rows.batch["input_ids"][r, p])) for r, p in
              enumerate(rows.subject_positions)]
    assert tokens == ["Braimouth", "Braimouth"] and rows.subject_positions[1] > rows.subject_positions[0]
    with pytest.raises(ValueError, match="edit prompt 'Where was she born': the subject 'Fakroul Braimouth' does not occur"):
        contexts(Fact("Where was she born", "Fakroul Braimouth", "Ostmark"), [])
