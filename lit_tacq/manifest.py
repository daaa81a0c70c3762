"""quantization.json read without trusting it: every field checked, then every stored tensor's shape and
dtype checked against the model it describes, all before anything is allocated.

A loader that builds QuantLinear shells from the JSON's sizes lets a 5 KB edit allocate gigabytes before
the weights file disagrees, and one that copies stored tensors into shells of the JSON's dtypes converts
them silently (kept weights into ``int8``). So: (1) ``read_manifest`` checks the JSON's fields, types and
supported values; (2) ``check_stored_tensors`` builds the model on the ``meta`` device (no memory) from
config.json with shells from the JSON, and compares every tensor the safetensors header lists with it
(shapes, and the exact dtypes of the packed buffers); (3) ``check_outlier_positions`` runs once the buffers
are loaded, so a kept-weight position past the end of its matrix fails at load time, not at generate time.
Every error names the file, the layer and the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import safe_open
from torch import nn

from lit_tacq.packing import OUTLIER_DTYPES, SUPPORTED_BITS
from lit_tacq.qlinear import FORMAT_BUFFERS, QuantLinear

MODEL_DTYPES = ("float32", "float16", "bfloat16")
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int16": "I16"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _module_problems(entry: Any) -> list[str]:
    """What is wrong with one module's entry, as ``field value, expected ...`` phrases."""
    if not isinstance(entry, dict):
        return [f"entry {entry!r}, expected an object"]
    rules = {
        "in_features": (_is_int(entry.get("in_features")) and entry["in_features"] > 0, "a positive integer"),
        "out_features": (_is_int(entry.get("out_features")) and entry["out_features"] > 0, "a positive integer"),
        "bits": (_is_int(entry.get("bits")) and entry["bits"] in SUPPORTED_BITS, f"one of {SUPPORTED_BITS}"),
        "group_size": (entry.get("group_size") is None or (_is_int(entry["group_size"]) and entry["group_size"] > 0),
                       "null or a positive integer"),
        "nnz": (_is_int(entry.get("nnz")) and entry["nnz"] >= 0, "a non-negative integer"),
        "outlier_dtype": (isinstance(entry.get("outlier_dtype"), str) and entry["outlier_dtype"] in OUTLIER_DTYPES,
                          f"one of {sorted(OUTLIER_DTYPES)}"),
        "bias": (isinstance(entry.get("bias"), bool), "true or false"),
    }
    problems = [f"{name} {entry[name]!r}, expected {expected}" if name in entry else f"{name} missing"
                for name, (ok, expected) in rules.items() if not ok]
    problems += [f"unknown field {name!r}" for name in sorted(set(entry) - set(rules))]
    return problems


def read_manifest(path: Path, format_name: str, format_version: int) -> dict[str, Any]:
    """The parsed quantization.json, every field checked (all problems reported together)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    if (meta.get("format"), meta.get("format_version")) != (format_name, format_version):
        raise ValueError(f"{path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, expected "
                         f"{format_name!r} v{format_version}")
    problems = []
    if meta.get("dtype") not in MODEL_DTYPES:
        problems.append(f"dtype {meta.get('dtype')!r}, expected one of {MODEL_DTYPES}")
    bpw = meta.get("bits_per_weight")
    if not isinstance(bpw, (int, float)) or isinstance(bpw, bool) or not bpw > 0:
        problems.append(f"bits_per_weight {bpw!r}, expected a positive number")
    if not isinstance(meta.get("extra", {}), dict):
        problems.append(f"extra {meta.get('extra')!r}, expected an object")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        problems.append(f"modules {modules!r}, expected a non-empty object of module name -> entry")
    else:
        problems += [f"{name}: {problem}" for name, entry in modules.items() for problem in _module_problems(entry)]
    if problems:
        raise ValueError(f"{path}:\n  " + "\n  ".join(problems))
    return meta


def quant_shell(entry: dict[str, Any], device: Any) -> QuantLinear:
    """An empty QuantLinear of a (checked) manifest entry's shapes and dtypes."""
    return QuantLinear(entry["in_features"], entry["out_features"], entry["bits"], entry["group_size"],
                       nnz=entry["nnz"], bias=entry["bias"], dtype=OUTLIER_DTYPES[entry["outlier_dtype"]],
                       device=device)


def swap_in_shells(model: nn.Module, modules: dict[str, dict[str, Any]], device: Any, manifest: Path) -> None:
    """Replace each listed Linear by its shell; a name that is no Linear of that size in the model is an error."""
    for name, entry in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{manifest}: {name}: no such Linear layer in the model of config.json")
        for field in ("in_features", "out_features"):
            if entry[field] != getattr(linear, field):
                raise ValueError(f"{manifest}: {name}: {field} {entry[field]}, the layer in config.json's model has "
                                 f"{getattr(linear, field)}")
        model.set_submodule(name, quant_shell(entry, device))


def check_stored_tensors(weights: Path, skeleton: nn.Module, modules: dict[str, dict[str, Any]]) -> None:
    """Every tensor in the weights file's header against the (meta-device) model: known name, same shape, and
    for the packed buffers the very dtype (a loader would otherwise convert them silently)."""
    expected = skeleton.state_dict()
    packed = {f"{name}.{buffer}" for name in modules for buffer in (*FORMAT_BUFFERS, "bias")}
    problems = []
    with safe_open(str(weights), framework="pt") as handle:
        for key in handle.keys():
            if key not in expected:
                problems.append(f"{key}: not a tensor of the model that config.json and quantization.json describe")
                continue
            stored = handle.get_slice(key)
            shape, dtype = list(stored.get_shape()), stored.get_dtype()
            want = expected[key]
            if shape != list(want.shape):
                problems.append(f"{key}: shape {shape}, expected {list(want.shape)} from config.json and "
                                "quantization.json")
            want_dtype = SAFETENSORS_DTYPES.get(str(want.dtype).removeprefix("torch."))
            if key in packed and dtype != want_dtype:
                problems.append(f"{key}: dtype {dtype}, expected {want_dtype} from quantization.json")
    if problems:
        raise ValueError(f"{weights}:\n  " + "\n  ".join(problems))


def check_outlier_positions(weights: Path, modules: dict[str, QuantLinear]) -> None:
    """Every kept-weight position inside its matrix (positions only grow, so the last one decides)."""
    for name, module in modules.items():
        if module.outlier_gaps.numel() == 0:
            continue
        last = int(module.outliers.positions()[-1])
        size = module.out_features * module.in_features
        if last >= size:
            raise ValueError(f"{weights}: {name}.outlier_gaps: kept positions reach {last}, beyond the "
                             f"{module.out_features} x {module.in_features} = {size} weights of the layer")
