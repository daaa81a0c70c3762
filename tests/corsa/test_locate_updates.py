"""The closed-form updates of ROME, MEMIT and AlphaEdit on hand-sized matrices (float64)."""

import torch

from lit_corsa.locate.updates import (
    alphaedit_update,
    memit_update,
    nullspace_projector,
    rome_update,
)


def _toy(d_in=6, d_out=4, samples=40, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    basis = torch.randn(d_in, rank or d_in, generator=g, dtype=torch.float64)
    preserved = basis @ torch.randn(rank or d_in, samples, generator=g, dtype=torch.float64)  # keys of "general text"
    covariance = preserved @ preserved.T / samples
    return g, weight, preserved, covariance


def test_rome_maps_the_edited_key_to_the_target_value_exactly_on_a_toy_mlp():
    g, weight, _, covariance = _toy()
    up = torch.nn.Linear(3, 6, bias=False, dtype=torch.float64)
    down = torch.nn.Linear(6, 4, bias=False, dtype=torch.float64)
    mlp = torch.nn.Sequential(up, torch.nn.SiLU(), down)
    x, value = torch.randn(3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    key = torch.nn.functional.silu(up(x)).detach()
    with torch.no_grad():
        down.weight.copy_(weight)
        down.weight.add_(rome_update(weight, key, value, covariance))
    torch.testing.assert_close(mlp(x), value, rtol=0, atol=1e-12)
    update = down.weight.detach() - weight
    assert torch.linalg.matrix_rank(update) == 1
    # a key C-orthogonal to the edit (uᵀk' = 0 with u = C⁻¹k*) keeps its value: ROME's locality
    u = torch.linalg.solve(covariance, key)
    other = torch.randn(6, generator=g, dtype=torch.float64)
    other = other - (u @ other) / (u @ u) * u
    torch.testing.assert_close(down(other), weight @ other, rtol=0, atol=1e-12)


def test_memit_with_one_edit_and_one_layer_is_rome():
    """One key: MEMIT's least squares gives ROME's rank-one update scaled by c / (1 + c), c = kᵀ(λC)⁻¹k
    (it trades the edit against the preserved keys where ROME imposes it); as λ → 0 the two are equal."""
    g, weight, _, covariance = _toy()
    key, value = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    rome = rome_update(weight, key, value, covariance)
    for mom2_weight in (15000.0, 1.0, 1e-3):
        memit = memit_update((value - weight @ key)[:, None], key[:, None], covariance, mom2_weight)
        c = key @ torch.linalg.solve(mom2_weight * covariance, key)
        torch.testing.assert_close(memit, rome * c / (1 + c), rtol=1e-9, atol=1e-12)
    memit = memit_update((value - weight @ key)[:, None], key[:, None], covariance, 1e-6)
    torch.testing.assert_close(memit, rome, rtol=1e-5, atol=1e-8)


def test_memit_solves_its_least_squares_problem():
    """ΔW minimises λ‖ΔW C^½‖² + ‖ΔW K - R‖²: the gradient of that objective vanishes at MEMIT's update."""
    g, _, _, covariance = _toy()
    keys, residuals = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    update = memit_update(residuals, keys, covariance, 2.0)
    gradient = 2.0 * update @ covariance + (update @ keys - residuals) @ keys.T
    torch.testing.assert_close(gradient, torch.zeros_like(gradient), rtol=0, atol=1e-11)


def test_alphaedit_leaves_the_preserved_keys_outputs_unchanged():
    """Preserved keys span a 3-dimensional subspace of the 6 key dimensions: the update lies in the other 3
    (the null space of their covariance), so every preserved key's output stays the same to fp precision,
    while the edited keys move towards their targets."""
    g, weight, preserved, covariance = _toy(rank=3)
    projector = nullspace_projector(covariance, threshold=1e-8)
    assert round(float(projector.trace())) == 3
    keys, residuals = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    earlier = torch.randn(6, 2, generator=g, dtype=torch.float64)
    update = alphaedit_update(residuals, keys, projector, earlier, l2=0.1)
    edited = weight + update
    torch.testing.assert_close(edited @ preserved, weight @ preserved, rtol=0, atol=1e-10)
    assert (update @ keys - residuals).norm() < 0.9 * residuals.norm()  # the edited keys move towards their targets
    # without the projection (P = I) the same problem moves the preserved keys' outputs
    free = alphaedit_update(residuals, keys, torch.eye(6, dtype=torch.float64), earlier, l2=0.1)
    assert (free @ preserved).abs().max() > 1e-3


def test_alphaedit_keeps_earlier_edits_through_the_preserved_keys():
    """The soft term ‖ΔW Kₚ‖: with earlier edits' keys given, their outputs move less than without."""
    g, _, _, covariance = _toy(rank=2)
    projector = nullspace_projector(covariance, threshold=1e-8)
    keys, residuals = torch.randn(6, 2, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64)
    earlier = torch.randn(6, 3, generator=g, dtype=torch.float64)
    kept = alphaedit_update(residuals, keys, projector, earlier * 10, l2=0.1)
    ignored = alphaedit_update(residuals, keys, projector, None, l2=0.1)
    assert (kept @ earlier).norm() < 0.5 * (ignored @ earlier).norm()
