"""SliM-LLM (Huang et al. 2024, arXiv:2405.14917): a bit width per column group, chosen by salience, then GPTQ.

For one Linear with weight W [out, in], its calibration Hessian H = (2/n) sum x x^T and a target of ``bits``:

1. **Salience** (the paper's SBA). A weight's salience is OBS's ``w^2 / [H^-1]_jj`` with GPTQ's conditional inverse
   Hessian ``[H^-1]_jj = U_jj^2`` (U the upper Cholesky factor of H^-1, what GPTQ divides errors by; the paper writes
   it ``w^2 / [H^-1]_jj^2`` with H^-1 standing for that factor, as its code computes). A group's salience is the sum
   over its [out, group_size] block.
2. **Allocation.** Groups ranked by salience: the k most salient get ``bits + 1``, the k least salient
   ``bits - 1``, the rest ``bits``, so the layer's code bits average exactly ``bits`` (a narrower last group stays at
   ``bits``). k is searched over ``splits`` values evenly spaced from 0 to half the groups: each candidate is
   quantized group by group to nearest (with the grids of step 3) and scored by the layer's output error on the
   calibration data, ``tr(dW H dW^T)``; the smallest wins (k = 0, uniform widths, is a candidate too).
3. **Grids** (the paper's SQC). Each (row, group) grid is searched over its range scaled by 0.21 ... 1.10 (GPTQ's
   shrink search, widened as SQC widens it) to minimise ``sum |q - w|^2.4`` where the group's salient weights
   (salience beyond mean + 2 standard deviations of the group's) count ``salience_weight`` times. A 1-bit grid has
   the two levels ``mu +- p * alpha`` (mu the mean, alpha = mean |w - mu|: sign binarization, which is how the
   public code quantizes its 1-bit groups), p searched alike; its zero point is then not an integer (mixed_linear.py).
   Scales and zeros are rounded to float16 inside the search: GPTQ compensates for the grid that is stored.
4. **GPTQ** with each group's own width and grid, fitted when the loop reaches the group (from the weights as
   updated by the earlier groups' errors), block = group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lit_tacq.gptq import inverse_hessian_cholesky, sweep_columns
from lit_tacq.quantizer import MSE_NORM, SCALE_DTYPE, dequantize, max_code

SALIENT_SIGMAS = 2.0  # SQC: a weight is salient beyond mean + 2 std of its group's salience
# the range (2+ bits) or the two levels' spread (1 bit) scaled by 1.00 ... 0.21 (GPTQ's search), then 1.01 ... 1.10
SCALE_FACTORS = tuple(1 - i / 100 for i in range(80)) + tuple(1 + i / 100 for i in range(1, 11))
SEARCH_ELEMENTS = 1 << 22  # quantized candidates held at once by the grid search (16 MB of float32)


@dataclass
class MixedResult:
    """One weight matrix quantized with a width per column group, before packing."""

    dequantized: Tensor  # float32 [out, in]: the grid values the packed layer decodes to
    codes: Tensor  # uint8 [out, in], each below 2 ** (its group's width)
    scale: Tensor  # float32 [out, groups], float16-representable
    zero: Tensor  # float32 [out, groups], float16-representable (not an integer in 1-bit groups)
    group_bits: list[int]
    group_size: int
    salience: Tensor  # float32 [groups]
    split: int  # groups moved to bits + 1 (and as many to bits - 1)
    split_errors: dict[int, float]  # the output error of every split tried


def group_ranges(cols: int, group_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + group_size, cols)) for start in range(0, cols, group_size)]


def weight_salience(W: Tensor, U: Tensor) -> Tensor:
    """``w^2 / U_jj^2`` of every weight (step 1)."""
    return W.pow(2) / U.diagonal().pow(2)[None, :]


def group_sums(values: Tensor, group_size: int) -> Tensor:
    """The sum of ``values`` [out, in] over every column group's block (a group's salience from its weights')."""
    return torch.stack([values[:, a:b].sum() for a, b in group_ranges(values.shape[1], group_size)])


