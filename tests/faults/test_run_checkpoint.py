"""RunCheckpoint on a small model: where last.ckpt lives and how a rerun finds it, atomic replacement under a
failing write, SIGTERM (save, exit 143) and SLURM's SIGUSR1 acted on between batches."""

import errno
import os
import signal
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger

from callbacks.run_checkpoint import RunCheckpoint, resume_by_default


class Model(BoringModel):
    """Calls ``on_step(self, batch_idx)`` inside each training step (where a signal would land)."""

    def __init__(self, on_step=None) -> None:
        super().__init__()
        self.on_step = on_step

    def training_step(self, batch, batch_idx):
        if self.on_step is not None:
            self.on_step(self, batch_idx)
        return super().training_step(batch, batch_idx)


def _trainer(tmp_path: Path, **kwargs) -> tuple[L.Trainer, RunCheckpoint]:
    checkpoint = RunCheckpoint(every_n_train_steps=kwargs.pop("every", None))
    trainer = L.Trainer(default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="run"), callbacks=[checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        **{"max_epochs": 1, "limit_train_batches": 8, **kwargs})
    return trainer, checkpoint


def test_last_checkpoint_is_kept_outside_the_version_and_a_rerun_resumes_from_it(tmp_path):
    resume_by_default("fit")  # what the CLIs do: "last" finding nothing is a new run, not a warning
    trainer, checkpoint = _trainer(tmp_path, every=3)
    trainer.fit(Model(), ckpt_path="last")
    assert Path(checkpoint.dirpath) == tmp_path / "run" / "checkpoints"  # not run/version_0/checkpoints
    assert torch.load(Path(checkpoint.dirpath) / "last.ckpt", weights_only=True)["global_step"] == 8  # train end
    again, _ = _trainer(tmp_path, max_epochs=2)  # another version, and other step saves: the same run
    again.fit(Model(), ckpt_path="last")
    assert again.logger.version == 1 and Path(again.ckpt_path) == Path(checkpoint.dirpath) / "last.ckpt"
    assert again.global_step == 16  # continued from 8, not restarted


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    trainer, checkpoint = _trainer(tmp_path, max_steps=2)
    trainer.fit(Model())
    last = Path(checkpoint.dirpath) / "last.ckpt"
    before = last.read_bytes()

    def disk_full(path, weights_only=False, storage_options=None):
        Path(path).write_bytes(before[: len(before) // 2])  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last.ckpt .*No space left.*is intact"):
        checkpoint._save_checkpoint(trainer, str(last))
    assert last.read_bytes() == before and torch.load(last, weights_only=True)["global_step"] == 2
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind


def test_a_crash_during_a_save_leaves_a_partial_file_that_the_next_run_removes(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    (directory / "last.ckpt.partial").write_bytes(b"truncated")
    trainer, _ = _trainer(tmp_path, max_steps=1)
    trainer.fit(Model())
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt"]


def test_sigterm_saves_and_exits_143(tmp_path):
    def terminate_at_step_3(module, batch_idx):
        if module.trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer, checkpoint = _trainer(tmp_path, every=100)
    with pytest.raises(SystemExit) as stopped:
        trainer.fit(Model(terminate_at_step_3))
    assert stopped.value.code == 143
    assert torch.load(Path(checkpoint.dirpath) / "last.ckpt", weights_only=True)["global_step"] == 4


def test_slurm_requeue_signal_runs_between_batches_and_its_checkpoint_is_a_resume_candidate(tmp_path, monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(len(steps_entered)))
    steps_entered = []

    def signal_inside_step_2(module, batch_idx):
        steps_entered.append(batch_idx)
        if batch_idx == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert calls == []  # not inside the step: it waits for the batch boundary

    try:
        trainer, checkpoint = _trainer(tmp_path, max_steps=5)
        trainer.fit(Model(signal_inside_step_2))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == [3]  # after step 2 (the third batch) ended, before the next began

    hpc = tmp_path / "hpc_ckpt_2.ckpt"
    hpc.write_bytes((Path(checkpoint.dirpath) / "last.ckpt").read_bytes())
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job", "SLURM_JOB_ID": "1"}.items():
        monkeypatch.setenv(name, value)
    assert str(hpc) in checkpoint._find_last_checkpoints(trainer)


def test_resuming_with_another_thread_count_warns_that_results_will_differ(tmp_path):
    trainer, _ = _trainer(tmp_path, max_epochs=1)
    trainer.fit(Model())
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        again, _ = _trainer(tmp_path, max_epochs=2)
        with pytest.warns(UserWarning, match=rf"other numerics \(threads {threads} -> {threads + 1}\)"):
            again.fit(Model(), ckpt_path="last")
    finally:
        torch.set_num_threads(threads)
