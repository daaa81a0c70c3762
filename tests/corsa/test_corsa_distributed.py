"""Through the CLI, 2 CPU processes with gloo: DDP scores like 1 process; FSDP (ModelParallelStrategy, the
frozen base sharded) scores exactly like DDP; an FSDP run resumed mid-sequence ends like an uninterrupted one.

DDP vs 1 process is not bit-identical by design: each rank's SFT loss is a token mean over its own rows
and, for CoRSA, each rank takes its SAM ascent from its own gradient (the first pass is never
synchronised), so those agree within a tolerance. FSDP vs DDP must agree exactly: sharding the base
changes where its weights live, not what is computed. The learning rate is high enough that the edits
take and the neighbourhood is disturbed, so the scores compared are not all 0 or all 1."""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from torch.distributed.checkpoint import FileSystemReader

from tests.cli import ROOT, cli_command, cli_env, run_cli

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  default_root_dir: {out}
  logger:   # the report writes into the logger's directory, which every rank must ask for (a collective)
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {out}, name: logs, version: 0}}
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: callbacks.edit_report.EditReport
      init_args: {{plot: false}}
    - class_path: callbacks.run_checkpoint.RunCheckpoint
      init_args: {{dirpath: {out}/ckpt}}
model:
  model_name_or_path: world:model
  method: {method}
  optimizer: {{learning_rate: 1.0e-2, warmup_steps: 1}}
  lora: {{r: 4, alpha: 8}}
  evaluation: {{generation: true}}   # under FSDP, generation must keep the ranks in lockstep
data:
  class_path: data.counterfact.CounterFactDataModule
  init_args:
    source: world:counterfact
    num_updates: 2
    edits_per_update: 8
    epochs_per_update: 8
    batch_size: {batch_size}
"""
DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")
FSDP = ("--trainer.devices", "2", "--trainer.strategy", "ModelParallelStrategy",
        "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1")


def _fit(out: Path, method: str, *extra: str, batch_size: int = 4, slurm_tasks: int = 0) -> tuple[dict, str]:
    """Runs ``train.py fit``; returns metrics.json and rank 0's stderr. Two ranks of 4 rows see the same
    8 edits per step as one process with batches of 8. ``slurm_tasks``: start that many processes
    ourselves with the environment srun gives each task (Lightning then launches nothing)."""
    config = out.with_suffix(".yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(CONFIG.format(out=out, method=method, batch_size=batch_size))
    env = cli_env()
    command = cli_command("train.py", config, *extra)
    if not slurm_tasks:
        result = run_cli(command)
        assert result.returncode == 0, result.stderr[-3000:]
        stderr = result.stderr
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        slurm = {"SLURM_NTASKS": str(slurm_tasks), "SLURM_NTASKS_PER_NODE": str(slurm_tasks), "SLURM_NODEID": "0",
                 "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "corsa", "MASTER_PORT": port}
        tasks = [subprocess.Popen(command, cwd=ROOT, env={**env, **slurm, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(slurm_tasks)]
        outputs = [task.communicate(timeout=300)[1] for task in tasks]
        for task, output in zip(tasks, outputs):
            assert task.returncode == 0, output[-3000:]
        stderr = outputs[0]
    return json.loads((out / "logs" / "version_0" / "metrics.json").read_text()), stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each run once per module: ``runs(name, method, *cli_args, batch_size=...)``."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name: str, method: str, *extra: str, batch_size: int = 4) -> tuple[dict, str]:
        if name not in done:
            done[name] = _fit(root / name, method, *extra, batch_size=batch_size)
        return done[name]
    return run


def test_two_process_ddp_matches_one_process(runs):
    """CoRSA only: the all-reduce of the merged update is the same code for every method, and CoRSA's step
    (two task gradients, PCGrad, SAM) is the one whose per-rank parts could drift apart."""
    single, _ = runs("single_corsa", "corsa", batch_size=8)
    ddp, _ = runs("ddp_corsa", "corsa", *DDP)
    assert single["summary"]["after_last_round"]["ES"] >= 0.75  # the edits took: the comparison means something
    assert [r["eval_round"] for r in ddp["rounds"]] == [0, 1]
    for name, value in single["summary"]["after_last_round"].items():
        assert ddp["summary"]["after_last_round"][name] == pytest.approx(value, abs=0.1), name


def test_fsdp_shards_the_base_and_scores_exactly_like_ddp(runs):
    ddp, _ = runs("ddp_corsa", "corsa", *DDP)
    fsdp, log = runs("fsdp_corsa", "corsa", *FSDP)
    assert "FSDP2: frozen base sharded over 2 rank(s)" in log
    assert fsdp["rounds"] == ddp["rounds"]


@pytest.fixture(scope="module")
def stopped_fsdp(tmp_path_factory) -> Path:
    """An FSDP run stopped inside its second round (16 optimiser steps in all: 2 rounds x 8 epochs x 1 step)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    stopped, _ = _fit(out, "corsa", *FSDP, "--trainer.max_steps", "12")
    assert [r["eval_round"] for r in stopped["rounds"]] == [0]
    return out


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_fsdp_rerun_resumes_mid_sequence_to_the_uninterrupted_result(runs, stopped_fsdp, tmp_path):
    uninterrupted, _ = runs("fsdp_corsa", "corsa", *FSDP)
    out = _copy_run(stopped_fsdp, tmp_path / "run")
    checkpoint = out / "ckpt" / "last.ckpt"
    assert checkpoint.is_dir()  # a distributed checkpoint: one shard file per rank
    resumed, log = _fit(out, "corsa", *FSDP)  # the same command again: ckpt_path "last" finds the folder
    assert "Restored all states from the checkpoint" in log and str(checkpoint) in log  # resumed, not restarted
    assert resumed["rounds"] == uninterrupted["rounds"]
    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    weights = [k for k in stored if k.startswith("state_dict.")]
    assert weights and all("lora_" in k for k in weights)  # the adapter only, never the frozen base


