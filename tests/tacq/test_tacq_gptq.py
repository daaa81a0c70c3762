import pytest
import torch

from lit_tacq.gptq import HessianAccumulator, fill_kept, gptq_quantize
from lit_tacq.quantizer import (
    dequantize,
    expand_groups,
    fake_quantize,
    find_params,
    rtn_quantize,
)


def _layer(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, correlated calibration inputs [n, cols] and their Hessian."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5  # dense mixing: strongly correlated features
    X = torch.randn(4 * cols, cols, generator=g) @ mixing
    acc = HessianAccumulator(cols)
    for sequence in X.view(-1, 8, cols):  # "sequences" of 8 tokens, one at a time
        acc.add_batch(sequence)
    return W, X, acc.H


def _on_grid(result) -> torch.Tensor:
    cols = result.codes.shape[1]
    scale = expand_groups(result.scale, result.group_size, cols)
    zero = expand_groups(result.zero, result.group_size, cols)
    return dequantize(result.codes, scale, zero)


def test_hessian_accumulator_is_two_over_n_sequences_sum_of_outer_products():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(5, 6, generator=g), torch.randn(3, 5, 6, generator=g), torch.randn(7, 6, generator=g)]
    acc = HessianAccumulator(6)
    for x in batches:
        acc.add_batch(x)
    tokens = torch.cat([x.reshape(-1, 6) for x in batches])
    n_sequences = 1 + 3 + 1
    assert acc.n_samples == n_sequences
    torch.testing.assert_close(acc.H, 2 / n_sequences * tokens.T @ tokens)


@pytest.mark.parametrize("group_size", [None, 16])
def test_gptq_beats_rtn_on_layer_output_error(group_size):
    W, X, H = _layer(32, 64)
    gptq = gptq_quantize(W, H, bits=3, group_size=group_size)
    rtn = rtn_quantize(W, bits=3, group_size=group_size)
    gptq_err = torch.linalg.norm(X @ (W - gptq.dequantized).T)
    rtn_err = torch.linalg.norm(X @ (W - rtn.dequantized).T)
    assert gptq_err < 0.85 * rtn_err
    assert torch.equal(gptq.dequantized, _on_grid(gptq))


def _naive_masked_gptq(W, H, bits, keep):
    """Column-by-column OBS updates with an explicit float64 inverse Hessian, no blocks, no Cholesky."""
    W = W.double().clone()
    H = H.double() + 0.01 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    scale, zero = find_params(fill_kept(W.float(), keep), bits)
    scale, zero = scale[:, 0].double(), zero[:, 0].double()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        w = W[:, j]
        q = torch.where(keep[:, j], w, fake_quantize(w, scale, zero, bits))
        Q[:, j] = q
        W[:, j:] -= ((w - q) / Hinv[j, j])[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]  # condition on column j
    return Q.float()


def test_masked_gptq_matches_naive_obs_updates_and_keeps_compensated_values():
    W, _, H = _layer(12, 40, seed=1)
    keep = torch.rand(12, 40, generator=torch.Generator().manual_seed(2)) < 0.1
    keep[0, 0] = True
    result = gptq_quantize(W, H, bits=3, keep_mask=keep, block_size=16)  # 3 blocks, the last partial
    expected = _naive_masked_gptq(W, H, 3, keep)
    torch.testing.assert_close(result.dequantized, expected, rtol=0, atol=1e-4)
    # kept weights moved (they absorbed earlier columns' errors) except in column 0, which has no past
    assert torch.equal(result.dequantized[:, 0][keep[:, 0]], W[:, 0][keep[:, 0]])
    later = keep.clone()
    later[:, 0] = False
    assert (result.dequantized - W).abs()[later].mean() > 0.05
    # everything else lies exactly on its row's grid, and the grid ignored the kept weights
    assert torch.equal(result.dequantized[~keep], _on_grid(result)[~keep])
    assert torch.equal(result.keep_mask, keep)
    assert torch.equal(result.kept_values, torch.where(keep, result.dequantized, 0.0))


def test_row_grid_ignores_a_kept_outlier():
    W, _, H = _layer(4, 32, seed=3)
    W[0, 5] = 50.0
    keep = torch.zeros_like(W, dtype=torch.bool)
    keep[0, 5] = True
    masked = gptq_quantize(W, H, bits=2, keep_mask=keep)
    unmasked = gptq_quantize(W, H, bits=2)
    assert masked.scale[0] < unmasked.scale[0] / 5
    expected_scale, _ = find_params(fill_kept(W, keep), 2)
    torch.testing.assert_close(masked.scale, expected_scale)


def test_grouped_masked_gptq_stays_on_group_grids():
    W, _, H = _layer(8, 48, seed=4)
    keep = torch.rand(8, 48, generator=torch.Generator().manual_seed(5)) < 0.1
    result = gptq_quantize(W, H, bits=4, keep_mask=keep, group_size=32, block_size=16)
    assert result.scale.shape == (8, 2)
    assert torch.equal(result.dequantized[~keep], _on_grid(result)[~keep])


def test_keeping_everything_changes_nothing():
    W, _, H = _layer(6, 24, seed=6)
    result = gptq_quantize(W, H, bits=2, keep_mask=torch.ones_like(W, dtype=torch.bool))
    assert torch.equal(result.dequantized, W)


def test_dead_inputs_are_zeroed():
    W, _, H = _layer(6, 24, seed=7)
    H[3, :] = 0
    H[:, 3] = 0
    result = gptq_quantize(W, H, bits=4)
    assert torch.equal(result.dequantized[:, 3], torch.zeros(6))


def test_act_order_is_on_grid_and_refuses_groups():
    W, X, H = _layer(16, 48, seed=8)
    result = gptq_quantize(W, H, bits=3, act_order=True)
    assert torch.equal(result.dequantized, _on_grid(result))
    rtn = rtn_quantize(W, bits=3)
    assert torch.linalg.norm(X @ (W - result.dequantized).T) < torch.linalg.norm(X @ (W - rtn.dequantized).T)
    with pytest.raises(ValueError):
        gptq_quantize(W, H, bits=3, act_order=True, group_size=16)


def test_cholesky_failure_adds_damping_again():
    W = torch.randn(4, 8, generator=torch.Generator().manual_seed(9))
    H = -torch.eye(8)  # negative definite: the first damping cannot fix it
    H[0, 0] = 200.0  # mean diagonal 24: each round adds 0.24, five rounds are needed
    result = gptq_quantize(W, H, bits=4)
    assert torch.isfinite(result.dequantized).all()
