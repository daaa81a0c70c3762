"""A GGUF file (llama.cpp's format) as a model source: dequantized into a plain Hugging Face model.

``model_name_or_path`` names a GGUF by its ``.gguf`` path, or by a directory that holds exactly one
``.gguf`` and no ``config.json`` (a directory with ``config.json`` is a Hugging Face checkpoint). The
config, the weights and the tokenizer (with its chat template) all come from that one file.

Every weight is dequantized when the file is loaded (``GgufConfig(dequantize=True)``), to the dtype asked
for: the result is an ordinary model of ``nn.Linear`` layers, which LoRA adapts, TaCQ quantizes and
``save_pretrained`` writes, identical on every load. transformers would otherwise keep the weights packed
where it has a GGUF kernel (GgufLinear: neither trainable nor serializable). A model loaded this way still
carries the GGUF's quantization error: numbers measured on it are numbers of the quantized checkpoint.

``python -m lit_common.gguf_source FILE OUT`` writes the dequantized model and tokenizer as a Hugging Face
directory, for tools that need one (bitsandbytes' ``load_in_4bit``, ``AutoPeftModel``, vLLM).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SUFFIX = ".gguf"


class GGUFSourceError(ValueError):
    """A GGUF source that cannot be used; the message names the file and what was expected."""


def gguf_file(path: str | Path) -> Path | None:
    """The GGUF file ``path`` names (a ``.gguf`` file, or a directory holding one ``.gguf`` and no
    ``config.json``), or ``None`` when ``path`` is no GGUF source (a Hugging Face directory, a hub id)."""
    path = Path(path)
    if path.suffix.lower() == SUFFIX:
        if not path.is_file():
            raise FileNotFoundError(f"GGUF model {path} does not exist (a .gguf source must be a local file)")
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())
    if len(found) > 1:
        raise GGUFSourceError(f"{path} holds {len(found)} .gguf files and no config.json, so it names no single "
                              f"model: use one file's path ({', '.join(p.name for p in found)})")
    return found[0] if found else None


def supported_architectures() -> list[str]:
    """The GGUF architectures (``general.architecture``) this transformers version can read."""
    from transformers.integrations.gguf import GGUF_ARCHS
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    sections = {"general", "tokenizer"}  # the legacy table's keys include metadata sections
    return sorted((set(GGUF_SUPPORTED_ARCHITECTURES) - sections) | set(GGUF_ARCHS))


def _describe_failure(path: Path, err: Exception) -> str:
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).get_field("general.architecture")
    except (ValueError, OSError) as unreadable:
        return f"{path} is not a readable GGUF file ({unreadable})"
    architecture = field.contents() if field is not None else "(none stated)"
    return (f"transformers {transformers.__version__} cannot load {path} (GGUF architecture {architecture!r}): "
            f"{err} The GGUF architectures it reads: {', '.join(supported_architectures())}; convert other "
            "checkpoints to a Hugging Face directory (safetensors) instead")


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """transformers' own errors name neither the file nor what it supports: add both."""
    try:
        yield
    except ValueError as err:
        raise GGUFSourceError(_describe_failure(path, err)) from err


def load_config(path: Path) -> PretrainedConfig:
    """The model config stated in the file's metadata."""
    with _reading(path):
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    config.name_or_path = str(path)
    return config


def load_causal_lm(path: Path, dtype: torch.dtype | str) -> PreTrainedModel:
    """The model with every weight dequantized to ``dtype`` ("auto": transformers' choice, float32 for Llama).

    Its ``name_or_path`` is the file, not its folder, so an adapter trained on it records the file as
    its base (peft's ``base_model_name_or_path``)."""
    config = load_config(path)
    with _reading(path):
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
    model.name_or_path = model.config.name_or_path = str(path)
    return model


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer and chat template stored in the file."""
    with _reading(path):
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def export_hf_directory(path: Path, out: Path, dtype: torch.dtype, card: str | None = None) -> Path:
    """Write the dequantized model (safetensors), its generation config and tokenizer to ``out``, plus
    ``card`` as README.md. Built in a hidden sibling folder and renamed when complete, so ``out`` is
    either whole or absent (a killed run can leave only that hidden folder behind)."""
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose another directory")
    model, tokenizer = load_causal_lm(path, dtype), load_tokenizer(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    partial.chmod(0o755)  # mkdtemp's 0700 would make the finished model private
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if card is not None:
            (partial / "README.md").write_text(card)
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_common.gguf_source", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("out", type=Path, help="the Hugging Face directory to create (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of the dequantized weights (float32 holds them exactly)")
    args = parser.parse_args(argv)
    source = gguf_file(args.gguf)
    if source is None:
        parser.error(f"{args.gguf} is not a .gguf file (nor a directory holding exactly one)")
    out = export_hf_directory(source, args.out, getattr(torch, args.dtype))
    print(f"{source} -> {out} ({args.dtype}, dequantized: the GGUF's quantization error is kept)")


if __name__ == "__main__":
    main()
