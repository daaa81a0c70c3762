"""Portability and KnowEdit's locality as probe kinds of their own: read from records shaped like KnowEdit's
and EasyEdit's releases (written here from the world's facts), scored into their own metrics, and carried
into metrics.json, the summary table and the plot (sparse sub-kinds' summaries: tests/corsa/test_corsa_report.py)."""

import json
import logging
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data.formats import Probe
from data.world_model import build_tokenizer
from data.world_writers import zsre_records
from data.zsre import ZsREDataModule, parse_zsre_rows
from lit_corsa.evaluation import PROTOCOLS, ProbeEvaluator, metric_names
from lit_corsa.settings import EvaluationSettings

EDITS = 4


def _questions(world, edited_subjects, count):
    """``count`` (question, answer) pairs about subjects no edit touches, each question asked once."""
    pairs = []
    for fact in world.facts:
        if fact.subject not in edited_subjects:
            pairs.append((world.relations[fact.relation_id].questions[0].format(fact.subject), fact.object))
    pairs = list(dict.fromkeys(pairs))
    assert len(pairs) >= count
    return pairs[:count]


def knowedit_rows(world, count=EDITS):
    """KnowEdit ZsRE records (the release's shape: ground_truth a list, locality grouped with list answers,
    portability grouped with string answers)."""
    mend = zsre_records(world, count)
    spare = iter(_questions(world, {r["subject"] for r in mend}, 4 * count))
    rows = []
    for r in mend:
        rows.append({
            "subject": r["subject"], "target_new": r["alt"], "prompt": r["src"], "ground_truth": r["answers"],
            "rephrase_prompt": r["rephrase"], "cond": r["cond"],
            "locality": {"Relation_Specificity": [{"prompt": p, "ground_truth": [a]} for p, a in (next(spare), next(spare))]},
            "portability": {"Reasoning": [dict(zip(("prompt", "ground_truth"), next(spare)))],
                            "Subject_Aliasing": [dict(zip(("prompt", "ground_truth"), next(spare)))]},
        })
    return rows


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("portability")
    build_tokenizer(world).save_pretrained(root / "tokenizer")
    (root / "knowedit.json").write_text(json.dumps(knowedit_rows(world)))
    return root


def test_knowedit_records_give_grouped_locality_and_portability_probes(world):
    rows = knowedit_rows(world)
    record = parse_zsre_rows(rows, "knowedit.json")[0]
    assert record.requests[0].target_old == rows[0]["ground_truth"][0]
    assert [(p.kind, p.group) for p in record.probes] == [
        ("efficacy", ""), ("paraphrase", ""), ("locality", "relation_specificity"), ("locality", "relation_specificity"),
        ("portability", "reasoning"), ("portability", "subject_aliasing")]
    reasoning = rows[0]["portability"]["Reasoning"][0]
    assert Probe("portability", reasoning["prompt"], reasoning["ground_truth"], group="reasoning") in record.probes


def test_easyedit_portability_field_is_a_one_hop_probe(world):
    row = {**zsre_records(world, 1)[0],
           "portability": {"Recalled Relation": "(a, b, c)", "New Question": "What does Zeboth Korai do?",
                           "New Answer": "tax collector"}}
    (record,) = parse_zsre_rows([row], "zsre_mend_eval_portability.json")
    assert record.probes[-1] == Probe("portability", "What does Zeboth Korai do?", "tax collector", group="one_hop")


def test_a_probe_group_must_belong_to_its_kind():
    with pytest.raises(ValueError, match="probe kind 'portability' has groups"):
        Probe("portability", "q", "a")  # a portability probe always says which sub-kind it is
    with pytest.raises(ValueError, match="probe kind 'paraphrase' has groups"):
        Probe("paraphrase", "q", "a", group="reasoning")


