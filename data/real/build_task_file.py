"""Derive TaCQ's task file of true facts from the committed CounterFact excerpt.

``counterfact_easyedit_first600.json`` is the first 600 records of EasyEdit's CounterFact train split (MIT),
flat records whose ``prompt`` already holds the subject. A 135M model knows few of these facts token for
token, but it mostly prefers the true object to CounterFact's counterfactual one, so each record becomes a
task record that keeps both: ``{"prompt", "answer": ground_truth, "alternative": target_new, "split"}``.
The split is positional, deterministic and disjoint: the first 300 records are ``evaluation``, the last 300
``calibration``. ``python -m data.real.build_task_file`` rewrites ``counterfact_true_facts.jsonl``
(committed, so configs need no build step); rerunning it gives the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

from data.formats import RecordReader, read_records
from lit_common.files import write_atomically

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "counterfact_easyedit_first600.json"
TARGET = HERE / "counterfact_true_facts.jsonl"
EVALUATION_COUNT = 300  # the first records; the rest calibrate


def task_records(source: Path = SOURCE, evaluation_count: int = EVALUATION_COUNT) -> list[dict[str, str]]:
    """One task record per CounterFact record, in order (module docstring); a bad record fails with its
    index and field."""
    records = read_records(source)
    if len(records) <= evaluation_count:
        raise ValueError(f"{source} has {len(records)} records: fewer than the {evaluation_count} evaluation "
                         "records plus at least one for calibration")
    rows = []
    for index, record in enumerate(records):
        reader = RecordReader(str(source), index, record)
        rows.append({"prompt": reader.string("prompt"), "answer": reader.string("ground_truth"),
                     "alternative": reader.string("target_new"),
                     "split": "evaluation" if index < evaluation_count else "calibration"})
    return rows


def write_task_file(rows: list[dict[str, str]], target: Path = TARGET) -> None:
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    write_atomically(target, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def main() -> None:
    rows = task_records()
    write_task_file(rows)
    splits = {split: sum(row["split"] == split for row in rows) for split in ("evaluation", "calibration")}
    print(f"wrote {TARGET} ({len(rows)} records: {splits['evaluation']} evaluation, "
          f"{splits['calibration']} calibration)")


if __name__ == "__main__":
    main()
