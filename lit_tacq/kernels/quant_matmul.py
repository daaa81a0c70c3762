"""y = x @ W^T straight from the packed format: codes are dequantized tile by tile in registers.

Each program owns a BLOCK_M x BLOCK_N tile of y and walks K in steps of 32 codes (one packing
period, exactly BITS words per output feature). For every (k, n) in a step it loads the int32 word
holding code k of output feature n (word rows of ``packed [words, N]`` are contiguous in n, so the loads
coalesce) and, for 3-bit codes that straddle a word boundary, the next word; it shifts the code out,
maps it through the row's (or group's) scale and zero, rounds it to x's dtype exactly as the PyTorch
path does, and feeds ``tl.dot`` with a float32 accumulator. Repeated loads of the same
word are served by cache; this is a correctness-first kernel, not a tuned one.

The kept 16-bit weights are added outside the kernel with a PyTorch CSR sparse matmul in float32
(their grid codes decode to exactly 0, so the two parts simply add).

Under ``TRITON_INTERPRET=1`` (CPU tensors, for tests) ``tl.dot`` on half precision is unreliable,
so the dot then runs on float32 copies of the same, already-rounded values.
"""

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from lit_tacq.packing import SparseOutliers

BLOCK_K = 32  # one packing period: 32 codes = BITS words per row


@triton.jit
def _quant_matmul_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, y_ptr,
    M, N, K, group_size,
    stride_xm, stride_xk, stride_pw, stride_pn, stride_sn, stride_ym,
    BITS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask, other=0.0)

        # codes as a [BLOCK_K, BLOCK_N] tile: code k of row n sits at bit k*BITS of the row's stream
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        word = (offs_k * BITS) // 32
        shift = ((offs_k * BITS) % 32).to(tl.uint32)
        row_words = packed_ptr + offs_n[None, :] * stride_pn + word[:, None] * stride_pw
        lo = tl.load(row_words, mask=w_mask, other=0).to(tl.uint32, bitcast=True)
        codes = lo >> shift[:, None]
        if BITS == 3:  # codes at shift 30 and 31 spill their high bits into the next word
            spills = (shift + BITS > 32)[:, None]
            hi = tl.load(row_words + stride_pw, mask=w_mask & spills, other=0).to(tl.uint32, bitcast=True)
            codes = codes | (hi << ((32 - shift) % 32)[:, None])
        codes = (codes & ((1 << BITS) - 1)).to(tl.float32)

        group = offs_k // group_size
        params = offs_n[None, :] * stride_sn + group[:, None]
        scale = tl.load(scale_ptr + params, mask=w_mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + params, mask=w_mask, other=0.0).to(tl.float32)
        w = (scale * (codes - zero)).to(x_ptr.dtype.element_ty)

        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)

    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc, mask=y_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _outlier_matmul(x: Tensor, outliers: SparseOutliers) -> Tensor:
    """x @ S^T in float32 for the CSR matrix S of kept weights: [M, out_features]."""
    row_ptr, col_idx = outliers.csr()
    sparse = torch.sparse_csr_tensor(row_ptr, col_idx, outliers.values.float(), size=outliers.shape,
                                     check_invariants=False)  # row-major by construction
    return (sparse @ x.float().T).T


def quant_matmul(
    x: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    bits: int,
    group_size: int | None,
    outliers: SparseOutliers | None = None,
) -> Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype, W given by packed codes [words, N], scale/zero [N, groups].

    ``group_size`` None means one grid per row. The grid part is computed by the Triton kernel; the
    kept weights, if given, are added in PyTorch.
    """
    M, K = x.shape
    N = packed.shape[1]
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)
    block_m = 16 if M <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _quant_matmul_kernel[grid](
        x, packed, scale.contiguous(), zero.contiguous(), y,
        M, N, K, group_size or K,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scale.shape[1], y.stride(0),
        BITS=bits,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=BLOCK_K,
        DOT_FP32=x.dtype == torch.float32 or _interpreting(),
    )
    if outliers is not None and outliers.nnz:
        y += _outlier_matmul(x, outliers)
    return y.to(x.dtype)
