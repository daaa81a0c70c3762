"""A causal LM whose chosen weights are edited in place, behind the interface the harness uses for adapters.

ROME, MEMIT and AlphaEdit write into a few MLP weights instead of training an adapter. :class:`EditedModel`
keeps the unedited values of exactly those weights aside and offers what the rest of the harness calls
on a peft model: ``forward`` / ``generate`` (the edited model), ``disable_adapter()`` (the unedited model:
the kept values swapped in for the block, e.g. for the locality score), and ``save_pretrained(dir)``.

**What a run saves.** ``save_pretrained`` writes ``edited_weights.safetensors``, the *edited values* of
the written weights only (5 of Llama-3-8B's 224 Linears for MEMIT), and ``edit.json`` naming the base
model; every other weight is the base's. Whole tensors rather than differences, so the saved edit
reproduces the run's model bit for bit (base + (W' - W) would round). :func:`load_edited` applies it to a
freshly loaded base.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lit_common.sources import load_causal_lm

WEIGHTS_FILE, MANIFEST_FILE = "edited_weights.safetensors", "edit.json"


class EditedModel(nn.Module):
    """``base`` with the weights named in ``edited`` (full parameter names) open to in-place edits."""

    def __init__(self, base: nn.Module, edited: list[str], base_name: str, method: str) -> None:
        super().__init__()
        self.base = base
        params = dict(base.named_parameters())
        missing = [name for name in edited if name not in params]
        if missing:
            raise ValueError(f"{type(base).__name__} has no parameters {missing}")
        self.edited = {name: params[name] for name in edited}
        # the unedited values: a plain dict, so they stay out of state_dict and checkpoints
        self._original = {name: p.detach().clone() for name, p in self.edited.items()}
        self.base_name, self.method = base_name, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.base.generate(*args, **kwargs)

    @property
    def config(self) -> Any:
        return self.base.config

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the unedited model inside the block (the kept values are swapped in, not copied)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def _swap(self) -> None:
        for name, p in self.edited.items():
            p.data, self._original[name] = self._original[name], p.data

    def edited_weights(self) -> dict[str, Tensor]:
        return {name: p.detach().cpu().contiguous() for name, p in self.edited.items()}

    def changed(self) -> dict[str, float]:
        """‖W' - W‖ / ‖W‖ per edited weight: how far the run has moved each one."""
        return {name: float((p.detach() - self._original[name]).norm() / self._original[name].norm())
                for name, p in self.edited.items()}

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.edited_weights(), str(directory / WEIGHTS_FILE))
        manifest = {"base_model": self.base_name, "method": self.method, "edited": sorted(self.edited),
                    "relative_change": self.changed()}
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1) + "\n")

    def load_edit(self, directory: str | Path) -> None:
        """Write a saved edit's values into this model's weights (the same weights must be edited)."""
        weights = load_file(str(Path(directory) / WEIGHTS_FILE))
        if set(weights) != set(self.edited):
            raise ValueError(f"{directory}: the saved edit writes {sorted(weights)}, this run edits {sorted(self.edited)}")
        with torch.no_grad():
            for name, value in weights.items():
                self.edited[name].copy_(value)


def load_edited(directory: str | Path, dtype: str = "float32") -> nn.Module:
    """The base model named in a saved edit's ``edit.json``, with the edit's weights written in."""
    manifest = json.loads((Path(directory) / MANIFEST_FILE).read_text())
    model = load_causal_lm(manifest["base_model"], dtype)
    weights = load_file(str(Path(directory) / WEIGHTS_FILE))
    model.load_state_dict(weights, strict=False)
    return model
