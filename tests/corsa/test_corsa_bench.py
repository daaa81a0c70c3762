"""bench/edit_quality.py end to end on the committed world model, at a size that takes seconds."""

import json

import pytest
import torch

from bench.edit_quality import MethodConfig, build, main, parse_args
from lit_corsa.locate.module import LocateEditModule
from lit_corsa.locate.settings import LocateSettings


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
    # every run and unedited row says its seed (bench.edit_combine matches separate jobs' runs by it)
    seeds = [r["seed"] for runs in saved["runs"].values() for r in runs] + [u["seed"] for u in saved["unedited"]]
    assert seeds == [0, 0, 0]
    assert table["corsa"]["seconds_per_step"][0] > 0 and "step_vs_lora" in table["corsa"]  # timed, not asserted
    assert ("NS" in table["corsa"]) == (benchmark == "counterfact")  # ZsRE has no neighbourhood score
    rows = [line for line in saved["markdown"].splitlines() if line.startswith(("| unedited", "| lora", "| corsa"))]
    assert len(rows) == 3 and all(row.count("|") == 14 for row in rows)
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_runs_a_locate_method_as_train_py_does(tmp_path):
    """MEMIT through the bench: built from its overlay (configs/methods/memit.yaml), one write per round, its
    saved edited weights reloaded and scored, costed per round rather than per optimizer step. The key
    covariance is the one every run shares (computed on first use, then read from the user's cache)."""
    out = tmp_path / "edit_quality.json"
    argv = ["--methods", "lora", "memit", "--seeds", "0", "--rounds", "2", "--edits-per-round", "4",
            "--epochs-per-round", "1", "--batch-size", "4", "--out", str(out),
            "--threads", str(torch.get_num_threads())]
    table = main(argv)
    saved = json.loads(out.read_text())
    assert list(saved["table"]) == ["unedited", "lora", "memit"] and saved["complete"] is True
    # the overlay's settings, not the bench's adapter flags: its step sizes, and a round written as one batch
    overlay = MethodConfig.read("memit")
    module, dm = build(parse_args(argv), "memit", 0, 2, 4)
    assert isinstance(module, LocateEditModule) and not overlay.takes_optimizer_steps
    paper_weight = LocateSettings().mom2_weight
    assert module.locate_settings.mom2_weight == overlay.init_args["locate"]["mom2_weight"] != paper_weight
    assert (dm.batch_size, dm.epochs_per_update) == (overlay.data_args["batch_size"], 1) and dm.batch_size > 4
    run = saved["runs"]["memit"][0]
    assert [r["eval_round"] for r in run["rounds"]] == [0, 1]
    # the edit is real and the reloaded edited weights reproduce the run's own last evaluation exactly (a reload
    # that dropped the edit would score the unedited model's ES of 0 here)
    assert table["memit"]["ES"][0] > table["unedited"]["ES"][0] + 0.5 and run["saved_vs_in_memory"] == 0.0
    assert run["seconds_per_round"] > 0 and "seconds_per_step" not in run  # no optimizer steps to time
    assert "seconds_per_step" in saved["runs"]["lora"][0] and "step_vs_lora" not in table["memit"]
    row = next(line for line in saved["markdown"].splitlines() if line.startswith("| memit"))
    assert row.count("|") == 14 and row.rstrip(" |").endswith("| - | -")  # s / round given, no step ratios


def test_bench_locate_flag_overrides_the_overlay_and_null_means_the_papers_value():
    """``--locate`` merges over the overlay's locate block, as ``--model.locate`` does on the CLI: what it names
    changes, what it leaves alone stays the overlay's, and null falls back to the paper's value."""
    overlay = MethodConfig.read("memit").init_args["locate"]
    args = parse_args(["--methods", "memit", "--locate", "{v_steps: 7, clamp_norm_factor: null, layers: [0]}"])
    module, _ = build(args, "memit", 0, 1, 2)
    settings = module.locate_settings
    assert (settings.v_steps, settings.layers, settings.clamp_norm_factor) == (7, [0], None)
    assert settings.mom2_weight == overlay["mom2_weight"] and settings.covariance_source == overlay["covariance_source"]
    assert module.objective.clamp_norm_factor == 0.75  # MEMIT's paper value
    with pytest.raises(SystemExit):
        parse_args(["--locate", "[1, 2]"])  # not a mapping: an argparse error, not a crash at build time
    with pytest.raises(SystemExit):
        parse_args(["--methods", "lora", "corsa", "--locate", "{v_steps: 7}"])  # no method would read it
    # the adapter methods have no locate block: the flag leaves them as they are
    lora, _ = build(args, "lora", 0, 1, 2)
    assert not hasattr(lora, "locate_settings")


def test_bench_reports_a_single_round_without_forgetting(tmp_path):
    """Forgetting needs a later round: one round gives none, and the table says '-' rather than failing."""
    out = tmp_path / "edit_quality.json"
    table = main(["--methods", "lora", "--seeds", "0", "--rounds", "1", "--edits-per-round", "2",
                  "--epochs-per-round", "1", "--batch-size", "2", "--out", str(out),
                  "--threads", str(torch.get_num_threads())])
    assert "ES" in table["lora"] and "forgetting_ES" not in table["lora"]
    row = next(line for line in json.loads(out.read_text())["markdown"].splitlines() if line.startswith("| lora"))
    assert "| - | - |" in row
