import json

import pytest
import torch

from data.loaders import ResumableLoader
from lit_common.tokenization import IGNORE_INDEX
from lit_tacq.calibration import (
    CalibrationDataModule,
    collate_one,
    read_task_records,
    read_text,
    task_examples,
    text_windows,
    tokenize_text,
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


def test_a_local_text_splits_into_disjoint_parts(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("".join(f"line {i}\n\n" for i in range(20)))  # blank lines are not documents
    train, test = (read_text(str(path), split).splitlines() for split in ("train", "test"))
    assert test == ["line 9", "line 19"] and train == [f"line {i}" for i in range(20) if i % 10 != 9]
    assert read_text(str(path), "calibration") == read_text(str(path), "train")
    assert read_text(str(path), "evaluation") == read_text(str(path), "test")
    assert read_text(str(path), "all").splitlines() == [f"line {i}" for i in range(20)]

    path.write_text("".join(f"line {i}\n" for i in range(1000)))  # 50 blocks of 20 lines: every tenth is test
    test = read_text(str(path), "test").splitlines()
    assert test == [f"line {i}" for i in range(1000) if i // 20 % 10 == 9] and len(test) == 100
    assert test[0] == "line 180" and test[-1] == "line 999"  # spread over the file, not its tail
    with pytest.raises(ValueError, match=r"text.txt is a local text, whose splits are .*not 'validation'"):
        read_text(str(path), "validation")


def _windows_of(ids: torch.Tensor, window: int) -> set[tuple[int, ...]]:
    return {tuple(w.tolist()) for w in ids.unfold(0, window, 1)}


def test_general_calibration_and_text_evaluation_never_share_text(tiny):
    dm = CalibrationDataModule(tiny.corpus, mode="general", split="train", model_name_or_path=tiny.model_dir,
                               token_budget=256, window=32, eval_source=tiny.corpus, eval_split="test", eval_windows=3)
    dm.setup()
    train = tokenize_text(read_text(tiny.corpus, "train"), dm.tokenizer)
    test = tokenize_text(read_text(tiny.corpus, "test"), dm.tokenizer)
    assert all(tuple(e.input_ids.tolist()) in _windows_of(train, 32) for e in dm.examples)
    windows = dm.evaluation_data().windows
    last = len(test) - 32  # evenly spaced from the start to the end of the test part
    assert [w.tolist() for w in windows] == [test[s : s + 32].tolist() for s in (0, last // 2, last)]
    assert not {tuple(w.tolist()) for w in windows} & _windows_of(train, 32)


def test_eval_text_adds_perplexity_windows_to_a_task_evaluation(tiny):
    plain = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir).evaluation_data()
    assert plain.pairs and not plain.windows  # unset: as before
    dm = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, window=32, eval_windows=4,
                               eval_text=tiny.corpus)
    both = dm.evaluation_data()
    assert both.pairs == plain.pairs
    test = tokenize_text(read_text(tiny.corpus, "test"), dm.tokenizer)
    starts = [i * (len(test) - 32) // 3 for i in range(4)]
    assert [w.tolist() for w in both.windows] == [test[s : s + 32].tolist() for s in starts]
    assert all(b - a >= 32 for a, b in zip(starts, starts[1:]))  # never overlapping
    twice = CalibrationDataModule(tiny.corpus, mode="general", model_name_or_path=tiny.model_dir, window=32,
                                  eval_source=tiny.corpus, eval_text=tiny.corpus)
    with pytest.raises(ValueError, match="is text already: set one of them"):
        twice.evaluation_data()
    short = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, window=10**6, eval_text=tiny.corpus)
    with pytest.raises(ValueError, match=r"corpus.txt \(test\) has \d+ tokens, fewer than one window of 1000000"):
        short.evaluation_data()


def _task_file(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_task_records_with_and_without_alternatives(tiny, tmp_path):
    records = read_task_records(tiny.task_qa)
    answers = [r["answer"] for r in records]
    with_alternatives = [{**r, "alternative": answers[i - 1]} for i, r in enumerate(records)]
    path = _task_file(tmp_path / "alt.jsonl", with_alternatives)
    data = CalibrationDataModule(path, model_name_or_path=tiny.model_dir).evaluation_data()
    evaluation = [r for r in with_alternatives if r["split"] == "evaluation"]
    assert data.pairs == [(r["prompt"], r["answer"]) for r in evaluation]
    assert data.alternatives == [r["alternative"] for r in evaluation]
    assert not CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir).evaluation_data().alternatives
    calibration = CalibrationDataModule(path, model_name_or_path=tiny.model_dir, token_budget=300)
    plain = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=300)
    assert calibration.fingerprint() == plain.fingerprint()  # alternatives are never calibrated on

    mixed = [dict(r) for r in with_alternatives]
    missing = next(i for i, r in enumerate(mixed) if r["split"] == "evaluation" and i > 0)
    del mixed[missing]["alternative"]
    path = _task_file(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(ValueError, match=rf"mixed.jsonl: record {missing}: field 'alternative': expected a non-empty "
                                         r"string, as record \d+ of the same split has one"):
        read_task_records(path, "evaluation")
    mixed[missing]["alternative"] = " "
    with pytest.raises(ValueError, match=rf"record {missing}: field 'alternative': expected a non-empty string"):
        read_task_records(_task_file(tmp_path / "blank.jsonl", mixed))


def test_a_mistyped_text_path_fails_at_once(tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise AssertionError("a file path went to the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for typo in (str(tmp_path / "wiki.utf8.txt"), "./calib.txt", "data/real/no_such/file.jsonl"):
        with pytest.raises(FileNotFoundError, match="no such file or directory"):
            read_text(typo)


def test_mixed_calibration_takes_its_share_of_text_windows_and_fills_the_rest_with_task_examples(tiny):
    task_only = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=256, window=32)
    mixed = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=256, window=32,
                                  general_source=tiny.corpus, general_share=0.25)
    task_only.setup()
    mixed.setup()
    train = _windows_of(tokenize_text(read_text(tiny.corpus, "train"), mixed.tokenizer), 32)
    windows = [e for e in mixed.examples if tuple(e.input_ids.tolist()) in train]
    assert len(windows) == 2 and all(torch.equal(e.labels, e.input_ids) for e in windows)  # 0.25 x 256 / 32
    facts = mixed.examples[: len(mixed.examples) - 2]
    assert sum(map(len, facts)) <= 256 - 64 < sum(map(len, task_only.examples))
    assert [e.input_ids.tolist() for e in facts] == [e.input_ids.tolist() for e in task_only.examples[: len(facts)]]
    assert mixed.fingerprint() != task_only.fingerprint()


@pytest.mark.parametrize("settings, match", [
    ({"general_source": "corpus", "general_share": 0.0}, r"general_share=0.0 .*\(0, 1\)"),
    ({"general_source": "corpus", "general_share": 1}, r"general_share=1 "),
    ({"general_share": 0.5}, r"general_share=0.5 with general_source=None"),
    ({"general_source": "corpus", "general_share": 0.5, "mode": "general"}, "general mode is text alone"),
])
def test_mixed_calibration_settings_are_checked(tiny, settings, match):
    settings = {**settings, "general_source": tiny.corpus} if "general_source" in settings else settings
    with pytest.raises(ValueError, match=match):
        CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, **settings)


def test_mixed_windows_that_fill_the_budget_are_an_error(tiny):
    dm = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=32, window=32,
                               general_source=tiny.corpus, general_share=0.9)
    with pytest.raises(ValueError, match="fill the whole budget of 32"):
        dm.setup()


def test_a_budget_below_one_example_says_so(tiny):
    dm = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=3)
    with pytest.raises(ValueError, match="token_budget=3 is smaller than the first example"):
        dm.setup()
