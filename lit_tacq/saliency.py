"""Which weights to keep in 16 bits: per-weight saliency scores and one global top-k mask.

TaCQ's score is ``|W| * A * |Q(W) - W|`` with ``A`` the sum over calibration examples of the
per-example absolute gradient and ``Q(W)`` the (unmasked) GPTQ weight. The other scorers are the
ablations and baselines it is compared with; all share one signature so that a config can name one.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lit_tacq.gptq import inverse_hessian_cholesky


@dataclass
class LayerStats:
    """What the scorers may need about one Linear layer; each scorer uses a subset."""

    weight: Tensor  # W [out, in]
    grad_abs_sum: Tensor | None = None  # A = sum_n |dL_n/dW| [out, in]
    quantized: Tensor | None = None  # Q(W) [out, in]
    hessian: Tensor | None = None  # H = 2/n sum x x^T [in, in]
    seed: int = 0  # for "random": give every layer its own seed


def tacq_saliency(W: Tensor, grad_abs_sum: Tensor, W_quant: Tensor) -> Tensor:
    """S = |W| * A * |Q(W) - W| in float32."""
    W = W.float()
    return W.abs() * grad_abs_sum.float() * (W_quant.float() - W).abs()


def _need(stats: LayerStats, *fields: str) -> list[Tensor]:
    values = [getattr(stats, f) for f in fields]
    missing = [f for f, v in zip(fields, values) if v is None]
    if missing:
        raise ValueError(f"this scorer needs LayerStats.{', '.join(missing)}")
    return [v.float() for v in values]


def _tacq(stats: LayerStats) -> Tensor:
    return tacq_saliency(*_need(stats, "weight", "grad_abs_sum", "quantized"))


def _grad_delta(stats: LayerStats) -> Tensor:
    """Quantization-aware localization alone: |g| * |Q(W) - W|."""
    W, A, Q = _need(stats, "weight", "grad_abs_sum", "quantized")
    return A * (Q - W).abs()


def _weight_grad(stats: LayerStats) -> Tensor:
    """Magnitude-sharpened gradient alone: |W| * |g|."""
    W, A = _need(stats, "weight", "grad_abs_sum")
    return W.abs() * A


def _magnitude(stats: LayerStats) -> Tensor:
    (W,) = _need(stats, "weight")
    return W.abs()


def _hessian(stats: LayerStats) -> Tensor:
    """SpQR-style sensitivity (W_ij - Q(W)_ij)^2 / U_jj^2, U = upper Cholesky factor of H^-1.

    U_jj^2 is column j's inverse Hessian given the earlier columns (GPTQ's own error scale, with the
    same 1 % damping), so the score is the layer-output loss of rounding W_ij in GPTQ's order.
    """
    W, Q, H = _need(stats, "weight", "quantized", "hessian")
    u = inverse_hessian_cholesky(H).diagonal()
    return (W - Q).square() / u.square()


def _random(stats: LayerStats) -> Tensor:
    generator = torch.Generator().manual_seed(stats.seed)
    return torch.rand(stats.weight.shape, generator=generator).to(stats.weight.device)


SCORERS: dict[str, Callable[[LayerStats], Tensor]] = {
    "tacq": _tacq,
    "grad_delta": _grad_delta,
    "weight_grad": _weight_grad,
    "magnitude": _magnitude,
    "hessian": _hessian,
    "random": _random,
}


# The LayerStats fields each scorer reads: a driver computes Q(W) or H only when the scorer needs them.
NEEDS: dict[str, frozenset[str]] = {
    "tacq": frozenset({"grad_abs_sum", "quantized"}),
    "grad_delta": frozenset({"grad_abs_sum", "quantized"}),
    "weight_grad": frozenset({"grad_abs_sum"}),
    "magnitude": frozenset(),
    "hessian": frozenset({"quantized", "hessian"}),
    "random": frozenset(),
}


def score(name: str, stats: LayerStats) -> Tensor:
    """Saliency [out, in] (float32) of one layer under the scorer called ``name``."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    return SCORERS[name](stats)


def _order_key(scores: Tensor) -> Tensor:
    """int32 keys that sort like the float32 scores.

    Non-negative IEEE floats already sort like their bit patterns read as integers; for negative
    ones, flipping the 31 non-sign bits reverses their order and puts them below the positives.
    """
    bits = scores.float().contiguous().view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def global_topk_mask(scores: dict[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Keep the k = floor(fraction * N) largest scores over all layers together (one ranking).

    Exactly k entries are kept; among equal scores at the threshold, the earlier ones win (layers in
    dict order, entries in row-major order). The k-th largest score is found by bisection on its
    32-bit pattern, counting ``score >= t`` layer by layer: 32 passes over the scores, but no
    concatenated copy of them, so memory stays at one layer's worth.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"scores of {name} contain NaN")
    total = sum(s.numel() for s in scores.values())
    k = math.floor(fraction * total)
    if k == 0:
        return {name: torch.zeros_like(s, dtype=torch.bool) for name, s in scores.items()}

    def count_at_least(threshold: int) -> int:
        return sum(int((_order_key(s) >= threshold).sum()) for s in scores.values())

    lo, hi = -(2**31), 0x7F800000  # all int32 keys up to +inf; invariant: count_at_least(lo) >= k
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_at_least(mid) >= k:
            lo = mid
        else:
            hi = mid - 1

    ties_left = k - count_at_least(lo + 1)
    masks = {}
    for name, s in scores.items():
        key = _order_key(s)
        ties = key == lo
        first_ties = ties & (ties.flatten().cumsum(0) <= ties_left).view_as(ties)
        ties_left -= int(first_ties.sum())
        masks[name] = (key > lo) | first_ties
    return masks
