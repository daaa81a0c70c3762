"""ZsRE: MEND/ROME/EasyEdit files (``src``/``alt``/``answers``/``rephrase``/``loc``/``loc_ans``, and EasyEdit's
``portability``), the hub's KILT-style rows (``wangzn2001/zsre``: ``input``/``output``/``alternatives``/
``rephrases``) and KnowEdit's records (``prompt``/``target_new``/``ground_truth``/``rephrase_prompt``/
``locality``/``portability``).

The edit target is a choice (``edit_target``): ``"alt"`` edits toward the counterfactual alternative and
skips records whose ``alt`` is empty (what editors that train toward ``alt`` do), ``"answers"`` edits
toward ``answers[0]`` as ROME/MEMIT's ZsRE evaluation does (the model's old prediction is then the answer
replaced, when it differs).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from data.base import EditDataModule
from data.formats import (
    LOCALITY_GROUPS,
    EditRecord,
    EditRequest,
    Probe,
    RecordError,
    RecordReader,
    grouped_probes,
    portability_probes,
)

EditTarget = Literal["alt", "answers"]
EDIT_TARGETS: tuple[str, ...] = get_args(EditTarget)


def check_edit_target(edit_target: Any) -> None:
    if edit_target not in EDIT_TARGETS:
        raise ValueError(f"data edit_target must be one of {EDIT_TARGETS} (edit toward alt, or toward answers[0]), "
                         f"got {edit_target!r}")


def _record(record_id: str, subject: str, prompt: str, new: str, old: str | None, rephrases: list[str],
            other_probes: list[Probe]) -> EditRecord:
    return EditRecord(
        record_id=record_id,
        subject=subject,
        requests=(EditRequest(prompt, new, old),),
        probes=(
            Probe("efficacy", prompt, new, old),
            *(Probe("paraphrase", p, new, old) for p in rephrases),
            *other_probes,
        ),
    )


def parse_mend_record(reader: RecordReader, edit_target: EditTarget) -> EditRecord | None:
    src, answers = reader.string("src"), reader.strings("answers")
    alt = reader.string("alt", allow_empty=True)
    if edit_target == "alt":
        if not alt.strip():
            return None
        new, old = alt, answers[0]
    else:
        pred = reader.string("pred", allow_empty=True) if reader.has("pred") else ""
        new, old = answers[0], (pred if pred.strip() and pred != answers[0] else None)
    subject = reader.string("subject") if reader.has("subject") else src
    locality = [Probe("locality", reader.string("loc"), reader.string("loc_ans"))] if reader.has("loc") else []
    return _record(f"zsre:{reader.index}", subject, src, new, old, [reader.string("rephrase")],
                   locality + portability_probes(reader))


def parse_kilt_record(reader: RecordReader) -> EditRecord | None:
    question = reader.string("input")
    outputs = reader.objects("output")
    old = reader.child(outputs[0], "output[0]").string("answer")
    alternatives = reader.strings("alternatives", allow_empty_list=True)
    if not alternatives:
        return None  # the reference skips rows without an alternative
    rephrases = reader.strings("rephrases", allow_empty_list=True) if reader.has("rephrases") else []
    return _record(f"zsre-kilt:{reader.record.get('id', reader.index)}", question, question, alternatives[0], old,
                   rephrases, [])


def parse_knowedit_record(reader: RecordReader) -> EditRecord:
    """KnowEdit: ``ground_truth`` (the answer replaced, a string or a list of aliases) is required, since
    without it the edit has nothing to be preferred over; ``locality`` and ``portability`` are optional."""
    prompt, new, old = reader.string("prompt"), reader.string("target_new"), reader.answer("ground_truth")
    locality = grouped_probes(reader, "locality", "locality", LOCALITY_GROUPS) if reader.has("locality") else []
    return _record(f"zsre-knowedit:{reader.index}", reader.string("subject"), prompt, new, old,
                   [reader.string("rephrase_prompt")], locality + portability_probes(reader))


def parse_zsre_rows(rows: list[dict[str, Any]], source: str, edit_target: EditTarget = "alt") -> list[EditRecord]:
    check_edit_target(edit_target)
    records = []
    for index, row in enumerate(rows):
        reader = RecordReader(source, index, row)
        if "src" in row:
            record = parse_mend_record(reader, edit_target)
        elif "input" in row:
            record = parse_kilt_record(reader)
        elif "prompt" in row and "target_new" in row:
            record = parse_knowedit_record(reader)
        else:
            raise RecordError(source, index, "src", "a ZsRE record (MEND's src/alt/answers, KILT's "
                              "input/output/alternatives, or KnowEdit's prompt/target_new)", sorted(row))
        if record is not None:
            records.append(record)
    return records


class ZsREDataModule(EditDataModule):
    """ZsRE edits (``source``: a MEND/KnowEdit JSON file, ``wangzn2001/zsre``, or ``world:zsre``)."""

    hub_split = "train"

    def __init__(self, *args: Any, edit_target: EditTarget = "alt", **kwargs: Any) -> None:
        check_edit_target(edit_target)
        super().__init__(*args, **kwargs)
        self.edit_target = edit_target

    def parse_rows(self, rows: list[dict[str, Any]], source: str) -> list[EditRecord]:
        return parse_zsre_rows(rows, source, self.edit_target)
