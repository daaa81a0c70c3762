import json
import math
from pathlib import Path

import quantize
from bench.quant_quality import difference_se, main

ROOT = Path(__file__).resolve().parents[2]


def _quantize_py_report(tiny, tmp_path: Path, bits: int) -> dict:
    """``quantize.py fit`` on the demo config at ``bits``, with the bench's calibration budget."""
    export = tmp_path / "cli_export"
    quantize.main([
        "fit", "--config", str(ROOT / "configs" / "demo_tacq.yaml"),
        "--model.model_name_or_path", tiny.model_dir, "--data.source", tiny.task_qa, "--data.token_budget", "300",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "cli"),
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.export_dir", str(export),
        "--trainer.callbacks.init_args.progress", "false", "--trainer.callbacks.init_args.quant.bits", str(bits),
    ])
    return json.loads((export / "report.json").read_text())


def test_bench_rows_are_what_quantize_py_gives(tiny, tmp_path):
    out = tmp_path / "quant_quality.json"
    result = main(["--model", tiny.model_dir, "--task-qa", tiny.task_qa, "--corpus", tiny.corpus, "--bits", "2",
                   "--methods", "gptq", "tacq", "tacq_general", "nf4", "--token-budget", "300", "--window", "32",
                   "--timing-shapes", "64x32", "--out", str(out), "--threads", "1"])
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["gptq", "tacq", "tacq_general", "bnb_nf4"]
    rows = {r["method"]: r for r in result["rows"]}

    report = _quantize_py_report(tiny, tmp_path, bits=2)
    tacq = rows["tacq"]
    assert tacq["settings"] == report["quant"]
    for key in ("bits_measured", "bits_accounted", "kept_fraction"):
        assert tacq[key] == report[key], key
    assert tacq["accuracy"] == report["quantized"]["accuracy"]
    assert tacq["answer_nll"] == report["quantized"]["answer_nll"]  # to the bit: the same weights, the same scorer
    assert tacq["calibration_tokens"] == report["calibration"]["tokens"] == saved["calibration"]["task_tokens"]
    assert sum(map(int, tacq["correct"])) == round(tacq["accuracy"] * saved["evaluation_facts"])

    general = rows["tacq_general"]
    assert general["calibration"] == "general"  # windows of 32 tokens, as many tokens as the task examples at most
    windows = saved["calibration"]["general_windows"]
    assert general["calibration_examples"] == windows == saved["calibration"]["task_tokens"] // 32
    assert rows["gptq"]["calibration_seconds"] > 0  # the product runs the gradient epoch for every row
    assert tacq["bits_measured"] > rows["gptq"]["bits_measured"]  # the kept weights cost bits
    assert all(r["peak_rss_mb"] > 0 for r in rows.values())
    assert 4 < rows["bnb_nf4"]["bits_measured"] < 8 and rows["bnb_nf4"]["calibration_seconds"] is None
    assert saved["linear_timing_cpu"] and saved["verdicts"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_paired_standard_error_uses_the_facts_the_methods_disagree_on():
    a, b = {"accuracy": 0.5, "correct": "1100"}, {"accuracy": 0.25, "correct": "1000"}
    # differences 0, 1, 0, 0: variance 1/4 - 1/16 over 4 facts
    assert math.isclose(difference_se(a, b, 4), math.sqrt((0.25 - 0.0625) / 4))
    assert difference_se(a, dict(a), 4) == 0.0  # same outcomes on every fact: no noise in the difference
    unpaired = math.sqrt((0.5 * 0.5 + 0.25 * 0.75) / 4)
    assert math.isclose(difference_se({"accuracy": 0.5}, {"accuracy": 0.25}, 4), unpaired)
