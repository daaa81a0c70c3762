"""A quantized model on disk: one directory, no pickle.

    model.safetensors   every tensor of the model: QuantLinear buffers + the remaining 16-bit weights
                        (tied weights stored once)
    config.json         the Hugging Face config (plus generation_config.json when the model has one)
    quantization.json   format and version, the quantized modules with their shapes, bits, group
                        size, number of kept weights and dtypes, and the measured bits per weight
    tokenizer files     when a tokenizer is given

``load_quantized`` trusts none of it: quantization.json's fields and every stored tensor's shape and dtype
are checked first, on a model built on the ``meta`` device (``lit_tacq.manifest``). Only then does it build
the architecture from config.json, swap the listed modules for empty QuantLinear shells and load the state
strictly (any missing or extra tensor is an error), then check the kept-weight positions.
"""

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedModel,
)
from transformers.initialization import no_init_weights

from lit_tacq.manifest import (
    check_outlier_positions,
    check_stored_tensors,
    read_manifest,
    swap_in_shells,
)
from lit_tacq.qlinear import FORMAT_BUFFERS, QuantLinear

FORMAT = "lit_tacq.packed"
FORMAT_VERSION = 3  # 3: kept-weight positions as 16-bit gaps (2: CSR with per-row counts)
WEIGHTS_FILE = "model.safetensors"
QUANT_FILE = "quantization.json"


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    """Every QuantLinear of ``model`` by its full module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _module_entry(module: QuantLinear) -> dict[str, Any]:
    return {
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bits": module.bits,
        "group_size": module.group_size,
        "nnz": module.outlier_values.numel(),
        "outlier_dtype": _dtype_name(module.outlier_values.dtype),
        "bias": module.bias is not None,
    }


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
        entries = json.loads((directory / QUANT_FILE).read_text())["modules"]
        n_bytes = 0
        with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
            for name in entries:
                for buffer in FORMAT_BUFFERS:
                    tensor = f.get_tensor(f"{name}.{buffer}")
                    n_bytes += tensor.numel() * tensor.element_size()
        n_weights = sum(e["in_features"] * e["out_features"] for e in entries.values())
    if n_weights == 0:
        raise ValueError("no quantized Linear layers found")
    return 8 * n_bytes / n_weights


def accounted_bits_per_weight(model: nn.Module) -> float:
    """Spec §2's accounting over the model's QuantLinear layers: b bits per code, 32 bits per kept weight
    (16 value + 16 index) and 32 bits of fp16 scale + zero per row or group. The stored bytes differ only
    by code padding to 32 codes per row (or group) and by filler entries (see ``packing.SparseOutliers``)."""
    modules = quantized_modules(model).values()
    n_weights = sum(m.in_features * m.out_features for m in modules)
    if n_weights == 0:
        raise ValueError("no quantized Linear layers found")
    bits = sum(
        m.bits * m.in_features * m.out_features + 32 * m.outliers.kept() + 32 * m.scale.numel()
        for m in modules
    )
    return bits / n_weights


def save_quantized(
    model: PreTrainedModel,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (with its QuantLinear modules in place) to ``out_dir``; returns the directory.

    ``extra`` (JSON-serialisable, e.g. the quantization settings) is stored in quantization.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("the model has no QuantLinear modules; quantize it first")
    save_model(model, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    float_params = [p for p in model.parameters() if p.is_floating_point()]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": _dtype_name(float_params[0].dtype if float_params else torch.float16),
        "bits_per_weight": measured_bits_per_weight(model),
        "modules": {name: _module_entry(m) for name, m in modules.items()},
        "extra": extra or {},
    }
    (out / QUANT_FILE).write_text(json.dumps(meta, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def load_quantized(
    out_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Rebuild a model saved by :func:`save_quantized`, ready for ``.generate()``.

    ``dtype`` is the dtype of the unquantized weights (default: as saved); the QuantLinear buffers
    always keep their stored dtypes. quantization.json and the weights file's header are checked against
    each other and against config.json before anything is allocated (``lit_tacq.manifest``).
    """
    directory = Path(out_dir)
    manifest, weights = directory / QUANT_FILE, directory / WEIGHTS_FILE
    meta = read_manifest(manifest, FORMAT, FORMAT_VERSION)
    config = AutoConfig.from_pretrained(directory)
    dtype = dtype or getattr(torch, meta["dtype"])
    with torch.device("meta"):  # shapes and dtypes only
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    swap_in_shells(skeleton, meta["modules"], "meta", manifest)
    check_stored_tensors(weights, skeleton, meta["modules"])
    # Every weight is about to be overwritten, so skip random init (which also skips weight tying).
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    swap_in_shells(model, meta["modules"], device, manifest)
    load_model(model, str(weights), strict=True, device=str(device))
    check_outlier_positions(weights, quantized_modules(model))
    if (directory / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model.eval()
