"""Edit, then quantize: how much of an edited model's edits survive RTN, GPTQ and TaCQ at 2, 3 and 4 bits.

    python -m bench.edit_then_quantize run --seeds 0 1      # the world model (CPU, one thread a job)
    python -m bench.edit_then_quantize run --target smollm2 --seeds 0 --bits 2 3 --methods rtn gptq tacq_general tacq_edits
    python -m bench.edit_then_quantize score runs/demo_edit_then_tacq/export   # one export, as quantize.py wrote it

``run``, per seed: the target's CoRSA edit (``TARGETS``: the world's ``configs/demo_counterfact.yaml`` or
``configs/smollm2_counterfact.yaml``, 5 rounds x 20 edits, with the seed as run seed and record shuffle seed)
writes its adapter; then every (method, bits) row is ``python quantize.py fit`` on the target's edit-then-quantize
config (``configs/demo_edit_then_tacq.yaml``, ``configs/smollm2_edit_then_tacq.yaml``) with that adapter and the
row's settings (the config the row ran is kept beside its export): the adapter merged into the base, calibrated,
quantized, saved, and reloaded with ``load_quantized``. Every score is of that reloaded export; the edited fp32
model is the base with the same adapter merged (``lit_tacq.module.merge_adapter``, what the rows quantize), the
base the unedited model. Methods (``METHODS``): ``rtn`` and ``gptq`` keep no weight in 16 bits, ``tacq_general``
calibrates on general text (the world: 14,848 tokens of its pretraining corpus, as in ``bench/quant_quality.py``;
SmolLM2: 4,096 tokens of exllamav2's ``wiki.utf8``; the same for rtn / gptq), ``tacq_edits`` on the edits alone
(every rewrite and paraphrase prompt with its new answer), ``tacq_edits_task`` on the edits and as many tokens
again of the target's partner data (``edit_share`` 0.5; the world: task-QA facts; SmolLM2: ``wiki.utf8``, because
its task file holds the old answers of edited records); ``gptq_edits`` is GPTQ on the edits alone (what the edit
calibration does without kept weights).
Every row names the edits (``data.edits``; ``edit_share`` 0 where it does not calibrate on them), so every
export records the adapter and the edits it carries.

**Edit metrics** are the editing runs' own (``lit_corsa.evaluation.ProbeEvaluator``: ES / PS / NS, token
accuracies, greedy generation) over every edit in one round (as ``train.py validate`` scores a saved adapter),
with the records rebuilt by the editing data module named in the export's record and checked against the
record ids it lists, and generating as many tokens as the target's editing config does. Locality token
agreement compares with the unedited base (``EditedAndBase``). The task metric is the callback's: teacher-forced
accuracy on the target's task-QA evaluation facts (and, where they carry a counterfactual, the preference of the
true object), scored on the reloaded export.

Why this glue lives here: ``lit_tacq`` and ``lit_corsa`` never import each other (README), yet scoring a
quantized edited model needs both (TaCQ's export, CoRSA's edit metrics). The products' shared pieces
(the edit data modules in ``data/``, peft's adapter format) carry everything across; only this bench, which may
import both, joins the packed model to the edit scorer.

Writes ``bench/results/edit_then_quantize.json`` after every row (``"complete": false`` until the last) and
prints a markdown table: mean ± std over seeds, and the share of the edited fp model's ES and PS that survives.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from data.base import EditDataModule
from lit_common.sources import load_causal_lm
from lit_corsa.evaluation import ProbeEvaluator, metric_names
from lit_corsa.settings import EvaluationSettings
from lit_tacq.calibration import CalibrationDataModule
from lit_tacq.evaluation import evaluate
from lit_tacq.io import load_quantized
from lit_tacq.module import merge_adapter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
EDIT_COLUMNS = ("ES", "PS", "NS", "reliability_token_acc", "generality_token_acc", "locality_token_acc",
                "reliability_gen", "generality_gen")
WIKI = "pypi:exllamav2==0.3.2/exllamav2/conversion/standard_cal_data/wiki.utf8"
# one scoring at a time: loading models in two threads at once gave one of them a broken unedited base (its
# locality token agreement came out 0.006 instead of 0.406; models load under process-wide init contexts)
SCORING = threading.Lock()


@dataclass(frozen=True)
class Target:
    """One model the benchmark runs on: its editing and edit-then-quantize configs, and the calibration data the
    rows swap in (``general``: general text; ``partner``: what ``tacq_edits_task`` mixes with the edits, and the
    source whose evaluation facts the task metric is scored on)."""

    edit_config: Path
    quant_config: Path
    general: dict[str, Any]
    partner: dict[str, Any]

    @cached_property
    def config(self) -> dict[str, Any]:
        """The editing config, read once."""
        return yaml.safe_load(self.edit_config.read_text())

    @property
    def model(self) -> str:
        return self.config["model"].get("model_name_or_path", "world:model")

    @property
    def run_name(self) -> str:
        return self.config["trainer"]["logger"]["init_args"]["name"]

    @property
    def evaluation(self) -> EvaluationSettings:
        """The editing config's evaluation settings (its generation length), for the edit metrics."""
        return EvaluationSettings(**self.config["model"].get("evaluation", {}))


