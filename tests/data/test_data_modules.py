"""DataModules: rounds, tokenisation with prompt/answer masking, batches, and round state across a
save/restore."""

import json
import re

import pytest

from data.base import EditDataModule
from data.code_update import CodeUpdateDataModule
from data.counterfact import CounterFactDataModule
from data.formats import DataFormatError, RecordError
from data.world_model import build_tokenizer
from data.world_writers import code_update_records, counterfact_records, zsre_records
from data.zsre import ZsREDataModule
from lit_common.sources import load_causal_lm, load_tokenizer, locate
from lit_common.tokenization import IGNORE_INDEX


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    build_tokenizer(world).save_pretrained(root / "tokenizer")
    (root / "cf.json").write_text(json.dumps(counterfact_records(world, 12)))
    (root / "zsre.json").write_text(json.dumps(zsre_records(world, 12)))
    (root / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in code_update_records(world)))
    return root


def _cf(files, **kwargs) -> CounterFactDataModule:
    defaults = dict(source=str(files / "cf.json"), tokenizer=str(files / "tokenizer"), num_updates=3,
                    edits_per_update=4, batch_size=4)
    dm = CounterFactDataModule(**{**defaults, **kwargs})
    dm.setup("fit")
    return dm


def test_rounds_partition_the_edits(files):
    dm = _cf(files)
    assert [len(r) for r in dm.rounds] == [4, 4, 4]
    ids = [r.record_id for round_ in dm.rounds for r in round_]
    assert len(set(ids)) == 12
    assert len(dm.eval_probes(0)) < len(dm.eval_probes(1)) < len(dm.eval_probes(2))
    assert {p.edit_round for p in dm.eval_probes(2)} == {0, 1, 2}


def test_too_few_records_for_the_rounds(files):
    with pytest.raises(ValueError, match="4 rounds of 4 edits need 16 records, the data has 12"):
        _cf(files, num_updates=4)


def test_round_of_epoch(files):
    dm = _cf(files, epochs_per_update=2)
    assert [dm.round_of_epoch(e) for e in range(7)] == [0, 0, 1, 1, 2, 2, 2]


def test_training_batch_masks_prompt_and_padding(files):
    dm = _cf(files)
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    chosen, rejected = batch["chosen"], batch["rejected"]
    assert chosen["input_ids"].shape == rejected["input_ids"].shape  # one width: can run as one 2B batch
    requests = {r.request_id: r for r in dm.all_requests(0)}
    for row, request_id in enumerate(batch["request_id"].tolist()):
        request = requests[request_id]
        labels = chosen["labels"][row]
        answer = labels[labels != IGNORE_INDEX].tolist()
        assert answer == request.new_ids
        first = (labels != IGNORE_INDEX).nonzero()[0].item()
        assert chosen["input_ids"][row, :first].tolist() == request.prompt_ids  # prompt then answer
        assert chosen["input_ids"][row, 0].item() == tok.bos_token_id
        assert rejected["labels"][row][rejected["labels"][row] != IGNORE_INDEX].tolist() == request.old_ids
        padding = chosen["attention_mask"][row] == 0
        assert (chosen["labels"][row][padding] == IGNORE_INDEX).all()
    assert batch["has_rejected"].all()


def test_multi_token_answers_decode_back(files):
    dm = _cf(files)
    for request in dm.all_requests(2):
        record_new = dm.tokenizer.decode(request.new_ids)
        assert record_new.strip() != "" and "<unk>" not in record_new
    multi = [r for r in dm.all_requests(2) if len(r.new_ids) > 1 or (r.old_ids and len(r.old_ids) > 1)]
    assert multi, "the world has multi-token objects; some edit should involve one"


