import json
import math
from pathlib import Path

import quantize
from bench.quant_quality import difference_se, main
from lit_tacq.calibration import read_task_records

ROOT = Path(__file__).resolve().parents[2]


def _with_alternatives(tiny, tmp_path: Path) -> str:
    """The tiny task file with an alternative answer (the previous record's) in every record."""
    records = read_task_records(tiny.task_qa)
    path = tmp_path / "task_qa_alt.jsonl"
    path.write_text("".join(json.dumps({**r, "alternative": records[i - 1]["answer"]}) + "\n"
                            for i, r in enumerate(records)))
    return str(path)


def _quantize_py_report(tiny, task_qa: str, tmp_path: Path, bits: int) -> dict:
    """``quantize.py fit`` on the demo config at ``bits``, with the bench's calibration budget and its
    perplexity text."""
    export = tmp_path / "cli_export"
    quantize.main([
        "fit", "--config", str(ROOT / "configs" / "demo_tacq.yaml"),
        "--model.model_name_or_path", tiny.model_dir, "--data.source", task_qa, "--data.token_budget", "300",
        "--data.eval_text", tiny.corpus, "--data.window", "32", "--data.eval_windows", "20",
        "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "cli"),
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks.init_args.export_dir", str(export),
        "--trainer.callbacks.init_args.progress", "false", "--trainer.callbacks.init_args.quant.bits", str(bits),
    ])
    return json.loads((export / "report.json").read_text())


def test_bench_rows_are_what_quantize_py_gives(tiny, tmp_path):
    out = tmp_path / "quant_quality.json"
    task_qa = _with_alternatives(tiny, tmp_path)
    result = main(["--model", tiny.model_dir, "--task-qa", task_qa, "--corpus", tiny.corpus, "--bits", "2",
                   "--methods", "gptq", "tacq", "tacq_general", "tacq_mixed", "nf4", "--token-budget", "300", "--window", "32",
                   "--timing-shapes", "64x32", "--out", str(out), "--threads", "1"])
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["gptq", "tacq", "tacq_general", "tacq_mixed", "bnb_nf4"]
    rows = {r["method"]: r for r in result["rows"]}

    report = _quantize_py_report(tiny, task_qa, tmp_path, bits=2)
    tacq = rows["tacq"]
    assert tacq["settings"] == report["quant"]
    for key in ("bits_measured", "bits_accounted", "kept_fraction"):
        assert tacq[key] == report[key], key
    assert tacq["accuracy"] == report["quantized"]["accuracy"]
    for key in ("answer_nll", "preference", "perplexity"):  # to the bit: the same weights, the same scorer
        assert tacq[key] == report["quantized"][key], key
    assert saved["perplexity_windows"] == 20 and set(saved["fp32"]) >= {"preference", "perplexity"}
    assert all(0 <= r["preference"] <= 1 and r["perplexity"] > 1 for r in rows.values())  # every row, NF4 too
    assert tacq["calibration_tokens"] == report["calibration"]["tokens"] == saved["calibration"]["task_tokens"]
    assert sum(map(int, tacq["correct"])) == round(tacq["accuracy"] * saved["evaluation_facts"])

    general = rows["tacq_general"]
    assert general["calibration"] == "general"  # windows of 32 tokens, as many tokens as the task examples at most
    windows = saved["calibration"]["general_windows"]
    assert general["calibration_examples"] == windows == saved["calibration"]["task_tokens"] // 32
    mixed = rows["tacq_mixed"]  # half of the 300-token budget as windows of 32: five, then facts up to the budget
    assert mixed["calibration"] == "mixed" and mixed["settings"] == tacq["settings"]
    assert 160 < mixed["calibration_tokens"] <= 300 and mixed["calibration_examples"] > 5
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
