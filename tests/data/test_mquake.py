"""MQuAKE: the reader on records shaped like the official files (written here), its errors, the conflicting-edit
check, rounds that keep a case's rewrites together, and the world's two-hop MQuAKE file."""

import copy
import json

import pytest

from data.formats import DataFormatError, Probe, RecordError
from data.mquake import MQuAKEDataModule, parse_mquake_rows
from data.world import CHAINS, OBJECT_RELATIONS, derived_facts
from data.world_model import build_tokenizer
from data.world_writers import mquake_records, write_world_files
from lit_common.sources import WORLD_DIR, WORLD_FILES


def rewrite(subject, prompt, relation_id, new, true):
    return {"prompt": prompt, "relation_id": relation_id, "target_new": {"str": new, "id": "Q1"},
            "target_true": {"str": true, "id": "Q2"}, "subject": subject,
            "question": prompt.replace("{}", subject) + "?"}


def hop(question, answer, aliases=()):
    return {"question": question, "cloze": question, "answer": answer, "answer_alias": list(aliases)}


def case(case_id, rewrites, questions, new_answer, new_aliases, new_hops):
    """A record in MQuAKE-CF-3k-v2's layout (the unedited chain's fields too, as the real files have them)."""
    return {"case_id": case_id, "requested_rewrite": rewrites, "questions": questions,
            "answer": "Old Answer", "answer_alias": ["Old"], "new_answer": new_answer, "new_answer_alias": new_aliases,
            "single_hops": [hop(h["question"], "Old") for h in new_hops], "new_single_hops": new_hops,
            "orig": {"triples": [["Q9", "P27", "Q45"]], "triples_labeled": [["Ilse Vortmann", "citizen", "Ardenia"]]}}


def sample_cases():
    """Three cases: two edits along a chain (as the official case 1), then two one-edit cases."""
    return [
        case(1, [rewrite("Ilse Vortmann", "{} is a citizen of", "P27", "United Kingdom", "Portugal"),
                 rewrite("United Kingdom", "The head of state of {} is", "P35", "Emmerson Mnangagwa", "Elizabeth II")],
             ["Who is the head of state of the country Ilse Vortmann is a citizen of?",
              "Which person heads the state of Ilse Vortmann's country?", "Ilse Vortmann's head of state is whom?"],
             "Emmerson Mnangagwa", ["Emmerson Dambudzo Mnangagwa"],
             [hop("Which country is Ilse Vortmann a citizen of?", "United Kingdom", ["UK", "Britain"]),
              hop("Who is the head of state of United Kingdom?", "Emmerson Mnangagwa")]),
        case(2, [rewrite("Karl Brenner", "{} was born in", "P19", "Varrow", "Tolvik")],
             ["Which country is Karl Brenner's birthplace in?", "Karl Brenner was born in which country?",
              "In which country was Karl Brenner born?"], "Ostmark", [],
             [hop("Where was Karl Brenner born?", "Varrow"), hop("Which country is Varrow in?", "Ostmark")]),
        case(3, [rewrite("Varrow", "{} is a town in", "P17", "Ostmark", "Ardenia")],
             ["Which country is the birthplace of Hanna Stoll in?", "Hanna Stoll's birthplace lies in which country?",
              "In which country was Hanna Stoll born?"], "Ostmark", [],
             [hop("Where was Hanna Stoll born?", "Varrow"), hop("Which country is Varrow in?", "Ostmark")]),
    ]


