import json
import math

import torch

from bench.quant_quality import difference_se, main


def test_bench_runs_end_to_end_on_a_tiny_model(tiny, tmp_path):
    out = tmp_path / "quant_quality.json"
    result = main(["--model", tiny.model_dir, "--task-qa", tiny.task_qa, "--corpus", tiny.corpus, "--bits", "2",
                   "--methods", "gptq", "tacq", "tacq_general", "nf4", "--token-budget", "300", "--window", "32",
                   "--timing-shapes", "64x32", "--out", str(out),
                   "--threads", str(torch.get_num_threads())])  # keep the suite's thread count
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["gptq", "tacq", "tacq_general", "bnb_nf4"]
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["tacq"]["bits_measured"] > rows["gptq"]["bits_measured"]  # the kept weights cost bits
    assert rows["tacq"]["gradient_seconds"] > 0 and rows["gptq"]["gradient_seconds"] == 0
    assert 4 < rows["bnb_nf4"]["bits_measured"] < 8
    assert saved["linear_timing_cpu"] and saved["verdicts"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_paired_standard_error_uses_the_facts_the_methods_disagree_on():
    a, b = {"accuracy": 0.5, "correct": "1100"}, {"accuracy": 0.25, "correct": "1000"}
    # differences 0, 1, 0, 0: variance 1/4 - 1/16 over 4 facts
    assert math.isclose(difference_se(a, b, 4), math.sqrt((0.25 - 0.0625) / 4))
    assert difference_se(a, dict(a), 4) == 0.0  # same outcomes on every fact: no noise in the difference
    unpaired = math.sqrt((0.5 * 0.5 + 0.25 * 0.75) / 4)
    assert math.isclose(difference_se({"accuracy": 0.5}, {"accuracy": 0.25}, 4), unpaired)