def test_requeued_slurm_fsdp_job_resumes_from_its_hpc_checkpoint_folder(runs, stopped_fsdp, tmp_path):
    """What a requeued 2-task SLURM job does: srun starts the ranks, and the fit (ckpt_path "last", the CLI's
    default) finds hpc_ckpt_<n>.ckpt (under FSDP a distributed-checkpoint folder), newer than last.ckpt, by
    itself and ends as if never interrupted."""
    uninterrupted, _ = runs("fsdp_corsa", "corsa", *FSDP)
    out = _copy_run(stopped_fsdp, tmp_path / "job")
    # SIGUSR1 makes Lightning save this through the same trainer.save_checkpoint as last.ckpt
    shutil.copytree(out / "ckpt" / "last.ckpt", out / "hpc_ckpt_1.ckpt")
    later = (out / "ckpt" / "last.ckpt").stat().st_mtime + 1
    os.utime(out / "hpc_ckpt_1.ckpt", (later, later))  # the signal's save is the newest (copytree kept the time)
    resumed, log = _fit(out, "corsa", *FSDP, slurm_tasks=2)
    assert "Restored all states from the checkpoint at" in log and "hpc_ckpt_1.ckpt" in log
    assert resumed["rounds"] == uninterrupted["rounds"]


def test_fsdp_with_a_bf16_base_bf16_mixed_and_gradient_checkpointing_edits(runs):
    """The combination the 8B config composed with configs/strategies/fsdp_node.yaml uses."""
    fsdp, log = runs("fsdp_bf16", "corsa", *FSDP, "--trainer.precision", "bf16-mixed", "--model.dtype", "bfloat16",
                     "--model.gradient_checkpointing", "true")
    assert "FSDP2: frozen base sharded over 2 rank(s)" in log
    assert fsdp["summary"]["after_last_round"]["ES"] >= 0.75
