"""The committed task file of true CounterFact facts is what its builder derives, and reads as a TaCQ task file."""

import json

from data.real import build_task_file
from lit_tacq.calibration import read_task_records


def test_the_committed_task_file_is_the_builders_output():
    rows = build_task_file.task_records()
    committed = [json.loads(line) for line in build_task_file.TARGET.read_text(encoding="utf-8").splitlines()]
    assert committed == rows
    source = json.loads(build_task_file.SOURCE.read_text(encoding="utf-8"))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in source]
    assert [r["split"] for r in rows] == ["evaluation"] * 300 + ["calibration"] * 300  # first 300 score
    assert all(r["answer"] != r["alternative"] for r in rows)

    evaluation = read_task_records(build_task_file.TARGET, "evaluation")
    calibration = read_task_records(build_task_file.TARGET, "calibration")
    assert len(evaluation) == len(calibration) == 300
    assert not {r["prompt"] for r in evaluation} & {r["prompt"] for r in calibration}


def test_rebuilding_gives_the_same_bytes(tmp_path):
    target = tmp_path / "facts.jsonl"
    build_task_file.write_task_file(build_task_file.task_records(), target)
    assert target.read_bytes() == build_task_file.TARGET.read_bytes()
