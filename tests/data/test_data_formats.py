"""Every reader on good records and on each kind of bad record, with the error text asserted."""

import copy
import json

import pytest

from data.code_update import (
    join_solution,
    parse_code_update_rows,
    solution_body,
    split_unit_tests,
)
from data.counterfact import parse_counterfact_rows
from data.formats import DataFormatError, RecordError, read_records
from data.world_writers import code_update_records, counterfact_records, zsre_records
from data.zsre import parse_zsre_rows


@pytest.fixture(scope="module")
def cf_rows(world):
    return counterfact_records(world, 6)


@pytest.fixture(scope="module")
def zsre_rows(world):
    return zsre_records(world, 6)


@pytest.fixture(scope="module")
def code_rows(world):
    return code_update_records(world)[:3]


def _write(tmp_path, name, rows):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path


# ---- files ---------------------------------------------------------------------------------------------

def test_read_json_and_jsonl(tmp_path, cf_rows, code_rows):
    assert read_records(_write(tmp_path, "cf.json", cf_rows)) == cf_rows
    assert read_records(_write(tmp_path, "code.jsonl", code_rows)) == code_rows


def test_non_utf8_file_names_file_and_byte(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"src": "caf\xe9"}]')
    with pytest.raises(DataFormatError, match=r"bad\.json: not valid UTF-8 \(byte 13"):
        read_records(path)


def test_truncated_json_names_file_and_position(tmp_path, cf_rows):
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(cf_rows)[:-40])
    with pytest.raises(DataFormatError, match=r"cut\.json: invalid JSON at line 1 column \d+: .*truncated"):
        read_records(path)


def test_truncated_jsonl_names_the_line(tmp_path, code_rows):
    path = tmp_path / "cut.jsonl"
    text = "".join(json.dumps(r) + "\n" for r in code_rows)
    path.write_text(text[:-30])
    with pytest.raises(DataFormatError, match=r"cut\.jsonl: line 3: invalid JSON"):
        read_records(path)


def test_json_that_is_not_a_list_of_objects(tmp_path):
    path = tmp_path / "obj.json"
    path.write_text('{"a": 1}')
    with pytest.raises(DataFormatError, match="expected a JSON list of records, got dict"):
        read_records(path)
    path.write_text('[{"a": 1}, 3]')
    with pytest.raises(RecordError, match=r"record 1: field '<record>': expected a JSON object, got 3"):
        read_records(path)


def test_missing_file():
    with pytest.raises(DataFormatError, match="no such file"):
        read_records("/nonexistent/cf.json")


def test_a_directory_is_named_as_one(tmp_path):
    with pytest.raises(DataFormatError, match=r": is a directory; expected a \.json or \.jsonl file"):
        read_records(tmp_path)


# ---- CounterFact -----------------------------------------------------------------------------------------

def test_counterfact_good_records(cf_rows):
    records = parse_counterfact_rows(cf_rows, "cf.json")
    assert len(records) == 6
    row, record = cf_rows[0], records[0]
    rewrite = row["requested_rewrite"]
    prompt = rewrite["prompt"].format(rewrite["subject"])
    assert record.requests[0].prompt == prompt
    assert record.requests[0].target_new == rewrite["target_new"]["str"]
    assert record.requests[0].target_old == rewrite["target_true"]["str"]
    kinds = [p.kind for p in record.probes]
    assert kinds.count("paraphrase") == len(row["paraphrase_prompts"])
    assert kinds.count("neighborhood") == len(row["neighborhood_prompts"])
    neighbour = next(p for p in record.probes if p.kind == "neighborhood")
    assert (neighbour.target, neighbour.contrast) == (rewrite["target_true"]["str"], rewrite["target_new"]["str"])