TARGETS = {
    "world": Target(
        ROOT / "configs" / "demo_counterfact.yaml", ROOT / "configs" / "demo_edit_then_tacq.yaml",
        general={"source": "world:corpus", "mode": "general", "split": "train", "window": 128,
                 "token_budget": 116 * 128, "eval_source": "world:task_qa"},  # the quantization bench's 14,848 tokens
        partner={"source": "world:task_qa", "mode": "task", "split": "calibration"}),
    "smollm2": Target(
        ROOT / "configs" / "smollm2_counterfact.yaml", ROOT / "configs" / "smollm2_edit_then_tacq.yaml",
        general={"source": WIKI, "mode": "general", "split": "train", "window": 512, "token_budget": 8 * 512,
                 "eval_source": "data/real/counterfact_true_facts.jsonl"},
        partner={"source": WIKI, "mode": "general", "split": "train", "window": 512,
                 "eval_source": "data/real/counterfact_true_facts.jsonl"}),
}

# name -> (QuantSettings overrides, the target's data it calibrates on, edit share: 0 calibrates on the data alone
# (recording the edits), 1 on the edits alone)
METHODS: dict[str, tuple[dict[str, Any], str, float]] = {
    "rtn": ({"saliency": "none", "quantizer": "rtn", "reference": "rtn"}, "general", 0.0),
    "gptq": ({"saliency": "none"}, "general", 0.0),
    "gptq_edits": ({"saliency": "none"}, "partner", 1.0),
    "tacq_general": ({"saliency": "tacq"}, "general", 0.0),
    "tacq_edits": ({"saliency": "tacq"}, "partner", 1.0),
    "tacq_edits_task": ({"saliency": "tacq"}, "partner", 0.5),
}


class EditedAndBase(nn.Module):
    """An edited model (merged or packed) and the unedited base, shaped like the ``PeftModel`` that
    ``ProbeEvaluator`` scores: calls and ``generate`` go to the edited model, ``disable_adapter()`` switches to
    the base (locality = agreement with the unedited model, as in an editing run)."""

    def __init__(self, edited: nn.Module, base: nn.Module) -> None:
        super().__init__()
        self.edited, self.base = edited, base
        self._active = edited

    def forward(self, **inputs: Any) -> Any:
        return self._active(**inputs)

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self._active.generate(**kwargs)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self._active = self.base
        try:
            yield
        finally:
            self._active = self.edited


def edit_data(record: dict[str, Any], tokenizer: str) -> EditDataModule:
    """The editing data module an ``edits`` record names (an export's), with all its edits in one round (so all
    are scored in one pass), tokenised by ``tokenizer`` (the model's, as the calibration was); fails unless it
    rebuilds exactly the records the record lists, when it lists them."""
    module_name, _, class_name = record["data_module"].rpartition(".")
    data_class = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(data_class, type) and issubclass(data_class, EditDataModule)):
        raise TypeError(f"edits record names {record['data_module']}, not a data.base.EditDataModule")
    init_args = record["init_args"]
    edits = len(record["records"]) if "records" in record else init_args["num_updates"] * init_args["edits_per_update"]
    data = data_class(**{**init_args, "num_updates": 1, "edits_per_update": edits, "tokenizer": tokenizer})
    data.setup()
    rebuilt = [r.record_id for r in data.rounds[0]]
    if "records" in record and rebuilt != record["records"]:
        raise ValueError(f"{record['data_module']}({record['init_args']}) now reads other records than the export "
                         f"was calibrated on (first: {rebuilt[:3]} vs {record['records'][:3]})")
    return data


