"""The packed TaCQ directory as a Hugging Face model: ``AutoModelForCausalLM.from_pretrained(path)`` once
``lit_tacq`` is imported.

Plugged in through transformers' own extension points, the way GPTQ, AWQ, HQQ and compressed-tensors are:
``register_quantization_config`` / ``register_quantizer`` for the method name ``lit_tacq``. config.json's
``quantization_config`` is the manifest: format and version, bits, group size and kept fraction, the
measured bits per weight, and every packed Linear with its shapes, bits, group size, number of kept weights
and dtypes. Before the weights load, :class:`TaCQHfQuantizer` checks that manifest and every safetensors
header against the model it describes (``lit_tacq.manifest``; nothing is allocated yet) and swaps the
listed Linears for empty QuantLinear shells (MixedQuantLinear for ``kind: "mixed"`` entries: a bit width per column
group, SpQRLinear for ``kind: "spqr"``: quantized group statistics); once loaded it checks the kept-weight
positions and the mixed layers' width maps and decodes the SpQR layers' statistics. Only packed
models load (``requires_calibration``): quantizing happens in ``quantize.py``. ``save_pretrained`` writes
the same directory back.
"""

from pathlib import Path
from typing import Any

from transformers import PreTrainedModel
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from lit_tacq.manifest import (
    check_group_bits,
    check_manifest,
    check_outlier_positions,
    check_stored_tensors,
    decode_statistics,
    swap_in_shells,
)
from lit_tacq.qlinear import quantized_modules

QUANT_METHOD = "lit_tacq"
FORMAT = "lit_tacq.packed"
FORMAT_VERSION = 4  # 4: manifest in config.json, codes packed along the input features (3: quantization.json)


@register_quantization_config(QUANT_METHOD)
class TaCQConfig(QuantizationConfigMixin):
    """config.json's ``quantization_config`` of a packed model (see the module docstring).

    ``bits`` and ``group_size`` are the model's settings (a list where layers differ), ``kept_fraction`` the
    share of quantized weights kept in 16 bits, ``modules`` the per-layer entries the loader builds shells
    from, ``extra`` what the writer recorded (quantization settings, calibration, adapter and edits).
    Unknown fields are kept so the check can name them instead of failing inside transformers.
    """

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        bits: int | list[int] | None = None,
        group_size: int | None | list[int | None] = None,
        kept_fraction: float | None = None,
        bits_per_weight: float | None = None,
        extra: dict[str, Any] | None = None,
        format: str = FORMAT,
        format_version: int = FORMAT_VERSION,
        **unknown: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.format, self.format_version = format, format_version
        self.bits, self.group_size, self.kept_fraction = bits, group_size, kept_fraction
        self.bits_per_weight = bits_per_weight
        self.modules = modules or {}
        self.extra = extra or {}
        self.unknown = unknown

    def to_dict(self) -> dict[str, Any]:
        fields = {key: value for key, value in super().to_dict().items() if key != "unknown"}
        return {**fields, **self.unknown}


@register_quantizer(QUANT_METHOD)
class TaCQHfQuantizer(HfQuantizer):
    """Loads a packed TaCQ model: checks, then swaps Linears for QuantLinear shells (module docstring)."""

    requires_calibration = True
    quantization_config: TaCQConfig

    def _process_model_before_weight_loading(self, model: PreTrainedModel, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> None:
        files = [Path(f) for f in checkpoint_files or []]
        source = files[0].parent / "config.json" if files else Path("config.json")
        modules = check_manifest(self.quantization_config.to_dict(), source, FORMAT, FORMAT_VERSION)["modules"]
        swap_in_shells(model, modules, source)
        check_stored_tensors(files, model, modules, source)
        self._files = files

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> None:
        modules = quantized_modules(model)
        check_outlier_positions(self._files, modules)
        check_group_bits(self._files, modules)
        decode_statistics(self._files, modules)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        """Adapters train on top (QuantLinear's forward is differentiable in its input); the codes do not."""
        return True
