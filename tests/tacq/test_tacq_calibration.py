import json

import pytest
import torch

from data.loaders import ResumableLoader
from lit_common.tokenization import IGNORE_INDEX
from lit_tacq.calibration import (
    CalibrationDataModule,
    collate_one,
    read_task_records,
    task_examples,
    text_windows,
)


def test_task_examples_are_whole_seeded_and_within_budget(tiny):
    records = read_task_records(tiny.task_qa, "calibration")
    examples = task_examples(records, tiny.tokenizer, token_budget=300, seed=3)
    lengths = [len(e) for e in examples]
    assert sum(lengths) <= 300 < sum(lengths) + 20  # stops only when the next example would not fit
    again = task_examples(records, tiny.tokenizer, token_budget=300, seed=3)
    other = task_examples(records, tiny.tokenizer, token_budget=300, seed=4)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(examples, again))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(examples, other))
    whole = {tuple(tiny.tokenizer(f"{r['prompt']} {r['answer']}")["input_ids"]) for r in records}
    assert all(tuple(e.input_ids.tolist()) in whole for e in examples)  # prompt + answer, never truncated
    assert all(torch.equal(e.labels, e.input_ids) for e in examples)  # the loss covers every token by default


def test_answer_only_masks_the_prompt(tiny):
    records = read_task_records(tiny.task_qa, "calibration")[:1]
    (example,) = task_examples(records, tiny.tokenizer, token_budget=1000, answer_only=True)
    answer_ids = tiny.tokenizer(" " + records[0]["answer"], add_special_tokens=False)["input_ids"]
    kept = example.labels[example.labels != IGNORE_INDEX].tolist()
    assert kept == answer_ids
    assert example.labels[: len(example) - len(answer_ids)].eq(IGNORE_INDEX).all()


def test_read_task_records_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "p", "answer": "a", "split": "calibration"}) + "\n"
                    + json.dumps({"prompt": "p", "split": "calibration"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl: record 1: field 'answer'"):  # the second line
        read_task_records(path)


def test_text_windows_are_seeded_windows_of_the_text():
    ids = torch.arange(1000)
    windows = text_windows(ids, window=64, count=5, seed=0)
    assert [len(w) for w in windows] == [64] * 5
    assert all(torch.equal(w, torch.arange(w[0], w[0] + 64)) for w in windows)
    assert all(torch.equal(a, b) for a, b in zip(windows, text_windows(ids, 64, 5, seed=0)))
    with pytest.raises(ValueError, match="fewer than one window"):
        text_windows(torch.arange(10), window=64, count=1)


def test_resumable_loader_skips_what_was_done():
    items = [torch.tensor([i]) for i in range(7)]
    loader = ResumableLoader(items, batch_size=1)
    iterator = iter(loader)
    seen = [next(iterator).item() for _ in range(3)]
    state = loader.state_dict()
    assert seen == [0, 1, 2] and state == {"batches_done": 3}

    resumed = ResumableLoader(items, batch_size=1)
    resumed.load_state_dict(state)
    assert [b.item() for b in resumed] == [3, 4, 5, 6]
    assert [b.item() for b in resumed] == list(range(7))  # the next epoch starts from the beginning


def test_datamodule_pads_for_ddp_without_repeating(tiny):
    dm = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=200)
    dm.setup()

    class FakeTrainer:
        world_size = 4

    dm.trainer = FakeTrainer()
    batches = list(dm.train_dataloader())
    assert len(batches) % 4 == 0
    real = [b for b in batches if b["input_ids"].numel()]
    assert len(real) == len(dm.examples) and len(batches) - len(real) < 4
    with pytest.raises(ValueError, match="one example"):
        collate_one([dm.examples[0], dm.examples[1]])


def test_general_mode_windows_and_text_evaluation(tiny):
    dm = CalibrationDataModule(tiny.corpus, mode="general", model_name_or_path=tiny.model_dir, token_budget=256,
                               window=32, eval_source=tiny.corpus, eval_windows=3)
    dm.setup()
    assert [len(e) for e in dm.examples] == [32] * 8
    evaluation = dm.evaluation_data()
    assert not evaluation.pairs and [len(w) for w in evaluation.windows] == [32] * 3


def test_task_evaluation_uses_the_evaluation_split(tiny):
    dm = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir)
    expected = [(r["prompt"], r["answer"]) for r in read_task_records(tiny.task_qa, "evaluation")]
    assert dm.evaluation_data().pairs == expected


def test_resuming_against_other_data_fails(tiny):
    saved = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=200).state_dict()
    same = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=200)
    same.load_state_dict(saved)
    other = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=200, seed=1)
    with pytest.raises(ValueError, match="other examples"):
        other.load_state_dict(saved)
