"""config.json's ``quantization_config`` read without trusting it: every field checked, then every stored
tensor's shape and dtype checked against the model it describes, all before anything is allocated.

A loader that builds QuantLinear shells from the manifest's sizes lets a 5 KB edit allocate gigabytes before
the weights file disagrees, and one that copies stored tensors into shells of the manifest's dtypes converts
them silently (kept weights into ``int8``). So (the quantizer in hf_quantizer.py runs these): (1)
``check_manifest`` checks the manifest's fields, types and supported values; (2) with the model still on the
``meta`` device (no memory) and shells swapped in, ``check_stored_tensors`` compares every tensor the
safetensors headers list with it (known name, shape, the exact dtypes of the packed buffers) and names any
tensor the files lack (a truncated or unreadable file is named too); (3) ``check_outlier_positions`` runs once
the buffers are loaded, so a kept-weight position past the end of its matrix fails at load time, not at
generate time; so does ``check_group_bits``, for a mixed-precision layer's stored width map (``kind: "mixed"``
entries, mixed_linear.py: one bit width per column group, stored as one packed part per width). ``kind: "spqr"``
entries (``kind_version`` 1, qlinear.SpQRLinear) store quantized group statistics; ``decode_statistics`` decodes
them once loaded and refuses non-finite or negative ones. Every error names the file, the layer and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import nn

from lit_tacq import mixed_linear
from lit_tacq.mixed_linear import MixedQuantLinear
from lit_tacq.packing import CODE_BITS, OUTLIER_DTYPES, SUPPORTED_BITS
from lit_tacq.qlinear import (
    FORMAT_BUFFERS,
    SPQR_KIND,
    SPQR_VERSION,
    QuantLinear,
    SpQRLinear,
)
from lit_tacq.quantizer import n_groups

MANIFEST_FIELDS = ("quant_method", "format", "format_version", "bits", "group_size", "kept_fraction",
                   "bits_per_weight", "modules", "extra")
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int16": "I16",
                      "uint8": "U8"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


Rules = dict[str, tuple[bool, str]]  # field -> (its value is acceptable, what was expected)


def _layer_rules(entry: dict[str, Any]) -> Rules:
    """The fields every kind of packed layer's entry has: its shape and whether it has a bias."""
    return {
        "in_features": (_is_int(entry.get("in_features")) and entry["in_features"] > 0, "a positive integer"),
        "out_features": (_is_int(entry.get("out_features")) and entry["out_features"] > 0, "a positive integer"),
        "bias": (isinstance(entry.get("bias"), bool), "true or false"),
    }


def _broken_rules(entry: dict[str, Any], rules: Rules, closed: bool = True) -> list[str]:
    """``field value, expected ...`` for each rule that fails; with ``closed``, fields no rule names are errors too."""
    problems = [f"{name} {entry[name]!r}, expected {expected}" if name in entry else f"{name} missing"
                for name, (ok, expected) in rules.items() if not ok]
    if closed:
        problems += [f"unknown field {name!r}" for name in sorted(set(entry) - set(rules))]
    return problems


def _module_problems(entry: Any) -> list[str]:
    """What is wrong with one module's entry, as ``field value, expected ...`` phrases."""
    if not isinstance(entry, dict):
        return [f"entry {entry!r}, expected an object"]
    if entry.get("kind") == SPQR_KIND:
        return _spqr_problems(entry)
    if "kind" in entry:
        return _mixed_problems(entry)
    rules = {
        **_layer_rules(entry),
        "bits": (_is_int(entry.get("bits")) and entry["bits"] in SUPPORTED_BITS, f"one of {SUPPORTED_BITS}"),
        "group_size": (entry.get("group_size") is None or (_is_int(entry["group_size"]) and entry["group_size"] > 0),
                       "null or a positive integer"),
        "nnz": (_is_int(entry.get("nnz")) and entry["nnz"] >= 0, "a non-negative integer"),
        "outlier_dtype": (isinstance(entry.get("outlier_dtype"), str) and entry["outlier_dtype"] in OUTLIER_DTYPES,
                          f"one of {sorted(OUTLIER_DTYPES)}"),
    }
    return _broken_rules(entry, rules)


