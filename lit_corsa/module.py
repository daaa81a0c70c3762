"""EditModule: sequential knowledge editing of any HF causal LM through one LoRA adapter.

Manual optimisation, because a CoRSA step needs the SFT and DPO gradients apart (PCGrad) and two
passes per update (SAM); the maths lives in :mod:`lit_corsa.step`, this module orchestrates it.

The life of a round (``num_updates`` rounds of ``epochs_per_update`` epochs, set on the data):

1. ``on_train_epoch_start`` of the round's first epoch: with ``optimizer.fresh_per_round``, AdamW's
   moments are cleared; the learning-rate schedule (linear warm-up, linear decay) restarts by itself,
   because every round is an editing job of its own.
2. ``training_step``, the first of the round: the frozen base's log-probs of each of the round's new and
   old answers are computed once, with the adapter disabled (DPO's reference; never a second forward per
   step). Every step: the objective's gradient of one micro-batch (:class:`~lit_corsa.step.EditStep`),
   accumulated over ``optimizer.accumulate`` micro-batches, all-reduced once across ranks, clipped, stepped.
3. ``validation_step`` after the round's last epoch: every edit of rounds 0..k is scored
   (:class:`~lit_corsa.evaluation.ProbeEvaluator`); ``on_validation_epoch_end`` publishes the result as
   :attr:`EditModule.scores`, which :class:`callbacks.edit_report.EditReport` records.

Around that:

- the base model is loaded in ``configure_model`` and wrapped in a peft LoRA adapter; only the adapter
  is trainable and only the adapter goes into checkpoints (the frozen base is reloaded from its path);
  under ``ModelParallelStrategy`` (FSDP2) the base is read by rank 0 only and sharded, the adapter is not
  (:mod:`lit_corsa.sharding`), so the step and the all-reduce are the same as under DDP;
- a resume at any batch continues exactly: the loader skips the batches done (``data.loaders``), a
  half-accumulated update is in the checkpoint (every rank's), random draws are seeded by position
  (:mod:`lit_corsa.seeding`), and a checkpoint made with other settings is refused;
- a non-finite loss, gradient or adapter weight stops the run with an error before anything is
  stepped or saved, and so does a checkpoint that holds one.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from data.base import EditDataModule
from lit_common.sources import empty_causal_lm, load_causal_lm, load_tokenizer
from lit_corsa.evaluation import ProbeEvaluator, RoundScores, metric_names
from lit_corsa.lora import wrap_with_lora
from lit_corsa.losses import next_token_logprobs, sequence_logprobs
from lit_corsa.objectives import resolve_objective
from lit_corsa.seeding import position_seed
from lit_corsa.settings import (
    EvaluationSettings,
    LoraSettings,
    ObjectiveSettings,
    OptimizerSettings,
)
from lit_corsa.sharding import data_parallel_mesh, loads_weights, shard_from_rank0
from lit_corsa.step import EditStep

# what a resumed run may change: how rounds are scored and how activations are stored, not what is trained
CHANGEABLE_ON_RESUME = frozenset({"evaluation", "gradient_checkpointing"})


def _group(cls: type, value: Any) -> Any:
    """A settings group from the CLI (an instance) or from a checkpoint's hyper-parameters (a dict)."""
    return cls(**value) if isinstance(value, dict) else value