def allocate(salience: Tensor, bits: int, split: int, rankable: int) -> list[int]:
    """Widths per group: the ``split`` most salient of the first ``rankable`` groups get bits + 1, the ``split`` least
    salient bits - 1, every other group ``bits``."""
    if 2 * split > rankable:
        raise ValueError(f"cannot move {split} groups up and {split} down among {rankable}")
    widths = [bits] * salience.numel()
    order = torch.argsort(salience[:rankable], descending=True, stable=True).tolist()
    for group in order[:split]:
        widths[group] = bits + 1
    for group in order[rankable - split:]:
        widths[group] = bits - 1
    return widths


def splits_to_try(rankable: int, splits: int) -> list[int]:
    """``splits`` values of k evenly spaced over 0 ... rankable // 2 (fewer where they coincide)."""
    top = rankable // 2
    return sorted({round(top * i / max(1, splits - 1)) for i in range(splits)})


def fit_grid(x: Tensor, bits: int, salience: Tensor, salience_weight: float) -> tuple[Tensor, Tensor]:
    """Scale and zero ([rows, 1] each, float32, float16-representable) of one grid per row of ``x`` (step 3)."""
    x = x.float()
    salient = salience > salience.mean() + SALIENT_SIGMAS * salience.std(unbiased=False)
    weights = torch.where(salient, salience_weight, 1.0)
    if bits == 1:
        mu = x.mean(dim=1)
        alpha = (x - mu[:, None]).abs().mean(dim=1)
        alpha = torch.maximum(alpha, mu.abs() * 2.0**-10).clamp_min(torch.finfo(SCALE_DTYPE).tiny)
    else:
        zeros = torch.zeros(x.shape[0], device=x.device)
        lo = torch.minimum(x.min(dim=1).values, zeros)
        hi = torch.maximum(x.max(dim=1).values, zeros)
        flat = (lo == 0) & (hi == 0)
        lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)

    def grid(factor: Tensor) -> tuple[Tensor, Tensor]:  # factors [F, 1] -> scale, zero [F, rows]
        if bits == 1:
            scale = (2 * factor * alpha).to(SCALE_DTYPE).float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
            zero = ((factor * alpha - mu) / scale).to(SCALE_DTYPE).float()
        else:
            scale = ((hi - lo) * factor / max_code(bits)).to(SCALE_DTYPE).float()
            scale = scale.clamp_min(torch.finfo(SCALE_DTYPE).tiny)
            zero = torch.round(-lo * factor / scale).clamp(0, max_code(bits))
        return scale, zero

    factors = torch.tensor(SCALE_FACTORS, device=x.device)[:, None]
    best_error = torch.full((x.shape[0],), float("inf"), device=x.device)
    best_scale = best_zero = torch.zeros_like(best_error)
    chunk = max(1, SEARCH_ELEMENTS // x.numel())  # candidates tried at once
    rows = torch.arange(x.shape[0], device=x.device)
    for start in range(0, factors.shape[0], chunk):
        scale, zero = grid(factors[start : start + chunk])
        quantized = grid_values(x, scale[..., None], zero[..., None], bits)  # [F, rows, n]
        error, pick = (weights * (quantized - x).abs().pow(MSE_NORM)).sum(dim=2).min(dim=0)  # the first best
        better = error < best_error  # an earlier candidate wins a tie, as in GPTQ's search
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, scale[pick, rows], best_scale)
        best_zero = torch.where(better, zero[pick, rows], best_zero)
    return best_scale[:, None], best_zero[:, None]


