"""Where models and benchmark files come from: a local path, a hub id, or the embedded world.

``world:<name>`` names a file or model of the embedded world (``world:model``, ``world:counterfact``, ...)
and resolves to the committed asset, so configs work from any directory. Anything else is a local path
when it exists, otherwise a hub id handed to ``from_pretrained`` / ``load_dataset`` unchanged.
"""

from __future__ import annotations

from pathlib import Path

WORLD_PREFIX = "world:"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS_DIR / "world_model"
WORLD_DIR = ASSETS_DIR / "world"
WORLD_FILES = {
    "counterfact": "counterfact.json",
    "zsre": "zsre_mend_eval.json",
    "code_update": "code_updates.jsonl",
    "task_qa": "task_qa.jsonl",
    "corpus": "corpus.txt",
}
WORLD_SOURCES = {"model": MODEL_DIR, **{key: WORLD_DIR / name for key, name in WORLD_FILES.items()}}


def resolve(name_or_path: str) -> str:
    """Turn a ``world:`` alias into its path; leave paths and hub ids as they are."""
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