def _spqr_problems(entry: dict[str, Any]) -> list[str]:
    """:func:`_module_problems` of an SpQR layer's entry (``kind: "spqr"``, ``qlinear.SpQRLinear``): a plain layer's
    fields, column groups, and how its statistics are stored."""
    own = ("kind", "kind_version", "stat_bits", "stat_group_size")
    if entry.get("kind_version") != SPQR_VERSION:
        return [f"kind {SPQR_KIND!r} v{entry.get('kind_version')!r}, this version of lit_tacq reads v{SPQR_VERSION} "
                "(re-export the model with it)"]
    rules = {
        "group_size": (_is_int(entry.get("group_size")), "a positive integer (SpQR's column groups)"),
        "stat_bits": (_is_int(entry.get("stat_bits")) and entry["stat_bits"] in SUPPORTED_BITS,
                      f"one of {SUPPORTED_BITS}"),
        "stat_group_size": (_is_int(entry.get("stat_group_size")) and entry["stat_group_size"] > 0,
                            "a positive integer"),
    }
    problems = _module_problems({key: value for key, value in entry.items() if key not in own})
    return problems + _broken_rules(entry, rules, closed=False)


def _mixed_problems(entry: dict[str, Any]) -> list[str]:
    """:func:`_module_problems` of a mixed-precision layer's entry (``kind: "mixed"``, ``mixed_linear.py``)."""
    sizes_ok = all(_is_int(entry.get(name)) and entry[name] > 0 for name in ("in_features", "group_size"))
    groups = n_groups(entry["in_features"], entry["group_size"]) if sizes_ok else None
    widths = entry.get("group_bits")
    rules = {
        "kind": (entry.get("kind") == mixed_linear.KIND,
                 f"{mixed_linear.KIND!r} or {SPQR_KIND!r} (or none: one bit width per layer)"),
        **_layer_rules(entry),
        "group_size": (_is_int(entry.get("group_size")) and entry["group_size"] > 0, "a positive integer"),
        "group_bits": (isinstance(widths, list) and all(_is_int(b) and b in CODE_BITS for b in widths)
                       and (groups is None or len(widths) == groups),
                       (f"a list of one width from {CODE_BITS} per column group"
                        + (f" ({groups} groups)" if groups is not None else ""))),
        "dtype": (isinstance(entry.get("dtype"), str) and entry["dtype"] in OUTLIER_DTYPES,
                  f"one of {sorted(OUTLIER_DTYPES)}"),
    }
    return _broken_rules(entry, rules)


def stored_buffers(entry: dict[str, Any]) -> tuple[str, ...]:
    """The packed buffers a (checked) manifest entry's layer stores, by name relative to the layer, bias excluded."""
    if entry.get("kind") == SPQR_KIND:
        return SpQRLinear.format_buffers
    if entry.get("kind") == mixed_linear.KIND:
        parts = [f"parts.{mixed_linear.part_key(bits)}.{buffer}" for bits in sorted(set(entry["group_bits"]))
                 for buffer in FORMAT_BUFFERS]
        return ("group_bits", *parts)
    return FORMAT_BUFFERS


def check_manifest(meta: Any, source: Path, format_name: str, format_version: int) -> dict[str, Any]:
    """The manifest (config.json's ``quantization_config``), every field checked, all problems reported
    together; ``source`` names the file in the messages."""
    if not isinstance(meta, dict):
        raise ValueError(f"{source}: quantization_config: expected an object, got {type(meta).__name__}")
    if (meta.get("format"), meta.get("format_version")) != (format_name, format_version):
        raise ValueError(f"{source}: quantization_config: format {meta.get('format')!r} "
                         f"v{meta.get('format_version')!r}, this version of lit_tacq reads {format_name!r} "
                         f"v{format_version} (re-export the model with it)")
    problems = [f"unknown field {name!r}" for name in sorted(set(meta) - set(MANIFEST_FIELDS))]
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
        raise ValueError(f"{source}: quantization_config:\n  " + "\n  ".join(problems))
    return meta


