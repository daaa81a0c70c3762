"""SpQR as a quantizer of the TaCQ pipeline: small-group GPTQ with quantized statistics and unstructured 16-bit
outliers chosen by their sensitivity (no Lightning, no I/O).

Dettmers et al., *SpQR: A Sparse-Quantized Representation for Near-Lossless LLM Weight Compression*,
arXiv 2306.03078 (ICLR 2024), §4 and Algorithm 1. One layer, given H = (2/n) X X^T:

1. **GPTQ in column order** (no act-order: groups are consecutive columns of the stored format), the inverse
   Hessian's upper Cholesky factor U (U^T U = H^-1, ``gptq.inverse_hessian_cholesky``), lazy block updates.
2. **Small groups.** Every output row has its own asymmetric min-max b-bit grid per β1 (``group_size``, the
   paper's 16) consecutive input columns, fitted when the loop reaches the group from the weights as GPTQ has
   updated them, with the group's likely outliers (step 4) replaced by the mean of the row's other weights.
3. **Quantized statistics.** A group's scale is stored as a ``stat_bits`` code on a min-max grid shared by β2
   (``stat_group_size``, 16) consecutive output rows of the same column group, whose minimum and step are fp16
   (the second level: :func:`quantize_statistics`). The zero point is rounded to an integer in [0, 2^b - 1]
   and stored as a b-bit code, exact, which for b = 3 is the paper's 3-bit zero (the reference implementation
   does the same when the zero is rounded and its statistic bits are >= b). An integer zero keeps the packed
   format's invariant that code ``zero`` decodes to exactly 0, so kept weights are added as a sparse part.
4. **Outliers.** Keeping weight w_ij in 16 bits removes its share of the layer error, its sensitivity
   (w_ij - q(w_ij))^2 / [H^-1]_jj, where [H^-1]_jj is U_jj^2, the inverse Hessian of column j given the
   columns already fixed (the quantity GPTQ's update divides by). A weight whose sensitivity exceeds τ is kept
   (at its error-compensated value, as TaCQ keeps its weights: zero error there, GPTQ's updates still reach it).
   Before a group's grid is fitted, SpQR's leave-one-out test (:func:`leave_one_out_reduction`) marks the weights
   whose exclusion lowers the group's Hessian-weighted error by more than τ, so they do not stretch the grid.
5. **τ.** ``threshold`` is the paper's relative threshold: τ = threshold * mean_j(Var_i W_ij / U_jj^2), the
   reference implementation's normalisation. With ``threshold=None`` the layer gets a budget instead:
   τ is searched (at most ``MAX_PASSES`` GPTQ passes of secant steps on log kept against log τ,
   :func:`_next_tau`: about 6 passes on random layers of SmolLM2's shapes, where geometric bisection needed 9)
   so that the layer keeps as many weights as possible but at most floor(fraction * weights): SpQR at the kept
   fraction TaCQ uses (0.35 %), so the two are compared at equal stored bits.

Stored bits per weight: b + (stat_bits + b) / β1 + 32 / (β1 β2) + 32 * kept / weights; 3.5 + 32 * kept / weights
at the paper's b = 3, β1 = β2 = 16 (``qlinear.SpQRLinear`` stores it; ``io.measured_bits_per_weight`` reads it).

In the pipeline: ``QuantSettings(quantizer="spqr", saliency="none", group_size=16)`` (saliency ``none``: SpQR
picks its own outliers; ``fraction`` is its budget), e.g. ``python quantize.py fit --config configs/demo_tacq.yaml
--trainer.callbacks.init_args.quant.quantizer spqr --trainer.callbacks.init_args.quant.saliency none
--trainer.callbacks.init_args.quant.group_size 16``, or the ``spqr`` row of ``bench/quant_quality.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_tacq.gptq import fill_kept, inverse_hessian_cholesky, sweep_columns
from lit_tacq.quantizer import (
    QuantResult,
    dequantize,
    fake_quantize,
    find_params,
    max_code,
    quantize,
)

STAT_DTYPE = torch.float16  # the second-level minimum and step
MAX_PASSES = 10  # GPTQ passes of one layer when τ is searched for a budget
BUDGET_TOLERANCE = 0.02  # a search stops once the layer keeps at least (1 - this) of its budget


@dataclass
class SpQRResult:
    """One layer quantized by SpQR, before packing.

    ``quant`` is an ordinary :class:`QuantResult` whose ``scale`` holds the *decoded* first-level scales (so
    GPTQ compensated exactly the grid that is stored) and ``zero`` the integer zero points; the rest is how
    the scales are stored: ``scale_codes`` [out, groups] on the second-level grids ``scale_min`` /
    ``scale_step`` [ceil(out / stat_group_size), groups] (fp16). ``threshold`` is the absolute τ used.
    """

    quant: QuantResult
    scale_codes: Tensor  # uint8 [out, groups]
    scale_min: Tensor  # fp16 [stat groups, groups]
    scale_step: Tensor  # fp16 [stat groups, groups]
    stat_bits: int
    stat_group_size: int
    threshold: float

    @property
    def kept(self) -> int:
        return 0 if self.quant.keep_mask is None else int(self.quant.keep_mask.sum())


def _fp16_toward(x: Tensor, direction: float) -> Tensor:
    """``x`` as float16, rounded toward -inf (``direction`` -1) or +inf (+1) rather than to nearest."""
    rounded = x.to(STAT_DTYPE)
    wrong_side = (rounded.float() - x) * direction < 0
    return torch.where(wrong_side, torch.nextafter(rounded, torch.full_like(rounded, direction * math.inf)), rounded)


def _per_row(params: Tensor, group_size: int, rows: int) -> Tensor:
    """Second-level [stat groups, groups] -> one row per statistic [rows, groups]."""
    return params.repeat_interleave(group_size, dim=0)[:rows]


def quantize_statistics(values: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Codes (uint8, ``values``' shape [rows, cols]), minimum and step (fp16 [ceil(rows / group_size), cols]) of
    min-max ``bits``-bit grids over ``group_size`` consecutive rows of each column.

    The minimum is rounded down and the step up to float16, so every value lies on its grid's range and
    ``decode_statistics`` is within step / 2 of it (plus the final fp16 rounding of the decoded value).
    """
    rows, cols = values.shape
    n = -(-rows // group_size)
    padded = torch.cat([values.float(), values[-1:].float().expand(n * group_size - rows, cols)])
    grouped = padded.view(n, group_size, cols)
    minimum = _fp16_toward(grouped.amin(dim=1), -1)
    step = _fp16_toward((grouped.amax(dim=1) - minimum.float()) / max_code(bits), 1)
    low, width = _per_row(minimum.float(), group_size, rows), _per_row(step.float(), group_size, rows)
    codes = torch.where(width > 0, torch.round((values.float() - low) / width.clamp_min(1e-30)), 0.0)
    return codes.clamp(0, max_code(bits)).to(torch.uint8), minimum, step


def decode_statistics(codes: Tensor, minimum: Tensor, step: Tensor, group_size: int) -> Tensor:
    """The scales ``minimum + step * code`` as float16 values (in float32), never below float16's smallest normal
    number (a scale is a divisor). The same function serves quantization and loading, so both see one grid."""
    rows = codes.shape[0]
    value = _per_row(minimum.float(), group_size, rows) + _per_row(step.float(), group_size, rows) * codes.float()
    return value.to(STAT_DTYPE).float().clamp_min(torch.finfo(STAT_DTYPE).tiny)


def leave_one_out_reduction(group: Tensor, u_diag: Tensor, bits: int) -> Tensor:
    """[rows, g]: how much the row's Hessian-weighted error sum_j ((w_j - q(w_j)) / U_jj)^2 over the group drops
    when weight j is left in 16 bits and the min-max grid is fitted to the other g - 1 weights (SpQR's test for
    the weights that should not shape a group's grid)."""
    rows, g = group.shape
    if g < 2:
        return torch.zeros_like(group)
    others = torch.arange(g, device=group.device).expand(g, g)
    others = others[~torch.eye(g, dtype=torch.bool, device=group.device)].view(g, g - 1)  # row j: every index but j
    left_out = group[:, others].reshape(rows * g, g - 1)
    scale, zero = find_params(left_out, bits, mse=False)
    err = ((fake_quantize(left_out, scale, zero, bits) - left_out) / u_diag[others].repeat(rows, 1)).square()
    scale, zero = find_params(group, bits, mse=False)
    base = ((fake_quantize(group, scale, zero, bits) - group) / u_diag).square().sum(dim=1, keepdim=True)
    return base - err.sum(dim=1).view(rows, g)


def _group_grid(group: Tensor, u_diag: Tensor, bits: int, tau: float, stat_bits: int,
                stat_group_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Decoded scale and integer zero ([rows, 1] each), scale codes and second-level minimum and step of one
    column group, its likely outliers left out of the fit."""
    if math.isfinite(tau):
        group = fill_kept(group, leave_one_out_reduction(group, u_diag, bits) > tau)
    scale, zero = find_params(group, bits, mse=False)
    codes, minimum, step = quantize_statistics(scale, stat_bits, stat_group_size)
    return decode_statistics(codes, minimum, step, stat_group_size), zero, codes, minimum, step


def _spqr_pass(W: Tensor, U: Tensor, bits: int, group_size: int, stat_bits: int, stat_group_size: int,
               block_size: int, tau: float) -> tuple[SpQRResult, Tensor]:
    """One GPTQ pass at absolute threshold τ; also every weight's sensitivity as the loop met it."""
    W = W.clone()
    block_size = group_size * max(1, block_size // group_size)  # a group never straddles two blocks
    Q, codes = torch.zeros_like(W), torch.zeros_like(W)
    keep = torch.zeros_like(W, dtype=torch.bool)
    sensitivity = torch.zeros_like(W)
    grids: list[tuple[Tensor, ...]] = []

    def quantize_column(col: int, rest: Tensor) -> Tensor:
        if col % group_size == 0:
            grids.append(_group_grid(rest[:, :group_size], U.diagonal()[col:col + group_size], bits, tau,
                                     stat_bits, stat_group_size))
        scale, zero = grids[-1][0][:, 0], grids[-1][1][:, 0]
        w = rest[:, 0]
        sensitivity[:, col] = ((w - dequantize(quantize(w, scale, zero, bits), scale, zero)) / U[col, col]).square()
        k = sensitivity[:, col] > tau
        c = quantize(torch.where(k, 0.0, w), scale, zero, bits)
        Q[:, col], codes[:, col], keep[:, col] = torch.where(k, w, dequantize(c, scale, zero)), c, k
        return Q[:, col]

    sweep_columns(W, U, block_size, quantize_column)
    scale, zero, scale_codes, minimum, step = (torch.cat(parts, dim=1) for parts in zip(*grids))
    quant = QuantResult(dequantized=Q, codes=codes.to(torch.uint8), scale=scale, zero=zero, keep_mask=keep,
                        bits=bits, group_size=group_size)
    return SpQRResult(quant, scale_codes, minimum, step, stat_bits, stat_group_size, tau), sensitivity


def spqr_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int = 16,
    stat_bits: int = 3,
    stat_group_size: int = 16,
    threshold: float | None = None,
    fraction: float = 0.0,
    percdamp: float = 0.01,
    block_size: int = 128,
) -> SpQRResult:
    """Quantize ``W`` [out, in] with SpQR (module docstring): at the relative ``threshold`` when given, else at
    the τ that keeps at most floor(``fraction`` * weights) of the layer's weights, as many as it can."""
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float32)
    W[:, H.diagonal() == 0] = 0  # inputs that are always zero: the weight never matters
    U = inverse_hessian_cholesky(H, percdamp)

    def run(tau: float) -> tuple[SpQRResult, Tensor]:
        return _spqr_pass(W, U, bits, group_size, stat_bits, stat_group_size, block_size, tau)

    if threshold is not None:
        return run(threshold * float((W.var(dim=0) / U.diagonal().square()).mean()))[0]
    budget = math.floor(fraction * W.numel())
    best, sensitivity = run(math.inf)
    if budget == 0:
        return best
    # the budget-th largest sensitivity without outliers: keeping weights changes the grids, hence the search
    tau = max(float(sensitivity.flatten().kthvalue(W.numel() - budget + 1).values), torch.finfo(torch.float32).tiny)
    slope = _kept_slope(sensitivity, tau)
    tried: list[tuple[float, int]] = []  # (τ, kept) of each pass
    for _ in range(MAX_PASSES - 1):
        result, _ = run(tau)
        tried.append((tau, result.kept))
        if result.kept <= budget and result.kept > best.kept:
            best = result
        if (1 - BUDGET_TOLERANCE) * budget <= result.kept <= budget:
            break
        tau = _next_tau(tried, budget, slope)
    return best


def _kept_slope(sensitivity: Tensor, tau: float) -> float:
    """-d log(kept) / d log(τ) near ``tau``, read from how many sensitivities exceed τ / 2 and 2 τ."""
    wider, narrower = (int((sensitivity > t).sum()) for t in (tau / 2, 2 * tau))
    return math.log(max(wider, 1) / max(narrower, 1)) / math.log(4)


def _next_tau(tried: list[tuple[float, int]], budget: int, slope: float) -> float:
    """The next τ: a secant step on log kept against log τ through the last two passes (``slope`` before there
    are two, or when they disagree with it in sign), aimed just inside the budget. Once some pass kept too many
    and another within the budget, the step stays inside that bracket, at least a tenth of it from either end,
    so the bracket always shrinks; before that it moves by a factor of 1.05 to 4 toward the budget."""
    tau, kept = tried[-1]
    if len(tried) > 1 and tried[-2][1] != kept and tried[-2][0] != tau:
        measured = -math.log(max(kept, 1) / max(tried[-2][1], 1)) / math.log(tau / tried[-2][0])
        slope = measured if measured > 0 else slope
    step = (math.log(max(kept, 1)) - math.log(budget * (1 - BUDGET_TOLERANCE / 2))) / max(slope, 0.25)
    over = [t for t, k in tried if k > budget]
    within = [t for t, k in tried if k <= budget]
    if not over or not within:
        return tau * math.exp(math.copysign(min(max(abs(step), math.log(1.05)), math.log(4)), step))
    a, b = math.log(max(over)), math.log(min(within))  # the tightest bracket
    if a >= b:  # kept is not quite monotone in τ: passes this close disagree by a few weights
        return math.exp((a + b) / 2)
    return math.exp(min(max(math.log(tau) + step, a + 0.1 * (b - a)), b - 0.1 * (b - a)))