def test_eval_batch_has_left_padded_prompts(files):
    dm = _cf(files)
    dm.current_round = 1
    batches = list(dm.val_dataloader())
    assert sum(len(b["probes"]) for b in batches) == len(dm.eval_probes(1))
    batch = batches[0]
    prompt = batch["prompt"]
    assert (prompt["attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the right edge
    for row, probe in enumerate(batch["probes"]):
        ids = prompt["input_ids"][row][prompt["attention_mask"][row] == 1].tolist()
        assert dm.tokenizer.decode(ids, skip_special_tokens=True) == " ".join(dm.tokenizer.tokenize(probe.prompt))
    kinds = set(batch["kind"].tolist())
    assert len(kinds) >= 2


def test_round_state_survives_save_and_restore(files):
    dm = _cf(files)
    dm.current_round = 2
    state = dm.state_dict()
    restored = _cf(files)
    restored.load_state_dict(state)
    assert restored.current_round == 2
    assert [len(b["probes"]) for b in restored.val_dataloader()] == [len(b["probes"]) for b in dm.val_dataloader()]


def test_restore_against_other_data_fails(files):
    state = _cf(files).state_dict()
    other = _cf(files, shuffle_seed=123)
    with pytest.raises(ValueError, match="different edit data"):
        other.load_state_dict(state)


def test_restore_with_other_round_settings_fails(files):
    state = _cf(files).state_dict()
    other = _cf(files, batch_size=2)
    with pytest.raises(ValueError, match="batch_size 4 vs 2.*--ckpt_path null"):
        other.load_state_dict(state)


@pytest.mark.parametrize("setting, value, message", [
    ("limit", -1, "data limit must be a positive integer or null, got -1"),
    ("batch_size", 0, "data batch_size must be a positive integer, got 0"),
    ("max_length", 1, "data max_length must hold a prompt token and an answer token"),
])
def test_bad_data_settings_fail_at_configuration(files, setting, value, message):
    with pytest.raises(ValueError, match=message):
        CounterFactDataModule(source=str(files / "cf.json"), tokenizer=str(files / "tokenizer"), **{setting: value})


def test_a_prompt_longer_than_max_length_names_its_record_instead_of_being_cut(files):
    with pytest.raises(DataFormatError, match=r"cf.json: record \S+: prompt and answer take \d+ \+ \d+ tokens, more "
                                              r"than max_length=6; raise data.init_args.max_length"):
        _cf(files, max_length=6)


def test_zsre_and_code_datamodules(files):
    zsre = ZsREDataModule(source=str(files / "zsre.json"), tokenizer=str(files / "tokenizer"), num_updates=2)
    zsre.setup("fit")
    assert [len(r) for r in zsre.rounds] == [6, 6]
    batch = next(iter(zsre.val_dataloader()))
    assert "locality" in {p.kind for p in batch["probes"]}

    code = CodeUpdateDataModule(source=str(files / "code.jsonl"), tokenizer=str(files / "tokenizer"),
                                num_updates=2, edits_per_update=2)
    code.setup("fit")
    batch = next(iter(code.train_dataloader()))
    assert batch["chosen"]["input_ids"].shape[0] == 4  # 2 updates x 2 training examples
    programs = [p for p in code.eval_probes(0) if p.probe.kind == "program"]
    assert programs and all(p.probe.program.unit_tests for p in programs)


def test_setup_failure_leaves_nothing_half_built(files, tmp_path):
    rows = json.loads((files / "cf.json").read_text())
    rows[7]["paraphrase_prompts"] = []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    dm = CounterFactDataModule(source=str(bad), tokenizer=str(files / "tokenizer"), num_updates=3)
    with pytest.raises(RecordError, match=r"bad\.json: record 7: field 'paraphrase_prompts'"):
        dm.setup("fit")
    assert dm.rounds == [] and dm.state_dict()["records_fingerprint"] is None


def test_unknown_hub_id_fails_clearly(files):
    dm = CounterFactDataModule(source="nobody/no-such-dataset", tokenizer=str(files / "tokenizer"))
    with pytest.raises(DataFormatError, match="nobody/no-such-dataset: not a local file and could not be loaded"):
        dm.setup("fit")


@pytest.mark.parametrize("source", ["./cf_typo.json", "data/real/cf_typo.json", "cf_typo.json", "../edits/cf",
                                    "~/cf.json", "/no/such/cf.json"])
def test_a_mistyped_path_fails_at_once_without_the_hub(files, monkeypatch, source):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail(f"{source} was sent to the hub"))
    dm = CounterFactDataModule(source=source, tokenizer=str(files / "tokenizer"))
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(source)}: no such file or directory .*not a hub id"):
        dm.setup("fit")


def test_hub_shaped_names_still_go_to_the_hub_and_paths_to_disk(files):
    assert locate("wangzn2001/zsre") == "wangzn2001/zsre"
    assert locate("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert locate(str(files / "cf.json")) == str(files / "cf.json")
    with pytest.raises(FileNotFoundError, match=r"models/smollm2/typo: no such file"):
        load_tokenizer("models/smollm2/typo")
    with pytest.raises(FileNotFoundError, match=r"\./models/typo: no such file"):
        load_causal_lm("./models/typo")


def test_a_directory_source_is_named_as_one(files):
    dm = CounterFactDataModule(source=str(files), tokenizer=str(files / "tokenizer"))
    with pytest.raises(DataFormatError, match=r": is a directory; expected a \.json or \.jsonl file"):
        dm.setup("fit")


def test_zsre_edit_target_is_checked_at_configuration(files):
    with pytest.raises(ValueError, match=r"data edit_target must be one of \('alt', 'answers'\).*got 'new'"):
        ZsREDataModule(source=str(files / "zsre.json"), tokenizer=str(files / "tokenizer"), edit_target="new")


def test_base_class_requires_a_format(files):
    with pytest.raises(NotImplementedError):
        EditDataModule(source=str(files / "cf.json"), tokenizer=str(files / "tokenizer")).setup("fit")


def test_answer_tokenizer_with_chat_template(files):
    from transformers import AutoTokenizer

    from lit_common.tokenization import AnswerTokenizer

    tokenizer = AutoTokenizer.from_pretrained(files / "tokenizer")
    # roles spelled with words the world's vocabulary knows: "Write" opens a user turn, "return" an answer
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}Write {{ m['content'] }} ."
                               "{% else %}return {{ m['content'] }} .{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}return{% endif %}")
    prompt_ids, answer_ids = AnswerTokenizer(tokenizer, chat_template=True).encode("Where was Varrow ?", "Tolvik")
    assert tokenizer.decode(prompt_ids) == "Write Where was Varrow ? . return"
    assert tokenizer.decode(answer_ids) == "Tolvik ."
    with pytest.raises(ValueError, match="no chat template"):
        AnswerTokenizer(AutoTokenizer.from_pretrained(files / "tokenizer"), chat_template=True)
