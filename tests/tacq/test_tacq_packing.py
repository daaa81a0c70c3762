import pytest
import torch

from lit_tacq.packing import SUPPORTED_BITS, count_dtype, pack_codes, to_sparse_outliers, unpack_codes


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("cols", [1, 31, 32, 33, 100])
def test_pack_unpack_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), generator=torch.Generator().manual_seed(cols))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert torch.equal(unpack_codes(packed, bits, cols), codes.to(torch.uint8))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_top_code_round_trips_from_uint8(bits):
    codes = torch.full((2, 40), 2**bits - 1, dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 40), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_packed_storage_uses_b_bits_per_code(bits):
    rows, cols = 3, 96  # a multiple of 32: no padding
    packed = pack_codes(torch.zeros(rows, cols, dtype=torch.int64), bits)
    assert packed.numel() * packed.element_size() * 8 == rows * cols * bits
    # odd widths are padded to the next 32 codes, never more
    assert pack_codes(torch.zeros(rows, 33, dtype=torch.int64), bits).shape == (rows, 2 * bits)


def test_three_bit_code_straddles_two_words():
    # code 10 of a row occupies stream bits 30, 31, 32: two bits in word 0, one in word 1
    codes = torch.zeros(1, 32, dtype=torch.int64)
    codes[0, 10] = 0b101
    packed = pack_codes(codes, 3)
    assert packed.tolist() == [[1 << 30, 1, 0]]
    all_ones = pack_codes(torch.full((1, 32), 7), 3)
    assert all_ones.tolist() == [[-1, -1, -1]]  # 96 set bits: three full words


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[0]]), 5)


def test_sparse_outliers_round_trip_and_csr_layout():
    values = torch.arange(12, dtype=torch.float32).view(3, 4) + 0.5
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    sparse = to_sparse_outliers(values, mask, torch.bfloat16)
    assert sparse.values.dtype == torch.bfloat16
    assert sparse.col_idx.dtype == torch.int16
    assert sparse.row_counts.dtype == torch.uint8
    assert sparse.row_counts.tolist() == [2, 0, 1]
    assert sparse.row_ptr.tolist() == [0, 2, 2, 3]
    assert sparse.col_idx.tolist() == [1, 3, 0]
    assert sparse.values.float().tolist() == [1.5, 3.5, 8.5]
    assert torch.equal(sparse.to_dense(3, 4).float(), torch.where(mask, values, 0.0))
    assert torch.equal(sparse.mask(3, 4), mask)


def test_wide_layers_use_int32_column_indices():
    cols = 40_000  # beyond int16
    mask = torch.zeros(2, cols, dtype=torch.bool)
    mask[1, cols - 1] = True
    sparse = to_sparse_outliers(torch.ones(2, cols), mask, torch.float16)
    assert sparse.col_idx.dtype == torch.int32
    assert sparse.col_idx.tolist() == [cols - 1]
    assert torch.equal(sparse.mask(2, cols), mask)


def test_row_counts_widen_when_a_row_holds_many_kept_weights():
    assert count_dtype(255) == torch.uint8 and count_dtype(256) == torch.int16 and count_dtype(40_000) == torch.int32
    mask = torch.zeros(3, 600, dtype=torch.bool)
    mask[1, :300] = True
    sparse = to_sparse_outliers(torch.randn(3, 600), mask)
    assert sparse.row_counts.dtype == torch.int16 and sparse.row_counts.tolist() == [0, 300, 0]
    assert torch.equal(sparse.mask(3, 600), mask)
