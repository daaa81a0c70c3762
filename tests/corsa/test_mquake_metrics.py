"""MQuAKE's accuracies: the answer match, the per-case rules, the evaluator against hand-computed cases (aliases
and case-insensitive matches included), and one short run of the product on the world's MQuAKE file."""

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from data.mquake import MQuAKEDataModule
from data.world import CHAINS
from data.world_model import build_tokenizer
from lit_corsa.evaluation import PROTOCOLS, ProbeEvaluator, metric_names
from lit_corsa.metrics import CaseAccuracy, answer_matches
from lit_corsa.settings import EvaluationSettings

HOP_METRICS = {"edit_wise_acc", "instance_wise_acc", "multi_hop_acc"}


@pytest.mark.parametrize("generation, answers, expected", [
    ("United Kingdom", ["United Kingdom"], True),
    ("  united KINGDOM\n and more", ["United Kingdom"], True),  # case-insensitive, first line, stripped
    ("United Kingdom . It is", ["United Kingdom"], True),  # a base model continues past the answer
    ("Britain", ["United Kingdom", "UK", "Britain"], True),  # an alias
    ("Ukraine", ["United Kingdom", "UK"], False),  # a prefix of a longer word is not the answer
    ("The United Kingdom", ["United Kingdom"], False),  # ... nor is an answer further in (MQuAKE's equality)
    ("United\n Kingdom", ["United Kingdom"], False),  # the answer must be on the first line
    ("the   Tessel\tIsles .", ["the Tessel Isles"], True),  # whitespace runs count as one space
    ("", ["Ostmark"], False),
])
def test_answer_matches(generation, answers, expected):
    assert answer_matches(generation, answers) is expected


def test_an_empty_answer_is_an_error():
    with pytest.raises(ValueError, match="empty expected answer"):
        answer_matches("anything", [" "])


def test_case_rules_by_hand():
    cases = torch.tensor([7, 7, 3, 3, 3, 9])
    hits = torch.tensor([True, True, True, False, False, False])
    expected = {"all": 1 / 3, "any": 2 / 3, "each": 3 / 6}  # case 7 all; 3 some; 9 none
    for rule, value in expected.items():
        metric = CaseAccuracy(rule)
        metric.update(cases[:3], hits[:3])  # a case's probes may come in different batches
        metric.update(cases[3:], hits[3:])
        assert float(metric.compute()) == pytest.approx(value), rule
    with pytest.raises(ValueError, match="rule must be one of"):
        CaseAccuracy("most")


def mquake_case(case_id, rewrites, questions, new_answer, hops, aliases=()):
    return {"case_id": case_id, "questions": questions, "new_answer": new_answer, "new_answer_alias": list(aliases),
            "answer": "x", "answer_alias": [],
            "requested_rewrite": [{"prompt": p, "subject": s, "relation_id": r, "question": "q",
                                   "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": old, "id": "Q2"}}
                                  for p, s, r, new, old in rewrites],
            "new_single_hops": [{"question": q, "cloze": q, "answer": a, "answer_alias": list(al)} for q, a, al in hops],
            "single_hops": []}


def hand_cases(world):
    """Three cases over world names (every prompt in the world tokenizer's words), with what the stand-in model
    generates for each prompt, and the scores worked out by hand."""
    s0, s1, s2 = world.subjects[:3]
    c0 = [q.format(s0) for q in CHAINS[0].questions]
    c1 = [q.format(s1) for q in CHAINS[1].questions]
    cases = [
        mquake_case(10, [("{} is a citizen of", s0, "P27", "the Tessel Isles", "Ardenia"),
                         ("The common language of {} is", "the Tessel Isles", "P37", "Velsh", "Dunari")],
                    c0, "Velsh", [(f"Which country is {s0} a citizen of?", "the Tessel Isles", ["Tessel Isles"]),
                                  ("Which language is common in the Tessel Isles?", "Velsh", [])]),
        mquake_case(11, [("{} was born in", s1, "P19", "Varrow", "Tolvik")], c1, "Ostmark",
                    [(f"Where was {s1} born?", "Varrow", []), ("Which country is Varrow in?", "Ostmark", [])]),
        mquake_case(12, [("{} works as a", s2, "P106", "Baker", "tanner")], [f"Who employs {s2}?"], "TARN PRESS",
                    [(f"What does {s2} do for a living?", "Baker", []), (f"Which company does {s2} work for?", "Tarn Press", [])],
                    aliases=["Tarn"]),
    ]
    said = {
        f"{s0} is a citizen of": "the Tessel Isles .", "The common language of the Tessel Isles is": "Velsh",
        f"Which country is {s0} a citizen of?": "Tessel Isles .",  # an alias
        "Which language is common in the Tessel Isles?": "Velsh .", c0[0]: "Orvanic", c0[1]: "Tamrese", c0[2]: "Velsh .",
        f"{s1} was born in": "Tolvik .", f"Where was {s1} born?": "Varrow", "Which country is Varrow in?": "Ardenia",
        **{q: "Ardenia" for q in c1},
        f"{s2} works as a": "baker .", f"What does {s2} do for a living?": "baker",  # another case than the file's
        f"Which company does {s2} work for?": "Tarn Press .", f"Who employs {s2}?": "Tarn Press .",
    }
    # edit-wise: 2 + 0 + 1 of 4 rewrites; instance-wise: cases 10 and 12; multi-hop: 10 (its third question), 12
    by_case = [{"edit_wise_acc": 1.0, "instance_wise_acc": 1.0, "multi_hop_acc": 1.0},
               {"edit_wise_acc": 0.0, "instance_wise_acc": 0.0, "multi_hop_acc": 0.0},
               {"edit_wise_acc": 1.0, "instance_wise_acc": 1.0, "multi_hop_acc": 1.0}]
    overall = {"edit_wise_acc": 0.75, "instance_wise_acc": 2 / 3, "multi_hop_acc": 2 / 3}
    return cases, said, by_case, overall


