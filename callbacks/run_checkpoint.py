"""RunCheckpoint: one resumable checkpoint per run, refreshed often, written atomically, found by a rerun.

Lightning's ``ModelCheckpoint(save_last=True, save_top_k=0)`` writes ``last.ckpt`` only when training ends,
inside the logger's ``version_N`` directory (a new one for every run, so rerunning the same command never
finds it), and writes it in place (a save interrupted by a kill or a full disk leaves a truncated file
where the previous good one was). On SIGTERM Lightning exits with status 0 and saves nothing, and SLURM's
SIGUSR1 makes it save an hpc checkpoint from inside the signal handler, possibly halfway through an
optimiser step. This subclass keeps ModelCheckpoint's interface and fixes each of those:

- ``last.ckpt`` lives in ``<logger save_dir>/<logger name>/checkpoints`` (the run's directory without its
  version), or ``<default_root_dir>/checkpoints`` without a logger, unless ``dirpath`` is given. The CLIs
  default to ``ckpt_path="last"``, so rerunning the same command resumes (``--ckpt_path null`` starts over).
- It is refreshed after every validation (for editing: after every round), every ``every_n_train_steps``
  optimiser steps, when training ends, and on SIGTERM, which then exits with status 143 (128 + SIGTERM).
- It is written to a temporary name in the same directory, flushed to disk, then renamed over the old one:
  a crash or a full disk during a save leaves the previous checkpoint intact.
- SIGUSR1 (SLURM's requeue signal, when Lightning handles it) is acted on at the next batch boundary, so
  the hpc checkpoint holds a consistent state; under SLURM the newest hpc checkpoint is a resume
  candidate beside ``last.ckpt``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import warnings
from pathlib import Path
from types import FrameType
from typing import Any, Callable

import lightning.pytorch as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lit_common.files import replace_atomically

SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
PARTIAL_SUFFIX = ".partial"
RESUME_DEFAULTS = Path(__file__).resolve().parents[1] / "configs" / "defaults" / "resume.yaml"


def resume_by_default(*subcommands: str) -> dict[str, dict[str, Any]]:
    """LightningCLI ``parser_kwargs`` that make ``ckpt_path: last`` the default of these subcommands.

    Lightning warns when ``last`` finds nothing; a new run is normal here, and :class:`RunCheckpoint`
    says which case it is, so that warning is silenced."""
    warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')
    return {name: {"default_config_files": [str(RESUME_DEFAULTS)]} for name in subcommands}


def run_checkpoint_dir(trainer: L.Trainer) -> Path:
    """The run's checkpoint directory: the logger's run directory without its version, else the root dir."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is not None and logger.save_dir is not None:
        return Path(logger.save_dir) / str(logger.name) / "checkpoints"
    return Path(trainer.default_root_dir) / "checkpoints"


