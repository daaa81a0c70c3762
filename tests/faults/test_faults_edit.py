"""Fault injection on an editing run through the CLI: killed (SIGKILL) mid-round and right after a round's
evaluation, stopped by SIGTERM, each time rerun with the same command; it must end exactly where an
uninterrupted run ends."""

import json
from pathlib import Path

import torch

from tests.cli import cli_command, run_cli
from tests.faults.edit_config import CONFIG

# 3 batches an epoch, 6 optimiser steps a round, 18 in all; last.ckpt after every round's evaluation and at
# steps 4, 8 and 16 (not 12: the last batch of round 1, right before its evaluation)


def _command(tmp_path: Path, tiny_assets) -> list[str]:
    root, _ = tiny_assets
    config = tmp_path / "config.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(out=tmp_path / "runs", model=root / "model",
                                    data=root / "world" / "counterfact.json", num_updates=3))
    return cli_command("train.py", config)


def _final_metrics(tmp_path: Path) -> dict:
    versions = sorted((tmp_path / "runs" / "run").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return json.loads((versions[-1] / "metrics.json").read_text())


def test_killed_and_terminated_runs_resume_to_the_uninterrupted_result(tiny_assets, tmp_path):
    uninterrupted = run_cli(_command(tmp_path / "a", tiny_assets))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    command = _command(tmp_path / "b", tiny_assets)
    checkpoint = tmp_path / "b" / "runs" / "run" / "checkpoints" / "last.ckpt"

    killed = run_cli(command, "train_batch_end:10:KILL")  # mid-round 1; last save: step 8, mid-epoch
    assert killed.returncode == -9
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 8
    killed = run_cli(command, "validation_end:1:KILL")  # round 1 scored, not yet saved (no save before it either)
    assert killed.returncode == -9 and "Resumed from" in killed.stderr
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 8
    killed = run_cli(command, "train_epoch_start:4:KILL")  # round 1 scored and saved, round 2 not started
    assert killed.returncode == -9
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 12
    terminated = run_cli(command, "train_batch_end:15:TERM")  # the last batch of an epoch, between step saves
    assert terminated.returncode == 143, terminated.stderr[-3000:]
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 15
    finished = run_cli(command)
    assert finished.returncode == 0, finished.stderr[-3000:]

    expected, resumed = _final_metrics(tmp_path / "a"), _final_metrics(tmp_path / "b")
    assert [r["eval_round"] for r in resumed["rounds"]] == [0, 1, 2]
    assert resumed["rounds"] == expected["rounds"]  # every score of every round, exactly
    assert 0.0 < expected["summary"]["final"]["ES"] < 1.0 or expected["summary"]["immediate"]["ES"] > 0.5
