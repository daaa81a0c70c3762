"""MQuAKE: multi-hop questions over edited facts (the official ``MQuAKE-CF-3k(-v2).json``, ``MQuAKE-T.json`` and
``MQuAKE-hard.json`` records; ``world:mquake``).

A case holds ``requested_rewrite`` (a list of edits, each a prompt with ``{}``, a subject, ``relation_id``,
``target_new`` / ``target_true`` objects ``{str, id}``), multi-hop ``questions`` whose answer after every edit
is ``new_answer`` (or one of ``new_answer_alias``), and ``new_single_hops`` (the edited chain one question a hop:
``question``, ``answer``, ``answer_alias``). Every rewrite of a case is an edit request, and a case's rewrites
are trained in the same round (the case is the unit the rounds split).

Scored as the MQuAKE papers score it, by greedy generation matched to the answer or an alias, ignoring case
(MQuAKE-Remastered): edit-wise accuracy (each rewrite's own prompt yields its new object), instance-wise accuracy
(a case counts when every new single hop is answered) and multi-hop accuracy (a case counts when any of its
questions is). Each rewrite is also an efficacy probe (ES: new object against the true one). ``answer``,
``answer_alias`` and ``single_hops`` describe the unedited chain and are not scored.

Conflicting edits: MQuAKE-hard (and MQuAKE-CF-3k before v2) has cases that edit the same (subject, relation)
to different objects; edited in one run, at most one of them can hold, so the other case is unsolvable by
construction. This module rejects such a run at setup with an error naming both cases, rather than guessing
which edit wins; the same edit shared by several cases (MQuAKE-CF-3k-v2 has many) is fine. Only the records the
run edits are checked (after ``shuffle_seed``, ``limit`` and the rounds), so a conflicting file can still be
used by leaving one of the two cases out (``limit``, another ``shuffle_seed``, or fewer edits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data.base import EditDataModule
from data.formats import (
    DataFormatError,
    EditRecord,
    EditRequest,
    Probe,
    RecordError,
    RecordReader,
)


@dataclass(frozen=True)
class EditedFact:
    """One rewrite of a case, as the conflict check sees it."""

    case_id: int
    subject: str
    relation_id: str
    target_new: str


def _case_id(source: str, index: int, row: dict[str, Any]) -> int:
    return RecordReader(source, index, row).get("case_id", lambda v: isinstance(v, int) and not isinstance(v, bool),
                                                "an integer (the case's id, unique in the file)")


def _target(reader: RecordReader, field_path: str) -> str:
    return reader.child(reader.obj(field_path, "an object {str, id}"), field_path).string("str")


def parse_mquake_case(reader: RecordReader, case_id: int) -> tuple[EditRecord, tuple[EditedFact, ...]]:
    """One case: its edit requests and probes, and its rewrites for the conflict check."""
    requests, probes, facts = [], [], []
    for i, rewrite in enumerate(reader.objects("requested_rewrite")):
        rw = reader.child(rewrite, f"requested_rewrite[{i}]")
        subject = rw.string("subject")
        prompt = rw.template("prompt").format(subject)
        new, true = _target(rw, "target_new"), _target(rw, "target_true")
        requests.append(EditRequest(prompt, new, true))
        probes += [Probe("efficacy", prompt, new, true), Probe("hop", prompt, new, group="edit", case=case_id)]
        facts.append(EditedFact(case_id, subject, rw.string("relation_id"), new))
    for i, hop in enumerate(reader.objects("new_single_hops")):
        entry = reader.child(hop, f"new_single_hops[{i}]")
        probes.append(Probe("hop", entry.string("question"), entry.string("answer"),
                            aliases=tuple(entry.strings("answer_alias", allow_empty_list=True)),
                            group="single_hop", case=case_id))
    new_answer = reader.string("new_answer")
    aliases = tuple(reader.strings("new_answer_alias", allow_empty_list=True))
    probes += [Probe("hop", question, new_answer, aliases=aliases, group="multi_hop", case=case_id)
               for question in reader.strings("questions")]
    record = EditRecord(f"mquake:{case_id}", facts[0].subject, tuple(requests), tuple(probes))
    return record, tuple(facts)


def parse_mquake_rows(rows: list[dict[str, Any]], source: str) -> tuple[list[EditRecord], dict[str, tuple[EditedFact, ...]]]:
    """Every case of a file, and each record's rewrites (by record id) for :func:`check_conflicts`."""
    records, facts, first_index = [], {}, {}
    for index, row in enumerate(rows):
        case_id = _case_id(source, index, row)
        if case_id in first_index:
            raise RecordError(source, index, "case_id", f"a case id unique in the file (record {first_index[case_id]} "
                              "has it too)", case_id)
        first_index[case_id] = index
        record, edited = parse_mquake_case(RecordReader(source, index, row, label=f"case_id {case_id}"), case_id)
        records.append(record)
        facts[record.record_id] = edited
    return records, facts


def check_conflicts(facts: list[EditedFact], source: str) -> None:
    """Refuse edits of one (subject, relation) to different objects in one run (see the module docstring)."""
    first: dict[tuple[str, str], EditedFact] = {}
    for fact in facts:
        earlier = first.setdefault((fact.subject, fact.relation_id), fact)
        if earlier.target_new != fact.target_new:
            raise DataFormatError(
                f"{source}: conflicting edits: case_id {earlier.case_id} edits ({fact.subject!r}, {fact.relation_id}) "
                f"to {earlier.target_new!r}, case_id {fact.case_id} to {fact.target_new!r}; at most one can hold after "
                "the run, so leave one case out (data limit, shuffle_seed, or fewer edits)")


class MQuAKEDataModule(EditDataModule):
    """MQuAKE cases (``source``: an MQuAKE JSON file or ``world:mquake``); one case = one round entry, with
    all its rewrites as edit requests. ``edits_per_update`` counts cases."""

    hub_split = "train"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.edited_facts: dict[str, tuple[EditedFact, ...]] = {}

    def parse_rows(self, rows: list[dict[str, Any]], source: str) -> list[EditRecord]:
        records, self.edited_facts = parse_mquake_rows(rows, source)
        return records

    def split_rounds(self, records: list[EditRecord], num_updates: int,
                     edits_per_update: int | None) -> list[list[EditRecord]]:
        """The base split, then the conflict check over every case the run edits."""
        rounds = super().split_rounds(records, num_updates, edits_per_update)
        check_conflicts([f for round_ in rounds for r in round_ for f in self.edited_facts[r.record_id]], self.source)
        return rounds