def test_counterfact_easyedit_layout():
    row = {"case_id": 3, "prompt": "The mother tongue of A B is", "target_new": "Velsh", "subject": "A B",
           "ground_truth": "Orvanic", "rephrase_prompt": "A B grew up speaking",
           "locality_prompt": "C D grew up speaking", "locality_ground_truth": "Dunari"}
    (record,) = parse_counterfact_rows([row], "ee.json")
    assert record.record_id == "counterfact-easyedit:3"
    assert [(p.kind, p.target) for p in record.probes] == [
        ("efficacy", "Velsh"), ("paraphrase", "Velsh"), ("neighborhood", "Dunari")]


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["requested_rewrite"].pop("subject"), "field 'requested_rewrite.subject': expected a non-empty string, missing"),
    (lambda r: r["requested_rewrite"]["target_new"].update(str=7), "field 'requested_rewrite.target_new.str': expected a non-empty string, got 7"),
    (lambda r: r.update(paraphrase_prompts=[]), "field 'paraphrase_prompts': expected a list of non-empty strings (at least one), got []"),
    (lambda r: r["requested_rewrite"].update(prompt="The mother tongue is"), "field 'requested_rewrite.prompt': expected a prompt with exactly one '{}'"),
    (lambda r: r.update(neighborhood_prompts="one prompt"), "field 'neighborhood_prompts': expected a list of non-empty strings, got 'one prompt'"),
    (lambda r: r.update(paraphrase_prompts=["ok", ""]), "field 'paraphrase_prompts[1]': expected a non-empty string, got ''"),
    (lambda r: r.pop("requested_rewrite"), "field 'requested_rewrite': expected a CounterFact record"),
])
def test_counterfact_bad_records(cf_rows, mutate, message):
    rows = copy.deepcopy(cf_rows)
    mutate(rows[4])
    with pytest.raises(RecordError) as err:
        parse_counterfact_rows(rows, "cf.json")
    assert str(err.value).startswith("cf.json: record 4: ")
    assert message in str(err.value)


# ---- ZsRE ----------------------------------------------------------------------------------------------

def test_zsre_good_records_and_edit_target(zsre_rows):
    rows = copy.deepcopy(zsre_rows)
    rows[1]["alt"] = ""
    by_alt = parse_zsre_rows(rows, "z.json", "alt")
    assert len(by_alt) == 5  # the empty-alt record is skipped
    assert by_alt[0].requests[0].target_new == rows[0]["alt"]
    assert by_alt[0].requests[0].target_old == rows[0]["answers"][0]
    assert [p.kind for p in by_alt[0].probes] == ["efficacy", "paraphrase", "locality"]
    by_answers = parse_zsre_rows(rows, "z.json", "answers")
    assert len(by_answers) == 6
    assert by_answers[1].requests[0].target_new == rows[1]["answers"][0]


def test_zsre_kilt_rows():
    rows = [{"id": "q1", "input": "Where was A B born?", "output": [{"answer": "Varrow"}],
             "alternatives": ["Tolvik"], "rephrases": ["In which town was A B born?"]},
            {"id": "q2", "input": "Where was C D born?", "output": [{"answer": "Varrow"}], "alternatives": []}]
    (record,) = parse_zsre_rows(rows, "hub")
    assert (record.requests[0].target_new, record.requests[0].target_old) == ("Tolvik", "Varrow")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("src"), "field 'src': expected a ZsRE record"),
    (lambda r: r.update(answers=[]), "field 'answers': expected a list of non-empty strings (at least one), got []"),
    (lambda r: r.update(answers="Velsh"), "field 'answers': expected a list of non-empty strings (at least one), got 'Velsh'"),
    (lambda r: r.update(rephrase=None), "field 'rephrase': expected a non-empty string, got None"),
    (lambda r: r.pop("loc_ans"), "field 'loc_ans': expected a non-empty string, missing"),
])
def test_zsre_bad_records(zsre_rows, mutate, message):
    rows = copy.deepcopy(zsre_rows)
    mutate(rows[2])
    with pytest.raises(RecordError) as err:
        parse_zsre_rows(rows, "z.json")
    assert str(err.value).startswith("z.json: record 2: ")
    assert message in str(err.value)


