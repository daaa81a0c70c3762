"""The closed-form weight updates of ROME, MEMIT and AlphaEdit, as pure functions of keys and values.

Notation (all three papers): a Linear ``W`` [d_out, d_in] maps a key ``k`` (its input at the subject's last
token) to a value ``W k``. ``C`` is the keys' second moment E[k kᵀ] over general text (the "knowledge to
preserve"); ``K`` [d_in, n] holds one key per edit as columns, ``R`` [d_out, n] the values still missing.
Everything is computed in float64 and returned in that dtype; callers cast.

- ROME (Meng et al. 2022, https://arxiv.org/abs/2202.05262, Eq. 2): the rank-one update
  ``W' = W + (v* - W k*) uᵀ / (uᵀ k*)`` with ``u = C⁻¹ k*``, so that ``W' k* = v*`` exactly and keys
  orthogonal to ``u`` in the C⁻¹ metric are untouched.
- MEMIT (Meng et al. 2023, https://arxiv.org/abs/2210.07229, Eq. 14): least squares over the preserved
  keys and the new ones, ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (λ = ``mom2_update_weight``). With one key this
  is ROME's direction scaled by ``c / (1 + c)``, ``c = kᵀ (λC)⁻¹ k``: MEMIT trades the edit against
  the preserved keys where ROME imposes it, and the two coincide as λ → 0.
- AlphaEdit (Fang et al. 2025, https://arxiv.org/abs/2410.02355, Eq. 12): ``P`` projects onto the
  null space of C (eigenvectors with eigenvalue < threshold); ``ΔW = R Kᵀ P (Kₚ Kₚᵀ P + K Kᵀ P + α I)⁻¹``
  with ``Kₚ`` the keys of earlier edits. Every row of ΔW lies in the range of P, so ``ΔW k = 0`` for
  any key that C spans: the preserved knowledge's outputs do not move at all.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _f64(*tensors: Tensor) -> list[Tensor]:
    """Float64 copies on the first tensor's device."""
    return [t.to(tensors[0].device, torch.float64) for t in tensors]


def rome_update(weight: Tensor, key: Tensor, value: Tensor, covariance: Tensor | None) -> Tensor:
    """ΔW that makes ``(weight + ΔW) @ key == value`` (ROME's rank-one update; ``covariance`` None: C = I)."""
    weight, key, value = _f64(weight, key, value)
    u = key if covariance is None else torch.linalg.solve(_f64(key, covariance)[1], key)
    return torch.outer(value - weight @ key, u) / (u @ key)


def memit_update(residuals: Tensor, keys: Tensor, covariance: Tensor, mom2_weight: float) -> Tensor:
    """MEMIT's ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ for residuals R [d_out, n] and keys K [d_in, n]."""
    residuals, keys, covariance = _f64(residuals, keys, covariance)
    gram = mom2_weight * covariance + keys @ keys.T
    # (A⁻¹ K Rᵀ)ᵀ = R Kᵀ A⁻¹ for the symmetric A: one solve, no explicit inverse
    return torch.linalg.solve(gram, keys @ residuals.T).T


def nullspace_projector(covariance: Tensor, threshold: float) -> Tensor:
    """P = U₀ U₀ᵀ over the eigenvectors of ``covariance`` whose eigenvalue is below ``threshold``."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.to(torch.float64))
    null = eigenvectors[:, eigenvalues < threshold]
    return null @ null.T


def alphaedit_update(residuals: Tensor, keys: Tensor, projector: Tensor, preserved_keys: Tensor | None,
                     l2: float) -> Tensor:
    """AlphaEdit's ΔW = R Kᵀ P (Kₚ Kₚᵀ P + K Kᵀ P + α I)⁻¹; ``preserved_keys`` [d_in, m] are earlier edits'
    keys (None: no earlier edit). Computed as (P A + αI)⁻¹ P K Rᵀ transposed, A = Kₚ Kₚᵀ + K Kᵀ."""
    residuals, keys, projector = _f64(residuals, keys, projector)
    gram = keys @ keys.T
    if preserved_keys is not None and preserved_keys.numel():
        preserved = preserved_keys.to(keys.device, torch.float64)
        gram = gram + preserved @ preserved.T
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    return torch.linalg.solve(projector @ gram + l2 * eye, projector @ keys @ residuals.T).T