def edit_scores(model: nn.Module, base: nn.Module, data: EditDataModule,
                settings: EvaluationSettings) -> dict[str, float]:
    """The editing metrics of ``model`` on every edit of ``data`` (one round), locality against ``base``, with
    the editing run's evaluation ``settings`` (its greedy generation length)."""
    paired = EditedAndBase(model, base).eval()
    evaluator = ProbeEvaluator(num_rounds=1, settings=settings)
    for batch in data.val_dataloader():
        evaluator.update(paired, batch, data.tokenizer)
    names = metric_names([p.probe for p in data.eval_probes(0)], settings.generation)
    return evaluator.compute(0, {0: names}).all


def edited_export(export: Path) -> tuple[dict[str, Any], EditDataModule]:
    """An edited model's export: its report and the editing data of the edits it records."""
    report = json.loads((export / "report.json").read_text())
    for key in ("adapter", "edits"):
        if key not in report:
            raise ValueError(f"{export}/report.json has no {key!r} record: not an edited model's export "
                             "(quantize.py with model.adapter and data.edits writes one)")
    return report, edit_data(report["edits"], report["adapter"]["merged_into"])


def score_export(export: Path, settings: EvaluationSettings, fp_too: bool = True) -> dict[str, dict[str, float]]:
    """Edit metrics of the reloaded export (``quantized``) and, with ``fp_too``, of the base and of the edited
    fp model (the base with the recorded adapter merged), on the edits the export records."""
    report, data = edited_export(export)
    base_path = report["adapter"]["merged_into"]
    base = load_causal_lm(base_path).eval()
    scores = {"quantized": edit_scores(load_quantized(export).eval(), base, data, settings)}
    if fp_too:
        edited = merge_adapter(load_causal_lm(base_path), report["adapter"]["path"]).eval()
        scores = {"base": edit_scores(base, base, data, settings),
                  "edited_fp": edit_scores(edited, base, data, settings), **scores}
    return scores


def task_metrics(model: nn.Module, target: Target) -> dict[str, float]:
    """Task metrics on the evaluation facts every row is scored on (the callback's evaluation)."""
    data = CalibrationDataModule(source=target.partner.get("eval_source", target.partner["source"]),
                                 model_name_or_path=target.model)
    return evaluate(model, data.tokenizer, data.evaluation_data())


