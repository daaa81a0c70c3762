"""Quantization quality on the embedded world model (or a real one): TaCQ against its baselines and ablations.

    python -m bench.quant_quality --threads 1      # 2, 3 and 4 bits, every method (CPU, about 10 minutes)
    python -m bench.quant_quality --bits 2 3 --methods rtn gptq tacq
    python -m bench.quant_quality --model models/smollm2-135m-instruct \
        --task-qa data/real/counterfact_true_facts.jsonl --window 512 \
        --corpus pypi:exllamav2==0.3.2/exllamav2/conversion/standard_cal_data/wiki.utf8   # SmolLM2

Every method row is a run of the product as ``python quantize.py fit`` runs it (configs/demo_tacq.yaml on the
CPU, without checkpoints): a Lightning Trainer fits ``CalibrationModule`` for one epoch on the examples
``CalibrationDataModule`` builds, and ``TaCQCallback``, holding the row's ``QuantSettings``, quantizes, exports
to a temporary directory, reloads the export and scores it. Rows differ only in their settings and data: task
mode on the task file's calibration split; ``tacq_general``: general mode, windows of the corpus's ``train``
part (the other 90 % of its lines) with as many tokens as the task examples hold; ``tacq_mixed``: task mode with
``--general-share`` of the same token budget as windows of that part (``CalibrationDataModule.general_source``),
the task examples filling the rest. Every row, the fp32 one too,
is scored on the task file's evaluation split (accuracy, answer NLL, and preference when its records carry an
``alternative``) and by perplexity on the corpus's held-out ``test`` part (every tenth block of its lines,
``lit_tacq.calibration``), which no calibration sees. Metrics, bits, seconds and peak memory are the callback's
report, scored on the reloaded export; the per-fact outcomes behind the paired standard errors of the verdicts
come from scoring that export's pairs again with the same scorer (``lit_common.scoring``), which must
reproduce the report's accuracy.

The product runs the calibration epoch (one backward pass per example) for every row, also for those whose
saliency reads no gradient (rtn, gptq, gptq_g128, gptq+magnitude/hessian/random): its time is reported apart
from the quantization's. Each row runs in a fresh process forked from a server that has only imported the code,
so the callback's memory probe (``ru_maxrss``, a process-lifetime peak) is that row's own. bitsandbytes NF4 is
the external baseline: its own quantization (``Linear4bit``), the same scorer, the same probe, in its own
process. Then the CPU time of a packed linear against the fp32 matmul. Prints a markdown table and writes
``bench/results/quant_quality.json`` and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from tqdm.auto import tqdm

from callbacks.tacq import TaCQCallback, peak_memory_mb
from lit_common.layers import decoder_linears
from lit_common.sources import load_causal_lm, resolve
from lit_tacq.calibration import CalibrationDataModule
from lit_tacq.evaluation import EvaluationData, scored_evaluation
from lit_tacq.io import load_quantized
from lit_tacq.module import CalibrationModule
from lit_tacq.pipeline import QuantSettings
from lit_tacq.qlinear import QuantLinear
from lit_tacq.quantizer import rtn_quantize

RESULTS = Path(__file__).resolve().parent / "results" / "quant_quality.json"
NF4 = "nf4"

# name -> (QuantSettings overrides, calibration data); every method keeps p of the weights unless "none"
METHODS: dict[str, tuple[dict[str, Any], str]] = {
    "rtn": ({"saliency": "none", "quantizer": "rtn"}, "task"),
    "gptq": ({"saliency": "none"}, "task"),
    "gptq_g128": ({"saliency": "none", "group_size": 128}, "task"),
    "gptq+magnitude": ({"saliency": "magnitude"}, "task"),
    "gptq+hessian": ({"saliency": "hessian"}, "task"),
    "gptq+random": ({"saliency": "random"}, "task"),
    "tacq": ({"saliency": "tacq"}, "task"),
    "tacq_general": ({"saliency": "tacq"}, "general"),
    "tacq_mixed": ({"saliency": "tacq"}, "mixed"),  # facts and general text under one budget
    # SpQR (lit_tacq/spqr.py): β1 = β2 = 16, 3-bit statistics, its own outliers, p of each layer
    "spqr": ({"saliency": "none", "quantizer": "spqr", "group_size": 16}, "task"),
    "spqr_g32": ({"saliency": "none", "quantizer": "spqr", "group_size": 32}, "task"),  # fewer bits: beside TaCQ's
    # SliM-LLM (lit_tacq/slim_llm.py): bits - 1 / bits / bits + 1 per column group. Groups of 128 as in the paper leave
    # the world model's 64-wide layers one group each (only the 256-wide down projections can mix); groups of 32 let
    # every layer mix, at 1 bit/weight of grids
    "slim_llm": ({"saliency": "none", "quantizer": "slim_llm", "group_size": 128}, "task"),
    "slim_llm_g32": ({"saliency": "none", "quantizer": "slim_llm", "group_size": 32}, "task"),
    "ablation |g|*|dW|": ({"saliency": "grad_delta"}, "task"),
    "ablation |W|*|g|": ({"saliency": "weight_grad"}, "task"),
}
# methods defined at some bit widths only: SliM-LLM needs bits - 1 and bits + 1 to be packable widths
METHOD_BITS: dict[str, tuple[int, ...]] = {"slim_llm": (2, 3), "slim_llm_g32": (2, 3)}

TABLE_NOTE = ("calib s: the product's calibration epoch, one backward pass per example, which it runs for every "
              "row, also where the saliency reads no gradient; quant s: the pipeline's stages (reference pass, mask, "
              "final pass, with its per-block work directory); peak RSS: the callback's probe (ru_maxrss) in the "
              "row's own process at the end of quantization (bnb_nf4: after its conversion)")


@dataclass(frozen=True)
class Job:
    """One row: a method at a bit width, its quantization settings (None for NF4) and data module settings."""

    method: str
    bits: int
    settings: QuantSettings | None
    data: dict[str, Any]
    model: str
    threads: int
    seed: int


def scored(model: nn.Module, tokenizer: Any, data: EvaluationData) -> dict[str, Any]:
    """The evaluation's metrics (``lit_tacq.evaluation``) and the per-fact outcomes as a 0/1 string (for
    paired comparisons)."""
    metrics, correct = scored_evaluation(model, tokenizer, data)
    return {**metrics, "correct": "".join("01"[c] for c in correct)}


def _quiet(threads: int) -> None:
    """A row's process: the bench's thread count, and none of the per-fit chatter of Lightning and transformers."""
    torch.set_num_threads(threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module=r"lightning\.pytorch\.utilities\._pytree")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")  # quantize.py
    warnings.filterwarnings("ignore", message=r".*does not have many workers")


def calibrate_and_export(job: Job, root: Path) -> tuple[TaCQCallback, CalibrationDataModule]:
    """``quantize.py fit`` with this row's settings, less its checkpoints and its fp32 evaluation (the parent
    scores the fp32 model once): the fit's callback holds the report of the export."""
    L.seed_everything(job.seed, verbose=False)
    callback = TaCQCallback(export_dir=str(root / "export"), quant=job.settings, evaluate_fp=False, progress=False)
    data = CalibrationDataModule(**job.data)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), callbacks=[callback])
    trainer.fit(CalibrationModule(job.model), datamodule=data)
    return callback, data


