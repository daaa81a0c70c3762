import json
from pathlib import Path

import pytest
import torch

import quantize
from lit_tacq.io import load_quantized, measured_bits_per_weight, quantized_modules

ROOT = Path(__file__).resolve().parents[2]


def test_cli_quantizes_exports_and_the_export_generates(tiny, tmp_path):
    export = tmp_path / "export"
    quantize.main([
        "fit", "--config", str(ROOT / "configs" / "demo_tacq.yaml"),
        "--model.model_name_or_path", tiny.model_dir,
        "--data.source", tiny.task_qa,
        "--data.token_budget", "300",
        "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks.init_args.export_dir", str(export),
        "--trainer.callbacks.init_args.progress", "false",
    ])
    report = json.loads((export / "report.json").read_text())
    assert report["quant"]["bits"] == 3 and report["calibration"]["tokens"] <= 300
    assert report["bits_measured"] == pytest.approx(measured_bits_per_weight(export))
    assert 0 <= report["quantized"]["accuracy"] <= 1 and report["quantized"]["answer_nll"] > 0

    model = load_quantized(export)
    assert len(quantized_modules(model)) == 14
    prompt = torch.tensor([[model.config.bos_token_id, 5, 6, 7]])
    generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


NO_CALLBACK = """
trainer:
  accelerator: cpu
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: callbacks.run_checkpoint.RunCheckpoint
model:
  model_name_or_path: {model}
data:
  source: {task_qa}
  token_budget: 300
"""


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the CLI gets as far as loading the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the configuration was refused")

    monkeypatch.setattr("lit_tacq.module.load_causal_lm", refuse)


def test_cli_refuses_a_config_without_the_tacq_callback(tiny, tmp_path, no_model_loading):
    config = tmp_path / "no_callback.yaml"
    config.write_text(NO_CALLBACK.format(root=tmp_path / "run", model=tiny.model_dir, task_qa=tiny.task_qa))
    with pytest.raises(ValueError, match="needs exactly one callbacks.tacq.TaCQCallback in trainer.callbacks, found 0"):
        quantize.main(["fit", "--config", str(config)])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_refuses_bad_quant_settings_before_loading_the_model(tiny, tmp_path, no_model_loading):
    with pytest.raises(ValueError, match="Does not validate") as error:
        quantize.main(["fit", "--config", str(ROOT / "configs" / "demo_tacq.yaml"),
                       "--model.model_name_or_path", tiny.model_dir, "--data.source", tiny.task_qa,
                       "--trainer.default_root_dir", str(tmp_path),
                       "--trainer.callbacks.init_args.quant.group_size", "0"])
    assert "group_size=0, expected None (one grid per row) or a positive integer" in str(error.value)
