"""Storage formats: b-bit codes packed densely into int32 words, and kept weights with 16-bit gap-encoded positions.

Codes of one row form a little-endian bit stream: code ``j`` occupies bits ``[j*b, (j+1)*b)``,
bit ``p`` of the stream is bit ``p % 32`` of word ``p // 32``. With b = 3 a code can straddle two
words. Rows are padded with zero codes to a multiple of 32 codes, so every row is exactly
``b`` words per 32 codes and the bit pattern repeats every 32 codes: the packer below (and the
Triton kernel) only need the 32 (word, offset) pairs of one such period.
"""

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

if sys.byteorder != "little":  # unpack_codes reads int32 words as bytes
    raise ImportError("the packed format is defined for little-endian machines")

SUPPORTED_BITS = (2, 3, 4, 8)  # what one layer's bits may be
# what the packer and both kernels take: 1-bit codes occur only in the parts of mixed-precision layers
# (mixed_linear.py), whose 1-bit groups sit next to wider ones
CODE_BITS = (1, *SUPPORTED_BITS)
OUTLIER_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}  # what kept weights are stored in
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
    if bits not in CODE_BITS:
        raise ValueError(f"bits must be one of {CODE_BITS}, got {bits}")


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
    """Inverse of :func:`pack_codes`: int32 [rows, words] -> uint8 codes [rows, cols].

    Reads the row's bit stream as bytes (little-endian words: byte k holds stream bits 8k..8k+7), so
    every ``bits`` bytes hold exactly 8 codes, none straddling: one int32 per 8 codes, then 8 shifts.
    """
    _check_bits(bits)
    rows, n_words = packed.shape
    periods = n_words // bits
    if n_words != periods * bits or periods * CODES_PER_PERIOD < cols:
        raise ValueError(f"{n_words} words per row cannot hold {cols} codes of {bits} bits")
    # [rows, 4 * words] in stream order (through 1-D: a one-word column keeps a stride that forbids the dtype view)
    stream = packed.contiguous().view(-1).view(torch.uint8).view(rows, -1)
    if bits == 8:
        return stream[:, :cols].clone()
    chunks = stream.view(rows, -1, bits).to(torch.int32)  # 8 codes per chunk of `bits` bytes
    word = chunks[..., 0]
    for byte in range(1, bits):
        word = word | (chunks[..., byte] << (8 * byte))
    shifts = torch.arange(0, 8 * bits, bits, dtype=torch.int32, device=packed.device)
    codes = (word.unsqueeze(-1) >> shifts).to(torch.uint8) & (2**bits - 1)  # the cast keeps the low 8 bits
    return codes.view(rows, -1)[:, :cols].contiguous()


GAP_LIMIT = 2**16  # a step between kept positions is stored as ``step - 1`` in 16 bits
_GAP_MASK = 0xFFFF


@dataclass
class SparseOutliers:
    """The kept 16-bit weights of one [rows, cols] matrix: exactly the 16 value bits and 16 index bits per kept
    weight of docs/tacq.md §2, with no per-row array.

    Values are in row-major order; ``gaps[i]`` holds the distance from the previous kept position in the
    flattened matrix (the first from position -1), minus one, as the bit pattern of a uint16 in an int16
    (safetensors and every torch op know int16). A distance beyond ``GAP_LIMIT`` is bridged by filler
    entries of value 0 at intermediate positions: adding 0 leaves the grid weight there unchanged, and
    at p = 0.35 % the mean distance is 286, so fillers only appear in layers that keep almost nothing.
    Kept weights whose 16-bit value is 0 are not stored (their code already decodes to 0), so the
    nonzero entries are exactly the kept weights.
    """

    values: Tensor  # fp16 or bf16, [nnz]
    gaps: Tensor  # int16 [nnz]: (distance to the previous stored position - 1) as uint16 bits
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        """Stored entries, fillers included (what the bytes pay for)."""
        return self.values.numel()

    def kept(self) -> int:
        """Kept weights (stored entries without the fillers)."""
        return int(torch.count_nonzero(self.values))

    def positions(self) -> Tensor:
        """Row-major flat position of every stored entry (int64 [nnz])."""
        return ((self.gaps.to(torch.int64) & _GAP_MASK) + 1).cumsum(0) - 1

    def row_col(self) -> tuple[Tensor, Tensor]:
        """Row and column of every stored entry (int64 [nnz] each)."""
        positions = self.positions()
        cols = self.shape[1]
        return positions // cols, positions % cols

    def csr(self) -> tuple[Tensor, Tensor]:
        """CSR row pointer (int64 [rows + 1]) and column indices (int64 [nnz]) for sparse kernels."""
        rows, cols = self.row_col()
        ptr = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=self.values.device)
        ptr[1:] = torch.bincount(rows, minlength=self.shape[0]).cumsum(0)
        return ptr, cols

    def mask(self) -> Tensor:
        """Dense boolean mask of the kept positions (fillers excluded)."""
        mask = torch.zeros(self.shape, dtype=torch.bool, device=self.values.device)
        rows, cols = self.row_col()
        mask[rows, cols] = self.values != 0
        return mask

    def to_dense(self) -> Tensor:
        """Dense matrix with the stored values and zeros elsewhere (values' dtype)."""
        dense = torch.zeros(self.shape, dtype=self.values.dtype, device=self.values.device)
        rows, cols = self.row_col()
        dense[rows, cols] = self.values
        return dense


def to_sparse_outliers(dense_values: Tensor, mask: Tensor, dtype: torch.dtype = torch.float16) -> SparseOutliers:
    """Collect ``dense_values[mask]`` (a [rows, cols] matrix) into the gap-encoded layout with values cast
    to ``dtype``."""
    if dtype not in OUTLIER_DTYPES.values():
        raise ValueError(f"outlier values are stored in one of {sorted(OUTLIER_DTYPES)}, got {dtype}")
    values = dense_values.to(dtype)
    mask = mask & (values != 0)  # a kept 0 needs no entry: its code decodes to 0
    positions = mask.flatten().nonzero().squeeze(1)
    values = values.flatten()[positions]
    steps = torch.diff(positions, prepend=positions.new_full((1,), -1))
    fillers = (steps - 1) // GAP_LIMIT  # zero-valued entries needed before each kept weight
    if fillers.any():
        last = (fillers + 1).cumsum(0) - 1  # where each kept weight lands once fillers are inserted
        expanded_steps = torch.full((int(last[-1]) + 1,), GAP_LIMIT, dtype=torch.int64, device=steps.device)
        expanded_steps[last] = steps - fillers * GAP_LIMIT
        expanded_values = torch.zeros(expanded_steps.numel(), dtype=dtype, device=values.device)
        expanded_values[last] = values
        steps, values = expanded_steps, expanded_values
    gaps = torch.where(steps - 1 >= 2**15, steps - 1 - 2**16, steps - 1).to(torch.int16)
    return SparseOutliers(values=values, gaps=gaps, shape=tuple(mask.shape))
