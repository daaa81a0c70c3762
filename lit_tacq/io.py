"""A quantized model on disk: a Hugging Face model directory, no pickle.

    config.json         the model's config; its ``quantization_config`` (quant_method ``lit_tacq``) is the
                        manifest: format and version, bits, group size, kept fraction, measured bits per
                        weight, and every packed Linear with its shapes, bits, group size, kept weights, dtypes
    model*.safetensors  every tensor of the model: QuantLinear buffers + the remaining 16-bit weights (tied
                        weights stored once; sharded like any large checkpoint)
    generation_config.json, tokenizer files   when the model / a tokenizer has them

It loads with ``AutoModelForCausalLM.from_pretrained(path)`` once ``lit_tacq`` is imported (hf_quantizer.py
registers the method with transformers), which checks the manifest and the safetensors headers before
allocating anything (``lit_tacq.manifest``); ``load_quantized`` is that call. ``save_quantized`` writes the
manifest and calls ``save_pretrained``; a loaded model's own ``save_pretrained`` writes the same directory.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from lit_tacq.hf_quantizer import FORMAT, FORMAT_VERSION, QUANT_METHOD, TaCQConfig
from lit_tacq.manifest import stored_buffers
from lit_tacq.qlinear import quantized_modules

__all__ = ["FORMAT", "FORMAT_VERSION", "accounted_bits_per_weight", "load_quantized", "measured_bits_per_weight",
           "quantized_modules", "save_quantized", "weight_files"]


_DTYPE_BYTES = {"I32": 4, "I16": 2, "F16": 2, "BF16": 2, "F32": 4, "U8": 1}


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a model directory (one, or the shards its index lists)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return [directory / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [directory / "model.safetensors"]


def measured_bits_per_weight(source: nn.Module | str | Path) -> float:
    """Stored bits per weight over all quantized Linear layers (codes, scale, zero, kept weights).

    ``source`` is a model holding QuantLinear modules or a directory written by
    :func:`save_quantized` (then the byte counts come from the safetensors file itself).
    """
    if isinstance(source, nn.Module):
        modules = quantized_modules(source).values()
        n_bytes = sum(m.stored_bytes() for m in modules)
        n_weights = sum(m.in_features * m.out_features for m in modules)
    else:
        directory = Path(source)
        entries = json.loads((directory / "config.json").read_text())["quantization_config"]["modules"]
        wanted = {f"{name}.{buffer}" for name, entry in entries.items() for buffer in stored_buffers(entry)}
        n_bytes = 0
        for weights in weight_files(directory):
            with safe_open(str(weights), framework="pt") as f:
                for key in wanted & set(f.keys()):
                    tensor = f.get_slice(key)
                    n_bytes += math.prod(tensor.get_shape()) * _DTYPE_BYTES[tensor.get_dtype()]
        n_weights = sum(e["in_features"] * e["out_features"] for e in entries.values())
    if n_weights == 0:
        raise ValueError("no quantized Linear layers found")
    return 8 * n_bytes / n_weights


def accounted_bits_per_weight(model: nn.Module) -> float:
    """Spec §2's accounting over the model's QuantLinear layers: b bits per code, 32 bits per kept weight
    (16 value + 16 index) and 32 bits of fp16 scale + zero per row or group. The stored bytes differ only
    by code padding to 32 codes per row (or group) and by filler entries (see ``packing.SparseOutliers``).
    A mixed-precision layer counts its own codes, grids and width map (``MixedQuantLinear.accounted_bits``), an
    SpQR layer its quantized statistics (``SpQRLinear.accounted_bits``)."""
    modules = quantized_modules(model).values()
    n_weights = sum(m.in_features * m.out_features for m in modules)
    if n_weights == 0:
        raise ValueError("no quantized Linear layers found")
    bits = sum(m.accounted_bits() for m in modules)
    return bits / n_weights


def _setting(values: set[Any]) -> Any:
    """One value when every layer shares it, else the sorted list (None, per-row grids, first)."""
    return next(iter(values)) if len(values) == 1 else sorted(values, key=lambda v: (v is not None, v or 0))


def quantization_config(model: nn.Module, extra: dict[str, Any] | None = None) -> TaCQConfig:
    """The manifest of a model holding QuantLinear modules (see the module docstring)."""
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no QuantLinear modules; quantize it first")
    n_weights = sum(m.in_features * m.out_features for m in modules.values())
    return TaCQConfig(
        modules={name: m.manifest_entry() for name, m in modules.items()},
        bits=_setting({m.bits for m in modules.values()}),
        group_size=_setting({m.group_size for m in modules.values()}),
        kept_fraction=sum(m.kept_weights() for m in modules.values()) / n_weights,
        bits_per_weight=measured_bits_per_weight(model),
        extra=extra or {},
    )


def save_quantized(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (with its QuantLinear modules in place) to ``out_dir``; returns the directory.

    ``extra`` (JSON-serialisable, e.g. the quantization settings) is stored in the manifest.
    """
    out = Path(out_dir)
    model.config.quantization_config = quantization_config(model, extra)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_quantized(
    out_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` of a directory written by :func:`save_quantized`, on ``device``.

    ``dtype`` is the dtype of the unquantized weights (default: as saved); the QuantLinear buffers always keep
    their stored dtypes. The manifest and the weights files' headers are checked against each other and
    against config.json before anything is allocated (``lit_tacq.manifest``).
    """
    directory = Path(out_dir)
    config = directory / "config.json"
    manifest = json.loads(config.read_text()).get("quantization_config", {}) if config.exists() else {}
    method = manifest.get("quant_method")
    if method != QUANT_METHOD:
        older = " (its quantization.json is lit_tacq's format v3 or older: re-export it)" if (
            directory / "quantization.json").exists() else ""
        raise ValueError(f"{directory}: not a packed lit_tacq model: config.json has no quantization_config with "
                         f"quant_method {QUANT_METHOD!r}{older}")
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or "auto", device_map=torch.device(device))
