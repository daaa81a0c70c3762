"""CounterFact: ROME/MEMIT files (``requested_rewrite`` records), the hub's ``azhx/counterfact`` rows
(same fields) and EasyEdit's flat ``counterfact-edit.json`` records.

Scoring follows ROME: efficacy on the rewrite prompt and paraphrase prompts compares the new answer with
the true one; neighbourhood prompts (other subjects whose true answer is ``target_true``) must keep
preferring the true answer. EasyEdit's flat files carry one rephrase and one locality prompt instead;
their "rephrase" often comes from ROME's generation prompts, so scores from the two layouts are not the
same measurement (the record id says which layout it came from). Either layout may carry EasyEdit's
``portability`` field (its CounterFact portability release), read as portability probes.
"""

from __future__ import annotations

from typing import Any

from data.base import EditDataModule
from data.formats import (
    EditRecord,
    EditRequest,
    Probe,
    RecordError,
    RecordReader,
    portability_probes,
)


def parse_rome_record(reader: RecordReader) -> EditRecord:
    rewrite = reader.get("requested_rewrite", lambda v: isinstance(v, dict), "an object")
    rw = reader.child(rewrite, "requested_rewrite")
    template = rw.template("prompt")
    subject = rw.string("subject")
    new = rw.child(rw.get("target_new", lambda v: isinstance(v, dict), "an object {str, id}"), "target_new").string("str")
    true = rw.child(rw.get("target_true", lambda v: isinstance(v, dict), "an object {str, id}"), "target_true").string("str")
    paraphrases = reader.strings("paraphrase_prompts")
    neighbours = reader.strings("neighborhood_prompts", allow_empty_list=True) if reader.has("neighborhood_prompts") else []
    prompt = template.format(subject)
    case_id = reader.record.get("case_id", reader.index)
    return EditRecord(
        record_id=f"counterfact:{case_id}",
        subject=subject,
        requests=(EditRequest(prompt, new, true),),
        probes=(
            Probe("efficacy", prompt, new, true),
            *(Probe("paraphrase", p, new, true) for p in paraphrases),
            *(Probe("neighborhood", p, true, new) for p in neighbours),
            *portability_probes(reader),
        ),
    )


def parse_easyedit_record(reader: RecordReader) -> EditRecord:
    prompt, subject = reader.string("prompt"), reader.string("subject")
    new, true = reader.string("target_new"), reader.string("ground_truth")
    probes = [Probe("efficacy", prompt, new, true), Probe("paraphrase", reader.string("rephrase_prompt"), new, true)]
    if reader.has("locality_prompt"):
        probes.append(Probe("neighborhood", reader.string("locality_prompt"), reader.string("locality_ground_truth"), new))
    probes += portability_probes(reader)
    return EditRecord(f"counterfact-easyedit:{reader.record.get('case_id', reader.index)}", subject,
                      (EditRequest(prompt, new, true),), tuple(probes))


def parse_counterfact_rows(rows: list[dict[str, Any]], source: str) -> list[EditRecord]:
    """Every row must be one layout: ROME's (``requested_rewrite``) or EasyEdit's flat one."""
    records = []
    for index, row in enumerate(rows):
        reader = RecordReader(source, index, row)
        if "requested_rewrite" in row:
            records.append(parse_rome_record(reader))
        elif "ground_truth" in row and "target_new" in row:
            records.append(parse_easyedit_record(reader))
        else:
            raise RecordError(source, index, "requested_rewrite", "a CounterFact record (ROME's requested_rewrite, "
                              "or EasyEdit's prompt/target_new/ground_truth)", sorted(row))
    return records


class CounterFactDataModule(EditDataModule):
    """CounterFact edits (``source``: a ROME/EasyEdit JSON file, ``azhx/counterfact``, or ``world:counterfact``)."""

    hub_split = "train"

    def parse_rows(self, rows: list[dict[str, Any]], source: str) -> list[EditRecord]:
        return parse_counterfact_rows(rows, source)
