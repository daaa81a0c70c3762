"""Uniform b-bit grids: scale/zero search, quantize/dequantize, and round-to-nearest.

A grid maps an integer code ``c`` in ``[0, 2**b - 1]`` to ``scale * (c - zero)``. Scale and zero
are per output row, or per group of ``group_size`` consecutive input columns. ``zero`` is an
integer, so the code ``zero`` decodes to exactly 0.0 (the packed format relies on this).

The search follows GPTQ's reference ``Quantizer.find_params(mse=True)``: start from the row's
[min, max] range (always including 0), then try the range shrunk by 1.00, 0.99, ..., 0.21 and keep
the candidate with the smallest sum of ``|q - x| ** 2.4``. Scales are rounded to float16 inside the
search, so the grid GPTQ compensates for is exactly the grid that is stored.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

SCALE_DTYPE = torch.float16  # what QuantLinear stores
MSE_NORM = 2.4
MSE_GRID = 100
MSE_MAX_SHRINK = 0.8  # shrink factors 1 - i/100 for i < 80: 1.00 ... 0.21


@dataclass
class QuantResult:
    """One quantized weight matrix [out, in], before packing.

    ``dequantized`` holds grid values ``scale * (code - zero)`` everywhere except at ``keep_mask``,
    where it holds the kept (error-compensated) 16-bit weights. ``codes`` at kept positions are
    meaningless: the outliers override them.
    """

    dequantized: Tensor  # float32 [out, in]
    codes: Tensor  # uint8 [out, in]
    scale: Tensor  # float32 [out, 1] or [out, n_groups], values representable in float16
    zero: Tensor  # float32, same shape as scale, integer values
    keep_mask: Tensor | None  # bool [out, in], None when nothing is kept
    bits: int
    group_size: int | None

    @property
    def kept_values(self) -> Tensor | None:
        """Dense [out, in] tensor with the kept weights at kept positions and zeros elsewhere."""
        if self.keep_mask is None:
            return None
        return torch.where(self.keep_mask, self.dequantized, torch.zeros_like(self.dequantized))


def max_code(bits: int) -> int:
    return 2**bits - 1


def find_params(x: Tensor, bits: int, sym: bool = False, mse: bool = True) -> tuple[Tensor, Tensor]:
    """Scale and zero ([rows, 1] each, float32) of one grid per row of ``x`` [rows, n]."""
    x = x.float()
    maxq = max_code(bits)
    zeros = torch.zeros(x.shape[0], device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros)
    xmax = torch.maximum(x.max(dim=1).values, zeros)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)  # an all-zero row still needs a valid grid
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)

    def grid(shrink: float) -> tuple[Tensor, Tensor]:
        lo, hi = shrink * xmin, shrink * xmax
        scale = ((hi - lo) / maxq).to(SCALE_DTYPE).float().clamp_min(torch.finfo(SCALE_DTYPE).tiny)
        if sym:
            zero = torch.full_like(scale, (maxq + 1) // 2)
        else:
            zero = torch.round(-lo / scale).clamp(0, maxq)
        return scale, zero

    scale, zero = grid(1.0)
    if mse:
        best = torch.full_like(scale, float("inf"))
        for i in range(int(MSE_MAX_SHRINK * MSE_GRID)):
            cand_scale, cand_zero = grid(1 - i / MSE_GRID)
            q = fake_quantize(x, cand_scale[:, None], cand_zero[:, None], bits)
            err = (q - x).abs().pow(MSE_NORM).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, cand_scale, scale)
            zero = torch.where(better, cand_zero, zero)
    return scale[:, None], zero[:, None]


def quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of ``x`` on the grid, as an integer-valued float tensor (broadcasts scale/zero)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, max_code(bits))


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Grid values ``scale * (codes - zero)`` in float32 (in place on one fresh copy: no temporaries)."""
    return codes.to(torch.float32, copy=True).sub_(zero).mul_(scale)


def fake_quantize(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Round ``x`` to its nearest grid value."""
    return dequantize(quantize(x, scale, zero, bits), scale, zero)


def expand_groups(params: Tensor, group_size: int | None, cols: int) -> Tensor:
    """Per-row [out, 1] or per-group [out, n_groups] params -> one column per input feature."""
    if group_size is None:
        return params.expand(-1, cols)
    return params.repeat_interleave(group_size, dim=1)[:, :cols]


def n_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def rtn_quantize(
    W: Tensor, bits: int, group_size: int | None = None, mse: bool = True, sym: bool = False
) -> QuantResult:
    """Round-to-nearest baseline: every weight independently onto its row's (or group's) grid."""
    W = W.float()
    cols = W.shape[1]
    width = group_size or cols
    params = [find_params(W[:, c : c + width], bits, sym=sym, mse=mse) for c in range(0, cols, width)]
    scale = torch.cat([s for s, _ in params], dim=1)
    zero = torch.cat([z for _, z in params], dim=1)
    full_scale, full_zero = expand_groups(scale, group_size, cols), expand_groups(zero, group_size, cols)
    codes = quantize(W, full_scale, full_zero, bits)
    return QuantResult(
        dequantized=dequantize(codes, full_scale, full_zero),
        codes=codes.to(torch.uint8),
        scale=scale,
        zero=zero,
        keep_mask=None,
        bits=bits,
        group_size=group_size,
    )
