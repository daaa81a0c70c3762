"""The optional locality term (docs/corsa.md §9): its loss, where its anchors come from, and its effect."""

import json

import lightning.pytorch as L
import pytest
import torch

from data.base import round_protocol
from data.counterfact import CounterFactDataModule
from data.tokenization import EncodedRequest, RequestCollator
from lit_corsa.losses import next_token_kl, next_token_logprobs
from lit_corsa.module import EditModule
from lit_corsa.settings import EvaluationSettings, LoraSettings, ObjectiveSettings, OptimizerSettings


def test_next_token_kl_reads_the_last_real_position_and_vanishes_on_the_reference():
    logits = torch.randn(2, 4, 7)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    reference = next_token_logprobs(logits, mask)
    assert torch.allclose(reference[1], logits[1, 1].log_softmax(-1))  # row 1 ends at position 1
    assert next_token_kl(logits, mask, reference).abs() < 1e-6
    changed = logits.clone()
    changed[1, 3] += 5.0  # a padding position: no effect
    assert next_token_kl(changed, mask, reference).abs() < 1e-6
    changed[1, 1, 0] += 5.0  # the last real position: a positive divergence
    assert next_token_kl(changed, mask, reference) > 0.01


def test_the_collator_pads_every_request_anchor_into_one_batch():
    requests = [EncodedRequest(0, [1, 2], [3], None, ([4, 5, 6], [7])), EncodedRequest(1, [1, 8], [9], None, ([5],))]
    anchors = RequestCollator(pad_id=0)(requests)["anchors"]
    assert anchors["input_ids"].tolist() == [[4, 5, 6], [7, 0, 0], [5, 0, 0]]
    assert anchors["attention_mask"].sum(-1).tolist() == [3, 1, 1]
    assert "anchors" not in RequestCollator(pad_id=0)([EncodedRequest(0, [1], [3], None)])


def _datamodule(tiny_assets, anchors: int, **kwargs) -> CounterFactDataModule:
    root, _ = tiny_assets
    return CounterFactDataModule(source=str(root / "world" / "counterfact.json"), tokenizer=str(root / "model"),
                                 num_updates=2, edits_per_update=4, epochs_per_update=3, batch_size=2,
                                 locality_anchors=anchors, **kwargs)


def test_anchors_come_from_records_the_run_does_not_edit_and_are_never_scored(tiny_assets):
    dm = _datamodule(tiny_assets, anchors=3)
    dm.setup("fit")
    tok = dm.tokenizer
    edited = [record for round_ in dm.rounds for record in round_]
    scored = {probe.prompt for record in edited for probe in record.probes}
    scored |= {request.prompt for record in edited for request in record.requests}
    root, _ = tiny_assets
    all_records = json.loads((root / "world" / "counterfact.json").read_text())
    edited_subjects = {record.subject for record in edited}
    unedited_prompts = set()
    for row in all_records:
        rewrite = row["requested_rewrite"]
        if rewrite["subject"] not in edited_subjects:
            unedited_prompts |= {rewrite["prompt"].format(rewrite["subject"]), *row["paraphrase_prompts"],
                                 *row["neighborhood_prompts"]}
    for request in dm.all_requests(1):
        assert len(request.anchor_ids) == 3
        for ids in request.anchor_ids:
            text = tok.decode(ids, skip_special_tokens=True)
            assert text not in {tok.decode(tok(p)["input_ids"], skip_special_tokens=True) for p in scored}
            assert text in {tok.decode(tok(p)["input_ids"], skip_special_tokens=True) for p in unedited_prompts}
    again = _datamodule(tiny_assets, anchors=3)
    again.setup("fit")
    assert [r.anchor_ids for r in again.all_requests(1)] == [r.anchor_ids for r in dm.all_requests(1)]


def test_too_few_unedited_records_for_the_anchors_fail_clearly(tiny_assets):
    dm = _datamodule(tiny_assets, anchors=10_000)
    with pytest.raises(ValueError, match="locality_anchors=10000 needs"):
        dm.setup("fit")


def _anchor_divergence(tiny_assets, tmp_path, locality_weight: float) -> tuple[float, EditModule]:
    """Fit one round of lora with the locality term at this weight; the mean KL(base || edited) after the
    training anchors of the round, measured on the final adapter."""
    L.seed_everything(0, verbose=False)
    root, _ = tiny_assets
    dm = _datamodule(tiny_assets, anchors=4)
    module = EditModule(model_name_or_path=str(root / "model"), method="lora",
                        objective=ObjectiveSettings(locality_weight=locality_weight),
                        optimizer=OptimizerSettings(learning_rate=2e-2, warmup_steps=1),
                        lora=LoraSettings(r=4, alpha=8), evaluation=EvaluationSettings(generation=False))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        **round_protocol(2, 3))
    trainer.fit(module, datamodule=dm)
    batch = RequestCollator(dm.pad_id)(dm.all_requests(1))
    with torch.no_grad():
        reference = module._anchor_reference(batch["anchors"])
        logits = module.model(**batch["anchors"]).logits
    return float(next_token_kl(logits, batch["anchors"]["attention_mask"], reference)), module


def test_the_locality_term_keeps_the_anchors_closer_to_the_base_model(tiny_assets, tmp_path):
    without, _ = _anchor_divergence(tiny_assets, tmp_path / "without", 0.0)
    with_term, module = _anchor_divergence(tiny_assets, tmp_path / "with", 10.0)
    assert with_term < 0.5 * without, (with_term, without)
    assert "train/locality" in module.trainer.logged_metrics


def test_a_locality_weight_without_anchors_fails_at_setup(tiny_assets, tmp_path):
    root, _ = tiny_assets
    module = EditModule(model_name_or_path=str(root / "model"), method="lora",
                        objective=ObjectiveSettings(locality_weight=1.0))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, **round_protocol(2, 3))
    with pytest.raises(ValueError, match="set data.init_args.locality_anchors"):
        trainer.fit(module, datamodule=_datamodule(tiny_assets, anchors=0))