def test_zsre_edit_target_is_checked():
    with pytest.raises(ValueError, match=r"data edit_target must be one of \('alt', 'answers'\).*got 'answer'"):
        parse_zsre_rows([], "z.json", "answer")


def _knowedit_row():
    """A record shaped like KnowEdit's ZsRE release (ground_truth and locality answers as lists)."""
    return {"subject": "Lake Orvanne", "target_new": "Chile", "prompt": "Which country is Lake Orvanne located in?",
            "ground_truth": ["Norway"], "rephrase_prompt": "In what country can Lake Orvanne be found?",
            "cond": "Sweden >> Chile || Which country is Lake Orvanne located in?",
            "locality": {"Relation_Specificity": [{"prompt": "The continent of Lake Orvanne is", "ground_truth": ["Europe"]}]},
            "portability": {"Reasoning": [{"prompt": "What is the capital of the country Lake Orvanne is in?",
                                           "ground_truth": "Santiago"}]}}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(locality=["The continent of Lake Orvanne is"]),
     "field 'locality': expected an object {Relation_Specificity | Forgetfulness: [{prompt, ground_truth}, ...]}, got ["),
    (lambda r: r.update(locality={"Relation_Specifity": []}),
     ("field 'locality': expected KnowEdit's locality sub-kinds as keys (Relation_Specificity, Forgetfulness), "
      "got 'Relation_Specifity'")),
    (lambda r: r["locality"]["Relation_Specificity"][0].pop("ground_truth"),
     "field 'locality.Relation_Specificity[0].ground_truth': expected a non-empty string or a list of them"),
    (lambda r: r.pop("ground_truth"),
     "field 'ground_truth': expected a non-empty string or a list of them (aliases; the first is scored), missing"),
    (lambda r: r.update(ground_truth=7),
     "field 'ground_truth': expected a non-empty string or a list of them (aliases; the first is scored), got 7"),
    (lambda r: r.update(ground_truth=[]), "field 'ground_truth': expected a non-empty string or a list of them"),
    (lambda r: r.update(ground_truth=[""]), "field 'ground_truth': expected a non-empty string or a list of them"),
    (lambda r: r.update(portability="Santiago"),
     "field 'portability': expected an object: EasyEdit's {New Question, New Answer} or KnowEdit's"),
    (lambda r: r.update(portability={"Multi_Hop": []}),
     ("field 'portability': expected KnowEdit's portability sub-kinds as keys (Reasoning, Subject_Aliasing, "
      "Logical_Generalization), got 'Multi_Hop'")),
    (lambda r: r["portability"]["Reasoning"][0].update(prompt=None),
     "field 'portability.Reasoning[0].prompt': expected a non-empty string, got None"),
    (lambda r: r.update(portability={"New Question": "What is the capital?"}),
     "field 'portability.New Answer': expected a non-empty string or a list of them"),
])
def test_knowedit_bad_records(mutate, message):
    rows = [_knowedit_row() for _ in range(3)]
    mutate(rows[1])
    with pytest.raises(RecordError) as err:
        parse_zsre_rows(rows, "knowedit.json")
    assert str(err.value).startswith("knowedit.json: record 1: ")
    assert message in str(err.value)


def test_knowedit_answers_as_strings_or_nested_aliases():
    row = _knowedit_row()
    row["ground_truth"] = "Norway"
    row["portability"]["Reasoning"][0]["ground_truth"] = [["Santiago", "Santiago de Chile"]]
    (record,) = parse_zsre_rows([row], "knowedit.json")
    assert record.requests[0].target_old == "Norway"
    assert record.probes[-1].target == "Santiago"  # the first alias is scored


