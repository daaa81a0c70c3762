"""A callback that kills its own process at a chosen point, for fault-injection tests.

``LIT_TEST_KILL="<hook>:<value>:<signal>"``, e.g. ``train_batch_end:5:KILL`` (after optimiser step 5),
``validation_end:1:KILL`` (after round 1's evaluation, before the checkpoint callbacks run: Lightning
runs checkpoint callbacks last), ``train_epoch_start:4:KILL``, ``train_batch_end:9:TERM``. Without the variable it does nothing, so
the interrupted run and its rerun are the same command.

TaCQ's quantization runs inside one hook (``on_fit_end``), block by block: ``final_block:2:KILL`` kills right
after the work directory (``lit_tacq.workdir``) committed 2 blocks of the final pass. For it the switch wraps
that commit in this process's ``WorkDir`` class when the trainer sets up; nothing outside the test's own
process is touched.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as L

from lit_tacq.workdir import WorkDir

QUANTIZATION_HOOKS = ("final_block",)


class KillSwitch(L.Callback):
    def __init__(self) -> None:
        spec = os.environ.get("LIT_TEST_KILL")
        self.hook, value, name = spec.split(":") if spec else (None, "0", "KILL")
        self.value, self.signal = int(value), getattr(signal, f"SIG{name}")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.hook in QUANTIZATION_HOOKS:
            commit = getattr(WorkDir, f"finish_{self.hook}")

            def commit_then_maybe_kill(work: WorkDir, index: int, *args: object) -> None:
                commit(work, index, *args)
                self._maybe_kill(self.hook, index + 1)

            setattr(WorkDir, f"finish_{self.hook}", commit_then_maybe_kill)

    def _maybe_kill(self, hook: str, value: int) -> None:
        if hook == self.hook and value == self.value:
            os.kill(os.getpid(), self.signal)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self._maybe_kill("train_batch_end", trainer.global_step)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_kill("train_epoch_start", trainer.current_epoch)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._maybe_kill("validation_end", trainer.datamodule.current_round)