def product_row(job: Job) -> dict[str, Any]:
    """One method row from the callback's report, with the per-fact outcomes of its reloaded export."""
    with tempfile.TemporaryDirectory() as root:
        callback, data = calibrate_and_export(job, Path(root))
        pairs = EvaluationData(pairs=data.evaluation_data().pairs)  # the report has the rest
        outcomes = scored(load_quantized(callback.export_dir), data.tokenizer, pairs)
    report = callback.report
    if outcomes["accuracy"] != report["quantized"]["accuracy"]:
        raise RuntimeError(f"{job.method} {job.bits}-bit: rescoring the export gives accuracy {outcomes['accuracy']}, "
                           f"the callback reported {report['quantized']['accuracy']}")
    calibration = report["calibration"]
    return {
        "method": job.method, "bits": job.bits, "settings": report["quant"],
        "calibration": "mixed" if calibration["general_share"] else calibration["mode"],
        "calibration_examples": calibration["examples"], "calibration_tokens": calibration["tokens"],
        "calibration_seconds": calibration["seconds"], "quantization_seconds": report["quantization_seconds"],
        "stage_seconds": report["stage_seconds"], "peak_rss_mb": report["peak_rss_mb"],
        "kept_fraction": report["kept_fraction"], "bits_measured": report["bits_measured"],
        "bits_accounted": report["bits_accounted"], **report["quantized"], "correct": outcomes["correct"],
    }