def quant_shell(entry: dict[str, Any], device: Any) -> QuantLinear | MixedQuantLinear:
    """An empty packed layer of a (checked) manifest entry's kind, shapes and dtypes."""
    if entry.get("kind") == mixed_linear.KIND:
        return MixedQuantLinear.shell(entry, device)
    if entry.get("kind") == SPQR_KIND:
        return SpQRLinear.shell(entry, device)
    return QuantLinear(entry["in_features"], entry["out_features"], entry["bits"], entry["group_size"],
                       nnz=entry["nnz"], bias=entry["bias"], dtype=OUTLIER_DTYPES[entry["outlier_dtype"]],
                       device=device)


def swap_in_shells(model: nn.Module, modules: dict[str, dict[str, Any]], manifest: Path) -> None:
    """Replace each listed Linear by its shell, on the Linear's device; a name that is no Linear of that size
    in the model is an error."""
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
        model.set_submodule(name, quant_shell(entry, linear.weight.device))


def _headers(weights: Path) -> dict[str, tuple[list[int], str]]:
    """Shape and dtype of every tensor in one safetensors file, read from its header only."""
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {key: (list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                    for key in handle.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights}: not a readable safetensors file (truncated or damaged?): {err}") from err


def check_stored_tensors(files: list[Path], model: nn.Module, modules: dict[str, dict[str, Any]],
                         manifest: Path) -> None:
    """Every tensor in the weights files' headers against the (meta-device) model: known name, same shape,
    and for the packed buffers the very dtype (a loader would otherwise convert them silently); then every
    tensor of the model that no file holds (tied copies excepted), since a lenient loader would leave it
    at its random initial values."""
    expected = model.state_dict()
    packed = {f"{name}.{buffer}" for name, entry in modules.items() for buffer in (*stored_buffers(entry), "bias")}
    problems, stored = [], set()
    for weights in files:
        for key, (shape, dtype) in _headers(weights).items():
            stored.add(key)
            if key not in expected:
                problems.append(f"{weights.name}: {key}: not a tensor of the model that {manifest.name} describes")
                continue
            want = expected[key]
            if shape != list(want.shape):
                problems.append(f"{weights.name}: {key}: shape {shape}, expected {list(want.shape)} from "
                                f"{manifest.name}")
            want_dtype = SAFETENSORS_DTYPES.get(str(want.dtype).removeprefix("torch."))
            if key in packed and dtype != want_dtype:
                problems.append(f"{weights.name}: {key}: dtype {dtype}, expected {want_dtype} from {manifest.name}")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    problems += [f"{key}: missing from the weights files" for key in sorted(set(expected) - stored - tied)]
    if problems:
        raise ValueError(f"{manifest.parent}:\n  " + "\n  ".join(problems))


def check_outlier_positions(files: list[Path], modules: dict[str, QuantLinear]) -> None:
    """Every kept-weight position inside its matrix (positions only grow, so the last one decides)."""
    for name, module in modules.items():
        if not isinstance(module, QuantLinear) or module.outlier_gaps.numel() == 0:  # mixed layers' parts keep none
            continue
        last = int(module.outliers.positions()[-1])
        size = module.out_features * module.in_features
        if last >= size:
            where = files[0].parent if files else "the loaded model"
            raise ValueError(f"{where}: {name}.outlier_gaps: kept positions reach {last}, beyond the "
                             f"{module.out_features} x {module.in_features} = {size} weights of the layer")


def check_group_bits(files: list[Path], modules: dict[str, Any]) -> None:
    """Every mixed-precision layer's stored width map equal to the manifest's its shell was built from (the parts'
    shapes follow from it, and the forward reads the columns it names)."""
    where = files[0].parent if files else "the loaded model"
    for name, module in modules.items():
        if isinstance(module, MixedQuantLinear):
            module.check_group_bits(f"{where}: {name}")


def decode_statistics(files: list[Path], modules: dict[str, Any]) -> None:
    """Every SpQR layer's fp16 grids decoded from its stored statistics (``SpQRLinear.decode_statistics``), which
    must be finite and non-negative."""
    where = files[0].parent if files else "the loaded model"
    for name, module in modules.items():
        if isinstance(module, SpQRLinear):
            try:
                module.decode_statistics()
            except ValueError as err:
                raise ValueError(f"{where}: {name}.{err}") from err
