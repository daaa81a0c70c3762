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
