"""Edit, then quantize, on the world model: an editing run's adapter -> quantize.py (merged, calibrated on the
edits) -> packed export -> reload -> the editing metrics. The packed model must score the edits far above the
base, which fails if the adapter were dropped anywhere on the way, and its record must name the adapter and the
records the run edited."""

import hashlib
import json
from pathlib import Path

import pytest

import callbacks.tacq
import quantize
import train
from bench.edit_then_quantize import TARGETS, score_export
from data.code_update import CodeUpdateDataModule
from data.counterfact import CounterFactDataModule
from data.zsre import ZsREDataModule
from lit_tacq.calibration import CalibrationDataModule
from lit_tacq.io import save_quantized
from lit_tacq.module import CalibrationModule

ROOT = Path(__file__).resolve().parents[2]
EDITS = {"source": "world:counterfact", "num_updates": 1, "edits_per_update": 10}


def edit_data(**settings) -> CounterFactDataModule:
    return CounterFactDataModule(**{**EDITS, **settings})


def test_edit_calibration_takes_the_edits_share_of_tokens_from_the_editing_reader():
    edited = edit_data(num_updates=2, edits_per_update=5)
    edited.setup()
    ids = [record.record_id for round_records in edited.rounds for record in round_records]

    only = CalibrationDataModule(edits=edit_data(num_updates=2, edits_per_update=5), token_budget=100_000)
    only.setup()
    assert only.edit_record["records"] == ids  # the editing run's own records, in its rounds
    assert only.edit_record["examples"] == len(only.examples) == 10 * 3  # rewrite + 2 paraphrases each
    assert only.edit_record["other_tokens"] == 0

    half = CalibrationDataModule(edits=edit_data(num_updates=2, edits_per_update=5), edit_share=0.5,
                                 token_budget=100_000)
    half.setup()
    edit_tokens, other_tokens = half.edit_record["tokens"], half.edit_record["other_tokens"]
    assert edit_tokens == only.edit_record["tokens"] and abs(other_tokens - edit_tokens) <= 12  # one task example
    none = CalibrationDataModule(edits=edit_data(num_updates=2, edits_per_update=5), edit_share=0, token_budget=300)
    none.setup()  # the edits recorded, the calibration all task examples
    assert none.edit_record["records"] == ids and none.edit_record["examples"] == 0
    assert none.edit_record["other_tokens"] == sum(map(len, none.examples)) > 280
    new_answers = {request.target_new for r in edited.rounds[0] + edited.rounds[1] for request in r.requests}
    tokenizer = half.tokenizer
    texts = [tokenizer.decode(example.input_ids) for example in half.examples[: half.edit_record["examples"]]]
    assert all(any(text.endswith(answer) for answer in new_answers) for text in texts)


@pytest.mark.parametrize("data_class, source", [(ZsREDataModule, "world:zsre"),
                                                (CodeUpdateDataModule, "world:code_update")])
def test_every_editing_reader_gives_its_requests_and_paraphrases(data_class, source):
    settings = {"source": source, "num_updates": 2, "edits_per_update": 2}
    edited = data_class(**settings)
    edited.setup()
    records = [record for round_records in edited.rounds for record in round_records]
    calibration = CalibrationDataModule(edits=data_class(**settings), token_budget=100_000)
    calibration.setup()
    assert calibration.edit_record["records"] == [record.record_id for record in records]
    expected = sum(len(r.requests) + sum(p.kind == "paraphrase" for p in r.probes) for r in records)
    assert len(calibration.examples) == expected > len(records) - 1


@pytest.mark.parametrize("kwargs, message", [
    ({"edit_share": 0.5}, "needs data edits"),
    ({"edits": "counterfact", "edit_share": 1.0}, "editing data module"),
    ({"edits": None, "edit_share": 1.5}, r"in \[0, 1\]"),
])
def test_edit_calibration_refuses_bad_settings(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        CalibrationDataModule(**kwargs)


def test_an_adapter_that_is_not_one_is_refused_before_any_model_loads(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="adapter_model.safetensors missing"):
        CalibrationModule(adapter=str(tmp_path))


def test_edit_then_quantize_end_to_end(tmp_path, monkeypatch):
    manifests = []  # what the callback asks save_quantized to record in the packed model's manifest

    def recording(model, path, tokenizer=None, extra=None):
        manifests.append(extra)
        return save_quantized(model, path, tokenizer, extra=extra)

    monkeypatch.setattr(callbacks.tacq, "save_quantized", recording)
    # the demo's editing run, cut to one round of 10 edits taught by plain LoRA (a quarter of CoRSA's step cost)
    train.main(["fit", "--config", str(ROOT / "configs" / "demo_counterfact.yaml"), "--model.method", "lora",
                "--data.init_args.num_updates", "1", "--data.init_args.edits_per_update", "10",
                "--model.evaluation.generation", "false",
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
                "--ckpt_path", "null"])
    adapter = tmp_path / "runs" / "demo_counterfact" / "version_0" / "adapter"
    export = tmp_path / "export"
    quantize.main(["fit", "--config", str(ROOT / "configs" / "demo_edit_then_tacq.yaml"),
                   "--model.adapter", str(adapter),
                   "--data.edits.init_args.num_updates", "1", "--data.edits.init_args.edits_per_update", "10",
                   "--data.edit_share", "1.0", "--data.eval_max_items", "40",
                   "--trainer.default_root_dir", str(tmp_path / "quant"), "--trainer.enable_progress_bar", "false",
                   "--trainer.callbacks.init_args.export_dir", str(export),
                   "--trainer.callbacks.init_args.progress", "false", "--ckpt_path", "null"])

    report = json.loads((export / "report.json").read_text())
    sha = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert report["adapter"]["sha256"] == sha and report["adapter"]["path"] == str(adapter.resolve())
    edited = edit_data()
    edited.setup()
    assert report["edits"]["records"] == [r.record_id for rnd in edited.rounds for r in rnd]
    assert manifests[0]["adapter"] == report["adapter"] and manifests[0]["edits"] == report["edits"]

    scores = score_export(export, TARGETS["world"].evaluation)  # the export reloaded with load_quantized
    base, fp, packed = scores["base"], scores["edited_fp"], scores["quantized"]
    assert base["ES"] <= 0.2 and fp["ES"] >= 0.8  # the run edited
    assert packed["ES"] >= base["ES"] + 0.6 and packed["PS"] >= base["PS"] + 0.4  # the adapter is in the export
    assert packed["ES"] >= 0.8 * fp["ES"]
    assert packed["reliability_gen"] > base["reliability_gen"]
    assert report["bits_measured"] < 4
