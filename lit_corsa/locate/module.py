"""LocateEditModule: ROME, MEMIT and AlphaEdit in the editing harness, beside lora / sam / dpo / corsa.

The same CLI (``train.py``; the module is chosen with ``model.class_path``, as the overlays
``configs/methods/{rome,memit,alphaedit}.yaml`` do), the same DataModules, sequential rounds, evaluation,
``metrics.json`` / plot (:class:`callbacks.edit_report.EditReport`) and ``last.ckpt`` resume
(:class:`callbacks.run_checkpoint.RunCheckpoint`). What differs is how a round changes the model:

1. ``training_step``, once per batch of the round's requests (a round is one epoch,
   ``data.epochs_per_update: 1``; ``data.batch_size`` = edits written together, so MEMIT and AlphaEdit
   write a whole round at once when it equals ``edits_per_update``): at the first step of the run, the key
   covariance of the edit layers (on general text, cached on disk) and the context prefixes are derived
   from the unedited model; then :class:`~lit_corsa.locate.editor.LocateEditor` writes the batch's facts
   into the MLP down projections in place. No optimiser, no adapter.
2. ``validation_step`` after the round: every edit of rounds 0..k is scored exactly as for the adapter
   methods; the locality token accuracy compares with the unedited model through
   :meth:`~lit_corsa.locate.edited.EditedModel.disable_adapter` (the kept original weights), so
   forgetting is measured by the same protocol (docs/corsa.md §6).

**What a run saves.** :class:`callbacks.edit_report.EditReport` calls ``model.save_pretrained`` into the
run's ``adapter/``: for these methods that is the edited weights only (``edited_weights.safetensors``, the
new values of the written down projections, + ``edit.json`` naming the base; :mod:`lit_corsa.locate.edited`),
loadable with :func:`~lit_corsa.locate.edited.load_edited` or scored again with ``model.adapter``.

**How it resumes.** A checkpoint holds the written weights' current values (the module's only
``requires_grad`` parameters, so :meth:`EditModule.state_dict` keeps exactly them) and the editor's state
(AlphaEdit's preserved keys); the covariance and the prefixes are derived again from the unedited model and
come out the same (cached file; seeded sampling). A batch is written atomically within one step, so a
resume after any step (and after any round) continues exactly as an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from data.base import EditDataModule
from lit_common.sources import load_causal_lm, load_tokenizer
from lit_corsa.evaluation import ProbeEvaluator
from lit_corsa.locate.edited import EditedModel
from lit_corsa.locate.editor import METHODS, LocateEditor
from lit_corsa.locate.settings import LocateSettings
from lit_corsa.locate.sites import edit_sites, paper_layers
from lit_corsa.locate.targets import Fact, subject_end
from lit_corsa.module import EditModule, _group
from lit_corsa.settings import EvaluationSettings


def facts_by_request(dm: EditDataModule) -> dict[int, Fact]:
    """Each request id's (prompt, subject, new answer): requests are numbered in record order at setup. Every
    prompt must hold its subject (checked here, before any round, naming the record)."""
    pairs = [(record, request) for round_ in dm.rounds for record in round_ for request in record.requests]
    for record, request in pairs:
        subject_end(request.prompt, record.subject, 0, f"{dm.source}: record {record.record_id}")
    encoded = dm.all_requests(dm.num_updates - 1)
    if len(pairs) != len(encoded):
        raise RuntimeError(f"{len(pairs)} requests in the records, {len(encoded)} encoded")
    return {e.request_id: Fact(request.prompt, record.subject, request.target_new)
            for (record, request), e in zip(pairs, encoded)}


class LocateEditModule(EditModule):
    """Edits facts into ``model_name_or_path`` with ``method`` (rome, memit, alphaedit) in place.

    Args:
        model_name_or_path: local path, hub id or ``world:model``.
        method: the locate-then-edit method (:mod:`lit_corsa.locate.editor`).
        locate: its settings (:class:`~lit_corsa.locate.settings.LocateSettings`; ``None`` values: the paper's).
        evaluation: how rounds are scored (as for every method).
        dtype: the weights' dtype.
        adapter: a saved edit (the ``adapter/`` of an earlier run) to start from, e.g. to score it again.
    """

    def __init__(
        self,
        model_name_or_path: str = "world:model",
        method: Literal["rome", "memit", "alphaedit"] = "memit",
        locate: LocateSettings = LocateSettings(),
        evaluation: EvaluationSettings = EvaluationSettings(),
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        adapter: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"LocateEditModule runs {METHODS}, not {method!r} (the adapter methods run in EditModule)")
        super().__init__(model_name_or_path=model_name_or_path, evaluation=evaluation, dtype=dtype)
        self.locate_settings = _group(LocateSettings, locate)
        self.save_hyperparameters({
            "model_name_or_path": model_name_or_path, "method": method, "dtype": dtype, "adapter": adapter,
            "locate": asdict(self.locate_settings), "evaluation": asdict(self.evaluation_settings),
        })
        self.objective = self.locate_settings.for_method(method)  # what metrics.json reports as the objective
        self.editor: LocateEditor | None = None
        self._facts: dict[int, Fact] = {}

    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp = self.hparams
        base = load_causal_lm(hp.model_name_or_path, hp.dtype)
        layers = self.locate_settings.layers or paper_layers(base, hp.method)
        sites = edit_sites(base, layers)
        base.requires_grad_(False)
        for _, layer, _ in sites.values():  # the weights this run writes: what checkpoints hold
            layer.weight.requires_grad_(True)
        self.model = EditedModel(base, [f"{name}.weight" for name, _, _ in sites.values()], hp.model_name_or_path,
                                 hp.method)
        if hp.adapter:
            self.model.load_edit(hp.adapter)
        self.model.train()  # as EditModule does; the editor writes in eval mode, Lightning evaluates in eval mode
        self.tokenizer = load_tokenizer(hp.model_name_or_path)
        self.editor = LocateEditor(hp.method, self.locate_settings, layers)
        self.objective = replace(self.objective, layers=layers)

    def configure_optimizers(self) -> None:
        """None: the edits are closed-form; the target values' small optimisations live in the editor."""

    def setup(self, stage: str) -> None:
        dm = self.datamodule
        self.evaluator = ProbeEvaluator(dm.num_updates, self.evaluation_settings)
        self._run_seed = torch.initial_seed()
        if dm.chat_template:
            raise ValueError(f"{self.hparams.method} reads facts at the subject's token in the plain prompt; "
                             "data.init_args.chat_template must be false")
        if stage == "fit" and dm.epochs_per_update != 1:
            raise ValueError(f"{self.hparams.method} writes each round's edits once: set "
                             f"data.init_args.epochs_per_update: 1 (got {dm.epochs_per_update})")
        self._facts = facts_by_request(dm)

    def on_fit_start(self) -> None:
        if self.trainer.world_size != 1:
            raise ValueError(f"{self.hparams.method} edits on one device; run it without DDP or FSDP "
                             f"(world size now {self.trainer.world_size})")

    def on_train_epoch_start(self) -> None:
        """Nothing to reset between rounds: there is no optimiser."""

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if not self.editor.prepared:
            self.editor.prepare(self.model, self.tokenizer, self._run_seed)
            if self.hparams.method == "alphaedit":
                rank_zero_info(f"AlphaEdit may write these many key directions per layer (its null space): "
                               f"{self.editor.null_space_dims()}")
        facts = [self._facts[int(i)] for i in batch["request_id"]]
        self.editor.edit(self.model, self.tokenizer, facts)
        self._check_restored_state_is_finite()
        size = len(facts)
        self.log("train/round", float(self.datamodule.current_round), batch_size=size)
        self.log("train/relative_change", max(self.model.changed().values()), batch_size=size)

    def _check_restored_state_is_finite(self) -> None:
        """After a restore and after every write: a non-finite edited weight stops the run, naming it."""
        bad = [name for name, p in self.model.edited.items() if not bool(torch.isfinite(p).all())]
        if bad:
            raise FloatingPointError(f"non-finite values in {', '.join(bad)} (round {self.datamodule.current_round}; "
                                     "a corrupted checkpoint, or an edit that diverged)")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["locate_editor"] = self.editor.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "locate_editor" in checkpoint:
            self.editor.load_state_dict(checkpoint["locate_editor"])
