"""Finding the decoder blocks and their Linear layers by structure, not by module names.

Works for Llama, Qwen2, Mistral and other Hugging Face decoders whose blocks sit in one
``nn.ModuleList``. GPT-2 style ``Conv1D`` layers (weight stored as [in, out]) are not ``nn.Linear``
and are therefore not found: such models are not supported.
"""

from torch import nn


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


def find_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``block``, keyed by its name relative to the block
    (e.g. ``self_attn.q_proj``, ``mlp.down_proj``). Embeddings and lm_head live outside the blocks."""
    return {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def named_decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks with their full module names (e.g. ``model.layers.3``)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(block)], block) for block in find_decoder_blocks(model)]


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every decoder ``nn.Linear`` by its full module name (``model.layers.3.mlp.down_proj``), block order."""
    return {
        f"{prefix}.{name}": linear
        for prefix, block in named_decoder_blocks(model)
        for name, linear in find_linears(block).items()
    }