def grid_codes(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """The nearest code of every entry (``round(x / scale + zero)``: the same as GPTQ's rounding for integer zeros)."""
    return torch.clamp(torch.round(x / scale + zero), 0, max_code(bits))


def grid_values(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``x`` rounded to its nearest grid value."""
    return dequantize(grid_codes(x, scale, zero, bits), scale, zero)


def output_error(delta: Tensor, H: Tensor) -> float:
    """``tr(dW H dW^T)``: the layer's squared output error on the calibration inputs (up to H's 2/n)."""
    return float(((delta @ H) * delta).sum())


def choose_split(W: Tensor, H: Tensor, weight_sal: Tensor, group_sal: Tensor, bits: int, group_size: int,
                 rankable: int, splits: int, salience_weight: float) -> tuple[int, dict[int, float]]:
    """The split k of least output error among :func:`splits_to_try`, each candidate rounded to nearest (step 2);
    ``weight_sal`` and ``group_sal`` are the salience of every weight and every group."""
    ranges = group_ranges(W.shape[1], group_size)
    rounded: dict[tuple[int, int], Tensor] = {}  # (group, width) -> the group rounded to that width's grid

    def rounded_group(group: int, width: int) -> Tensor:
        if (group, width) not in rounded:
            a, b = ranges[group]
            scale, zero = fit_grid(W[:, a:b], width, weight_sal[:, a:b], salience_weight)
            rounded[group, width] = grid_values(W[:, a:b], scale, zero, width)
        return rounded[group, width]

    errors = {}
    for split in splits_to_try(rankable, splits):
        widths = allocate(group_sal, bits, split, rankable)
        quantized = torch.cat([rounded_group(g, width) for g, width in enumerate(widths)], dim=1)
        errors[split] = output_error(quantized - W, H)
    return min(errors, key=lambda k: (errors[k], k)), errors


def slim_llm_quantize(W: Tensor, H: Tensor, bits: int, group_size: int, percdamp: float = 0.01, splits: int = 9,
                      salience_weight: float = 2.0) -> MixedResult:
    """Quantize ``W`` [out, in] with SliM-LLM (module docstring) to an average of ``bits`` code bits per weight."""
    if bits - 1 < 1:
        raise ValueError(f"SliM-LLM needs bits - 1 >= 1, got bits {bits}")
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float32)
    cols = W.shape[1]
    W[:, H.diagonal() == 0] = 0  # inputs that are always zero: the weight never matters
    U = inverse_hessian_cholesky(H, percdamp)
    ranges = group_ranges(cols, group_size)
    rankable = len(ranges) - (1 if ranges[-1][1] - ranges[-1][0] < group_size else 0)

    weight_sal = weight_salience(W, U)
    salience = group_sums(weight_sal, group_size)
    split, errors = choose_split(W, H, weight_sal, salience, bits, group_size, rankable, splits, salience_weight)
    widths = allocate(salience, bits, split, rankable)

    Q, codes = torch.zeros_like(W), torch.zeros_like(W)
    starts = {a: (b, width) for (a, b), width in zip(ranges, widths)}
    grids: list[tuple[Tensor, Tensor, int]] = []  # (scale, zero, width) of each group so far

    def quantize_column(col: int, rest: Tensor) -> Tensor:
        if col in starts:  # the block is the group: fit its grid from its weights as updated so far
            b, width = starts[col]
            group = rest[:, :b - col]
            grids.append((*fit_grid(group, width, weight_salience(group, U[col:b, col:b]), salience_weight), width))
        scale, zero, width = grids[-1]
        codes[:, col] = grid_codes(rest[:, 0], scale[:, 0], zero[:, 0], width)
        Q[:, col] = dequantize(codes[:, col], scale[:, 0], zero[:, 0])
        return Q[:, col]

    sweep_columns(W, U, group_size, quantize_column)
    scales, zeros, _ = zip(*grids)
    return MixedResult(dequantized=Q, codes=codes.to(torch.uint8), scale=torch.cat(scales, dim=1),
                       zero=torch.cat(zeros, dim=1), group_bits=widths, group_size=group_size, salience=salience,
                       split=split, split_errors=errors)