def to_nf4(model: nn.Module) -> None:
    """Every decoder Linear as a bitsandbytes NF4 Linear4bit (blocks of 64, double-quantized statistics)."""
    import bitsandbytes as bnb

    for name, linear in decoder_linears(model).items():
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        model.set_submodule(name, layer.to("cpu"))  # quantization happens on the move to a device


def nf4_bits(model: nn.Module, names: list[str]) -> float:
    """Bits per weight of the NF4 layers: every tensor of their state dicts except the bias."""
    n_bytes = n_weights = 0
    for name in names:
        layer = model.get_submodule(name)
        n_weights += layer.in_features * layer.out_features
        n_bytes += sum(t.numel() * t.element_size() for key, t in layer.state_dict().items() if key != "bias")
    return 8 * n_bytes / n_weights


def nf4_row(job: Job) -> dict[str, Any]:
    """The external baseline, quantized by bitsandbytes itself, scored on the data module's evaluation facts."""
    data = CalibrationDataModule(**job.data)
    model = load_causal_lm(job.model)
    names = list(decoder_linears(model))
    start = time.perf_counter()
    to_nf4(model)
    seconds = time.perf_counter() - start
    return {"method": "bnb_nf4", "bits": 4, "calibration": None, "calibration_seconds": None,
            "quantization_seconds": seconds, **peak_memory_mb(), "bits_accounted": None,
            "bits_measured": nf4_bits(model, names), **scored(model, data.tokenizer, data.evaluation_data())}


def run_row(job: Job) -> dict[str, Any]:
    _quiet(job.threads)
    return nf4_row(job) if job.method == NF4 else product_row(job)


def in_own_processes(jobs: list[Job]) -> list[dict[str, Any]]:
    """``run_row`` for each job, one at a time, each in a fresh process forked from a server that has only imported
    the product: a row's peak memory is its own (``ru_maxrss`` never goes down) and its timings see an idle box.
    Not this module: under ``python -m`` each child runs it as its ``__main__`` (cheap once the product is in)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["callbacks.tacq", "lit_tacq.module"])
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        return list(tqdm(pool.map(run_row, jobs), total=len(jobs), desc="rows"))


def data_settings(args: argparse.Namespace) -> tuple[CalibrationDataModule, dict[str, dict[str, Any]]]:
    """CalibrationDataModule settings per calibration mode, all scored on the task file's evaluation facts and
    the corpus's held-out part; general mode calibrates on the corpus's other part with the task examples'
    token count (hence the built task data module, returned too), mixed mode on both under the task budget."""
    common = {"model_name_or_path": args.model, "seed": args.seed, "eval_source": args.task_qa,
              "eval_split": "evaluation", "eval_max_items": args.eval_max, "eval_text": args.corpus,
              "eval_text_split": "test", "window": args.window, "eval_windows": args.eval_windows}
    task = {"source": args.task_qa, "mode": "task", "split": "calibration", "token_budget": args.token_budget,
            **common}
    module = CalibrationDataModule(**task)
    module.setup()
    tokens = sum(len(e) for e in module.examples)
    general = {"source": args.corpus, "mode": "general", "split": "train", "token_budget": tokens, **common}
    mixed = {**task, "general_source": args.corpus, "general_share": args.general_share}
    return module, {"task": task, "general": general, "mixed": mixed}


def time_call(fn: Any, repeats: int) -> float:
    """Median wall time of ``fn()`` in microseconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def linear_timings(shapes: list[tuple[int, int]], tokens: list[int], bits: int = 3) -> list[dict[str, Any]]:
    """CPU time of QuantLinear's forward (decode + matmul, the PyTorch path) against the fp32 matmul."""
    rows = []
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features)
        packed = QuantLinear.from_result(rtn_quantize(weight, bits, mse=False), bias=None)
        for n in tokens:
            x = torch.randn(n, in_features)
            repeats = max(5, min(200, int(2e8 / (out_features * in_features * max(n, 8)))))
            with torch.no_grad():
                fp32 = time_call(lambda: F.linear(x, weight), repeats)
                quant = time_call(lambda: packed(x), repeats)
            rows.append({"out": out_features, "in": in_features, "tokens": n, "bits": bits,
                         "fp32_us": fp32, "packed_us": quant, "slowdown": quant / fp32})
    return rows