def write(tmp_path, rows, name="mquake.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return str(path)


def test_a_case_becomes_its_rewrites_as_requests_and_hop_probes_per_case(tmp_path):
    records, facts = parse_mquake_rows(sample_cases(), "MQuAKE-CF-3k-v2.json")
    first = records[0]
    assert first.record_id == "mquake:1" and first.subject == "Ilse Vortmann"
    assert [(r.prompt, r.target_new, r.target_old) for r in first.requests] == [
        ("Ilse Vortmann is a citizen of", "United Kingdom", "Portugal"),
        ("The head of state of United Kingdom is", "Emmerson Mnangagwa", "Elizabeth II")]
    assert Probe("efficacy", "Ilse Vortmann is a citizen of", "United Kingdom", "Portugal") in first.probes
    hops = [p for p in first.probes if p.kind == "hop"]
    assert [(p.group, p.case) for p in hops] == [("edit", 1)] * 2 + [("single_hop", 1)] * 2 + [("multi_hop", 1)] * 3
    assert hops[0] == Probe("hop", "Ilse Vortmann is a citizen of", "United Kingdom", group="edit", case=1)
    assert hops[2].aliases == ("UK", "Britain") and hops[2].target == "United Kingdom"
    assert {(p.prompt, p.target, p.aliases) for p in hops[4:]} == {
        (q, "Emmerson Mnangagwa", ("Emmerson Dambudzo Mnangagwa",)) for q in sample_cases()[0]["questions"]}
    assert [(f.case_id, f.subject, f.relation_id, f.target_new) for f in facts["mquake:1"]] == [
        (1, "Ilse Vortmann", "P27", "United Kingdom"), (1, "United Kingdom", "P35", "Emmerson Mnangagwa")]


def _broken(mutate):
    rows = copy.deepcopy(sample_cases())
    mutate(rows[1])
    return rows


@pytest.mark.parametrize("mutate, field, expected", [
    (lambda r: r.pop("requested_rewrite"), "requested_rewrite", "a list of objects"),
    (lambda r: r.update(requested_rewrite=[]), "requested_rewrite", "a list of objects"),
    (lambda r: r["requested_rewrite"][0].update(prompt="Karl Brenner was born in"), "requested_rewrite[0].prompt", "'{}'"),
    (lambda r: r["requested_rewrite"][0].pop("relation_id"), "requested_rewrite[0].relation_id", "non-empty string"),
    (lambda r: r["requested_rewrite"][0].update(target_new="Varrow"), "requested_rewrite[0].target_new", "{str, id}"),
    (lambda r: r.update(questions="Which country?"), "questions", "a list of non-empty strings"),
    (lambda r: r.update(new_answer=""), "new_answer", "a non-empty string"),
    (lambda r: r.update(new_answer_alias="Ostmark"), "new_answer_alias", "a list of non-empty strings"),
    (lambda r: r["new_single_hops"][1].pop("answer"), "new_single_hops[1].answer", "a non-empty string"),
    (lambda r: r["new_single_hops"][0].update(answer_alias=[3]), "new_single_hops[0].answer_alias[0]", "a non-empty"),
])
def test_bad_records_name_file_record_case_and_field(mutate, field, expected):
    with pytest.raises(RecordError) as err:
        parse_mquake_rows(_broken(mutate), "MQuAKE-hard.json")
    message = str(err.value)
    assert message.startswith("MQuAKE-hard.json: record 1 (case_id 2): field ") and f"'{field}'" in message, message
    assert expected in message, message


@pytest.mark.parametrize("case_id, expected", [(None, "missing"), ("2", "got '2'"), (1, "record 0 has it too")])
def test_case_ids_are_integers_unique_in_the_file(case_id, expected):
    rows = sample_cases()
    if case_id is None:
        rows[1].pop("case_id")
    else:
        rows[1]["case_id"] = case_id
    with pytest.raises(RecordError, match=rf"^f.json: record 1: field 'case_id': expected .*{expected}"):
        parse_mquake_rows(rows, "f.json")


@pytest.fixture(scope="module")
def tokenizer_dir(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("mquake_tokenizer")
    build_tokenizer(world).save_pretrained(path)
    return str(path)


def test_conflicting_edits_in_one_run_are_refused_naming_both_cases(tmp_path, tokenizer_dir):
    rows = sample_cases()
    rows.append(case(7, [rewrite("Varrow", "{} is a town in", "P17", "Drevia", "Ardenia")], ["Q?"], "Drevia", [],
                     [hop("Which country is Varrow in?", "Drevia")]))
    source = write(tmp_path, rows)
    dm = MQuAKEDataModule(source, tokenizer=tokenizer_dir, shuffle_seed=None)
    with pytest.raises(DataFormatError, match=r"conflicting edits: case_id 3 edits \('Varrow', P17\) to 'Ostmark', "
                                              r"case_id 7 to 'Drevia'"):
        dm.setup()
    assert dm.rounds == []
    # case 2 and case 3 reach Ostmark through the same fact; editing it twice to one object is no conflict,
    # and a conflicting case the run does not edit is not checked
    ok = MQuAKEDataModule(source, tokenizer=tokenizer_dir, shuffle_seed=None, num_updates=1, edits_per_update=3)
    ok.setup()
    assert [r.record_id for r in ok.rounds[0]] == ["mquake:1", "mquake:2", "mquake:3"]


def test_a_cases_rewrites_share_its_round_and_rounds_schedule_their_own_steps(tmp_path, tokenizer_dir):
    dm = MQuAKEDataModule(write(tmp_path, sample_cases()), tokenizer=tokenizer_dir, shuffle_seed=None, num_updates=3,
                          edits_per_update=1, batch_size=1, epochs_per_update=2)
    dm.setup()
    assert [len(dm.requests_of_round(k)) for k in range(3)] == [2, 1, 1]  # edits_per_update counts cases
    assert [{p.probe.case for p in dm.eval_probes(k) if p.edit_round == k and p.probe.kind == "hop"} for k in range(3)] \
        == [{1}, {2}, {3}]
    assert dm.optimizer_steps_per_round(world_size=1, accumulate=1) == [4, 2, 2]


def test_real_shaped_files_read_back_through_the_datamodule(tmp_path, tokenizer_dir):
    dm = MQuAKEDataModule(write(tmp_path, sample_cases()), tokenizer=tokenizer_dir, num_updates=1)
    dm.setup()
    kinds = [(p.probe.kind, p.probe.group) for p in dm.eval_probes(0)]
    assert kinds.count(("efficacy", "")) == kinds.count(("hop", "edit")) == 4
    assert kinds.count(("hop", "single_hop")) == 6 and kinds.count(("hop", "multi_hop")) == 9


# ---- the world's two-hop MQuAKE file ----------------------------------------------------------------------------

def test_world_chains_are_derived_from_the_person_facts(world):
    languages = derived_facts(world, OBJECT_RELATIONS[0])  # a country's most common native language
    assert set(languages) == set(world.relations["P27"].objects)
    country = "Ardenia"
    citizens = [f.subject for f in world.facts if f.relation_id == "P27" and f.object == country]
    spoken = [world.fact(s, "P103").object for s in citizens]
    assert spoken.count(languages[country]) == max(spoken.count(o) for o in set(spoken))


def test_world_mquake_cases_chain_two_hops_without_conflicts_in_known_words(world, tokenizer_dir, tmp_path):
    rows = mquake_records(world, 120)
    assert rows == json.loads((WORLD_DIR / WORLD_FILES["mquake"]).read_text()), "committed world files are stale"
    _, facts = parse_mquake_rows(rows, "world")
    assert len({(f.subject, f.relation_id) for fs in facts.values() for f in fs}) < sum(map(len, facts.values()))
    for row in rows:  # the chain: hop 1's answer is hop 2's subject, hop 2's answer the multi-hop answer
        hop1, hop2 = row["new_single_hops"]
        assert hop1["answer"] in hop2["question"] and hop2["answer"] == row["new_answer"] != row["answer"]
        assert row["requested_rewrite"][-1]["subject"] == hop1["answer"]
    assert {len(r["requested_rewrite"]) for r in rows} == {1, 2}
    assert {next(c for c in CHAINS if r["requested_rewrite"][-1]["relation_id"] == c.second).first for r in rows} \
        == {c.first for c in CHAINS}
    dm = MQuAKEDataModule(write(tmp_path, rows), tokenizer=tokenizer_dir, num_updates=1)
    dm.setup()  # every case edited in one run: no conflicting edits
    unk = dm.tokenizer.unk_token_id
    assert all(unk not in p.prompt_ids + p.target_ids for p in dm.eval_probes(0))
    assert any(p.probe.aliases for p in dm.eval_probes(0))  # "the Tessel Isles" -> "Tessel Isles"


def test_the_mquake_file_leaves_every_other_world_file_as_committed(world, tmp_path):
    """The demo's ES/PS/NS depend on these bytes: the world's MQuAKE file is an addition only."""
    write_world_files(world, tmp_path, num_edits=200)
    for key, name in WORLD_FILES.items():
        assert (tmp_path / name).read_bytes() == (WORLD_DIR / name).read_bytes(), key
