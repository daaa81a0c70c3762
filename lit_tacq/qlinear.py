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

:class:`SpQRLinear` stores the per-group scale and zero quantized (SpQR's second-level statistics) and decodes them
to these fp16 grids when built or loaded, so everything above applies to it unchanged.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_common.layers import is_packed_linear
from lit_tacq.cpu_kernel import MIN_WEIGHTS, packed_matmul
from lit_tacq.packing import (
    OUTLIER_DTYPES,
    SparseOutliers,
    pack_codes,
    packed_words,
    to_sparse_outliers,
    unpack_codes,
)
from lit_tacq.quantizer import QuantResult, dequantize, expand_groups, n_groups
from lit_tacq.spqr import SpQRResult, decode_statistics

FORMAT_BUFFERS = ("qweight", "scale", "zero", "outlier_values", "outlier_gaps")


@functools.cache
def _triton_matmul() -> Callable | None:
    """The Triton kernel, or None where triton is missing (then the PyTorch path is used)."""
    try:
        from lit_tacq.kernels import quant_matmul
    except ImportError:
        return None
    return quant_matmul


def move_buffers_keeping_dtypes(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
    """Apply ``fn`` (what ``nn.Module._apply`` is given: a move, a cast, or both) to ``module``'s own buffers but keep
    each buffer's dtype: the packed format's dtypes are part of the format."""
    for name, buf in module._buffers.items():
        if buf is not None:
            moved = fn(buf)
            module._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W decoded from packed codes, scale/zero and sparse kept weights.

    The constructor builds an empty shell of the right shapes (what a loader fills from a state
    dict); :meth:`from_result` builds a filled one from a :class:`QuantResult`.
    """

    packed_linear = True  # lit_common.layers: LoRA may adapt it, no quantizer touches it again
    format_buffers = FORMAT_BUFFERS  # what is stored (and counted as stored bits)

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

    def manifest_entry(self) -> dict[str, Any]:
        """This layer's entry in the manifest (``lit_tacq.manifest`` checks it on load)."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.group_size, "nnz": self.outlier_values.numel(),
                "outlier_dtype": str(self.outlier_values.dtype).removeprefix("torch."), "bias": self.bias is not None}

    def kept_weights(self) -> int:
        """Weights stored in 16 bits (the sparse part, filler entries not counted)."""
        return self.outliers.kept()

    def stored_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the buffers; the bias is left out by default since a 16-bit layer has it too."""
        names = self.format_buffers + (("bias",) if include_bias and self.bias is not None else ())
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in names)

    def accounted_bits(self) -> int:
        """docs/tacq.md §2's accounting: b bits per code, 32 bits per kept weight (16 value + 16 index), 32 bits of
        fp16 scale + zero per row or group. The stored bytes differ only by code padding to 32 codes per row and
        by filler entries (see ``packing.SparseOutliers``)."""
        return self.bits * self.in_features * self.out_features + 32 * self.outliers.kept() + 32 * self.scale.numel()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "QuantLinear":
        """Follow device moves but never dtype casts: ``model.half()`` must not rewrite the format."""
        move_buffers_keeping_dtypes(self, fn)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, nnz={self.outlier_values.numel()}"
        )


SPQR_KIND, SPQR_VERSION = "spqr", 1  # the manifest entry of an SpQRLinear: {"kind": "spqr", "kind_version": 1, ...}


class SpQRLinear(QuantLinear):
    """A QuantLinear whose per-group scale and zero are stored quantized: SpQR's layout (lit_tacq/spqr.py).

    Buffers: ``qweight``, ``outlier_values``, ``outlier_gaps`` and ``bias`` as in QuantLinear; in place of the fp16
    ``scale`` and ``zero`` (groups = ceil(in / group_size), stat groups = ceil(out / stat_group_size)):
        scale_codes            int32 [groups, words]        each row's group scale as a ``stat_bits`` code, packed
                                                            along the output features (packing.py)
        scale_min, scale_step  fp16 [stat groups, groups]   second level: scale = min + step * code, one grid per
                                                            ``stat_group_size`` consecutive rows of a column group
        zero_codes             int32 [groups, words]        each row's group zero point, an integer b-bit code

    ``scale`` and ``zero`` remain as buffers that are not saved (``persistent=False``): decoded from the above when
    the layer is built or loaded (:meth:`decode_statistics`; they are small), so ``dequantize``, the CPU and the
    Triton kernels run unchanged on fp16 grids, and the zero point still decodes to exactly 0 (the format
    invariant of QuantLinear).
    """

    format_buffers = ("qweight", "scale_codes", "scale_min", "scale_step", "zero_codes", "outlier_values",
                      "outlier_gaps")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        nnz: int = 0,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
        *,
        stat_bits: int = 3,
        stat_group_size: int = 16,
    ) -> None:
        if not isinstance(group_size, int):
            raise ValueError(f"SpQRLinear needs column groups, got group_size={group_size!r}")
        super().__init__(in_features, out_features, bits, group_size, nnz, bias, dtype, device)
        self.stat_bits, self.stat_group_size = stat_bits, stat_group_size
        groups, stat_groups = n_groups(in_features, group_size), -(-out_features // stat_group_size)
        empty = functools.partial(torch.zeros, device=device)
        self.register_buffer("scale_codes", empty(groups, packed_words(out_features, stat_bits), dtype=torch.int32))
        self.register_buffer("scale_min", empty(stat_groups, groups, dtype=torch.float16))
        self.register_buffer("scale_step", empty(stat_groups, groups, dtype=torch.float16))
        self.register_buffer("zero_codes", empty(groups, packed_words(out_features, bits), dtype=torch.int32))
        for name in ("scale", "zero"):  # decoded, not stored
            self.register_buffer(name, self._buffers[name], persistent=False)
        self.register_load_state_dict_post_hook(SpQRLinear._decode_after_load)

    @classmethod
    def from_result(cls, result: SpQRResult, bias: Tensor | None, dtype: torch.dtype = torch.float16) -> "SpQRLinear":
        """Pack an SpQR result; ``dtype`` (float16/bfloat16) stores the kept weights and bias."""
        quant = result.quant
        plain = QuantLinear.from_result(quant, bias, dtype)  # codes, kept weights and bias as QuantLinear packs them
        module = cls(plain.in_features, plain.out_features, quant.bits, quant.group_size, plain.outlier_values.numel(),
                     bias is not None, dtype, device=quant.codes.device, stat_bits=result.stat_bits,
                     stat_group_size=result.stat_group_size)
        for name in ("qweight", "outlier_values", "outlier_gaps", "bias"):
            setattr(module, name, getattr(plain, name))
        module.scale_codes = pack_codes(result.scale_codes.T, result.stat_bits)
        module.scale_min = result.scale_min.to(torch.float16)
        module.scale_step = result.scale_step.to(torch.float16)
        module.zero_codes = pack_codes(quant.zero.T, quant.bits)
        module.decode_statistics()
        return module

    @classmethod
    def from_buffers(cls, buffers: dict[str, Tensor], in_features: int, bits: int, group_size: int, *,
                     stat_bits: int = 3, stat_group_size: int = 16) -> "SpQRLinear":
        """A module holding exactly these buffers (named as in its state dict), on their device: what a resumed
        quantization restores from its work directory."""
        values = buffers["outlier_values"]
        module = cls(in_features, buffers["qweight"].shape[1], bits, group_size, values.numel(), "bias" in buffers,
                     values.dtype, device=values.device, stat_bits=stat_bits, stat_group_size=stat_group_size)
        module.load_state_dict(buffers)  # decodes the statistics (the hook of __init__)
        return module

    @classmethod
    def shell(cls, entry: dict[str, Any], device: Any) -> "SpQRLinear":
        """An empty module of a (checked) manifest entry's shapes and dtypes."""
        return cls(entry["in_features"], entry["out_features"], entry["bits"], entry["group_size"], entry["nnz"],
                   entry["bias"], OUTLIER_DTYPES[entry["outlier_dtype"]], device=device, stat_bits=entry["stat_bits"],
                   stat_group_size=entry["stat_group_size"])

    def manifest_entry(self) -> dict[str, Any]:
        """This layer's entry in the manifest (``lit_tacq.manifest`` checks it on load)."""
        return {"kind": SPQR_KIND, "kind_version": SPQR_VERSION, **super().manifest_entry(),
                "stat_bits": self.stat_bits, "stat_group_size": self.stat_group_size}

    def decode_statistics(self) -> None:
        """Set ``scale`` and ``zero`` from the stored statistics; non-finite or negative second-level values are an
        error (they would decode to grids that are no grid)."""
        for name in ("scale_min", "scale_step"):
            values = getattr(self, name)
            if values.is_meta:
                return  # a shell before loading
            if not bool(torch.isfinite(values).all() and (values >= 0).all()):
                raise ValueError(f"{name}: non-finite or negative second-level statistics")
        codes = unpack_codes(self.scale_codes, self.stat_bits, self.out_features).T
        self.scale = decode_statistics(codes, self.scale_min, self.scale_step, self.stat_group_size).to(torch.float16)
        self.zero = unpack_codes(self.zero_codes, self.bits, self.out_features).T.to(torch.float16).contiguous()

    @staticmethod
    def _decode_after_load(module: "SpQRLinear", incompatible_keys: Any) -> None:
        module.decode_statistics()

    def accounted_bits(self) -> int:
        """b bits per code, 32 per kept weight, ``stat_bits`` + b bits of scale and zero code per row and group, and
        32 bits of fp16 minimum + step per ``stat_group_size`` rows of a group: the stored bytes differ only by
        code padding to 32 codes per row (of the weights, and of the statistics along the output features) and
        by filler entries between kept weights."""
        groups = self.scale_min.shape[1]
        return (self.bits * self.in_features * self.out_features + 32 * self.outliers.kept()
                + (self.stat_bits + self.bits) * self.out_features * groups + 32 * self.scale_min.numel())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stat_bits={self.stat_bits}, stat_group_size={self.stat_group_size}"


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every packed layer of ``model`` by its full module name: each QuantLinear, and each layer built of QuantLinear
    parts (``mixed_linear.MixedQuantLinear``, whose parts do not declare ``packed_linear``)."""
    return {name: module for name, module in model.named_modules() if is_packed_linear(module)}
