"""Where ROME, MEMIT and AlphaEdit write: each decoder block's MLP down projection, found by structure.

The down projection is the block's Linear (``nn.Linear`` or GPT-2's ``Conv1D``) that writes the residual
stream (its output width is the embedding width) from the widest input: Llama's ``mlp.down_proj``, GPT-2's
``mlp.c_proj``, GPT-NeoX's ``mlp.dense_4h_to_h``; the attention's output projection reads a narrower input.
Its input at the subject's last token is the *key*, its output the *value* (ROME §3).

The layers each paper edits, by model family (``config.model_type`` and depth), are in :data:`PAPER_LAYERS`;
another model gets the same relative depth as the Llama-3-8B choice (ROME 5/32, MEMIT and AlphaEdit 4/32
to 8/32 of the blocks).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from lit_common.layers import find_linears, named_decoder_blocks

# (model_type, number of blocks) -> method -> layers, as the papers and their released settings use them
PAPER_LAYERS: dict[tuple[str, int], dict[str, list[int]]] = {
    ("llama", 32): {"rome": [5], "memit": [4, 5, 6, 7, 8], "alphaedit": [4, 5, 6, 7, 8]},  # Llama-3-8B (AlphaEdit)
    ("gptj", 28): {"rome": [5], "memit": [3, 4, 5, 6, 7, 8], "alphaedit": [3, 4, 5, 6, 7, 8]},  # GPT-J-6B
    ("gpt2", 48): {"rome": [17], "memit": [13, 14, 15, 16, 17], "alphaedit": [13, 14, 15, 16, 17]},  # GPT-2 XL
}
RELATIVE_SPAN = {"rome": (5, 5), "memit": (4, 8), "alphaedit": (4, 8)}  # of 32 blocks, as for Llama-3-8B


def paper_layers(model: nn.Module, method: str) -> list[int]:
    """The blocks ``method`` edits in ``model``: the paper's choice for its family, else the same relative depth."""
    blocks = len(named_decoder_blocks(model))
    known = PAPER_LAYERS.get((getattr(model.config, "model_type", ""), blocks))
    if known is not None:
        return known[method]
    first, last = (blocks * layer // 32 for layer in RELATIVE_SPAN[method])
    return list(range(first, last + 1))


def down_projection(block: nn.Module, hidden_size: int, where: str) -> nn.Module:
    """The block's Linear writing the residual stream from its widest input (module docstring)."""
    writers = [(in_out(layer)[0], name, layer) for name, layer in find_linears(block).items()
               if in_out(layer)[1] == hidden_size]
    if not writers:
        raise ValueError(f"{where}: no Linear writes the residual stream (output width {hidden_size})")
    writers.sort(key=lambda item: item[0], reverse=True)
    if len(writers) > 1 and writers[0][0] == writers[1][0]:
        raise ValueError(f"{where}: {writers[0][1]} and {writers[1][1]} both map width {writers[0][0]} to the "
                         "residual stream; cannot tell the MLP's down projection by structure")
    return writers[0][2]


def in_out(layer: nn.Module) -> tuple[int, int]:
    """(input width, output width) of an ``nn.Linear`` or ``Conv1D``."""
    if isinstance(layer, Conv1D):
        return layer.weight.shape[0], layer.weight.shape[1]
    return layer.in_features, layer.out_features


def weight_matrix(layer: nn.Module) -> Tensor:
    """The layer's weight as W [d_out, d_in] (a view: writing into it writes the layer; Conv1D stores Wᵀ)."""
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def edit_sites(model: nn.Module, layers: list[int]) -> dict[int, tuple[str, nn.Module, nn.Module]]:
    """For each block index: (the down projection's full name, the down projection, the block)."""
    hidden = model.get_input_embeddings().embedding_dim
    blocks = named_decoder_blocks(model)
    bad = [i for i in layers if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"model.locate.layers {bad} out of range: the model has {len(blocks)} decoder blocks")
    if max(layers) == len(blocks) - 1:
        raise ValueError(f"model.locate.layers {layers} include the last decoder block ({len(blocks) - 1}): what it writes at "
                         "the subject's token never reaches the answer's tokens (only later blocks carry it there)")
    sites = {}
    for i in layers:
        prefix, block = blocks[i]
        layer = down_projection(block, hidden, f"decoder block {prefix}")
        name = next(n for n, m in block.named_modules() if m is layer)
        sites[i] = (f"{prefix}.{name}", layer, block)
    return sites


def _hidden(output: Tensor | tuple) -> Tensor:
    """A block's output hidden states (blocks return a tensor or a tuple starting with one)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(module: nn.Module, rows: Tensor, positions: Tensor, what: str) -> Iterator[dict[str, Tensor]]:
    """Record ``module``'s input (``what="input"``) or output at (row, position) pairs: ``found["value"]``
    [n, width] after the forward. Hooks are removed on exit."""
    found: dict[str, Tensor] = {}

    def read(tensor: Tensor) -> None:
        found["value"] = tensor[rows, positions]

    if what == "input":
        handle = module.register_forward_pre_hook(lambda m, args: read(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: read(_hidden(out)))
    try:
        yield found
    finally:
        handle.remove()


@contextlib.contextmanager
def add_to_output(module: nn.Module, rows: Tensor, positions: Tensor, delta: Callable[[], Tensor]) -> Iterator[None]:
    """Add ``delta()`` [n, width] to ``module``'s output at (row, position) pairs during forwards."""
    def hook(m: nn.Module, args: tuple, out: Tensor) -> Tensor:
        out = out.clone()
        out[rows, positions] = out[rows, positions] + delta().to(out.dtype)
        return out

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def as_index(values: list[int], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)
