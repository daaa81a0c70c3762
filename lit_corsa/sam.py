"""SAM's ascent step on a list of parameters (CoRSA step, docs/corsa.md §3.3 and §3.5).

``sam_perturb`` moves the parameters φ to φ + ε with ε = ρ · d / sqrt(‖d‖² + 1e-12), d the (merged)
gradient; ``sam_restore`` puts φ back.

Restoring copies saved values back instead of subtracting ε: in floating point (φ + ε) − ε is not φ
(in bf16 it is often off by one ulp), and the reference's ``p.sub_(eps)`` lets that error drift into
the weights at every step. The copy costs one extra copy of the trainable parameters, which for CoRSA are
the LoRA matrices only (r = 32 on all seven projections of Llama-3.1-8B: about 84M values, ~170 MB in
bf16, next to 16 GB of frozen weights), and makes the round trip exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

EPS = 1e-12


def _squared_norm(grads: Sequence[Optional[Tensor]]) -> Tensor:
    squares = [g.float().square().sum() for g in grads if g is not None]
    if not squares:
        return torch.zeros(())
    return torch.stack(squares).sum()


def global_grad_norm(grads: Sequence[Optional[Tensor]]) -> Tensor:
    """L2 norm of a gradient list read as one vector, in fp32 (``None`` entries count as zeros)."""
    return _squared_norm(grads).sqrt()


@torch.no_grad()
def sam_perturb(
    params: Sequence[Tensor], direction: Sequence[Optional[Tensor]], rho: float
) -> Optional[list[Optional[Tensor]]]:
    """Add ε = ρ · d / sqrt(‖d‖² + 1e-12) to ``params`` in place; return what ``sam_restore`` needs.

    The return value is a list of copies of the original parameter values (``None`` where the direction
    is ``None`` and the parameter is left untouched), not ε itself; see the module docstring for why.
    Returns ``None`` and changes nothing when ‖d‖ is zero or not finite (the step then skips its ascent).
    """
    if len(params) != len(direction):
        raise ValueError(f"{len(params)} parameters but {len(direction)} direction tensors")
    squared = _squared_norm(direction)
    if not bool(torch.isfinite(squared)) or bool(squared == 0):
        return None
    scale = rho / torch.sqrt(squared + EPS)
    saved: list[Optional[Tensor]] = []
    for p, d in zip(params, direction):
        if d is None:
            saved.append(None)
            continue
        saved.append(p.detach().clone())
        p.add_(d.float() * scale.to(d.device))
    return saved


@torch.no_grad()
def sam_restore(params: Sequence[Tensor], saved: Sequence[Optional[Tensor]]) -> None:
    """Copy the values saved by ``sam_perturb`` back into ``params``: bit-exact φ."""
    if len(params) != len(saved):
        raise ValueError(f"{len(params)} parameters but {len(saved)} saved tensors")
    for p, s in zip(params, saved):
        if s is not None:
            p.copy_(s)
