import json

from bench.quant_quality import main


def test_bench_runs_end_to_end_on_a_tiny_model(tiny, tmp_path):
    out = tmp_path / "quant_quality.json"
    result = main(["--model", tiny.model_dir, "--task-qa", tiny.task_qa, "--corpus", tiny.corpus, "--bits", "2",
                   "--methods", "gptq", "tacq", "tacq_general", "nf4", "--token-budget", "300", "--window", "32",
                   "--timing-shapes", "64x32", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [r["method"] for r in saved["rows"]] == ["gptq", "tacq", "tacq_general", "bnb_nf4"]
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["tacq"]["bits_measured"] > rows["gptq"]["bits_measured"]  # the kept weights cost bits
    assert rows["tacq"]["gradient_seconds"] > 0 and rows["gptq"]["gradient_seconds"] == 0
    assert 4 < rows["bnb_nf4"]["bits_measured"] < 8
    assert saved["linear_timing_cpu"] and saved["verdicts"]
