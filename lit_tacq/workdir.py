"""The work directory of one quantization: what a killed ``quantize_model`` resumes from, block by block.

    progress.json             the commit point: fingerprint, stage ("reference" or "final"), blocks of that
                              stage done, kept weights of the finished layers, seconds per stage so far
    hidden.safetensors        the inputs of the stage's next block, one tensor per calibration sequence
                              (the very tensors an uninterrupted run feeds that block)
    scores-NNNN.safetensors   reference pass: the saliency of block NNNN's Linears (float32)
    mask.safetensors          the global mask once ranked: each layer's kept positions as flat int64 indices
    block-NNNN.safetensors    final pass: the QuantLinear buffers of block NNNN

Every file is written under a temporary name in the directory, flushed and renamed over its target
(``os.replace``); a block counts as done only once progress.json, rewritten the same way after that block's
files, says so. A kill at any moment therefore leaves the state before the block or after it, never a mix.
Only safetensors and JSON are written or read (no pickle).

The fingerprint ties the directory to one quantization: a sha256 over the settings, the calibration token
ids, every parameter and buffer of the model and the accumulated gradients. Opening the directory for any
other quantization fails instead of mixing two. Without a path (``WorkDir.in_memory()``) the same
bookkeeping runs and nothing is written, so the pipeline has one code path.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lit_common.files import write_atomically

WORK_FORMAT = 1
PROGRESS_FILE = "progress.json"
HIDDEN_FILE = "hidden.safetensors"
STAGES = ("reference", "final")


def fingerprint(model: nn.Module, sequences: list[Tensor], settings: dict[str, Any],
                grad_abs_sum: dict[str, Tensor] | None) -> str:
    """sha256 (hex) of everything the quantized model depends on, read in a fixed order."""
    digest = hashlib.sha256(json.dumps({"format": WORK_FORMAT, "settings": settings}, sort_keys=True).encode())

    def add(name: str, tensor: Tensor) -> None:
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(memoryview(flat.view(torch.uint8).numpy()))

    for index, ids in enumerate(sequences):
        add(f"sequence.{index}", ids)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        add(f"model.{name}", tensor)
    for name, tensor in sorted((grad_abs_sum or {}).items()):
        add(f"grad_abs_sum.{name}", tensor)
    return digest.hexdigest()


@dataclass
class Progress:
    """What progress.json holds."""

    fingerprint: str
    stage: str = "reference"
    blocks_done: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    total_weights: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class WorkDir:
    """Progress of one quantization, persisted after every block when it has a path (module docstring)."""

    def __init__(self, path: Path | None, progress: Progress) -> None:
        self.path = path
        self.progress = progress

    @classmethod
    def in_memory(cls) -> WorkDir:
        return cls(None, Progress(fingerprint=""))

    @classmethod
    def open(cls, path: str | Path, fingerprint: str) -> WorkDir:
        """The directory's progress, or a fresh start where it has none; another quantization's is refused."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob(".*.tmp"):  # a write that a kill interrupted
            stale.unlink()
        progress_file = path / PROGRESS_FILE
        if not progress_file.exists():
            return cls(path, Progress(fingerprint))
        progress = cls._read_progress(progress_file)
        if progress.fingerprint != fingerprint:
            raise ValueError(
                f"{path} holds the progress of another quantization (fingerprint {progress.fingerprint[:16]}, this "
                f"one {fingerprint[:16]}: the model, calibration examples, gradients or quantization settings "
                "differ). Rerun with what it was made for, or delete the directory to quantize from the start.")
        return cls(path, progress)

    @staticmethod
    def _read_progress(file: Path) -> Progress:
        try:
            data = json.loads(file.read_text())
            if data.pop("format") != WORK_FORMAT:
                raise ValueError(f"work directory format is not {WORK_FORMAT}")
            progress = Progress(**data)
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise ValueError(f"{file} is not a progress file this version can resume from ({err}); delete "
                             f"{file.parent} to quantize from the start") from err
        if progress.stage not in STAGES or not isinstance(progress.blocks_done, int) or progress.blocks_done < 0:
            raise ValueError(f"{file}: stage {progress.stage!r} / blocks_done {progress.blocks_done!r} "
                             f"is not a state of {STAGES}; delete {file.parent} to quantize from the start")
        return progress

    # ---- where the run stands ---------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        return self.progress.stage

    @property
    def blocks_done(self) -> int:
        return self.progress.blocks_done

    def clock(self, stage: str) -> Callable[[], None]:
        """Time ``stage`` on top of earlier attempts: each call of the result records the total so far (the
        next commit persists it)."""
        base, start = self.progress.seconds.get(stage, 0.0), time.perf_counter()

        def tick() -> None:
            self.progress.seconds[stage] = base + time.perf_counter() - start

        return tick

    # ---- reading back what earlier attempts finished --------------------------------------------------------
    def hidden(self, device: torch.device | str) -> list[Tensor] | None:
        """The stored inputs of the stage's next block; None where there are none (a stage's first block, a
        pass without Hessians, or after a stage's last block, whose outputs nothing reads)."""
        file = None if self.path is None else self.path / HIDDEN_FILE
        if file is None or self.blocks_done == 0 or not file.exists():
            return None
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
        if (meta.get("stage"), meta.get("block")) != (self.stage, str(self.blocks_done)):
            return None
        tensors = load_file(str(file), device=str(device))
        return [tensors[str(i)] for i in range(len(tensors))]

    def scores(self, device: torch.device | str) -> dict[str, Tensor]:
        """The saliency of every layer of the reference pass's finished blocks."""
        scores: dict[str, Tensor] = {}
        for index in range(self.blocks_done if self.stage == "reference" else 0):
            scores.update(load_file(str(self._file(f"scores-{index:04d}")), device=str(device)))
        return scores

    def mask(self, device: torch.device | str) -> dict[str, Tensor]:
        """The global mask, as stored when the reference stage finished."""
        file = self._file("mask")
        with safe_open(str(file), framework="pt") as handle:
            shapes = json.loads(handle.metadata()["shapes"])
        kept = load_file(str(file), device=str(device))
        masks = {}
        for name, shape in shapes.items():
            mask = torch.zeros(shape, dtype=torch.bool, device=device)
            mask.view(-1)[kept[name]] = True
            masks[name] = mask
        return masks

    def final_block(self, index: int, device: torch.device | str) -> dict[str, Tensor]:
        """The QuantLinear buffers of a block the final pass finished, by ``<linear name>.<buffer>``."""
        return load_file(str(self._file(f"block-{index:04d}")), device=str(device))

    # ---- committing a finished block or stage ------------------------------------------------------------
    def finish_reference_block(self, index: int, scores: dict[str, Tensor], outputs: list[Tensor] | None) -> None:
        self._save(f"scores-{index:04d}", scores)
        self._finish_block(index, outputs)

    def finish_reference(self, masks: dict[str, Tensor] | None) -> None:
        """The mask is ranked (None: nothing is kept): the final stage starts at its first block."""
        if masks is not None:
            shapes = {name: list(mask.shape) for name, mask in masks.items()}
            self._save("mask", {name: mask.flatten().nonzero().squeeze(1) for name, mask in masks.items()},
                       {"shapes": json.dumps(shapes)})
        reference_blocks = self.blocks_done
        self.progress.stage, self.progress.blocks_done = "final", 0
        self._commit()
        if self.path is not None:  # no longer needed once the commit says the final stage has begun
            for index in range(reference_blocks):
                self._file(f"scores-{index:04d}").unlink(missing_ok=True)
            (self.path / HIDDEN_FILE).unlink(missing_ok=True)

    def finish_final_block(self, index: int, buffers: dict[str, Tensor], kept: dict[str, int], weights: int,
                           outputs: list[Tensor] | None) -> None:
        self._save(f"block-{index:04d}", buffers)
        self.progress.kept.update(kept)
        self.progress.total_weights += weights
        self._finish_block(index, outputs)

    def _finish_block(self, index: int, outputs: list[Tensor] | None) -> None:
        if index != self.blocks_done:
            raise RuntimeError(f"block {index} finished while {self.blocks_done} blocks were done")
        if outputs is not None:
            self._save("hidden", {str(i): h for i, h in enumerate(outputs)},
                       {"stage": self.stage, "block": str(index + 1)})
        self.progress.blocks_done = index + 1
        self._commit()

    # ---- atomic writes -----------------------------------------------------------------------------------
    def _file(self, stem: str) -> Path:
        assert self.path is not None
        return self.path / f"{stem}.safetensors"

    def _save(self, stem: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
        if self.path is None:
            return
        on_cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        write_atomically(self._file(stem), lambda tmp: save_file(on_cpu, str(tmp), metadata=metadata))

    def _commit(self) -> None:
        if self.path is None:
            return
        text = json.dumps({"format": WORK_FORMAT, **asdict(self.progress)}, indent=1)
        write_atomically(self.path / PROGRESS_FILE, lambda tmp: tmp.write_text(text))
