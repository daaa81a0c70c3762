"""Through the CLI: a 2-process CPU DDP run (gloo) scores like a 1-process run on the same edits.

Not bit-identical by design: each rank's SFT loss is a token mean over its own rows and, for CoRSA, each
rank takes its SAM ascent from its own gradient (the first pass is never synchronised), so the runs
agree within a tolerance rather than exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  default_root_dir: {out}
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: callbacks.edit_report.EditReport
      init_args: {{output_dir: {out}, plot: false}}
model:
  model_name_or_path: world:model
  method: {method}
  learning_rate: 2.0e-3
  lora_r: 4
  lora_alpha: 8
  generation: false
data:
  class_path: data.counterfact.CounterFactDataModule
  init_args:
    source: world:counterfact
    num_updates: 2
    edits_per_update: 8
    epochs_per_update: 4
    batch_size: {batch_size}
"""


def _fit(tmp_path: Path, name: str, method: str, *extra: str, batch_size: int = 8) -> dict:
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIG.format(out=out, method=method, batch_size=batch_size))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "train.py", "fit", "--config", str(config), *extra], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["lora", "corsa"])
def test_two_process_ddp_matches_one_process(tmp_path, method):
    single = _fit(tmp_path, "single", method)
    # two ranks of 4 see the same 8 edits per step as one process with batches of 8
    ddp = _fit(tmp_path, "ddp", method, "--trainer.devices", "2", "--trainer.strategy", "ddp", batch_size=4)
    assert [r["eval_round"] for r in ddp["rounds"]] == [0, 1]
    for name, value in single["summary"]["after_last_round"].items():
        assert ddp["summary"]["after_last_round"][name] == pytest.approx(value, abs=0.1), name