def test_counterfact_layouts_read_easyedit_portability():
    row = {"case_id": 3, "prompt": "The mother tongue of A B is", "target_new": "Velsh", "subject": "A B",
           "ground_truth": "Orvanic", "rephrase_prompt": "A B grew up speaking",
           "portability": {"New Question": "The language of A B's poems is", "New Answer": "Velsh"}}
    (record,) = parse_counterfact_rows([row], "ee.json")
    assert [(p.kind, p.group, p.target) for p in record.probes][-1] == ("portability", "one_hop", "Velsh")


# ---- code updates ----------------------------------------------------------------------------------------

def test_code_update_grouped_and_hub_rows_agree(code_rows):
    grouped = parse_code_update_rows(code_rows, "arena.jsonl", train_examples=2)
    hub_rows = [{"update": r["update"], "update_id": r["update"]["update_id"], **example}
                for r in code_rows for example in r["prog_syn_examples"]]
    from_rows = parse_code_update_rows(hub_rows, "hub", train_examples=2)
    assert grouped == from_rows
    record = grouped[0]
    assert len(record.requests) == 2
    programs = [p for p in record.probes if p.kind == "program"]
    assert len(programs) == len(code_rows[0]["prog_syn_examples"]) - 2
    assert programs[0].program.function_path == code_rows[0]["update"]["function_path"]
    assert record.requests[0].target_old.startswith("return math.")


def test_solution_helpers():
    assert solution_body("def f(x): return x + 1", "def f(x):") == "return x + 1"
    assert solution_body("import m\ndef f(x):\n    y = x\n    return y\n", "def f(x):") == "\n    y = x\n    return y"
    assert join_solution("def f(x):", "return x") == "def f(x): return x"
    assert join_solution("def f(x):", "\n    return x") == "def f(x):\n    return x"
    assert split_unit_tests("def test_a():\n    assert 1\n\n\ndef test_b():\n    assert 2\n") == (
        "def test_a():\n    assert 1", "def test_b():\n    assert 2\n")


@pytest.mark.parametrize("mutate, field, message", [
    (lambda r: r["update"].pop("implementation"), "update.implementation", "expected a non-empty string, missing"),
    (lambda r: r["update"].update(function_path="sqrt"), "update.function_path", "expected a dotted path"),
    (lambda r: r.update(prog_syn_examples=[]), "prog_syn_examples", "expected a list of objects (at least one), got []"),
    (lambda r: r["prog_syn_examples"][1].update(unit_tests=[]), "prog_syn_examples[1].unit_tests", "expected test sources"),
    (lambda r: r["prog_syn_examples"][0].update(problem=3), "prog_syn_examples[0].problem", "expected a non-empty string, got 3"),
    # caught when the file is read, not when the first evaluation runs the program after a round of training
    (lambda r: r["prog_syn_examples"][2].update(unit_tests=["assert True"]), "prog_syn_examples[2].unit_tests",
     "expected at least one test function (def test...)"),
    (lambda r: r["prog_syn_examples"][2].update(unit_tests=["def test_a(:\n    pass"]),
     "prog_syn_examples[2].unit_tests[0]", "expected Python source (line 1"),
    (lambda r: r["update"].update(implementation="def a(): pass\ndef b(): pass"), "update.implementation",
     "expected a function replacing"),
    (lambda r: r["update"].update(imports="import"), "update.imports", "expected Python source"),
])
def test_code_update_bad_records(code_rows, mutate, field, message):
    rows = copy.deepcopy(code_rows)
    mutate(rows[1])
    with pytest.raises(RecordError) as err:
        parse_code_update_rows(rows, "arena.jsonl")
    assert f"arena.jsonl: record 1: field '{field}': {message}" in str(err.value)


def test_code_update_needs_held_out_examples(code_rows):
    rows = copy.deepcopy(code_rows)
    rows[0]["prog_syn_examples"] = rows[0]["prog_syn_examples"][:2]
    with pytest.raises(RecordError, match=r"record 0: field 'prog_syn_examples': expected more than train_examples=2"):
        parse_code_update_rows(rows, "arena.jsonl", train_examples=2)
