"""bench/edit_quality.py end to end on the committed world model, at a size that takes seconds."""

import json

import pytest
import torch

from bench.edit_quality import main


@pytest.mark.parametrize("benchmark", ["counterfact", "zsre"])
def test_bench_runs_and_reports_every_method(benchmark, tmp_path):
    out = tmp_path / "edit_quality.json"
    table = main(["--benchmark", benchmark, "--methods", "lora", "corsa", "--seeds", "0", "--rounds", "2",
                  "--edits-per-round", "4", "--epochs-per-round", "1", "--batch-size", "4", "--out", str(out),
                  "--threads", str(torch.get_num_threads())])  # keep the suite's thread count
    saved = json.loads(out.read_text())
    assert list(saved["table"]) == ["unedited", "lora", "corsa"] and set(saved["runs"]) == {"lora", "corsa"}
    assert table["unedited"]["ES"][0] < table["lora"]["ES"][0]  # measured from a fresh adapter, before any step
    # the final scores are the saved adapter's, read back from disk: the same as the run's own last evaluation
    assert all(run["saved_vs_in_memory"] == 0.0 for runs in saved["runs"].values() for run in runs)
    assert saved["complete"] is True
    assert table["corsa"]["seconds_per_step"][0] > 0 and "step_vs_lora" in table["corsa"]  # timed, not asserted
    assert ("NS" in table["corsa"]) == (benchmark == "counterfact")  # ZsRE has no neighbourhood score
    rows = [line for line in saved["markdown"].splitlines() if line.startswith(("| unedited", "| lora", "| corsa"))]
    assert len(rows) == 3 and all(row.count("|") == 13 for row in rows)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