def _numerics() -> dict[str, Any]:
    """What decides how floating-point reductions are split and rounded in this process."""
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _validation_follows(trainer: L.Trainer) -> bool:
    """Whether an evaluation runs right after this batch. Lightning resumes a checkpoint saved there as an
    epoch already complete and skips that evaluation, so a round's scores would be lost; the save after
    the evaluation comes moments later instead."""
    every = trainer.check_val_every_n_epoch
    return bool(trainer.is_last_batch and trainer.enable_validation
                and (every is None or (trainer.current_epoch + 1) % every == 0))


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` of a run (see the module docstring); ``every_n_train_steps`` adds saves within rounds.
    It keeps one checkpoint only: add Lightning's ModelCheckpoint beside it for top-k checkpoints."""

    def __init__(self, dirpath: str | None = None, every_n_train_steps: int | None = None) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be positive (or 0/None: only after rounds), got {every_n_train_steps}")
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True,
                         enable_version_counter=False)
        self._usr1_handler: Callable[[int, FrameType | None], Any] | None = None
        self._signal_pending = self._signal_handled = False

    @property
    def state_key(self) -> str:
        """One per run, whatever its save cadence: a rerun with another ``every_n_train_steps`` still finds its state."""
        return type(self).__qualname__

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "numerics": _numerics()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when a resume cannot be bit-identical: reductions split differently over threads, devices or
        library versions round differently (the README's "resumes identically" holds for the same ones)."""
        super().load_state_dict(state_dict)
        saved, now = state_dict.get("numerics"), _numerics()
        if saved is not None and saved != now:
            changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)
            rank_zero_warn(f"resuming with other numerics ({changed}): the run continues correctly, but its "
                           "results will differ slightly from an uninterrupted run's")

    # ---- where the checkpoint lives, and what a rerun resumes from ----------------------------------------
    def _resolve_dir(self, trainer: L.Trainer) -> None:
        if self.dirpath is None:
            self.dirpath = str(run_checkpoint_dir(trainer))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._resolve_dir(trainer)
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and stage == "fit":
            for stale in Path(self.dirpath).glob(f"*{PARTIAL_SUFFIX}*"):  # a save that a crash interrupted
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        """``last.ckpt`` in the run directory and, under SLURM, the newest hpc checkpoint (Lightning saves
        one on the requeue signal); ``ckpt_path="last"`` takes the most recently written of them."""
        self._resolve_dir(trainer)
        candidates = super()._find_last_checkpoints(trainer)
        if SLURMEnvironment.detect():
            numbered = [(int(m.group(1)), p) for p in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
                        if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
            if numbered:
                candidates.add(os.path.normpath(max(numbered)[1]))
        return candidates

    # ---- when it is written -------------------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After every evaluation, also when a step save just happened: the scores are new state."""
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any, **kwargs: Any) -> None:
        every = self._every_n_train_steps
        if (every and trainer.global_step > 0 and trainer.global_step % every == 0
                and not _validation_follows(trainer) and not self._should_skip_saving_checkpoint(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._run_deferred_signal(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The state at the end of training, unless the last save already holds it (Lightning's own check
        only asks whether anything was saved at all)."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._restore_signal_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """SIGTERM: save (unless it came during an evaluation, whose partial scores cannot be resumed) and
        turn Lightning's exit status 0 into 143, so schedulers and scripts see that the run did not finish."""
        if not isinstance(exception, SIGTERMException):
            return
        in_evaluation = trainer.state.stage in (RunningStage.VALIDATING, RunningStage.SANITY_CHECKING)
        if not in_evaluation and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        exception.code = SIGTERM_EXIT_CODE
        rank_zero_info(f"SIGTERM: stopped at step {trainer.global_step}; {self.last_model_path or 'no checkpoint'} "
                       "holds the latest saved state; rerun the same command to resume from it")

    # ---- how it is written --------------------------------------------------------------------------------
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        target = Path(filepath)
        partial = target.with_name(f"{target.name}{PARTIAL_SUFFIX}")
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
            if trainer.is_global_zero:
                replace_atomically(partial, target)
        except OSError as err:
            if trainer.is_global_zero and partial.exists():
                shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
            raise OSError(f"could not write checkpoint {target} ({err}); the previous checkpoint there, if any, "
                          "is intact") from err
        trainer.strategy.barrier("RunCheckpoint.replace")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path:
            rank_zero_info(f"Resumed from {trainer.ckpt_path} at step {trainer.global_step} "
                           "(--ckpt_path null starts over)")
        else:
            rank_zero_info(f"No checkpoint in {self.dirpath}: a new run")
        self._defer_requeue_signal()

    # ---- SLURM's requeue signal, deferred to a batch boundary ---------------------------------------------
    def _defer_requeue_signal(self) -> None:
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler):  # Lightning's auto-requeue (SLURM): hpc save + requeue, run between batches
            self._usr1_handler = handler
            signal.signal(signal.SIGUSR1, self._defer_signal)

    def _defer_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self._signal_handled:  # SLURM signals a job once; the requeue is already done
            self._signal_pending = True

    def _run_deferred_signal(self, trainer: L.Trainer) -> None:
        """Every rank saves at the same batch boundary (the save is a collective), once any rank got it."""
        if self._usr1_handler is None:
            return
        pending = self._signal_pending
        if trainer.world_size > 1:
            pending = trainer.strategy.reduce_boolean_decision(pending, all=False)
        if pending:
            self._signal_pending, self._signal_handled = False, True
            self._usr1_handler(signal.SIGUSR1, None)

    def _restore_signal_handler(self) -> None:
        if self._usr1_handler is not None and signal.getsignal(signal.SIGUSR1) == self._defer_signal:
            signal.signal(signal.SIGUSR1, self._usr1_handler)
        self._usr1_handler = None
