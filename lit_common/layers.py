"""Finding the decoder blocks and their Linear layers by structure, not by module names.

Works for Llama, Qwen2, Mistral, GPT-NeoX and other Hugging Face decoders whose blocks sit in one
``nn.ModuleList``. One rule for both products: a decoder "Linear" is an ``nn.Linear`` or GPT-2's
``Conv1D`` (the same map with its weight stored as [in, out]). LoRA adapts both kinds; TaCQ's packed
format is written for ``nn.Linear`` and refuses ``Conv1D`` layers by name (:func:`require_nn_linear`).
A layer that computes a Linear's map from some other storage (TaCQ's QuantLinear: packed codes) declares
``packed_linear = True``: it is no Linear to quantize, but LoRA adapts it (:func:`find_adaptable_linears`).
"""

from torch import nn
from transformers.pytorch_utils import Conv1D

LINEAR_TYPES = (nn.Linear, Conv1D)


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def find_decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, in order: the ``nn.ModuleList`` of same-class modules holding the most
    parameters. (Counting parameters, not entries, skips lists nested inside blocks, such as MoE
    experts, which can have more entries than there are layers.)"""
    candidates = [
        module
        for module in model.modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise ValueError(f"no nn.ModuleList of identical blocks in {type(model).__name__}")
    return list(max(candidates, key=_param_count))


def is_packed_linear(module: nn.Module) -> bool:
    """Whether ``module`` declares itself a Linear computed from other storage (module docstring)."""
    return getattr(module, "packed_linear", False) is True


def find_adaptable_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The Linears of :func:`find_linears` and the packed ones, by name relative to ``block``: LoRA's targets."""
    return {name: module for name, module in block.named_modules()
            if isinstance(module, LINEAR_TYPES) or is_packed_linear(module)}


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Every Linear (``nn.Linear`` or ``Conv1D``) inside ``block``, keyed by its name relative to the block
    (e.g. ``self_attn.q_proj``, ``mlp.down_proj``). Embeddings and lm_head live outside the blocks."""
    return {name: module for name, module in block.named_modules() if isinstance(module, LINEAR_TYPES)}


def named_decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks with their full module names (e.g. ``model.layers.3``)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(block)], block) for block in find_decoder_blocks(model)]


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """Every decoder Linear by its full module name (``model.layers.3.mlp.down_proj``), block order."""
    return {
        f"{prefix}.{name}": linear
        for prefix, block in named_decoder_blocks(model)
        for name, linear in find_linears(block).items()
    }


def require_nn_linear(linears: dict[str, nn.Module]) -> dict[str, nn.Linear]:
    """The layers unchanged if all are ``nn.Linear``; a clear refusal naming the first that is not."""
    for name, layer in linears.items():
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{name} is a {type(layer).__name__} (GPT-2 style, weight stored as [in, out]): TaCQ's "
                             "quantizer and packed format support nn.Linear layers only")
    return linears
