"""Random numbers as a function of where they are drawn, so a resumed run draws what an uninterrupted one does.

A checkpoint cannot carry the global random state usefully: Lightning and the data loaders consume it
between a save and the next step differently in a resumed process than in an uninterrupted one. Instead
every consumer (LoRA/base dropout in a training step, sampled generations in an evaluation batch)
reseeds from the run's seed and its position (epoch, batch, rank, ...), which a resume restores exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import torch


def position_seed(run_seed: int, *position: int | str) -> int:
    """A 63-bit seed determined by the run's seed and a position tuple only."""
    digest = hashlib.blake2b(repr((run_seed, *position)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block under ``seed`` on the CPU and on ``device``, leaving the global random state as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