class EditModule(L.LightningModule):
    """Edits facts into ``model_name_or_path`` with ``method`` (lora, sam, dpo, corsa, easyedit_dpo).

    Args:
        model_name_or_path: local path, hub id or ``world:model``.
        method: the objective (see :mod:`lit_corsa.objectives`).
        objective / lora / optimizer / evaluation: the settings groups of :mod:`lit_corsa.settings`.
        dtype: weights' dtype ("float32", "bfloat16", "float16", "auto"); ``load_in_4bit`` for a
            QLoRA-style NF4 base; ``gradient_checkpointing`` trades compute for activation memory.
        adapter: a saved adapter (the ``adapter/`` that :class:`callbacks.edit_report.EditReport` writes) to
            start from instead of a fresh one, e.g. to score it with ``train.py validate``; its own rank,
            alpha and targets apply, ``lora`` is then unused.
    """

    scores: RoundScores | None
    """The scores of the latest evaluation (validation or test), for callbacks to record."""

    def __init__(
        self,
        model_name_or_path: str = "world:model",
        method: Literal["lora", "sam", "dpo", "corsa", "easyedit_dpo"] = "corsa",
        objective: ObjectiveSettings = ObjectiveSettings(),
        lora: LoraSettings = LoraSettings(),
        optimizer: OptimizerSettings = OptimizerSettings(),
        evaluation: EvaluationSettings = EvaluationSettings(),
        dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32",
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        adapter: str | None = None,
    ) -> None:
        super().__init__()
        self.objective_settings = _group(ObjectiveSettings, objective)
        self.lora_settings = _group(LoraSettings, lora)
        self.optimizer_settings = _group(OptimizerSettings, optimizer)
        self.evaluation_settings = _group(EvaluationSettings, evaluation)
        self.save_hyperparameters({  # plain values: checkpoints load with weights_only=True
            "model_name_or_path": model_name_or_path, "method": method, "dtype": dtype,
            "load_in_4bit": load_in_4bit, "gradient_checkpointing": gradient_checkpointing, "adapter": adapter,
            "objective": asdict(self.objective_settings), "lora": asdict(self.lora_settings),
            "optimizer": asdict(self.optimizer_settings), "evaluation": asdict(self.evaluation_settings),
        })
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the adapter only; the frozen base comes from its path
        self.objective = resolve_objective(method, self.objective_settings)
        self.step_fn = EditStep(self.objective, self.objective_settings.beta, self.objective_settings.rho)
        self.model = None
        self.evaluator: ProbeEvaluator | None = None
        self.scores = None
        self._accumulated: list[Tensor | None] | None = None
        self._reference: Tensor | None = None  # [num_requests, 2] base log-probs (chosen, rejected); NaN = not yet
        self._run_seed = 0

    # ---- model -----------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        hp, lora = self.hparams, self.lora_settings
        mesh = data_parallel_mesh(self.device_mesh) if self.device_mesh is not None else None  # FSDP2
        if mesh is not None and hp.load_in_4bit:
            raise ValueError("load_in_4bit and FSDP sharding (ModelParallelStrategy) do not combine: bitsandbytes' "
                             "packed 4-bit weights cannot be sharded by fully_shard; use one or the other")
        if mesh is None or loads_weights(mesh):
            base = load_causal_lm(hp.model_name_or_path, hp.dtype, hp.load_in_4bit)
        else:
            base = empty_causal_lm(hp.model_name_or_path, hp.dtype)
        self.model = wrap_with_lora(base, lora.r, lora.alpha, lora.dropout, lora.target_modules,
                                    hp.gradient_checkpointing, hp.adapter)
        self.model.train()  # from_pretrained returns eval mode; train as HF's Trainer does (the base's dropout on)
        if mesh is not None:
            shard_from_rank0(self.model, mesh)
        self.tokenizer = load_tokenizer(hp.model_name_or_path)

    @property
    def trainable(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Only the adapter (and metric states are not worth keeping): the base weights never change."""
        full = super().state_dict(*args, **kwargs)
        keep = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in keep}

    @property
    def datamodule(self) -> EditDataModule:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, EditDataModule):
            raise TypeError(f"EditModule needs an EditDataModule, got {type(datamodule).__name__}")
        return datamodule

    def setup(self, stage: str) -> None:
        dm = self.datamodule  # Lightning has set it up already (data before module)
        self.evaluator = ProbeEvaluator(dm.num_updates, self.evaluation_settings, lockstep=self.device_mesh is not None)
        self._reference = torch.full((dm.request_count, 2), float("nan"))
        self._run_seed = torch.initial_seed()  # seed_everything's seed, the same again in a resumed process
        if self.objective.use_dpo and not dm.has_old_answers():
            rank_zero_warn("no edit has an old answer: the DPO margin term will contribute nothing")
        if self.objective.locality_weight > 0 and not dm.locality_anchors:
            raise ValueError(f"model.objective.locality_weight={self.objective.locality_weight} needs prompts to keep: "
                             "set data.init_args.locality_anchors (e.g. 2)")

    def on_fit_start(self) -> None:
        if str(self.trainer.precision).startswith("16"):
            raise ValueError("fp16 loss scaling is not supported by the SAM step; use precision bf16-mixed or 32")
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError("set model.optimizer.accumulate instead of trainer.accumulate_grad_batches "
                             "(manual optimisation)")
        strategy = type(self.trainer.strategy).__name__
        if strategy not in ("SingleDeviceStrategy", "DDPStrategy", "ModelParallelStrategy"):
            raise ValueError(f"{strategy} is not supported by the CoRSA step (it takes gradients with autograd.grad "
                             "on the LoRA parameters and all-reduces them itself): use a single device, DDP, or "
                             "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1) to "
                             "shard the frozen base with FSDP2 (configs/strategies/fsdp_node.yaml); Lightning's "
                             "FSDPStrategy would shard the adapter too")
        ddp = self.trainer.model if hasattr(self.trainer.model, "require_backward_grad_sync") else None
        if ddp is not None:  # we all-reduce the merged update ourselves, once per optimiser step
            ddp.require_backward_grad_sync = False

    # ---- optimiser ---------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        settings = self.optimizer_settings
        optimizer = torch.optim.AdamW(self.trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        # from the data alone (not from max_epochs), so a run stopped early schedules like a full one
        steps_per_round = self.datamodule.optimizer_steps_per_round(self.trainer.world_size, settings.accumulate)
        starts = list(itertools.accumulate(steps_per_round, initial=0))

        def factor(step: int) -> float:  # warm-up then linear decay, restarted every round
            k = min(bisect.bisect_right(starts, step), len(steps_per_round)) - 1
            in_round, length = step - starts[k], steps_per_round[k]
            warmup = min(settings.warmup_steps, length)
            if in_round < warmup:
                return (in_round + 1) / warmup
            return max(0.0, (length - in_round) / max(1, length - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- training ----------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        """Not called when Lightning resumes inside an epoch, so it holds nothing a step depends on."""
        round_starts = self.current_epoch % self.datamodule.epochs_per_update == 0
        if round_starts and self.current_epoch > 0 and self.optimizer_settings.fresh_per_round:
            self.optimizers().optimizer.state.clear()
        self._accumulated = None

    def _reference_for(self, request_ids: Tensor) -> Tensor:
        """The base log-probs of these requests, computing the current round's at its first step."""
        rows = self._reference[request_ids.cpu()]
        if bool(torch.isnan(rows).any()):  # every rank reaches this at the same step (each caches the whole round)
            self._cache_reference()
            rows = self._reference[request_ids.cpu()]
        return rows.to(self.device)

    @torch.no_grad()
    def _cache_reference(self) -> None:
        """Base-model log-probs of this round's new and old answers, computed once per edit."""
        dm = self.datamodule
        requests = [r for r in dm.requests_of_round(dm.current_round) if torch.isnan(self._reference[r.request_id, 0])]
        if not requests:
            return
        was_training = self.model.training
        self.model.eval()
        with self.model.disable_adapter():
            for batch in dm.request_loader(requests):
                batch = self.trainer.strategy.batch_to_device(batch)
                for column, key in ((0, "chosen"), (1, "rejected")):
                    seq = batch[key]
                    logits = self.model(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"]).logits
                    self._reference[batch["request_id"].cpu(), column] = sequence_logprobs(logits, seq["labels"]).float().cpu()
        self.model.train(was_training)

    @torch.no_grad()
    def _anchor_reference(self, anchors: dict[str, Tensor]) -> Tensor:
        """The base model's next-token log-probs after the batch's anchor prompts (the locality target); per
        batch rather than cached, as anchors are few and drawn per request."""
        with self.model.disable_adapter():
            logits = self.model(input_ids=anchors["input_ids"], attention_mask=anchors["attention_mask"]).logits
        return next_token_logprobs(logits, anchors["attention_mask"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        accumulate = self.optimizer_settings.accumulate
        torch.manual_seed(position_seed(self._run_seed, "train", self.current_epoch, batch_idx, self.global_rank))
        reference = self._reference_for(batch["request_id"]) if self.objective.use_dpo else None
        anchor_reference = self._anchor_reference(batch["anchors"]) if self.objective.locality_weight > 0 else None
        grads, logs = self.step_fn(self.model, self.trainable, batch, reference, scale=1.0 / accumulate,
                                   anchor_reference=anchor_reference)
        losses = {k: logs[k] for k in ("sft", "dpo") if k in logs}
        if not _all_finite(losses.values()):
            self._fail_non_finite("loss (" + ", ".join(f"{k} {float(v)}" for k, v in losses.items()) + ")")
        self._accumulate(grads)
        if (batch_idx + 1) % accumulate == 0 or self.trainer.is_last_batch:
            self._optimizer_step()
        batch_size = batch["chosen"]["input_ids"].shape[0]
        self.log_dict({f"train/{k}": v.float() for k, v in logs.items()}, prog_bar=False, batch_size=batch_size)
        self.log("train/round", float(self.datamodule.current_round), batch_size=batch_size)

    def _fail_non_finite(self, what: str) -> None:
        raise FloatingPointError(
            f"non-finite {what} at epoch {self.current_epoch} (round {self.datamodule.current_round}), optimiser step "
            f"{self.global_step}: the run stops before stepping or saving it. Lower model.optimizer.learning_rate "
            f"(now {self.optimizer_settings.learning_rate}) or check the checkpoint and data this run started from.")

    def _accumulate(self, grads: list[Tensor | None]) -> None:
        if self._accumulated is None:
            self._accumulated = [g.detach().clone() if g is not None else None for g in grads]
            return
        for i, g in enumerate(grads):
            if g is None:
                continue
            self._accumulated[i] = g.detach().clone() if self._accumulated[i] is None else self._accumulated[i] + g

    def _optimizer_step(self) -> None:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(self._accumulated, self.trainable)]
        if self.trainer.world_size > 1:  # one all-reduce of the whole merged update
            flat = self.trainer.strategy.reduce(torch.cat([g.reshape(-1).float() for g in grads]), reduce_op="mean")
            grads = [chunk.view_as(g).to(g.dtype) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
        if not _all_finite(grads):
            self._fail_non_finite("gradient")
        for p, g in zip(self.trainable, grads):
            p.grad = g
        self.clip_gradients(optimizer, gradient_clip_val=self.optimizer_settings.max_grad_norm,
                            gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self._accumulated = None
        if not _all_finite(self.trainable):
            self._fail_non_finite("adapter weight after the optimiser step")

    # ---- checkpointed state ------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A half-accumulated update, every rank's (the hook runs on all ranks; the file is rank 0's)."""
        checkpoint["edit_accumulated"] = None
        if self._accumulated is not None:
            flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                              for g, p in zip(self._accumulated, self.trainable)])
            gathered = self.all_gather(flat) if self.trainer.world_size > 1 else flat[None]
            checkpoint["edit_accumulated"] = gathered.cpu()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting:
            self._check_same_settings(checkpoint.get("hyper_parameters", {}))
        accumulated = checkpoint.get("edit_accumulated") if fitting else None
        if accumulated is not None:
            if accumulated.shape[0] != self.trainer.world_size:
                raise ValueError(f"the checkpoint was saved halfway through a gradient accumulation by "
                                 f"{accumulated.shape[0]} processes; resume it with as many (now {self.trainer.world_size})")
            sizes = [p.numel() for p in self.trainable]
            self._accumulated = [chunk.view_as(p).to(p) for chunk, p in
                                 zip(accumulated[self.global_rank].split(sizes), self.trainable)]

    def on_train_start(self) -> None:
        self._check_restored_state_is_finite()

    def on_test_start(self) -> None:
        self._check_restored_state_is_finite()

    def _check_restored_state_is_finite(self) -> None:
        """After any restore (a checkpoint file, or a distributed checkpoint loaded straight into the module):
        a flipped bit in a stored tensor would otherwise turn every later score into 0 without an error."""
        names = {id(p): n for n, p in self.model.named_parameters() if p.requires_grad}
        bad = [names[id(p)] for p in self.trainable if not _all_finite([p])]
        optimizer = self.optimizers().optimizer if self.trainer.training else None
        if optimizer is not None:
            bad += [f"AdamW state of {names.get(id(p), 'a parameter')}" for p, state in optimizer.state.items()
                    if not _all_finite(t for t in state.values() if torch.is_tensor(t))]
        if bad:
            raise ValueError(f"non-finite values in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} after "
                             f"restoring {self.trainer.ckpt_path}: the checkpoint is corrupted or was saved after "
                             "the run diverged")

    def _check_same_settings(self, saved: dict[str, Any]) -> None:
        """Resuming with other training settings would silently mix two runs: refuse, naming them."""
        changed = [f"{name}: {saved[name]!r} in the checkpoint, {now!r} now" for name, now in self.hparams.items()
                   if name in saved and name not in CHANGEABLE_ON_RESUME and saved[name] != now]
        if changed:
            raise ValueError(f"the checkpoint to resume was trained with other settings ({'; '.join(changed)}); "
                             "start a new run (--ckpt_path null, or another trainer.logger.init_args.name) or "
                             "restore them")

    # ---- evaluation --------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.evaluator.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        seed = position_seed(self._run_seed, "eval", self.datamodule.current_round, batch_idx, self.global_rank)
        self.evaluator.update(self.model, batch, self.tokenizer, seed)

    def on_validation_epoch_end(self) -> None:
        self._score_and_log("val")

    test_step = validation_step
    on_test_epoch_start = on_validation_epoch_start

    def on_test_epoch_end(self) -> None:
        self._score_and_log("test")

    def _score_and_log(self, prefix: str) -> None:
        dm = self.datamodule
        names_by_round = {
            r: metric_names((p.probe for p in dm.eval_probes(r) if p.edit_round == r), self.evaluation_settings.generation)
            for r in range(dm.current_round + 1)
        }
        self.scores = self.evaluator.compute(dm.current_round, names_by_round)
        # torchmetrics already reduced the scores over ranks, so every rank holds the same values and the
        # mean that sync_dist takes leaves them unchanged (and every rank can monitor them)
        for name, value in self.scores.all.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)


def _all_finite(tensors: Any) -> bool:
    """One device sync for a whole list of tensors (``None`` entries are skipped)."""
    flags = [torch.isfinite(t.detach()).all() for t in tensors if t is not None]
    return not flags or bool(torch.stack(flags).all())
