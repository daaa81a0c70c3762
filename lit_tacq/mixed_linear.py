"""MixedQuantLinear: a Linear whose column groups have their own bit widths (SliM-LLM, lit_tacq/slim_llm.py).

Column group g covers input features ``[g * group_size, (g + 1) * group_size)`` (the last one may be narrower) and
is stored with ``group_bits[g]`` bits per code. The groups of one width form one **part**: an ordinary
:class:`QuantLinear` of that width over those columns, in column order, with the same group size (one fp16 scale and
zero per output row and group). So

    y = sum over widths b of part_b(x[..., columns of width b]) + bias

and every part runs on the kernels QuantLinear has (C on the CPU, Triton on CUDA, both decode 1-bit codes too).
A narrower last group is the last group of whichever part holds it, so each part is a valid grouped layout.
The parts do not declare ``packed_linear``: LoRA adapts, and the manifest lists, the mixed layer as one Linear.

Buffers (all in the state dict, all counted as stored bits):
    group_bits           uint8 [groups]   the width of each column group
    parts.bits{b}.*      the QuantLinear buffers of the part of width b (no kept weights: nnz 0)
    bias                 optional, [out]

The manifest entry (``kind: "mixed"``) repeats ``group_bits``: the loader needs the parts' shapes before any tensor
is read, and checks once loaded that the stored map is the manifest's (:meth:`check_group_bits`). A 1-bit part's
grid has two levels ``scale * (c - zero)``, c in {0, 1}, with a zero point that need not be an integer (a 1-bit grid
with an integer zero would have 0 as one of its two levels); no part keeps weights, so the QuantLinear invariant
"the zero point decodes to exactly 0" is not needed here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_tacq.packing import CODE_BITS, OUTLIER_DTYPES
from lit_tacq.qlinear import QuantLinear, move_buffers_keeping_dtypes
from lit_tacq.quantizer import QuantResult, dequantize, expand_groups, n_groups

KIND = "mixed"


def part_key(bits: int) -> str:
    """The name of the part of width ``bits`` under ``parts`` (``parts.bits2.qweight``)."""
    return f"bits{bits}"


def group_columns(in_features: int, group_size: int, group_bits: list[int]) -> dict[int, list[int]]:
    """The input features of every width present, in column order."""
    columns: dict[int, list[int]] = {}
    for group, bits in enumerate(group_bits):
        stop = min((group + 1) * group_size, in_features)
        columns.setdefault(bits, []).extend(range(group * group_size, stop))
    return dict(sorted(columns.items()))


class MixedQuantLinear(nn.Module):
    """``y = x @ W^T + b`` with W stored as one packed part per bit width (module docstring).

    The constructor builds an empty shell of the right shapes (what a loader fills from a state dict);
    :meth:`from_codes` builds a filled one.
    """

    packed_linear = True  # lit_common.layers: computed from packed storage, no quantizer touches it again

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        group_bits: list[int],
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        """``dtype`` (float16 or bfloat16) is that of the bias and of the parts' (empty) kept-weight buffers."""
        super().__init__()
        groups = n_groups(in_features, group_size)
        if len(group_bits) != groups or any(b not in CODE_BITS for b in group_bits):
            raise ValueError(f"group_bits must hold {groups} widths from {CODE_BITS} (in_features {in_features}, "
                             f"group_size {group_size}), got {group_bits}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("group_bits", torch.tensor(group_bits, dtype=torch.uint8, device=device))
        self._group_bits = list(group_bits)
        self._columns = group_columns(in_features, group_size, group_bits)
        self._indices: dict[tuple[int, torch.device], Tensor] = {}  # built once per part and device
        self.parts = nn.ModuleDict({
            part_key(bits): _as_part(QuantLinear(len(cols), out_features, bits, group_size, dtype=dtype, device=device))
            for bits, cols in self._columns.items()
        })
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, group_bits: list[int], group_size: int,
                   bias: Tensor | None, dtype: torch.dtype = torch.float16) -> MixedQuantLinear:
        """Pack codes [out, in] (each below ``2 ** width`` of its group) with their grids [out, groups]."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, group_size, group_bits, bias is not None, dtype, device=codes.device)
        for bits, cols in module._columns.items():
            groups = [g for g, b in enumerate(group_bits) if b == bits]
            index = torch.tensor(cols, device=codes.device)
            part_scale, part_zero = scale[:, groups].float(), zero[:, groups].float()
            part_codes = codes.index_select(1, index)
            grid = dequantize(part_codes, expand_groups(part_scale, group_size, len(cols)),
                              expand_groups(part_zero, group_size, len(cols)))
            result = QuantResult(grid, part_codes, part_scale, part_zero, None, bits, group_size)
            module.parts[part_key(bits)] = _as_part(QuantLinear.from_result(result, None, dtype))
        if bias is not None:
            module.bias = bias.detach().to(codes.device, dtype).clone()
        return module

    @classmethod
    def from_buffers(cls, buffers: dict[str, Tensor], in_features: int, group_size: int) -> MixedQuantLinear:
        """A module holding exactly these buffers (named as in its state dict): what a resumed quantization
        restores from its work directory."""
        group_bits = [int(b) for b in buffers["group_bits"].tolist()]
        first = f"parts.{part_key(group_bits[0])}"
        module = cls(in_features, buffers[f"{first}.qweight"].shape[1], group_size, group_bits, "bias" in buffers,
                     buffers[f"{first}.outlier_values"].dtype, device=buffers["group_bits"].device)
        module.load_state_dict(buffers)
        return module

    @classmethod
    def shell(cls, entry: dict[str, Any], device: Any) -> MixedQuantLinear:
        """An empty module of a (checked) manifest entry's shapes and dtypes."""
        return cls(entry["in_features"], entry["out_features"], entry["group_size"], entry["group_bits"],
                   entry["bias"], OUTLIER_DTYPES[entry["dtype"]], device=device)

    def manifest_entry(self) -> dict[str, Any]:
        """This layer's entry in the manifest (``lit_tacq.manifest`` checks it on load)."""
        dtype = next(iter(self.parts.values())).outlier_values.dtype
        return {"kind": KIND, "in_features": self.in_features, "out_features": self.out_features,
                "group_size": self.group_size, "group_bits": self.widths(),
                "dtype": str(dtype).removeprefix("torch."), "bias": self.bias is not None}

    def kept_weights(self) -> int:
        """Weights stored in 16 bits: none, SliM-LLM keeps no outliers."""
        return sum(part.kept_weights() for part in self.parts.values())

    @property
    def qweight(self) -> Tensor:
        """The first part's packed codes: where peft looks for a quantized layer's device when it puts a LoRA adapter
        on it (``LoraModel._replace_module``), as it finds QuantLinear's own ``qweight``."""
        return next(iter(self.parts.values())).qweight

    def widths(self) -> list[int]:
        """The bit width of every column group, as the shell was built (the stored map must equal it)."""
        return list(self._group_bits)

    def check_group_bits(self, where: str) -> None:
        """The stored map against the one the shell was built from; ``where`` names the layer in the error."""
        stored = [int(b) for b in self.group_bits.tolist()]
        if stored != self.widths():
            raise ValueError(f"{where}.group_bits: stored widths {stored} differ from the manifest's {self.widths()}")

    def average_code_bits(self) -> float:
        """Code bits per weight over the layer (the target of SliM-LLM's allocation)."""
        return sum(bits * len(cols) for bits, cols in self._columns.items()) / self.in_features

    @property
    def bits(self) -> int | float:
        """The layer's width for the manifest's ``bits`` setting: its average code bits (an integer when whole)."""
        average = self.average_code_bits()
        return int(average) if average.is_integer() else average

    def accounted_bits(self) -> int:
        """b bits per code, 32 bits of fp16 scale + zero per row and group, 8 bits per group's width: the stored
        bytes differ only by code padding to 32 codes per part row."""
        codes = sum(bits * len(cols) * self.out_features for bits, cols in self._columns.items())
        return codes + 32 * self.out_features * len(self.group_bits) + 8 * len(self.group_bits)

    def stored_bytes(self, include_bias: bool = False) -> int:
        """Bytes of the buffers; the bias is left out by default since a 16-bit layer has it too."""
        own = self.group_bits.numel() * self.group_bits.element_size()
        if include_bias and self.bias is not None:
            own += self.bias.numel() * self.bias.element_size()
        return own + sum(part.stored_bytes() for part in self.parts.values())

    def dequantize(self) -> Tensor:
        """The dense float32 weight [out, in]."""
        weight = torch.empty(self.out_features, self.in_features, device=self.group_bits.device)
        for bits, part in self._parts():
            weight[:, self._index(bits, weight.device)] = part.dequantize()
        return weight

    def forward(self, x: Tensor) -> Tensor:
        y = sum(part(x.index_select(-1, self._index(bits, x.device))) for bits, part in self._parts())
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def reference_forward(self, x: Tensor) -> Tensor:
        """``F.linear`` with the decoded weight: what the parts' kernels together must equal."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def _parts(self) -> list[tuple[int, QuantLinear]]:
        return [(bits, self.parts[part_key(bits)]) for bits in self._columns]

    def _index(self, bits: int, device: torch.device) -> Tensor:
        """The input features of the part of width ``bits`` as an index tensor on ``device``."""
        if (bits, device) not in self._indices:
            self._indices[bits, device] = torch.tensor(self._columns[bits], dtype=torch.long, device=device)
        return self._indices[bits, device]

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> MixedQuantLinear:
        """Follow device moves but never dtype casts (as QuantLinear): ``model.half()`` must not rewrite the format."""
        for part in self.parts.values():
            part._apply(fn)
        move_buffers_keeping_dtypes(self, fn)
        return self

    def extra_repr(self) -> str:
        columns = ", ".join(f"{len(cols)} at {bits} bits" for bits, cols in self._columns.items())
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"columns: {columns}")


def _as_part(part: QuantLinear) -> QuantLinear:
    """A part is no layer of the model on its own: it does not declare ``packed_linear``, so LoRA targets and the
    manifest (``qlinear.quantized_modules``) see the mixed layer, never its parts."""
    part.packed_linear = False
    return part