def run_command(command: list[str], log: Path) -> None:
    """A CLI run as a user would start it (offline, one thread); its output goes to ``log``, and a failure
    raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")


def edit(target: Target, seed: int, work: Path) -> Path:
    """The target's CoRSA editing run with this seed; its saved adapter (one already in the work directory is
    reused: remove the directory to edit again)."""
    run_dir = work / f"seed{seed}"
    done = sorted(run_dir.glob(f"{target.run_name}/version_*/adapter/adapter_model.safetensors"))
    if done:
        return done[-1].parent
    run_command([sys.executable, "train.py", "fit", "--config", str(target.edit_config), "--seed_everything", str(seed),
                 "--data.init_args.shuffle_seed", str(seed), "--trainer.logger.init_args.save_dir", str(run_dir),
                 "--trainer.enable_progress_bar", "false", "--ckpt_path", "null"], run_dir.with_suffix(".log"))
    adapters = sorted(run_dir.glob(f"{target.run_name}/version_*/adapter"))
    if not adapters:
        raise RuntimeError(f"the editing run for seed {seed} wrote no adapter under {run_dir}")
    return adapters[-1]


def row_config(target: Target, method: str, bits: int, seed: int, adapter: Path, row_dir: Path) -> dict[str, Any]:
    """The target's edit-then-quantize config with this row's adapter, quantization settings and calibration
    data."""
    quant, data_kind, share = METHODS[method]
    data = getattr(target, data_kind)
    config = yaml.safe_load(target.quant_config.read_text())
    config["seed_everything"] = seed
    config["trainer"]["default_root_dir"] = str(row_dir)
    config["trainer"]["enable_progress_bar"] = False
    tacq = next(c for c in config["trainer"]["callbacks"] if c["class_path"] == "callbacks.tacq.TaCQCallback")
    tacq["init_args"].update(export_dir=str(row_dir / "export"), evaluate_fp=False, progress=False)
    tacq["init_args"]["quant"].update(bits=bits, **quant)
    config["model"]["adapter"] = str(adapter)
    edits = config["data"]["edits"]
    edits["init_args"]["shuffle_seed"] = seed
    config["data"] = {**config["data"], **copy.deepcopy(data), "seed": seed, "edits": edits, "edit_share": share}
    return config


def quantize_row(target: Target, method: str, bits: int, seed: int, adapter: Path, work: Path) -> dict[str, Any]:
    """One row: ``quantize.py fit`` on its config, then the reloaded export scored. A rerun of a stopped benchmark
    reuses a row's finished export when its config is unchanged (remove the work directory to redo it); the
    scoring is always redone, one row at a time (``SCORING``)."""
    row_dir = work / f"seed{seed}" / f"{method}_{bits}bit"
    row_dir.mkdir(parents=True, exist_ok=True)
    config, export = row_dir / "config.yaml", row_dir / "export"
    text = yaml.safe_dump(row_config(target, method, bits, seed, adapter, row_dir), sort_keys=False)
    started = time.perf_counter()
    if not ((export / "report.json").exists() and config.exists() and config.read_text() == text):
        config.write_text(text)
        run_command([sys.executable, "quantize.py", "fit", "--config", str(config), "--ckpt_path", "null"],
                    row_dir / "quantize.log")
    report = json.loads((export / "report.json").read_text())
    with SCORING:
        edits = score_export(export, target.evaluation, fp_too=False)["quantized"]
    return {"method": method, "bits": bits, "seed": seed, "bits_measured": report["bits_measured"],
            "task": report["quantized"], "edits": edits, "calibration_tokens": report["calibration"]["tokens"],
            "edit_tokens": report["edits"]["tokens"], "adapter_sha256": report["adapter"]["sha256"],
            "quantization_seconds": report["quantization_seconds"], "wall_seconds": time.perf_counter() - started}


def references(target: Target, seed: int, adapter: Path) -> dict[str, Any]:
    """The base and the edited fp model (base + this seed's adapter, merged) on this seed's edits and the task."""
    edit_data_config = target.config["data"]
    edits = {"data_module": edit_data_config["class_path"],
             "init_args": {**edit_data_config["init_args"], "shuffle_seed": seed}}
    data = edit_data(edits, target.model)
    base = load_causal_lm(target.model).eval()
    edited = merge_adapter(load_causal_lm(target.model), str(adapter)).eval()
    settings = target.evaluation
    return {"adapter": str(adapter), "records": [r.record_id for r in data.rounds[0]],
            "base": {"edits": edit_scores(base, base, data, settings), "task": task_metrics(base, target)},
            "edited_fp": {"edits": edit_scores(edited, base, data, settings), "task": task_metrics(edited, target)}}


def _mean_std(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def _task_cells(tasks: list[dict[str, float]]) -> str:
    """Task accuracy and preference (``-`` where the task facts carry no counterfactual)."""
    return " | ".join(_mean_std([t[k] for t in tasks]) if all(k in t for t in tasks) else "-"
                      for k in ("accuracy", "preference"))


def table(rows: list[dict[str, Any]], references: dict[int, dict[str, Any]]) -> str:
    """Markdown: the base and edited fp rows, then every (method, bits) over its seeds."""
    head = ("| model | bits | measured bits/w | ES | PS | NS | ES kept % | PS kept % | loc. tok. acc | rel. gen | "
            "task acc | task pref. | seeds |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    seeds = sorted(references)
    for name in ("base", "edited_fp"):
        scored = [references[s][name] for s in seeds]
        cells = [_mean_std([x["edits"][k] for x in scored]) for k in ("ES", "PS", "NS")]
        lines.append(f"| {name} | 32 | 32 | {' | '.join(cells)} | - | - | "
                     f"{_mean_std([x['edits']['locality_token_acc'] for x in scored])} | "
                     f"{_mean_std([x['edits']['reliability_gen'] for x in scored])} | "
                     f"{_task_cells([x['task'] for x in scored])} | {len(seeds)} |")
    keys = sorted({(r["bits"], list(METHODS).index(r["method"]), r["method"]) for r in rows})
    for bits, _, method in keys:
        group = [r for r in rows if r["method"] == method and r["bits"] == bits]
        kept = {k: [100 * r["edits"][k] / references[r["seed"]]["edited_fp"]["edits"][k] for r in group]
                for k in ("ES", "PS")}
        cells = [_mean_std([r["edits"][k] for r in group]) for k in ("ES", "PS", "NS")]
        lines.append(f"| {method} | {bits} | {_mean_std([r['bits_measured'] for r in group])} | {' | '.join(cells)} | "
                     f"{statistics.mean(kept['ES']):.1f} | {statistics.mean(kept['PS']):.1f} | "
                     f"{_mean_std([r['edits']['locality_token_acc'] for r in group])} | "
                     f"{_mean_std([r['edits']['reliability_gen'] for r in group])} | "
                     f"{_task_cells([r['task'] for r in group])} | {len(group)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    target = TARGETS[args.target]
    suffix = "" if args.target == "world" else f"_{args.target}"  # the world keeps its original file names
    work = Path(args.work_dir or f"runs/bench_edit_then_quantize{suffix}").resolve()
    output = Path(args.output or RESULTS / f"edit_then_quantize{suffix}.json")
    work.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    results: dict[str, Any] = {"settings": {"target": args.target, "seeds": args.seeds, "bits": args.bits,
                                            "methods": args.methods,
                                            "edit": str(target.edit_config.relative_to(ROOT)),
                                            "quantize": str(target.quant_config.relative_to(ROOT))},
                               "references": {}, "rows": [], "complete": False}

    def save() -> None:
        with lock:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json.dumps(results, indent=1) + "\n")

    with ThreadPoolExecutor(args.jobs) as pool:
        adapters = dict(zip(args.seeds, pool.map(lambda s: edit(target, s, work), args.seeds)))
        for seed, adapter in adapters.items():
            results["references"][seed] = references(target, seed, adapter)
            print(f"seed {seed}: edited fp {results['references'][seed]['edited_fp']}", file=sys.stderr, flush=True)
        save()

        def one(job: tuple[str, int, int]) -> None:
            method, bits, seed = job
            try:
                row = quantize_row(target, method, bits, seed, adapters[seed], work)
            except Exception as err:  # noqa: BLE001 - one failed row is reported, the others still run
                with lock:
                    results.setdefault("failed", []).append({"method": method, "bits": bits, "seed": seed,
                                                             "error": f"{type(err).__name__}: {err}"[-2000:]})
                save()
                print(f"{method} {bits}-bit seed {seed} FAILED: {err}", file=sys.stderr, flush=True)
                return
            with lock:
                results["rows"].append(row)
            save()
            print(f"{method} {bits}-bit seed {seed}: ES {row['edits']['ES']:.3f} PS {row['edits']['PS']:.3f} "
                  f"task {row['task']['accuracy']:.3f} ({row['wall_seconds']:.0f}s)", file=sys.stderr, flush=True)

        list(pool.map(one, [(m, b, s) for s in args.seeds for b in args.bits for m in args.methods]))
    results["complete"] = not results.get("failed")
    results["table"] = table(results["rows"], {int(k): v for k, v in results["references"].items()})
    save()
    print(results["table"])
    return results


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("run", help="edit, quantize every (method, bits), score the reloaded exports")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    bench.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    bench.add_argument("--jobs", type=int, default=1, help="rows run side by side (one thread each)")
    bench.add_argument("--work-dir", help="adapters, exports and logs; default runs/bench_edit_then_quantize[_TARGET]")
    bench.add_argument("--output", help="default bench/results/edit_then_quantize[_TARGET].json")
    score = commands.add_parser("score", help="edit metrics of one export of an edited model")
    score.add_argument("export", type=Path)
    for command in (bench, score):
        command.add_argument("--target", choices=list(TARGETS), default="world",
                             help="the model, and the editing config whose evaluation settings score the edits")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run(args)
    torch.set_num_threads(1)
    scores = score_export(args.export, TARGETS[args.target].evaluation)
    print(f"| model | {' | '.join(EDIT_COLUMNS)} |\n|---|{'---|' * len(EDIT_COLUMNS)}")
    for name, values in scores.items():
        print(f"| {name} | {' | '.join(f'{values[k]:.3f}' for k in EDIT_COLUMNS)} |")
    return scores


if __name__ == "__main__":
    main()
