"""Storage formats: b-bit codes packed densely into int32 words, and kept weights as CSR.

Codes of one row form a little-endian bit stream: code ``j`` occupies bits ``[j*b, (j+1)*b)``,
bit ``p`` of the stream is bit ``p % 32`` of word ``p // 32``. With b = 3 a code can straddle two
words. Rows are padded with zero codes to a multiple of 32 codes, so every row is exactly
``b`` words per 32 codes and the bit pattern repeats every 32 codes: the packer below (and the
Triton kernel) only need the 32 (word, offset) pairs of one such period.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
CODES_PER_PERIOD = 32  # 32 codes of b bits fill exactly b int32 words
_WORD_MASK = 0xFFFFFFFF


def packed_words(cols: int, bits: int) -> int:
    """Number of int32 words one row of ``cols`` codes occupies."""
    periods = -(-cols // CODES_PER_PERIOD)
    return periods * bits


def _lane_layout(bits: int) -> list[tuple[int, int]]:
    """(word within the period, bit offset in that word) of each of the 32 codes of a period."""
    return [divmod(lane * bits, 32) for lane in range(CODES_PER_PERIOD)]


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in ``[0, 2**bits)`` of shape [rows, cols] into int32 [rows, words]."""
    _check_bits(bits)
    rows, cols = codes.shape
    codes = codes.to(torch.int64)  # uint8 comparisons with 2**8 would wrap around
    if codes.numel() and (codes.min() < 0 or codes.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits - 1}]")
    periods = -(-cols // CODES_PER_PERIOD)
    padded = torch.zeros(rows, periods * CODES_PER_PERIOD, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes
    lanes = padded.view(rows, periods, CODES_PER_PERIOD)

    # int64 holds a full unsigned 32-bit word; disjoint bit ranges make "+" the same as "|".
    words = torch.zeros(rows, periods, bits, dtype=torch.int64, device=codes.device)
    for lane, (word, offset) in enumerate(_lane_layout(bits)):
        code = lanes[:, :, lane]
        words[:, :, word] += (code << offset) & _WORD_MASK
        if offset + bits > 32:  # the high bits spill into the next word
            words[:, :, word + 1] += code >> (32 - offset)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.view(rows, periods * bits).to(torch.int32)


def unpack_codes(packed: Tensor, bits: int, cols: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 [rows, words] -> uint8 codes [rows, cols]."""
    _check_bits(bits)
    rows, n_words = packed.shape
    periods = n_words // bits
    if n_words != periods * bits or periods * CODES_PER_PERIOD < cols:
        raise ValueError(f"{n_words} words per row cannot hold {cols} codes of {bits} bits")
    words = (packed.to(torch.int64) & _WORD_MASK).view(rows, periods, bits)
    code_mask = 2**bits - 1
    lanes = torch.empty(rows, periods, CODES_PER_PERIOD, dtype=torch.int64, device=packed.device)
    for lane, (word, offset) in enumerate(_lane_layout(bits)):
        code = words[:, :, word] >> offset
        if offset + bits > 32:
            code = code | (words[:, :, word + 1] << (32 - offset))
        lanes[:, :, lane] = code & code_mask
    return lanes.view(rows, -1)[:, :cols].to(torch.uint8)


def index_dtype(cols: int) -> torch.dtype:
    """Smallest signed integer type that can hold a column index (int16 saves half the bytes)."""
    return torch.int16 if cols <= torch.iinfo(torch.int16).max else torch.int32


def count_dtype(max_count: int) -> torch.dtype:
    """Smallest integer type for the kept weights of one row: uint8 almost always (p = 0.35 % of a
    4096-wide row is 14), int16 / int32 when the global ranking piles many into one row."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if max_count <= torch.iinfo(dtype).max:
            return dtype
    raise ValueError(f"{max_count} kept weights in one row do not fit int32")


@dataclass
class SparseOutliers:
    """The kept 16-bit weights of one [rows, cols] matrix, sorted by row then column (CSR without the
    pointer array: per-row counts in the smallest type that fits, so a narrow layer does not pay 32 bits
    per row; ``row_ptr`` is their running sum).

    Row ``r`` owns ``values[row_ptr[r]:row_ptr[r+1]]`` at columns ``col_idx[row_ptr[r]:row_ptr[r+1]]``.
    """

    values: Tensor  # fp16 or bf16, [nnz]
    col_idx: Tensor  # int16 (cols <= 32767) or int32, [nnz]
    row_counts: Tensor  # uint8 / int16 / int32 (count_dtype), [rows]

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def row_ptr(self) -> Tensor:
        """CSR row pointer (int64 [rows + 1]) computed from the counts."""
        ptr = torch.zeros(self.row_counts.numel() + 1, dtype=torch.int64, device=self.row_counts.device)
        ptr[1:] = self.row_counts.to(torch.int64).cumsum(0)
        return ptr

    def row_idx(self) -> Tensor:
        """Row of every stored value (int64 [nnz]), expanded from the counts."""
        counts = self.row_counts.to(torch.int64)
        rows = torch.arange(counts.numel(), device=counts.device)
        return torch.repeat_interleave(rows, counts, output_size=self.nnz)

    def mask(self, rows: int, cols: int) -> Tensor:
        """Dense boolean [rows, cols] mask of the stored positions."""
        mask = torch.zeros(rows, cols, dtype=torch.bool, device=self.values.device)
        mask[self.row_idx(), self.col_idx.to(torch.int64)] = True
        return mask

    def to_dense(self, rows: int, cols: int) -> Tensor:
        """Dense [rows, cols] matrix with the stored values and zeros elsewhere (values' dtype)."""
        dense = torch.zeros(rows, cols, dtype=self.values.dtype, device=self.values.device)
        dense[self.row_idx(), self.col_idx.to(torch.int64)] = self.values
        return dense


def to_sparse_outliers(dense_values: Tensor, mask: Tensor, dtype: torch.dtype = torch.float16) -> SparseOutliers:
    """Collect ``dense_values[mask]`` (a [rows, cols] matrix) into the row-sorted layout with values cast
    to ``dtype``."""
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"outlier values are stored in float16 or bfloat16, got {dtype}")
    rows, cols = mask.shape
    row_idx, col_idx = mask.nonzero(as_tuple=True)  # row-major order
    counts = mask.sum(dim=1)
    return SparseOutliers(
        values=dense_values[row_idx, col_idx].to(dtype),
        col_idx=col_idx.to(index_dtype(cols)),
        row_counts=counts.to(count_dtype(int(counts.max()) if rows else 0)),
    )
