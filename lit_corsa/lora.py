"""Load any Hugging Face causal LM and wrap it in a peft LoRA adapter aimed at its decoder Linears.

LoRA targets are found by structure (every Linear, or GPT-2 ``Conv1D``, inside the decoder blocks:
:func:`lit_common.layers.find_adaptable_linears`), so
the same config edits Llama (q/k/v/o/gate/up/down_proj), Qwen2, Mistral, GPT-NeoX (query_key_value,
dense, dense_h_to_4h, dense_4h_to_h) and GPT-2 (c_attn, c_proj, c_fc) without listing names. A packed base
(a TaCQ export: its Linears are packed layers computing from their codes) is adapted the same way
(:func:`lit_common.adapters.with_packed_layers`); the codes stay as they are (QLoRA-style).
"""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from lit_common.adapters import with_packed_layers
from lit_common.layers import find_adaptable_linears, find_decoder_blocks


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the Linear/Conv1D (or packed) layers in the decoder blocks (e.g. ``["down_proj", ...]``)."""
    blocks = find_decoder_blocks(model)
    names = {name.rsplit(".", 1)[-1] for block in blocks for name in find_adaptable_linears(block)}
    if not names:
        raise ValueError(f"no Linear layers found in the decoder blocks of {type(model).__name__}")
    return sorted(names)


def wrap_with_lora(model: PreTrainedModel, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                   target_modules: list[str] | None = None, gradient_checkpointing: bool = False,
                   saved_adapter: str | None = None) -> PeftModel:
    """Freeze the base model and add a trainable LoRA adapter (named ``default``); ``target_modules=None``
    means every decoder Linear, found by type. ``saved_adapter``: a directory written by peft's
    ``save_pretrained`` to start from instead (its own rank, alpha and targets then apply)."""
    model = _prepare(model, gradient_checkpointing)
    if saved_adapter is not None:
        config = with_packed_layers(LoraConfig.from_pretrained(saved_adapter), model)
        return PeftModel.from_pretrained(model, saved_adapter, is_trainable=True, config=config)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
        target_modules=target_modules or decoder_linear_names(model),
    )
    return get_peft_model(model, with_packed_layers(config, model))


def _prepare(model: PreTrainedModel, gradient_checkpointing: bool) -> PreTrainedModel:
    """What a base model needs before an adapter goes on it: k-bit preparation, activation checkpointing."""
    if getattr(model, "is_loaded_in_4bit", False):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        _no_inference_repacking(model)
    elif gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def _no_inference_repacking(model: PreTrainedModel) -> None:
    """Keep a 4-bit base trainable through evaluation. On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a
    ``Linear4bit``'s weights for its inference kernel at the first eval-mode call without gradients, for good; that
    kernel has no autograd formula, so every later training step would lose the gradient through the frozen base
    (the adapters below the last layer would train on the LoRA branch alone). An editing run evaluates between
    rounds and before its first step (the DPO reference), so the repacking is turned off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
