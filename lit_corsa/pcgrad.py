"""PCGrad merge of the DPO and SFT task gradients (CoRSA step, docs/corsa.md §3.2).

Each gradient is a list with one tensor per trainable parameter, read as one flat vector: inner products
and norms run over all parameters at once, in fp32, so the conflict test sees the whole LoRA update and
not one matrix at a time. ``None`` (a parameter the loss did not reach) counts as zeros.

Modes:

- ``"sequential"`` (default, the reference's rule): if ⟨g_dpo, g_sft⟩ < 0, project g_dpo onto the normal
  plane of g_sft; then test g_sft against the *already projected* g_dpo. That second test only fires on
  rounding noise (the projected g_dpo is orthogonal to g_sft up to the 1e-12 in the denominator), so in
  practice only the DPO gradient is ever changed. It is still run literally, as the reference does.
- ``"symmetric"``: textbook two-task PCGrad; each gradient is projected against the other's *original*.
- ``"none"``: no projection; the two gradients are just averaged.

The merged gradient is the average ``(g_dpo' + g_sft') / 2``, not the sum, as in the reference.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor

Grads = Sequence[Optional[Tensor]]
Mode = Literal["sequential", "symmetric", "none"]

EPS = 1e-12


def _dot(a: Grads, b: Grads) -> Tensor:
    """Inner product of two gradient lists in fp32 (``None`` contributes nothing)."""
    terms = [(x.float() * y.float()).sum() for x, y in zip(a, b) if x is not None and y is not None]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def _project(g: Grads, onto: Grads) -> tuple[list[Optional[Tensor]], bool]:
    """PCGrad's rule: remove from ``g`` its component along ``onto`` when the two conflict."""
    dot = _dot(g, onto)
    if not bool(dot < 0):
        return list(g), False
    coef = dot / (_dot(onto, onto) + EPS)
    projected = []
    for x, y in zip(g, onto):
        if y is None:
            projected.append(x)
        elif x is None:
            projected.append((-coef * y.float()).to(y.dtype))
        else:
            projected.append((x.float() - coef * y.float()).to(x.dtype))
    return projected, True


def project_conflicting(
    g_dpo: Grads, g_sft: Grads, mode: Mode = "sequential"
) -> tuple[list[Optional[Tensor]], bool]:
    """Merge two task gradients; returns ``(merged, projected)``.

    ``merged[i]`` is ``None`` only where both task gradients are ``None``; ``projected`` says whether
    any projection happened (for logging). The inputs are not modified.
    """
    if len(g_dpo) != len(g_sft):
        raise ValueError(f"gradient lists differ in length: {len(g_dpo)} vs {len(g_sft)}")
    if mode == "sequential":
        dpo, p1 = _project(g_dpo, g_sft)
        sft, p2 = _project(g_sft, dpo)
    elif mode == "symmetric":
        dpo, p1 = _project(g_dpo, g_sft)
        sft, p2 = _project(g_sft, g_dpo)
    elif mode == "none":
        dpo, sft, p1, p2 = list(g_dpo), list(g_sft), False, False
    else:
        raise ValueError(f"unknown PCGrad mode {mode!r}; expected 'sequential', 'symmetric' or 'none'")
    merged = []
    for a, b in zip(dpo, sft):
        if a is None and b is None:
            merged.append(None)
        elif a is None:
            merged.append(b / 2)
        elif b is None:
            merged.append(a / 2)
        else:
            merged.append(((a.float() + b.float()) / 2).to(a.dtype))
    return merged, p1 or p2
