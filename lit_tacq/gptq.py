"""(Masked) GPTQ on one Linear layer, given the Hessian of its layer-wise loss.

GPTQ quantizes a weight matrix column by column and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse Hessian H^-1 of ||W X - Q X||^2, H = 2 X X^T / n.
TaCQ adds a mask of weights to keep in 16 bits: their error is defined as zero, so they never push
error onto others, yet they still receive the updates from earlier columns and are stored at that
error-compensated value. Everything runs in float32.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from lit_tacq.quantizer import QuantResult, dequantize, find_params, quantize


class HessianAccumulator:
    """Running average H = (2/n) sum_x x x^T over n samples, updated one batch at a time.

    As in GPTQ's reference ``add_batch``, a sample is one sequence: a [seq, in] input counts once and
    a [batch, seq, in] input counts ``batch`` times, while every token contributes its outer product.
    """

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_samples = 0

    def add_batch(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected [seq, in] or [batch, seq, in], got shape {tuple(x.shape)}")
        samples = 1 if x.dim() == 2 else x.shape[0]
        tokens = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        self.H *= self.n_samples / (self.n_samples + samples)
        self.n_samples += samples
        tokens = math.sqrt(2 / self.n_samples) * tokens
        self.H += tokens.T @ tokens


def inverse_hessian_cholesky(H: Tensor, percdamp: float = 0.01, max_tries: int = 10) -> Tensor:
    """Upper Cholesky factor U of (H + damping)^-1, with U^T U = H^-1.

    U[j, j]^2 is the inverse Hessian of column j given that columns < j are already fixed: GPTQ's
    error scale. Dead inputs (diag H = 0) get a unit diagonal. Damping is ``percdamp`` times the
    mean diagonal; if a factorisation fails, the same damping is added again, up to ``max_tries``.
    """
    H = H.float().clone()
    diag = H.diagonal()
    diag[diag == 0] = 1
    damp = percdamp * diag.mean()
    for _ in range(max_tries):
        diag += damp
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
    raise torch.linalg.LinAlgError(f"Hessian not positive definite after {max_tries} rounds of damping")


ColumnQuantizer = Callable[[int, Tensor], Tensor]


def sweep_columns(W: Tensor, U: Tensor, block_size: int, quantize_column: ColumnQuantizer) -> None:
    """GPTQ's column loop with lazy block updates (Frantar et al. 2023, Algorithm 1), updating ``W`` in place.

    ``U`` is the upper Cholesky factor of H^-1. For each column, ``quantize_column(col, rest)`` gets the column's
    index and the block's not yet quantized columns as updated so far (``rest[:, 0]`` is the column itself, so a
    grid for a group starting there can be fitted from ``rest[:, :group_size]``) and returns the column's stored
    value; its error, divided by ``U[col, col]``, is spread over the later columns. Every GPTQ variant here (plain,
    kept weights, grouped grids, SpQR's outliers, SliM-LLM's widths) differs only in ``quantize_column``.
    """
    cols = W.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            q = quantize_column(i1 + i, W1[:, i:])
            err = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            err1[:, i] = err
        W[:, i2:] -= err1 @ U[i1:i2, i2:]


def fill_kept(W: Tensor, keep: Tensor) -> Tensor:
    """``W`` with kept entries replaced by the mean of the other entries of their row.

    Kept weights are stored in 16 bits, so they must not stretch the row's grid; the row mean is a
    neutral stand-in that leaves the [min, max] range of the remaining weights unchanged.
    """
    other = ~keep
    mean = (W * other).sum(dim=1, keepdim=True) / other.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(keep, mean, W)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    keep_mask: Tensor | None = None,
    group_size: int | None = None,
    block_size: int = 128,
    percdamp: float = 0.01,
    act_order: bool = False,
    mse: bool = True,
    sym: bool = False,
) -> QuantResult:
    """Quantize ``W`` [out, in] to ``bits`` with GPTQ, keeping ``keep_mask`` entries in 16 bits.

    Per-row grids are fixed up front; per-group grids are found when the loop reaches a group, from
    its weights as updated so far (blocks are widened to a multiple of the group so a group never
    straddles two blocks). ``act_order`` (columns by decreasing diag H) needs per-row grids: grouped
    storage assumes groups of consecutive columns.
    """
    if act_order and group_size is not None:
        raise ValueError("act_order with group_size would need a column permutation in the stored format")
    W = W.detach().float().clone()
    H = H.detach().to(W.device, torch.float32)
    keep = torch.zeros_like(W, dtype=torch.bool) if keep_mask is None else keep_mask.to(W.device, torch.bool)

    W[:, H.diagonal() == 0] = 0  # inputs that are always zero: the weight never matters
    if group_size is None:
        scale, zero = find_params(fill_kept(W, keep), bits, sym=sym, mse=mse)
    else:
        block_size = group_size * max(1, block_size // group_size)
        scales, zeros = [], []

    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H, keep = W[:, perm], H[perm][:, perm], keep[:, perm]
    U = inverse_hessian_cholesky(H, percdamp)

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)

    def quantize_column(col: int, rest: Tensor) -> Tensor:
        nonlocal scale, zero
        if group_size is not None and col % group_size == 0:
            scale, zero = find_params(fill_kept(rest[:, :group_size], keep[:, col : col + group_size]), bits,
                                      sym=sym, mse=mse)
            scales.append(scale)
            zeros.append(zero)
        w, k = rest[:, 0], keep[:, col]
        c = quantize(torch.where(k, 0.0, w), scale[:, 0], zero[:, 0], bits)
        Q[:, col], codes[:, col] = torch.where(k, w, dequantize(c, scale[:, 0], zero[:, 0])), c
        return Q[:, col]

    sweep_columns(W, U, block_size, quantize_column)

    if act_order:
        inverse = torch.argsort(perm)
        Q, codes = Q[:, inverse], codes[:, inverse]
    if group_size is not None:
        scale, zero = torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
    return QuantResult(
        dequantized=Q,
        codes=codes.to(torch.uint8),
        scale=scale,
        zero=zero,
        keep_mask=None if keep_mask is None else keep_mask.to(W.device, torch.bool),
        bits=bits,
        group_size=group_size,
    )
