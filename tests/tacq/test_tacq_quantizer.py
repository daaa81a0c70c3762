import pytest
import torch

from lit_tacq.quantizer import (
    dequantize,
    expand_groups,
    fake_quantize,
    find_params,
    quantize,
    rtn_quantize,
)


def _weights(rows: int = 16, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_grid_holds_zero_exactly_and_scales_fit_float16(bits, sym):
    W = _weights() + 0.3  # asymmetric rows
    scale, zero = find_params(W, bits, sym=sym)
    assert scale.shape == zero.shape == (W.shape[0], 1)
    assert torch.equal(scale, scale.half().float())
    assert torch.equal(zero, zero.round())
    assert ((zero >= 0) & (zero <= 2**bits - 1)).all()
    assert torch.equal(dequantize(zero, scale, zero), torch.zeros_like(scale))
    if sym:
        assert (zero == 2 ** (bits - 1)).all()
    codes = quantize(W, scale, zero, bits)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_mse_search_clips_an_outlier_row():
    row = torch.cat([torch.linspace(-1, 1, 63), torch.tensor([8.0])])[None, :]
    full_scale, full_zero = find_params(row, 3, mse=False)
    mse_scale, mse_zero = find_params(row, 3, mse=True)
    assert mse_scale < full_scale  # the range was shrunk

    def err(scale, zero):
        return (fake_quantize(row, scale, zero, 3) - row).abs().pow(2.4).sum()

    assert err(mse_scale, mse_zero) < err(full_scale, full_zero)


def test_all_zero_row_gets_a_valid_grid():
    scale, zero = find_params(torch.zeros(2, 8), 4)
    assert (scale > 0).all()
    assert torch.equal(fake_quantize(torch.zeros(2, 8), scale, zero, 4), torch.zeros(2, 8))


def test_rtn_per_row_rounds_to_nearest_grid_value():
    W = _weights()
    result = rtn_quantize(W, 3)
    assert result.scale.shape == (16, 1)
    grid = dequantize(result.codes, result.scale, result.zero)
    assert torch.equal(result.dequantized, grid)
    # nearest: moving any weight one code up or down on its grid is never closer
    for step in (-1, 1):
        other = dequantize((result.codes.float() + step).clamp(0, 7), result.scale, result.zero)
        assert ((W - result.dequantized).abs() <= (W - other).abs() + 1e-6).all()


def test_rtn_groups_have_their_own_grids_including_a_partial_last_group():
    W = _weights(cols=80)
    W[:, 64:] *= 10  # the last (partial) group is much wider
    result = rtn_quantize(W, 4, group_size=32)
    assert result.scale.shape == (16, 3)
    for g, start in enumerate(range(0, 80, 32)):
        scale, zero = find_params(W[:, start : start + 32], 4)
        assert torch.equal(result.scale[:, g : g + 1], scale)
        assert torch.equal(result.zero[:, g : g + 1], zero)
    full_scale = expand_groups(result.scale, 32, 80)
    full_zero = expand_groups(result.zero, 32, 80)
    assert torch.equal(result.dequantized, dequantize(result.codes, full_scale, full_zero))
    assert (result.scale[:, 2] > 3 * result.scale[:, 0]).all()
