"""CalibrationModule: one "fit" epoch that measures gradients and never updates a weight.

Each training step is one calibration example: its mean next-token cross-entropy (all tokens, or the
answer's when the data module says so through ``labels``), a backward pass, and nothing else. Manual
optimisation whose only "optimiser" is :class:`StepClock` (no model parameter, a step that does nothing)
makes "never updates a weight" structural, while Lightning's step counter still counts calibration
examples, so ``max_steps`` and ``ModelCheckpoint(every_n_train_steps=...)`` work as usual.
Only the decoder Linear weights require gradients (found by type, ``lit_common.layers``), so the backward
pass computes exactly the gradients TaCQ's accumulator reads (``callbacks/tacq.py``) and no others.

A non-finite loss stops the run with the example's index before its backward pass (the callback checks
the gradients the same way), so no NaN can reach A and, through it, the mask.

The model stays in eval mode (``from_pretrained``'s default): no dropout, so each example's gradient
depends on the example alone and a resumed calibration reproduces an uninterrupted one.

The weights never change, so checkpoints hold none of them (the base is reloaded from its path, as
``lit_corsa``'s module does with its frozen base): a calibration checkpoint is small, and no quantized
weight can ever end up in it.

**Quantizing an edited model.** ``adapter`` names an editing run's saved peft adapter (the ``adapter/`` that
``callbacks/edit_report.py`` writes): it is loaded onto the base and merged into its weights
(``merge_and_unload``) before anything else, so calibration, quantization and export see one plain model, the
edited one, and no TaCQ code knows about adapters. This goes through peft, not through ``lit_corsa``: the two
products share only ``lit_common`` and ``data`` (README), and a saved peft adapter is a peft format, not a
``lit_corsa`` one. :attr:`CalibrationModule.adapter_record` says which adapter was merged (path, sha256 of its
weights, the base it was trained on, rank and targets); the callback writes it into the packed model's
manifest, next to the edits the calibration data names (``lit_tacq.calibration``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor
from transformers import PreTrainedModel

from lit_common.layers import decoder_linears, require_nn_linear
from lit_common.sources import DTYPES, load_causal_lm
from lit_tacq.calibration import example_index


def freeze_all_but_decoder_linears(model: PreTrainedModel) -> dict[str, torch.nn.Linear]:
    """Make only the decoder Linear weights trainable (biases, norms, embeddings, lm_head frozen)."""
    model.requires_grad_(False)
    linears = require_nn_linear(decoder_linears(model))
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    return linears


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def check_adapter_dir(adapter: str) -> Path:
    """A saved peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``), or a ValueError
    that names what is missing (checked when the config is read, before any model is loaded)."""
    path = Path(adapter)
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (path / name).is_file()]
    if missing:
        raise ValueError(f"model adapter={adapter!r} is not a saved peft adapter directory: {', '.join(missing)} "
                         "missing (an editing run writes one to runs/<name>/version_N/adapter)")
    return path


def adapter_record(adapter: str, merged_into: str) -> dict[str, Any]:
    """What identifies a saved adapter: its resolved path, the sha256 of its weights file, the model it is merged
    into here and the one it was trained on, its rank, alpha and target modules (its ``adapter_config.json``)."""
    path = check_adapter_dir(adapter)
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    targets = config.get("target_modules")
    return {
        "path": str(path.resolve()),
        "merged_into": merged_into,
        "sha256": hashlib.sha256((path / ADAPTER_WEIGHTS).read_bytes()).hexdigest(),
        "base_model_name_or_path": config.get("base_model_name_or_path"),
        "peft_type": config.get("peft_type"),
        "r": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": sorted(targets) if isinstance(targets, list) else targets,
    }


def merge_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """``model`` with the saved peft adapter folded into its weights, as a plain model (module docstring)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(check_adapter_dir(adapter))).merge_and_unload()


class StepClock(torch.optim.Optimizer):
    """An optimiser over one dummy scalar (no model parameter) whose ``step`` changes nothing.

    In manual optimisation Lightning's ``global_step`` counts optimiser steps; stepping this clock once
    per example makes it count examples without any weight being touched.
    """

    def __init__(self) -> None:
        super().__init__([torch.zeros(())], {})

    def step(self, closure: Any = None) -> Any:
        return closure() if closure is not None else None


class CalibrationModule(L.LightningModule):
    """Per-example losses and gradients of a causal LM over the calibration data; no optimiser step.

    Args:
        model_name_or_path: local path, hub id or ``world:model``.
        dtype: weights' dtype ("float32", "bfloat16", "float16"); the accumulator is float32 regardless.
        gradient_checkpointing: trade compute for activation memory (large models, long sequences).
        adapter: a saved peft adapter (an editing run's ``adapter/``) merged into the model before
            calibration: the edited model is what gets quantized (module docstring).
    """

    def __init__(
        self, model_name_or_path: str = "world:model", dtype: str = "float32", gradient_checkpointing: bool = False,
        adapter: str | None = None,
    ) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
        if adapter is not None:
            check_adapter_dir(adapter)
        self.save_hyperparameters()
        self.adapter_record: dict[str, Any] | None = None  # the merged adapter (set by configure_model)
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold no weights (module docstring)
        self.model: PreTrainedModel | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = load_causal_lm(self.hparams.model_name_or_path, self.hparams.dtype)
        if self.hparams.adapter is not None:
            self.adapter_record = adapter_record(self.hparams.adapter, self.hparams.model_name_or_path)
            model = merge_adapter(model, self.hparams.adapter)
        self.model = model
        if self.hparams.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        freeze_all_but_decoder_linears(self.model)

    def configure_optimizers(self) -> StepClock:
        """Only a step counter: calibration reads gradients and updates nothing."""
        return StepClock()

    def example_loss(self, input_ids: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy of one example over its labelled tokens."""
        return self.model(input_ids=input_ids, labels=labels, use_cache=False).loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor | None:
        if batch["input_ids"].shape[0] != 1:
            raise ValueError("calibration needs one example per batch (per-example gradients)")
        clock = self.optimizers()
        if batch["input_ids"].numel() == 0:  # DDP padding: nothing to measure, but keep ranks in step
            clock.step()
            return None
        self.model.zero_grad(set_to_none=True)
        loss = self.example_loss(batch["input_ids"], batch["labels"])
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(
                f"calibration example {example_index(self.trainer, batch_idx)} has a non-finite loss "
                f"({loss.item()}): the run stops before its gradient reaches A (and the mask). An example with "
                "no labelled token has no mean loss; a model that overflows in half precision needs dtype float32.")
        # each rank keeps its own per-example gradient: no DDP all-reduce (it would average examples)
        sync_off = getattr(self.trainer.strategy, "block_backward_sync", contextlib.nullcontext)
        with sync_off():
            self.manual_backward(loss)
        clock.step()
        self.log("calibration_loss", loss.detach(), prog_bar=True, batch_size=1)
        return loss.detach()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {}