class Oracle(nn.Module):
    """A stand-in for the edited model whose answers the test decides. With the adapter on it predicts every
    next token (teacher forced, so it gets every answer token right) and generates each prompt's answer; on
    a ``blind`` prompt, and always with the adapter off, it predicts ``wrong`` instead."""

    def __init__(self, vocab: int, answers: dict[tuple[int, ...], list[int]], blind: set[tuple[int, ...]], wrong: int):
        super().__init__()
        self.vocab, self.answers, self.blind, self.wrong, self.adapter_on = vocab, answers, blind, wrong, True

    def _is_blind(self, ids: list[int]) -> bool:
        return not self.adapter_on or any(tuple(ids[: len(p)]) == p for p in self.blind)

    def forward(self, input_ids, attention_mask):
        predicted = torch.roll(input_ids, -1, dims=1)
        for row, ids in enumerate(input_ids.tolist()):
            if self._is_blind(ids):
                predicted[row] = self.wrong
        return SimpleNamespace(logits=nn.functional.one_hot(predicted, self.vocab).float())

    @contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = [i for i, m in zip(ids, mask) if m]
            answer = [self.wrong] if self._is_blind(prompt) else self.answers[tuple(prompt)]
            rows.append(ids + (answer + [self.wrong] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


def test_portability_and_knowedit_locality_are_scored_into_their_own_metrics(files):
    dm = ZsREDataModule(source=str(files / "knowedit.json"), tokenizer=str(files / "tokenizer"), num_updates=1,
                        eval_batch_size=5)  # batches mix the kinds
    dm.setup("validate")
    probes = dm.eval_probes(0)
    tokenizer = dm.tokenizer
    # blind on every Reasoning question and on the first locality prompt of each record
    first_locality = {r.record_id: next(p for p in r.probes if p.kind == "locality").prompt for r in dm.rounds[0]}
    blind = {tuple(p.prompt_ids) for p in probes
             if p.probe.group == "reasoning" or p.probe.prompt in first_locality.values()}
    wrong = tokenizer.unk_token_id
    assert all(wrong not in p.target_ids for p in probes)
    model = Oracle(len(tokenizer), {tuple(p.prompt_ids): p.target_ids for p in probes}, blind, wrong)
    evaluator = ProbeEvaluator(1, EvaluationSettings(max_new_tokens=4))
    for batch in dm.val_dataloader():
        evaluator.update(model, batch, tokenizer)
    names = metric_names((p.probe for p in probes), generation=True)
    assert names >= {"portability_token_acc", "portability_gen", "portability_reasoning_token_acc",
                     "portability_subject_aliasing_token_acc", "locality_relation_specificity_token_acc"}
    assert not names & {"portability_one_hop_token_acc", "locality_forgetfulness_token_acc", "NS"}
    scores = evaluator.compute(0, {0: names}).all
    assert scores["portability_reasoning_token_acc"] == 0.0
    assert scores["portability_subject_aliasing_token_acc"] == 1.0
    assert scores["portability_token_acc"] == pytest.approx(0.5)  # as many of each
    assert scores["portability_gen"] == pytest.approx(0.5)
    # locality = agreement with the unedited model: kept on the blind half (both say `wrong`), lost on the rest
    assert scores["locality_relation_specificity_token_acc"] == pytest.approx(0.5)
    assert scores["locality_token_acc"] == pytest.approx(0.5)
    assert scores["reliability_token_acc"] == scores["generality_token_acc"] == 1.0
    assert names <= set(PROTOCOLS)


def test_a_knowedit_run_reports_portability_in_metrics_json_table_and_plot(tiny_assets, tmp_path, caplog):
    """Through the product: EditModule + EditReport on a KnowEdit file, two rounds, Reasoning questions on
    the first round's edits only."""
    import lightning.pytorch as L

    from callbacks.edit_report import EditReport
    from data.base import round_protocol
    from lit_corsa.module import EditModule
    from lit_corsa.settings import LoraSettings, OptimizerSettings

    root, _ = tiny_assets
    mend = json.loads((root / "world" / "zsre_mend_eval.json").read_text())
    rows = []
    for i, r in enumerate(mend[:4]):
        other = mend[-1 - i]  # a question about a record the run does not edit
        portability = {"Subject_Aliasing": [{"prompt": other["rephrase"], "ground_truth": other["answers"][0]}]}
        if i < 2:
            portability["Reasoning"] = [{"prompt": other["src"], "ground_truth": other["answers"][0]}]
        rows.append({"subject": r["subject"], "target_new": r["alt"], "prompt": r["src"], "ground_truth": r["answers"],
                     "rephrase_prompt": r["rephrase"], "portability": portability,
                     "locality": {"Relation_Specificity": [{"prompt": r["loc"], "ground_truth": [r["loc_ans"]]}]}})
    (tmp_path / "knowedit.json").write_text(json.dumps(rows))
    dm = ZsREDataModule(source=str(tmp_path / "knowedit.json"), tokenizer=str(root / "model"), num_updates=2,
                        edits_per_update=2, shuffle_seed=None, batch_size=2)
    module = EditModule(model_name_or_path=str(root / "model"), method="lora", lora=LoraSettings(r=2, alpha=4),
                        optimizer=OptimizerSettings(learning_rate=1e-2, warmup_steps=1),
                        evaluation=EvaluationSettings(max_new_tokens=2))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[EditReport(output_dir=str(tmp_path / "run"))], **round_protocol(2, 1))
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=dm)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    summary = metrics["summary"]
    for name in ("portability_token_acc", "portability_gen", "portability_subject_aliasing_token_acc",
                 "portability_reasoning_token_acc", "locality_relation_specificity_token_acc", "locality_token_acc"):
        assert 0.0 <= summary["after_last_round"][name] <= 1.0, name
        assert name in summary["final"] and name in metrics["protocol"]["metrics"], name
    assert summary["edit_rounds"]["portability_reasoning_token_acc"] == [0]  # only round 0's edits have one
    assert summary["edit_rounds"]["portability_subject_aliasing_token_acc"] == [0, 1]
    assert "portability_reasoning_token_acc" in summary["forgetting"]
    table = next(r.getMessage() for r in caplog.records if "immediate   final  forgetting" in r.getMessage())
    assert "portability_reasoning_token_acc" in table  # the end-of-run table
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