def share_of_fp(accuracy: float, fp: dict[str, float]) -> float:
    """Accuracy as a fraction of the fp32 model's (NaN when the fp32 model knows nothing)."""
    return accuracy / fp["accuracy"] if fp["accuracy"] > 0 else float("nan")


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(fp: dict[str, float], rows: list[dict[str, Any]]) -> str:
    """One row per method and the fp32 row; preference and perplexity are "-" where the data has none."""
    lines = [("| method | bits | measured bits/w | accounted bits/w | accuracy | % of fp | answer NLL | preference | "
              "perplexity | calib s | quant s | peak RSS MB |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| fp32 | 32 | 32 | 32 | {fp['accuracy']:.3f} | 100.0 | {fp['answer_nll']:.3f} | "
             f"{_cell(fp.get('preference'), '.3f')} | {_cell(fp.get('perplexity'), '.2f')} | - | - | - |"]
    for r in rows:
        method = r["method"].replace("|", "\\|")  # "ablation |g|*|dW|" must not split the table's cells
        lines.append(
            f"| {method} | {r['bits']} | {r['bits_measured']:.3f} | {_cell(r['bits_accounted'], '.3f')} | "
            f"{r['accuracy']:.3f} | {100 * share_of_fp(r['accuracy'], fp):.1f} | {r['answer_nll']:.3f} | "
            f"{_cell(r.get('preference'), '.3f')} | {_cell(r.get('perplexity'), '.2f')} | "
            f"{_cell(r['calibration_seconds'], '.1f')} | {r['quantization_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def plot_task_metric_vs_bits(result: dict[str, Any], path: Path) -> None:
    """The task metric against measured bits per weight, one line per method across its bit widths: the
    preference of the true object where the facts carry counterfactuals (a small real model gets few answers
    exactly right, so its accuracy has no signal), else the accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = "preference" if "preference" in result["fp32"] else "accuracy"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    colors = plt.get_cmap("tab20").colors  # pairs of a dark and a light shade: the 10 dark ones, then the light
    markers = "os^Dv"  # a new marker with each ten methods
    for i, method in enumerate(methods):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["bits_measured"])
        color, marker = colors[(2 * i + i // 10) % 20], markers[i // 10 % 5]
        style = ({"lw": 2.5, "color": "k", "marker": "o"} if method == "tacq" else
                 {"lw": 1, "alpha": 0.8, "color": color, "marker": marker})
        ax.plot([r["bits_measured"] for r in rows], [r[metric] for r in rows], label=method, **style)
    ax.axhline(result["fp32"][metric], ls=":", color="gray", label="fp32")
    ax.set_xlabel("measured bits per decoder-Linear weight")
    ax.set_ylabel(f"task {metric} ({result['evaluation_facts']} held-out facts)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def difference_se(a: dict[str, Any], b: dict[str, Any], n: int) -> float:
    """Standard error of the accuracy difference of two scored rows over the same n facts: paired, from
    the per-fact outcomes (the facts both get right or both get wrong carry no noise), or, for rows
    without outcomes, the conservative unpaired binomial one."""
    if "correct" in a and "correct" in b:
        d = torch.tensor([int(x) - int(y) for x, y in zip(a["correct"], b["correct"])], dtype=torch.float64)
        return math.sqrt(max(float((d * d).mean() - d.mean() ** 2), 0.0) / n)
    p1, p2 = a["accuracy"], b["accuracy"]
    return math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / n)


def verdicts(fp: dict[str, float], rows: list[dict[str, Any]], n_facts: int) -> list[str]:
    """The issue's targets, checked on the measured rows; a difference counts only beyond twice its
    standard error (:func:`difference_se`)."""
    notes = [f"noise: {n_facts} facts, one fact = {100 / n_facts:.2f} points; a difference is called only "
             "beyond 2 standard errors of the paired (fact-by-fact) difference"]
    by = {(r["method"], r["bits"]): r for r in rows}
    for bits in sorted({r["bits"] for r in rows}):
        tacq = by.get(("tacq", bits))
        if tacq is None:
            continue
        share = share_of_fp(tacq["accuracy"], fp)
        grid_overhead = tacq["bits_accounted"] - bits - 32 * tacq["kept_fraction"]
        line = (f"{bits}-bit TaCQ: {100 * share:.1f} % of fp accuracy at {tacq['bits_measured']:.2f} measured bits "
                f"(scale + zero cost {grid_overhead:.2f} bits/weight on this model's narrow layers, 0.008 at "
                "d_in = 4096)")
        if bits == 3:
            line += f"; target >= 95 % at ~3.1 bits: {'met' if share >= 0.95 else 'NOT met'}"
        notes.append(line)
        for rival in ("gptq", "rtn", "gptq_g128", "gptq+magnitude", "gptq+hessian", "gptq+random", "tacq_general",
                      "tacq_mixed", "spqr", "spqr_g32", "slim_llm", "slim_llm_g32"):
            other = by.get((rival, bits))
            if other is not None:
                delta = tacq["accuracy"] - other["accuracy"]
                two_se = 2 * difference_se(tacq, other, n_facts)
                verdict = "ahead" if delta > two_se else "behind" if delta < -two_se else "within noise"
                notes.append(f"  vs {rival} ({other['bits_measured']:.2f} bits, {other['accuracy']:.3f}): "
                             f"{100 * delta:+.1f} +- {100 * two_se:.1f} points, {verdict}")
        gap = tacq["bits_measured"] / tacq["bits_accounted"] - 1
        notes.append(f"  stored bits vs the accounting of docs/tacq.md §2: {100 * gap:+.1f} % (target within 2 %; "
                     "any gap is code padding to 32 codes per row and zero fillers between far-apart kept weights)")
        gptq = by.get(("gptq", bits))
        if gptq is not None and fp["accuracy"] - gptq["accuracy"] <= 2 * difference_se(fp, gptq, n_facts):
            notes.append(f"  plain GPTQ stays within noise of fp32 at {bits} bits: this setting cannot separate "
                         "the methods (the 2-bit rows are the informative ones)")
    return notes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="world:model")
    parser.add_argument("--task-qa", default="world:task_qa")
    parser.add_argument("--corpus", default="world:corpus")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, NF4], choices=[*METHODS, NF4])
    parser.add_argument("--fraction", type=float, default=0.0035)
    parser.add_argument("--token-budget", type=int, default=128 * 2048)
    parser.add_argument("--general-share", type=float, default=0.5,
                        help="tacq_mixed: the share of the token budget that is windows of the corpus")
    parser.add_argument("--window", type=int, default=128,
                        help="tokens per window of the corpus, calibration and perplexity (the world model has 256 "
                             "positions)")
    parser.add_argument("--eval-windows", type=int, default=20, help="perplexity windows of the corpus's test part")
    parser.add_argument("--eval-max", type=int, default=None, help="cap on evaluation facts")
    parser.add_argument("--timing-shapes", nargs="+", default=None, metavar="OUTxIN",
                        help="Linear shapes to time (default: the model's MLP up projection and 4096x4096)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: draw the rows of these result files (one model, the same facts, e.g. one "
                             "file per bit width) in one plot, written to --out's .png")
    return parser.parse_args(argv)


def jobs_of(args: argparse.Namespace, data: dict[str, dict[str, Any]]) -> list[Job]:
    """Every (method, bits) row in order, then NF4 (4 bits only); a method at a width it is not defined for is left
    out, with a line saying so."""
    jobs = []
    for bits in args.bits:
        for method in (m for m in args.methods if m != NF4):
            if bits not in METHOD_BITS.get(method, (bits,)):
                print(f"{method}: no {bits}-bit row (defined at {METHOD_BITS[method]} bits)")
                continue
            overrides, mode = METHODS[method]
            settings = QuantSettings(bits=bits, fraction=args.fraction, seed=args.seed, **overrides)
            jobs.append(Job(method, bits, settings, data[mode], args.model, args.threads, args.seed))
    if NF4 in args.methods:
        jobs.append(Job(NF4, 4, None, data["task"], args.model, args.threads, args.seed))
    return jobs


def replot(files: list[Path], path: Path) -> dict[str, Any]:
    """One plot of several result files' rows; they must share the fp32 scores (the same model and facts)."""
    results = [json.loads(f.read_text()) for f in files]
    for f, r in zip(files[1:], results[1:]):
        if r["fp32"] != results[0]["fp32"]:
            raise ValueError(f"{f} scores another fp32 model or other facts than {files[0]}: not one plot")
    merged = {**results[0], "rows": [row for r in results for row in r["rows"]]}
    plot_task_metric_vs_bits(merged, path)
    print(f"wrote {path}")
    return merged


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.replot:
        return replot(args.replot, args.out.with_suffix(".png"))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    task, data = data_settings(args)
    evaluation = task.evaluation_data()
    pairs = evaluation.pairs
    fp_model = load_causal_lm(args.model)
    fp = scored(fp_model, task.tokenizer, evaluation)
    task_tokens = sum(len(e) for e in task.examples)
    print(f"fp32: {', '.join(f'{k} {v:.3f}' for k, v in fp.items() if k != 'correct')} on {len(pairs)} held-out "
          f"facts and {len(evaluation.windows)} text windows; calibration: {len(task.examples)} task examples "
          f"({task_tokens} tokens)")

    rows = in_own_processes(jobs_of(args, data))
    general = next((r for r in rows if r["calibration"] == "general"), None)
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.timing_shapes or []]
    config = fp_model.config
    timing = linear_timings(shapes or [(config.intermediate_size, config.hidden_size), (4096, 4096)], [1, 64])
    result = {
        "model": resolve(args.model),
        "model_card": _card(args.model),
        "fp32": fp,
        "evaluation_facts": len(pairs),
        "calibration": {"task_examples": len(task.examples), "task_tokens": task_tokens,
                        "general_windows": general["calibration_examples"] if general else 0, "window": args.window},
        "perplexity_windows": len(evaluation.windows),
        "fraction": args.fraction,
        "threads": args.threads,
        "rows": rows,
        "table_note": TABLE_NOTE,
        "linear_timing_cpu": timing,
        "total_seconds": time.perf_counter() - started,
    }
    result["verdicts"] = verdicts(fp, [r for r in rows if r["method"] != "bnb_nf4"], len(pairs))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot_task_metric_vs_bits(result, args.out.with_suffix(".png"))

    print(markdown_table(fp, rows))
    print(f"\n{TABLE_NOTE}")
    print("\nCPU time of one linear, PyTorch path (decode all codes, then matmul) vs fp32:")
    for t in timing:
        print(f"  {t['out']}x{t['in']}, {t['tokens']} tokens, {t['bits']}-bit: fp32 {t['fp32_us']:.0f} us, "
              f"packed {t['packed_us']:.0f} us ({t['slowdown']:.1f}x)")
    print("\n" + "\n".join(result["verdicts"]))
    print(f"\nwrote {args.out} ({result['total_seconds'] / 60:.1f} min)")
    return result


def _card(model: str) -> dict[str, Any] | None:
    path = Path(resolve(model)) / "world_card.json"
    return json.loads(path.read_text()) if path.exists() else None


if __name__ == "__main__":
    main()