class Speaker(nn.Module):
    """A stand-in for the edited model that generates, greedily, the text the test chose for each prompt."""

    def __init__(self, tokenizer, said):
        super().__init__()
        self.tokenizer = tokenizer
        self.said = {"".join(prompt.split()): text for prompt, text in said.items()}

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, len(self.tokenizer)))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = self.tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=True)
            answer = self.tokenizer(self.said["".join(prompt.split())], add_special_tokens=False)["input_ids"]
            rows.append(ids + (answer + [self.tokenizer.eos_token_id] * max_new_tokens)[:max_new_tokens])
        return torch.tensor(rows)


@pytest.mark.parametrize("generation", [True, False])
def test_mquake_accuracies_by_hand(world, tmp_path, generation):
    """Each case its own round; batches of 5 mix cases and kinds. With ``generation`` off the MQuAKE accuracies
    are still generated (they have no other measurement), the other ``*_gen`` metrics are not."""
    cases, said, by_case, overall = hand_cases(world)
    build_tokenizer(world).save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    dm = MQuAKEDataModule(str(tmp_path / "cases.json"), tokenizer=str(tmp_path / "tokenizer"), shuffle_seed=None,
                          num_updates=3, edits_per_update=1, eval_batch_size=5)
    dm.setup()
    dm.current_round = 2
    evaluator = ProbeEvaluator(3, EvaluationSettings(max_new_tokens=4, generation=generation))
    model = Speaker(dm.tokenizer, said)
    for batch in dm.val_dataloader():
        evaluator.update(model, batch, dm.tokenizer)
    names = {r: metric_names((p.probe for p in dm.eval_probes(r) if p.edit_round == r), generation) for r in range(3)}
    assert all(HOP_METRICS <= n and ("reliability_gen" in n) == generation for n in names.values())
    scores = evaluator.compute(2, names)
    assert {k: scores.all[k] for k in HOP_METRICS} == pytest.approx(overall)
    for r in range(3):
        assert {k: scores.by_edit_round[r][k] for k in HOP_METRICS} == pytest.approx(by_case[r]), r
    assert HOP_METRICS <= set(PROTOCOLS)


def test_an_mquake_run_reports_its_accuracies_and_restarts_the_schedule_every_round(tiny_assets, tmp_path, caplog):
    """Through the product, on the (tiny) world's MQuAKE file: rounds of 5, 4 and 5 rewrites, each round's first
    step at the full learning rate (warm-up 1), and the three accuracies in metrics.json, table and plot."""
    import lightning.pytorch as L

    from callbacks.edit_report import EditReport
    from data.base import round_protocol
    from lit_corsa.module import EditModule
    from lit_corsa.settings import LoraSettings, OptimizerSettings

    root, _ = tiny_assets

    class RoundStartRates(L.Callback):
        def __init__(self):
            self.rates = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:  # one epoch per round
                self.rates[trainer.current_epoch] = trainer.optimizers[0].param_groups[0]["lr"]

    dm = MQuAKEDataModule(source=str(root / "world" / "mquake.json"), tokenizer=str(root / "model"), num_updates=3,
                          edits_per_update=3, shuffle_seed=None, batch_size=1)
    module = EditModule(model_name_or_path=str(root / "model"), method="lora", lora=LoraSettings(r=2, alpha=4),
                        optimizer=OptimizerSettings(learning_rate=1e-2, warmup_steps=1),
                        evaluation=EvaluationSettings(max_new_tokens=3, generation=False))
    rates = RoundStartRates()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[EditReport(output_dir=str(tmp_path / "run")), rates], **round_protocol(3, 1))
    with caplog.at_level(logging.INFO):
        trainer.fit(module, datamodule=dm)
    assert [len(dm.requests_of_round(k)) for k in range(3)] == [5, 4, 5]  # cases of 2, 1, 2, 1, ... rewrites
    assert dm.optimizer_steps_per_round(1, 1) == [5, 4, 5]
    assert rates.rates == {k: pytest.approx(1e-2) for k in range(3)}  # not round 0's length as the period
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    summary = metrics["summary"]
    for name in HOP_METRICS:
        assert 0.0 <= summary["after_last_round"][name] <= 1.0, name
        assert name in summary["forgetting"] and name in metrics["protocol"]["metrics"], name
    table = next(r.getMessage() for r in caplog.records if "immediate   final  forgetting" in r.getMessage())
    assert all(name in table for name in HOP_METRICS)
    assert (tmp_path / "run" / "metrics.png").stat().st_size > 10_000
