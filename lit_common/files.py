"""Writing files so that a crash, a kill or a full disk never leaves a half-written file where a good one was.

Each write goes to a temporary name in the target's directory (a rename is atomic only within one file
system), is flushed to disk, and is then renamed over the target; the directory entry is flushed too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(temporary path)``, then move the finished file over ``target``; a failed write leaves
    ``target`` as it was and removes the temporary file."""
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(target.parent)


def replace_atomically(partial: Path, target: Path) -> None:
    """Move a finished file or folder over the previous one. A file is swapped in one rename; a folder (an
    FSDP distributed checkpoint, an export) cannot be renamed over a non-empty one, so the old folder is moved
    aside first and removed after the swap."""
    if partial.is_file():
        fsync_path(partial)
        os.replace(partial, target)
    else:
        aside = target.with_name(target.name + ".old")
        if target.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(target, aside)
        os.replace(partial, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_path(target.parent)
