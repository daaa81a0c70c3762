"""QuantLinear: a Linear layer that holds only the packed TaCQ format and computes from it.

Buffers (all saved in the state dict):
    qweight          int32  [words, out]   b-bit codes: each output feature's codes as one bit stream along the
                                           input features (packing.py), word w of every output feature in row
                                           w, so neighbouring output features decode together (cpu_kernel.py)
    scale, zero      fp16   [out, groups]  grid of each row (groups = 1) or of each column group
    outlier_values   fp16/bf16 [nnz]       kept weights in row-major order
    outlier_gaps     int16 [nnz]           16-bit distance to the previous kept position (packing.py)
    bias             optional, [out]

Format invariant: at a kept position the code is the zero point, which decodes to exactly 0, so
weight = grid values + scattered kept values, and the kernels can add the sparse part separately.

Forward: on CUDA the Triton kernel (kernels/), on the CPU the C packed matmul (cpu_kernel.py), both for
inference; a forward that needs gradients (a LoRA adapter training on top, x requiring grad) decodes the
weight and uses ``F.linear``, the reference every kernel is tested against; so do layers too small for a
kernel call to pay (``cpu_kernel.MIN_WEIGHTS``).
"""

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tacq.cpu_kernel import MIN_WEIGHTS, packed_matmul
from lit_tacq.packing import (
    SparseOutliers,
    pack_codes,
    packed_words,
    to_sparse_outliers,
    unpack_codes,
)
from lit_tacq.quantizer import QuantResult, dequantize, expand_groups, n_groups

FORMAT_BUFFERS = ("qweight", "scale", "zero", "outlier_values", "outlier_gaps")


@functools.cache
def _triton_matmul() -> Callable | None:
    """The Triton kernel, or None where triton is missing (then the PyTorch path is used)."""
    try:
        from lit_tacq.kernels import quant_matmul
    except ImportError:
        return None
    return quant_matmul


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W decoded from packed codes, scale/zero and sparse kept weights.

    The constructor builds an empty shell of the right shapes (what a loader fills from a state
    dict); :meth:`from_result` builds a filled one from a :class:`QuantResult`.
    """

    packed_linear = True  # lit_common.layers: LoRA may adapt it, no quantizer touches it again

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        nnz: int = 0,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        """``dtype`` is the dtype of the kept weights and of the bias (float16 or bfloat16); ``nnz`` the
        number of stored kept-weight entries."""
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = n_groups(in_features, group_size)
        empty = functools.partial(torch.zeros, device=device)
        self.register_buffer("qweight", empty(packed_words(in_features, bits), out_features, dtype=torch.int32))
        self.register_buffer("scale", empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("zero", empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("outlier_values", empty(nnz, dtype=dtype))
        self.register_buffer("outlier_gaps", empty(nnz, dtype=torch.int16))
        self.register_buffer("bias", empty(out_features, dtype=dtype) if bias else None)

    @classmethod
    def from_result(cls, result: QuantResult, bias: Tensor | None, dtype: torch.dtype = torch.float16) -> "QuantLinear":
        """Pack a quantized weight; ``dtype`` (float16/bfloat16) stores the kept weights and bias."""
        out_features, in_features = result.codes.shape
        codes = result.codes
        keep = result.keep_mask
        if keep is None:
            keep = torch.zeros_like(codes, dtype=torch.bool)
        zero_codes = expand_groups(result.zero, result.group_size, in_features).to(codes.dtype)
        codes = torch.where(keep, zero_codes, codes)  # the format invariant (module docstring)
        outliers = to_sparse_outliers(result.dequantized, keep, dtype)

        module = cls(in_features, out_features, result.bits, result.group_size, outliers.nnz, bias is not None, dtype,
                     device=codes.device)
        module.qweight = pack_codes(codes, result.bits).T.contiguous()
        module.scale = result.scale.to(torch.float16)
        module.zero = result.zero.to(torch.float16)
        module.outlier_values = outliers.values
        module.outlier_gaps = outliers.gaps
        if bias is not None:
            module.bias = bias.detach().to(codes.device, dtype).clone()
        return module

    @classmethod
    def from_buffers(
        cls, buffers: dict[str, Tensor], in_features: int, bits: int, group_size: int | None
    ) -> "QuantLinear":
        """A module holding exactly these buffers (named as in its state dict), on their device: what a
        resumed quantization restores from its work directory."""
        values = buffers["outlier_values"]
        module = cls(in_features, buffers["qweight"].shape[1], bits, group_size, values.numel(), "bias" in buffers,
                     values.dtype, device=values.device)
        module.load_state_dict(buffers)
        return module

    @property
    def outliers(self) -> SparseOutliers:
        return SparseOutliers(self.outlier_values, self.outlier_gaps, (self.out_features, self.in_features))

    def dequantize(self) -> Tensor:
        """The dense float32 weight [out, in]: grid values, plus the kept weights at their positions."""
        codes = unpack_codes(self.qweight.T, self.bits, self.in_features)
        scale = expand_groups(self.scale.float(), self.group_size, self.in_features)
        zero = expand_groups(self.zero.float(), self.group_size, self.in_features)
        weight = dequantize(codes, scale, zero)
        outliers = self.outliers
        return weight.view(-1).index_add_(0, outliers.positions(), outliers.values.float()).view_as(weight)

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or self.in_features * self.out_features < MIN_WEIGHTS:
            return self.reference_forward(x)
        flat = x.reshape(-1, self.in_features)
        kernel = _triton_matmul() if x.is_cuda else None
        if kernel is not None:
            y = kernel(flat, self.qweight, self.scale, self.zero, self.bits, self.group_size, self.outliers)
        elif x.is_cuda:  # a CUDA machine without triton
            y = None
        else:
            y = packed_matmul(flat, self.qweight, self.scale, self.zero, self.bits, self.group_size, self.outliers)
        if y is None:
            return self.reference_forward(x)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def reference_forward(self, x: Tensor) -> Tensor:
        """``F.linear`` with the decoded weight in x's dtype: differentiable, and what the kernels must equal."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def stored_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the buffers; the bias is left out by default since a 16-bit layer has it too."""
        names = FORMAT_BUFFERS + (("bias",) if include_bias and self.bias is not None else ())
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in names)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "QuantLinear":
        """Follow device moves but never dtype casts: ``model.half()`` must not rewrite the format."""
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, nnz={self.outlier_values.numel()}"
        )


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of ``model`` by its full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
