"""Fault injection on a TaCQ run through the CLI: killed (SIGKILL) during the calibration and during the
quantization's final pass, each time rerun with the same command; the export must be byte for byte the
uninterrupted run's, with no work directory or accumulator side file left. (In process, and faster: a rerun of a
finished run in tests/tacq/test_tacq_callback.py, a quantization interrupted in its reference pass or final pass
in tests/tacq/test_tacq_pipeline.py.)"""

import json
from pathlib import Path

import pytest
import torch

from tests.cli import cli_command, run_cli
from tests.tacq.tiny import build_tiny

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  precision: 32-true
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {out}
  callbacks:
    - class_path: callbacks.run_checkpoint.RunCheckpoint
      init_args: {{every_n_train_steps: 5}}
    - class_path: callbacks.tacq.TaCQCallback
      init_args:
        export_dir: {out}/export
        progress: false
        quant: {{bits: 2, fraction: 0.02}}
    - class_path: tests.faults.kill_switch.KillSwitch
model:
  model_name_or_path: {model}
data:
  source: {task_qa}
  token_budget: 300
"""
# 28 calibration examples (one per step): last.ckpt at steps 5, 10, ..., 25 and at the end of the epoch (28);
# 3 decoder blocks, so the final pass has blocks before and after the kill
TIMINGS = {"seconds", "quantization_seconds", "stage_seconds", "peak_rss_mb", "peak_cuda_mb"}


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny_tacq_faults"), num_hidden_layers=3)


def _command(out: Path, tiny) -> list[str]:
    config = out.with_suffix(".yaml")  # beside the run directory, where the CLI saves the resolved config
    config.write_text(CONFIG.format(out=out, model=tiny.model_dir, task_qa=tiny.task_qa))
    return cli_command("quantize.py", config)


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMINGS}
    return value


def _safetensors(path: Path) -> tuple[dict, bytes]:
    """The header (as a dict: safetensors writes its metadata in a per-process random order) and every byte of
    the tensor data."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _progress(out: Path) -> tuple[str, int]:
    progress = json.loads((out / "export.partial" / "progress.json").read_text())
    return progress["stage"], progress["blocks_done"]


def test_killed_tacq_runs_resume_to_the_uninterrupted_export(tiny3, tmp_path):
    expected_out, out = tmp_path / "a", tmp_path / "b"
    uninterrupted = run_cli(_command(expected_out, tiny3))
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    command = _command(out, tiny3)
    checkpoint, side_files = out / "checkpoints" / "last.ckpt", out / "checkpoints" / "tacq_state"

    killed = run_cli(command, "train_batch_end:7:KILL")  # mid-calibration; last save: step 5
    assert killed.returncode == -9
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 5 and not (out / "export").exists()
    killed = run_cli(command, "final_block:2:KILL")  # calibration finished and saved, 2 of 3 blocks quantized
    assert killed.returncode == -9 and "Resumed from" in killed.stderr
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 28
    assert _progress(out) == ("final", 2) and list(side_files.iterdir()) and not (out / "export").exists()
    finished = run_cli(command)  # resumed from the calibration's end (the fit loop is done) and the final pass's block 2
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not (out / "export.partial").exists() and not side_files.exists()  # nothing left behind

    expected, resumed = expected_out / "export", out / "export"
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in expected.iterdir())
    assert _safetensors(resumed / "model.safetensors") == _safetensors(expected / "model.safetensors")
    for name in ("generation_config.json", "tokenizer.json"):
        assert (resumed / name).read_bytes() == (expected / name).read_bytes(), name
    for name in ("config.json", "report.json"):
        want, got = (_without_timings(json.loads((d / name).read_text())) for d in (expected, resumed))
        if name == "report.json":
            assert got.pop("run_id") != want.pop("run_id")  # two runs ...
            assert (got.pop("export_dir"), want.pop("export_dir")) == (str(resumed), str(expected))
        assert got == want, name  # ... with the same result: settings, kept fraction, bits, accuracies
