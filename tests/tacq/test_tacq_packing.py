import pytest
import torch

from lit_tacq.packing import (
    GAP_LIMIT,
    SUPPORTED_BITS,
    pack_codes,
    to_sparse_outliers,
    unpack_codes,
)


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


def test_sparse_outliers_round_trip_and_gap_layout():
    values = torch.arange(12, dtype=torch.float32).view(3, 4) + 0.5
    mask = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    sparse = to_sparse_outliers(values, mask, torch.bfloat16)
    assert sparse.values.dtype == torch.bfloat16 and sparse.gaps.dtype == torch.int16
    # flat positions 1, 3, 8: distances 2, 2, 5 from the previous one (the first from -1), stored minus one
    assert sparse.gaps.tolist() == [1, 1, 4]
    assert sparse.positions().tolist() == [1, 3, 8]
    assert [t.tolist() for t in sparse.csr()] == [[0, 2, 2, 3], [1, 3, 0]]
    assert sparse.values.float().tolist() == [1.5, 3.5, 8.5]
    assert sparse.kept() == sparse.nnz == 3
    assert torch.equal(sparse.to_dense().float(), torch.where(mask, values, 0.0))
    assert torch.equal(sparse.mask(), mask)


def test_gaps_use_all_sixteen_bits():
    cols = 40_000 + GAP_LIMIT + 1
    mask = torch.zeros(1, cols, dtype=torch.bool)
    mask[0, [0, 40_000, 40_000 + GAP_LIMIT]] = True  # distances 1, 40 000 (> int16 max) and GAP_LIMIT
    sparse = to_sparse_outliers(torch.ones(1, cols), mask, torch.float16)
    assert sparse.nnz == 3  # no filler needed up to a distance of exactly GAP_LIMIT
    assert sparse.positions().tolist() == mask[0].nonzero().squeeze(1).tolist()
    assert torch.equal(sparse.mask(), mask)


def test_long_distances_are_bridged_by_zero_fillers():
    rows, cols = 4, 100_000
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask[0, 5] = True
    mask[3, 99_999] = True  # about 4.6 GAP_LIMITs after the first
    weights = torch.randn(rows, cols)
    sparse = to_sparse_outliers(weights, mask)
    assert sparse.nnz == 2 + 6 and sparse.kept() == 2  # ceil(399 994 / 65 536) - 1 = 6 fillers
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.to_dense(), torch.where(mask, weights, 0.0).half())


def test_kept_zeros_are_not_stored():
    mask = torch.ones(2, 3, dtype=torch.bool)
    weights = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    sparse = to_sparse_outliers(weights, mask)
    assert sparse.nnz == 3 and sparse.positions().tolist() == [0, 2, 4]
    assert torch.equal(sparse.to_dense().float(), weights)


def test_no_kept_weights():
    sparse = to_sparse_outliers(torch.randn(3, 5), torch.zeros(3, 5, dtype=torch.bool))
    assert sparse.nnz == 0 and sparse.csr()[0].tolist() == [0, 0, 0, 0]
    assert not sparse.mask().any()
