"""TaCQ over a whole decoder, block by block: reference pass, one global mask, masked GPTQ (no Lightning).

1. **Reference pass** (only when the scorer needs Q(W) or H): unmasked GPTQ (or RTN) of a *copy* of each
   block, sequential: block i's inputs come from the already-quantized copies of blocks < i. Each layer
   is scored as soon as its Q(W) is known; the copy is then dropped. The reference code does the same in
   two runs (a GPTQ model on disk, then |W - Q(W)|); a whole-model Q(W) is never held.
2. **One global top-p ranking** of all scores (``saliency.global_topk_mask``): the mask needs every
   layer's score, which is why the passes cannot be fused.
3. **Final pass**: masked GPTQ of the real blocks in place, sequential again, every Linear swapped for a
   :class:`QuantLinear` as soon as it is quantized, so that later layers and blocks see the activations
   of the model that is actually stored.

Inside a block the Linears are quantized in groups that read the same input, (q, k, v) -> o ->
(gate, up) -> down for Llama: the groups come from watching one forward pass, not from module names.
H = (2/n) sum x x^T is accumulated over the calibration sequences one at a time (``gptq.HessianAccumulator``).

**Resumable per block.** Given a ``work_dir``, ``quantize_model`` persists every finished block
(``lit_tacq.workdir``): the next block's inputs for every calibration sequence (so no finished block is ever
run again), the reference pass's scores, the mask, the final pass's packed layers. Rerun on the same model,
calibration, settings and gradients, it continues after the last finished block and ends bit-identical to an
uninterrupted run (every later block sees exactly the tensors it would have seen). The directory is left in
place: the caller removes it once the quantized model is safely stored.

Memory: the whole model stays on its device. A pass holds the hidden states of one block boundary for all
sequences and, in the reference pass, one block copy; the scores of every layer (float32, on
``score_device``, CPU by default) live until the mask is ranked, which ``global_topk_mask`` does layer by
layer without concatenating them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lit_common.layers import (
    decoder_linears,
    find_decoder_blocks,
    find_linears,
    named_decoder_blocks,
    require_nn_linear,
)
from lit_tacq.gptq import HessianAccumulator, fill_kept, gptq_quantize
from lit_tacq.mixed_linear import MixedQuantLinear
from lit_tacq.packing import CODE_BITS, OUTLIER_DTYPES, SUPPORTED_BITS
from lit_tacq.qlinear import QuantLinear, SpQRLinear
from lit_tacq.quantizer import QuantResult, rtn_quantize
from lit_tacq.saliency import NEEDS, SCORERS, LayerStats, global_topk_mask, score
from lit_tacq.slim_llm import slim_llm_quantize
from lit_tacq.spqr import spqr_quantize
from lit_tacq.workdir import WorkDir, fingerprint


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class QuantSettings:
    """How to quantize (docs/tacq.md §2). ``saliency="none"`` keeps nothing in 16 bits: plain GPTQ / RTN.

    ``reference`` is how Q(W) of the saliency is computed, ``quantizer`` the final (masked) quantizer.
    Every field is checked when the settings are made (for the CLI: when the config is parsed, before any
    model is loaded), all at once. ``group_size`` needs no check against the model: any positive size fits
    any layer width, the last group of a row is then narrower (the format and kernel store and decode it).
    ``quantizer="slim_llm"`` is SliM-LLM (lit_tacq/slim_llm.py): a width of bits - 1, bits or bits + 1 per column
    group of ``group_size`` (the paper's 128), ``slim_splits`` splits searched, salient weights' errors counted
    ``salience_weight`` times in the grid search; it stores MixedQuantLinear layers (lit_tacq/mixed_linear.py).
    ``quantizer="spqr"`` is SpQR (lit_tacq/spqr.py): b-bit grids per ``group_size`` columns (β1, the paper's 16)
    whose scales are stored as ``stat_bits`` codes on fp16 grids shared by ``stat_group_size`` rows (β2), and
    16-bit outliers chosen during GPTQ: above the relative ``outlier_threshold`` when set, else ``fraction`` of
    each layer's weights; it stores SpQRLinear layers (lit_tacq/qlinear.py).
    """

    bits: int = 3
    group_size: int | None = None
    fraction: float = 0.0035
    saliency: str = "tacq"
    reference: Literal["gptq", "rtn"] = "gptq"
    quantizer: Literal["gptq", "rtn", "slim_llm", "spqr"] = "gptq"
    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    mse: bool = True
    outlier_dtype: Literal["float16", "bfloat16"] = "float16"
    seed: int = 0
    slim_splits: int = 9
    salience_weight: float = 2.0
    stat_bits: int = 3
    stat_group_size: int = 16
    outlier_threshold: float | None = None

    def __post_init__(self) -> None:
        rules = {
            "bits": (_is_int(self.bits) and self.bits in SUPPORTED_BITS, f"one of {SUPPORTED_BITS}"),
            "group_size": (self.group_size is None or (_is_int(self.group_size) and self.group_size > 0),
                           "None (one grid per row) or a positive integer"),
            "fraction": (_is_number(self.fraction) and 0 <= self.fraction < 1, "a number in [0, 1)"),
            "saliency": (isinstance(self.saliency, str) and (self.saliency == "none" or self.saliency in SCORERS),
                         f"'none' or one of {sorted(SCORERS)}"),
            "reference": (self.reference in ("gptq", "rtn"), "'gptq' or 'rtn'"),
            "quantizer": (self.quantizer in ("gptq", "rtn") or (self.quantizer == "slim_llm" and self._slim_llm_fits)
                          or (self.quantizer == "spqr" and self.group_size is not None and self.saliency == "none"),
                          f"'gptq', 'rtn', 'slim_llm' or 'spqr' (slim_llm: bits - 1 and bits + 1 in {CODE_BITS}, a "
                          "group_size and saliency 'none': its groups get bits - 1 / bits / bits + 1 and it keeps no "
                          "weights; spqr: a group_size, the paper's 16, and saliency 'none': it picks its own "
                          "outliers during GPTQ)"),
            "stat_bits": (_is_int(self.stat_bits) and self.stat_bits in SUPPORTED_BITS, f"one of {SUPPORTED_BITS}"),
            "stat_group_size": (_is_int(self.stat_group_size) and self.stat_group_size > 0, "a positive integer"),
            "outlier_threshold": (self.outlier_threshold is None or (_is_number(self.outlier_threshold)
                                                                     and self.outlier_threshold > 0),
                                  "None (keep `fraction` of each layer) or a positive number (SpQR's relative τ)"),
            "slim_splits": (_is_int(self.slim_splits) and self.slim_splits > 0, "a positive integer"),
            "salience_weight": (_is_number(self.salience_weight) and self.salience_weight >= 1,
                                "a number >= 1 (how much more a salient weight's error counts)"),
            "percdamp": (_is_number(self.percdamp) and 0 < self.percdamp <= 1,
                         "a number in (0, 1]: the damping as a fraction of the mean Hessian diagonal"),
            "block_size": (_is_int(self.block_size) and self.block_size > 0, "a positive integer"),
            "act_order": (isinstance(self.act_order, bool) and not (self.act_order and self.group_size is not None),
                          "a bool, and False with a group_size (grouped storage needs columns in order)"),
            "mse": (isinstance(self.mse, bool), "a bool"),
            "outlier_dtype": (isinstance(self.outlier_dtype, str) and self.outlier_dtype in OUTLIER_DTYPES,
                              f"one of {sorted(OUTLIER_DTYPES)}"),
            "seed": (_is_int(self.seed), "an integer"),
        }
        problems = [f"{name}={getattr(self, name)!r}, expected {expected}"
                    for name, (ok, expected) in rules.items() if not ok]
        if problems:
            raise ValueError("invalid QuantSettings: " + "; ".join(problems))

    @property
    def _slim_llm_fits(self) -> bool:
        return (_is_int(self.bits) and self.bits - 1 in CODE_BITS and self.bits + 1 in CODE_BITS
                and self.group_size is not None and self.saliency == "none")

    @property
    def keeps_outliers(self) -> bool:
        return self.saliency != "none" and self.fraction > 0

    @property
    def needs_gradients(self) -> bool:
        return self.keeps_outliers and "grad_abs_sum" in NEEDS[self.saliency]


@dataclass
class BlockInputs:
    """What the first decoder block receives for each calibration sequence: hidden states and the
    keyword arguments the model passes along (position embeddings, masks, ...)."""

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]


@dataclass
class QuantSummary:
    """What a run did: weights kept per layer, totals, seconds per stage (summed over the attempts of a
    resumed run)."""

    kept: dict[str, int] = field(default_factory=dict)
    total_weights: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def kept_fraction(self) -> float:
        return sum(self.kept.values()) / max(1, self.total_weights)


class _Captured(Exception):
    """Stops the model's forward once the first block's inputs are recorded."""


@torch.no_grad()
def capture_block_inputs(model: nn.Module, sequences: list[Tensor], progress: bool = True) -> BlockInputs:
    """Run the model up to its first decoder block for every sequence (one at a time)."""
    first = find_decoder_blocks(model)[0]
    device = next(model.parameters()).device
    inputs = BlockInputs([], [])

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        inputs.hidden.append(args[0] if args else kwargs.pop("hidden_states"))
        inputs.kwargs.append(kwargs)
        raise _Captured

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in tqdm(sequences, desc="block inputs", disable=not progress, leave=False):
            try:
                model(input_ids=ids[None].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs


def _block_output(output: Tensor | tuple) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[Tensor]:
    """The block's output for every sequence."""
    return [_block_output(block(h, **kw)) for h, kw in zip(inputs.hidden, inputs.kwargs)]


@torch.no_grad()
def linear_groups(block: nn.Module, inputs: BlockInputs) -> list[list[str]]:
    """The block's Linears grouped by the input tensor they read, in execution order."""
    linears = find_linears(block)
    calls: list[tuple[str, Tensor]] = []  # holding the tensors keeps their identity unique
    hooks = [
        linear.register_forward_pre_hook(lambda m, args, name=name: calls.append((name, args[0])))
        for name, linear in linears.items()
    ]
    try:
        block(inputs.hidden[0], **inputs.kwargs[0])
    finally:
        for hook in hooks:
            hook.remove()
    groups: list[tuple[Tensor, list[str]]] = []
    for name, x in calls:
        group = next((names for tensor, names in groups if tensor is x), None)
        if group is None:
            groups.append((x, [name]))
        elif name not in group:
            group.append(name)
    seen = {name for _, names in groups for name in names}
    if seen != set(linears):
        raise RuntimeError(f"Linear layers never called in a forward pass: {sorted(set(linears) - seen)}")
    return [names for _, names in groups]


@torch.no_grad()
def collect_hessians(block: nn.Module, names: list[str], inputs: BlockInputs) -> dict[str, Tensor]:
    """H = (2/n) sum x x^T of the inputs of the named Linears over all sequences."""
    accumulators: dict[str, HessianAccumulator] = {}
    hooks = []
    for name in names:
        linear = block.get_submodule(name)
        accumulator = HessianAccumulator(linear.in_features, device=linear.weight.device)
        accumulators[name] = accumulator
        hooks.append(linear.register_forward_pre_hook(lambda m, args, acc=accumulator: acc.add_batch(args[0])))
    try:
        run_block(block, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: acc.H for name, acc in accumulators.items()}


def quantize_weight(
    W: Tensor, H: Tensor | None, method: str, settings: QuantSettings, keep: Tensor | None = None
) -> QuantResult:
    """One weight matrix by GPTQ (needs H) or round-to-nearest, ``keep`` entries left in 16 bits."""
    if method == "gptq":
        if H is None:
            raise ValueError("GPTQ needs the layer's Hessian")
        return gptq_quantize(W, H, settings.bits, keep_mask=keep, group_size=settings.group_size,
                             block_size=settings.block_size, percdamp=settings.percdamp,
                             act_order=settings.act_order, mse=settings.mse)
    W = W.float()
    if keep is None:
        return rtn_quantize(W, settings.bits, settings.group_size, mse=settings.mse)
    grid = rtn_quantize(fill_kept(W, keep), settings.bits, settings.group_size, mse=settings.mse)
    return replace(grid, dequantized=torch.where(keep, W, grid.dequantized), keep_mask=keep)


LayerFn = Callable[[str, nn.Module, str, Tensor | None], None]
BlockEndFn = Callable[[int, nn.Module, list[Tensor] | None], None]


def sequential_pass(
    model: nn.Module,
    sequences: list[Tensor],
    layer_fn: LayerFn,
    need_hessians: bool,
    on_copies: bool,
    desc: str,
    progress: bool = True,
    on_block_end: BlockEndFn | None = None,
    start_block: int = 0,
    start_hidden: list[Tensor] | None = None,
) -> None:
    """Visit every decoder Linear in order, block by block, calling ``layer_fn(full_name, block, name, H)``.

    ``layer_fn`` quantizes the layer in ``block`` in place; with ``need_hessians`` each block's inputs
    come from the blocks already processed. ``on_copies`` works on a copy of each block so the model
    itself is left untouched. ``on_block_end(index, block, outputs)`` runs once a block is done, with its
    outputs for every sequence (the next block's inputs; None after the last block or without Hessians).
    ``start_block`` skips blocks an earlier run finished; ``start_hidden`` are that block's inputs.
    """
    blocks = named_decoder_blocks(model)
    inputs = None
    if need_hessians and start_block < len(blocks):
        inputs = capture_block_inputs(model, sequences, progress)  # also the keyword arguments every block gets
        if start_block > 0:
            if start_hidden is None:
                raise RuntimeError(f"resuming the pass at block {start_block} needs that block's inputs, and none "
                                   "were stored: delete the work directory to quantize from the start")
            inputs.hidden = start_hidden
    with tqdm(total=len(blocks), initial=start_block, desc=desc, disable=not progress) as bar:
        for index in range(start_block, len(blocks)):
            prefix, original = blocks[index]
            block = copy.deepcopy(original) if on_copies else original
            groups = linear_groups(block, inputs) if inputs is not None else [[n] for n in find_linears(block)]
            for group in groups:
                hessians = collect_hessians(block, group, inputs) if inputs is not None else {}
                for name in group:
                    layer_fn(f"{prefix}.{name}", block, name, hessians.get(name))
            outputs = None
            if inputs is not None and index + 1 < len(blocks):
                outputs = inputs.hidden = run_block(block, inputs)
            if on_block_end is not None:
                on_block_end(index, block, outputs)
            bar.update()


def saliency_scores(
    model: nn.Module,
    sequences: list[Tensor],
    settings: QuantSettings,
    grad_abs_sum: dict[str, Tensor] | None,
    score_device: str | torch.device = "cpu",
    progress: bool = True,
    work: WorkDir | None = None,
) -> dict[str, Tensor]:
    """Every decoder Linear's saliency under ``settings.saliency``; Q(W) and H from a reference pass, which
    ``work`` persists block by block and resumes after its last finished block."""
    work = work if work is not None else WorkDir.in_memory()
    needs = NEEDS[settings.saliency]
    linears = decoder_linears(model)
    order = {name: i for i, name in enumerate(linears)}
    scores: dict[str, Tensor] = {}
    block_scores: dict[str, Tensor] = {}  # of the block being processed

    def score_layer(full: str, weight: Tensor, quantized: Tensor | None, hessian: Tensor | None) -> None:
        grads = None if grad_abs_sum is None else grad_abs_sum[full].to(weight.device)
        stats = LayerStats(weight, grads, quantized, hessian, seed=settings.seed + order[full])
        scores[full] = block_scores[full] = score(settings.saliency, stats).to(score_device)

    tick = work.clock("saliency")
    if not needs & {"quantized", "hessian"}:
        for full, linear in linears.items():
            score_layer(full, linear.weight.detach(), None, None)
        tick()
        return scores

    def reference_layer(full: str, block: nn.Module, name: str, H: Tensor | None) -> None:
        linear = block.get_submodule(name)
        result = quantize_weight(linear.weight, H, settings.reference, settings)
        score_layer(full, linear.weight.detach(), result.dequantized, H)
        linear.weight.data.copy_(result.dequantized)  # later layers see the quantized copy

    def finish_block(index: int, block: nn.Module, outputs: list[Tensor] | None) -> None:
        tick()
        work.finish_reference_block(index, block_scores, outputs)
        block_scores.clear()

    scores.update(work.scores(score_device))
    need_h = settings.reference == "gptq" or "hessian" in needs
    sequential_pass(model, sequences, reference_layer, need_h, on_copies=True, desc="reference pass", progress=progress,
                    on_block_end=finish_block, start_block=work.blocks_done, start_hidden=work.hidden(_device(model)))
    tick()
    return dict(sorted(scores.items(), key=lambda item: order[item[0]]))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_gradients(model: nn.Module, grad_abs_sum: dict[str, Tensor] | None) -> None:
    if grad_abs_sum is None:
        raise ValueError("this saliency needs the accumulated gradients A (grad_abs_sum)")
    for name, linear in decoder_linears(model).items():
        if name not in grad_abs_sum:
            raise ValueError(f"no accumulated gradient for {name}")
        if grad_abs_sum[name].shape != linear.weight.shape:
            raise ValueError(f"A[{name}] has shape {tuple(grad_abs_sum[name].shape)}, "
                             f"the weight {tuple(linear.weight.shape)}")


def _restore_finished_blocks(model: nn.Module, work: WorkDir, settings: QuantSettings) -> None:
    """Swap in the QuantLinears of the blocks an earlier run of the final pass finished."""
    for index, (_, block) in enumerate(named_decoder_blocks(model)[: work.blocks_done]):
        buffers = work.final_block(index, _device(model))
        for name, linear in find_linears(block).items():
            own = {key.removeprefix(f"{name}."): t for key, t in buffers.items() if key.startswith(f"{name}.")}
            block.set_submodule(name, _layer_from_buffers(own, linear.in_features, settings))


PackedLayer = QuantLinear | MixedQuantLinear


def _layer_from_buffers(buffers: dict[str, Tensor], in_features: int, settings: QuantSettings) -> PackedLayer:
    """A packed layer the final pass stored in the work directory, rebuilt as the quantizer made it."""
    if settings.quantizer == "slim_llm":
        return MixedQuantLinear.from_buffers(buffers, in_features, settings.group_size)
    if settings.quantizer == "spqr":
        return SpQRLinear.from_buffers(buffers, in_features, settings.bits, settings.group_size,
                                       stat_bits=settings.stat_bits, stat_group_size=settings.stat_group_size)
    return QuantLinear.from_buffers(buffers, in_features, settings.bits, settings.group_size)


def _pack_layer(linear: nn.Linear, H: Tensor | None, settings: QuantSettings, keep: Tensor | None,
                dtype: torch.dtype) -> tuple[PackedLayer, Tensor | None]:
    """The final quantizer on one layer: its packed module and the weights it kept in 16 bits (TaCQ's mask as
    given, SpQR's own outliers, none for SliM-LLM)."""
    if settings.quantizer == "slim_llm":
        mixed = slim_llm_quantize(linear.weight, H, settings.bits, settings.group_size, settings.percdamp,
                                  settings.slim_splits, settings.salience_weight)
        return MixedQuantLinear.from_codes(mixed.codes, mixed.scale, mixed.zero, mixed.group_bits,
                                           mixed.group_size, linear.bias, dtype), keep
    if settings.quantizer == "spqr":
        spqr = spqr_quantize(linear.weight, H, settings.bits, settings.group_size, settings.stat_bits,
                             settings.stat_group_size, settings.outlier_threshold, settings.fraction,
                             settings.percdamp, settings.block_size)
        return SpQRLinear.from_result(spqr, linear.bias, dtype), spqr.quant.keep_mask
    result = quantize_weight(linear.weight, H, settings.quantizer, settings, keep)
    return QuantLinear.from_result(result, linear.bias, dtype), keep


def quantize_model(
    model: nn.Module,
    sequences: list[Tensor],
    settings: QuantSettings,
    grad_abs_sum: dict[str, Tensor] | None = None,
    score_device: str | torch.device = "cpu",
    progress: bool = True,
    work_dir: str | Path | None = None,
) -> QuantSummary:
    """Quantize every decoder Linear of ``model`` in place (swapped for :class:`QuantLinear`).

    ``sequences`` are the calibration token ids (1-D each); ``grad_abs_sum`` maps full Linear names
    (``model.layers.0.self_attn.q_proj``) to A when the saliency needs it. ``work_dir`` makes the run
    resumable per block (module docstring); a directory left by another quantization is refused.
    """
    require_nn_linear(decoder_linears(model))
    if not sequences and (settings.quantizer != "rtn" or settings.keeps_outliers):
        raise ValueError("no calibration sequences")
    if settings.needs_gradients:
        _check_gradients(model, grad_abs_sum)
    work = (WorkDir.in_memory() if work_dir is None
            else WorkDir.open(work_dir, fingerprint(model, sequences, asdict(settings), grad_abs_sum)))
    was_training = model.training
    model.eval()
    masks: dict[str, Tensor] | None = None
    if work.stage == "reference":
        if settings.keeps_outliers:
            scores = saliency_scores(model, sequences, settings, grad_abs_sum, score_device, progress, work)
            tick = work.clock("mask")
            masks = global_topk_mask(scores, settings.fraction)
            del scores
            tick()
        work.finish_reference(masks)
    elif settings.keeps_outliers:
        masks = work.mask(score_device)
    dtype = OUTLIER_DTYPES[settings.outlier_dtype]

    packed: dict[str, PackedLayer] = {}  # of the current block, swapped in when it is done
    kept: dict[str, int] = {}
    weights = 0

    def final_layer(full: str, block: nn.Module, name: str, H: Tensor | None) -> None:
        nonlocal weights
        linear = block.get_submodule(name)
        keep = None if masks is None else masks[full].to(linear.weight.device)
        packed[name], keep = _pack_layer(linear, H, settings, keep, dtype)
        # until the swap, the dense layer computes with exactly the stored weights (and is faster than
        # decoding the packed codes at every call of the remaining Hessian and output passes)
        linear.weight.data.copy_(packed[name].dequantize())
        if linear.bias is not None:
            linear.bias.data.copy_(packed[name].bias)
        kept[full] = 0 if keep is None else int(keep.sum())
        weights += linear.weight.numel()

    tick = work.clock("quantize")

    def finish_block(index: int, block: nn.Module, outputs: list[Tensor] | None) -> None:
        nonlocal weights
        for name, module in packed.items():
            block.set_submodule(name, module)
        buffers = {f"{name}.{key}": t for name, module in packed.items() for key, t in module.state_dict().items()}
        tick()
        work.finish_final_block(index, buffers, kept, weights, outputs)
        packed.clear()
        kept.clear()
        weights = 0

    start_hidden = work.hidden(_device(model))
    _restore_finished_blocks(model, work, settings)
    sequential_pass(model, sequences, final_layer, settings.quantizer != "rtn", on_copies=False,
                    desc=f"{'masked ' if masks else ''}{settings.quantizer.upper()} {settings.bits}-bit",
                    progress=progress, on_block_end=finish_block, start_block=work.blocks_done,
                    start_hidden=start_hidden)
    model.train(was_training)
    return QuantSummary(kept=dict(work.progress.kept), total_weights=work.progress.total_weights,
                        seconds=dict(work.progress.seconds), settings=asdict(settings))
