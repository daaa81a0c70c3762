"""Editing methods side by side: quality over sequential rounds, forgetting, cost.

    python -m bench.edit_quality                       # the embedded world; lora, sam, dpo, corsa, easyedit_dpo; 3 seeds
    python -m bench.edit_quality --methods lora corsa --seeds 0 --rounds 5
    python -m bench.edit_quality --methods lora corsa rome memit alphaedit   # with the locate-then-edit methods
    python -m bench.edit_quality --benchmark code --methods lora corsa --rounds 4 --edits-per-round 2 \
        --batch-size 4 --max-new-tokens 16             # the world's 8 API updates as configs/demo_code_update.yaml
    python -m bench.edit_quality --model models/smollm2-135m-instruct \
        --source data/real/counterfact_easyedit_first600.json ...   # a real model (README: "A real LLM")

Every method is built as ``train.py fit --config <benchmark config> --config configs/methods/<method>.yaml``
builds it: the overlay's ``model`` section picks the module (EditModule for lora / sam / dpo / corsa /
easyedit_dpo, whose objective it names; LocateEditModule for rome / memit / alphaedit, with its ``locate``
settings) and its ``data`` section overrides the bench's data settings (the locate methods write a round
once, as one batch); the overlay's ``trainer`` section (its run name) does not apply. Then the same data,
rounds, seeds, metrics and final scoring of the saved result reloaded from disk (an adapter, or the edited
weights). The unedited model is scored on the same edits first (a validation pass with a fresh adapter,
whose B = 0). Prints a markdown table (mean ± std over seeds) and writes JSON to
``bench/results/edit_quality.json``.

Cost: every method's median training wall time per edit round ("s / round"; validation excluded); for the
methods that take optimizer steps also the median time per step, as a ratio to the ``dpo`` step (the cost
target of issue 3: corsa <= 2.1 x dpo) and to ``lora``. The locate methods take no optimizer steps (a
round is one closed-form write), so they have no step ratio. With ``--jobs`` > 1 runs share the CPU, so
the times hold for that shared load.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml

from callbacks.edit_report import EditReport
from data.base import EditDataModule, round_protocol
from data.code_update import CodeUpdateDataModule
from data.counterfact import CounterFactDataModule
from data.mquake import MQuAKEDataModule
from data.zsre import ZsREDataModule
from lit_corsa.module import EditModule
from lit_corsa.settings import (
    EvaluationSettings,
    LoraSettings,
    ObjectiveSettings,
    OptimizerSettings,
)

COLUMNS = ("ES", "PS", "NS", "reliability_token_acc", "generality_token_acc", "locality_token_acc", "generality_gen",
           "pass@1", "pass@5", "reliability_gen", "multi_hop_acc", "instance_wise_acc", "edit_wise_acc")
MQUAKE_COLUMNS = ("multi_hop_acc", "instance_wise_acc", "edit_wise_acc")  # in the table where measured (MQuAKE)
# in the table where Pass@k is measured (the code benchmark)
CODE_COLUMNS = ("pass@1", "pass@5", "reliability_gen", "reliability_token_acc")
DATAMODULES = {"counterfact": (CounterFactDataModule, "world:counterfact"), "zsre": (ZsREDataModule, "world:zsre"),
               "code": (CodeUpdateDataModule, "world:code_update"), "mquake": (MQuAKEDataModule, "world:mquake")}
METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "methods"


@dataclass(frozen=True)
class MethodConfig:
    """What ``--config configs/methods/<method>.yaml`` adds to a ``train.py`` run: the module class and its
    init args (a ``class_path`` overlay), or EditModule with ``method`` (a plain ``model: method:`` overlay),
    and the data init args it overrides."""

    module_class: type[EditModule]
    init_args: dict[str, Any]
    data_args: dict[str, Any]

    @classmethod
    def read(cls, method: str) -> MethodConfig:
        path = METHOD_CONFIGS / f"{method}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in METHOD_CONFIGS.glob("*.yaml"))
            raise ValueError(f"no method overlay {path}: --methods takes {known}")
        overlay = yaml.safe_load(path.read_text()) or {}
        model = overlay.get("model") or {}
        data_args = dict((overlay.get("data") or {}).get("init_args") or {})
        if "class_path" not in model:
            return cls(EditModule, dict(model), data_args)
        module_path, _, name = model["class_path"].rpartition(".")
        module_class = getattr(import_module(module_path), name)
        if not (isinstance(module_class, type) and issubclass(module_class, EditModule)):
            raise TypeError(f"{path}: model.class_path {model['class_path']} is not an EditModule")
        return cls(module_class, dict(model.get("init_args") or {}), data_args)

    @property
    def takes_optimizer_steps(self) -> bool:
        """Only EditModule trains (an adapter, with AdamW); LocateEditModule writes each round in closed form."""
        return self.module_class is EditModule


class StepTimer(L.Callback):
    """Wall time of every training batch (one optimizer step when accumulate = 1) and the round it is in."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.rounds: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        self.seconds.append(time.perf_counter() - self._start)
        self.rounds.append(trainer.datamodule.round_of_epoch(trainer.current_epoch))

    def seconds_per_round(self) -> float:
        """Median over rounds of the round's training time (a locate method's first round includes its
        one-off key covariance, which the median leaves out)."""
        totals: dict[int, float] = {}
        for round_, seconds in zip(self.rounds, self.seconds):
            totals[round_] = totals.get(round_, 0.0) + seconds
        return statistics.median(totals.values())

    def seconds_per_step(self) -> float:
        return statistics.median(self.seconds[len(self.seconds) // 10:])  # drop warm-up batches


def build(args: argparse.Namespace, method: str, seed: int, num_updates: int, edits_per_update: int,
          adapter: Path | None = None) -> tuple[EditModule, EditDataModule]:
    """The module and data of one run, as ``train.py`` builds them from the benchmark's settings followed by
    the method's overlay (``adapter``: a saved result to start from, e.g. to score it again)."""
    L.seed_everything(seed, verbose=False)
    config = MethodConfig.read(method)
    datamodule_class, world_source = DATAMODULES[args.benchmark]
    dm = datamodule_class(**{"source": args.source or world_source, "tokenizer": args.model, "num_updates": num_updates,
                             "edits_per_update": edits_per_update, "epochs_per_update": args.epochs_per_round,
                             "batch_size": args.batch_size, "shuffle_seed": seed,
                             "locality_anchors": args.locality_anchors, **config.data_args})
    settings: dict[str, Any] = {"model_name_or_path": args.model, "adapter": None if adapter is None else str(adapter),
                                "evaluation": EvaluationSettings(max_new_tokens=args.max_new_tokens)}
    if config.takes_optimizer_steps:  # the bench's adapter-training flags
        settings |= {
            "objective": ObjectiveSettings(beta=args.beta, rho=args.rho, locality_weight=args.locality_weight),
            "lora": LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, target_modules=args.lora_targets),
            "optimizer": OptimizerSettings(learning_rate=args.learning_rate, warmup_steps=args.warmup_steps)}
    init_args = dict(config.init_args)
    if not config.takes_optimizer_steps and args.locate:  # the bench's --locate over the overlay's locate block
        init_args["locate"] = {**(init_args.get("locate") or {}), **args.locate}
    return config.module_class(**{**settings, **init_args}), dm


def scores_of_all_edits(args: argparse.Namespace, seed: int, method: str = "lora",
                        saved: Path | None = None) -> dict[str, float]:
    """Every edit of a run scored in one validation pass (all edits placed in one round): with a fresh adapter
    (B = 0, so the unedited model), or with ``method``'s saved result read back from disk."""
    module, dm = build(args, method, seed, 1, args.rounds * args.edits_per_round, saved)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, datamodule=dm, verbose=False)
    return module.scores.all


def run_one(args: argparse.Namespace, method: str, seed: int, out_dir: Path) -> dict:
    module, dm = build(args, method, seed, args.rounds, args.edits_per_round)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, **round_protocol(dm.num_updates, dm.epochs_per_update),
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[EditReport(output_dir=str(out_dir), plot=False), timer],
    )
    trainer.fit(module, datamodule=dm)
    metrics = json.loads((out_dir / "metrics.json").read_text())
    saved = scores_of_all_edits(args, seed, method, out_dir / "adapter")
    in_memory = metrics["summary"]["after_last_round"]
    # Pass@k samples at a temperature, seeded by batch: the reload (all edits in one round) draws other samples,
    # so it is compared apart; every other metric is deterministic and must come back exactly
    sampled = {k for k in saved if k.startswith("pass@")}
    difference = {"saved_vs_in_memory": max(abs(saved[k] - in_memory[k]) for k in saved.keys() - sampled)}
    if sampled:
        difference["sampled_saved_vs_in_memory"] = max(abs(saved[k] - in_memory[k]) for k in sampled)
    cost = {"seconds_per_round": timer.seconds_per_round()}
    if MethodConfig.read(method).takes_optimizer_steps:
        cost["seconds_per_step"] = timer.seconds_per_step()
    return {"seed": seed, "summary": metrics["summary"], "rounds": metrics["rounds"], **cost,
            "saved_adapter": saved, **difference}


def timed_run(args: argparse.Namespace, method: str, seed: int, out_dir: Path) -> dict:
    """One run in a worker process (``--jobs`` of them side by side, ``--threads`` each)."""
    started = time.perf_counter()
    result = run_one(args, method, seed, out_dir)
    print(f"{method} seed {seed}: {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    return result


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(results: dict[str, list[dict]], unedited: list[dict[str, float]]) -> dict[str, dict]:
    """Mean ± std over seeds of every method's scores; the unedited model's row first, and each method's NS
    as a share of the unedited model's (the locality target)."""
    table: dict[str, dict] = {"unedited": {name: _mean_std([u[name] for u in unedited]) for name in COLUMNS
                                           if all(name in u for u in unedited)}}
    for method, runs in results.items():
        row = {}
        # ZsRE has no NS (its locality is the token agreement): aggregate what every run measured
        for name in (n for n in COLUMNS if all(n in r["saved_adapter"] for r in runs)):
            row[name] = _mean_std([r["saved_adapter"][name] for r in runs])
            row[f"immediate_{name}"] = _mean_std([r["summary"]["immediate"][name] for r in runs])
            if all(name in r["summary"]["forgetting"] for r in runs):  # none after a single round
                row[f"forgetting_{name}"] = _mean_std([r["summary"]["forgetting"][name] for r in runs])
        if all("seconds_per_round" in r for r in runs):  # not in files of older versions (bench.edit_combine)
            row["seconds_per_round"] = _mean_std([r["seconds_per_round"] for r in runs])
        if all("seconds_per_step" in r for r in runs):  # the methods that take optimizer steps
            row["seconds_per_step"] = _mean_std([r["seconds_per_step"] for r in runs])
        row["saved_vs_in_memory"] = max(r["saved_vs_in_memory"] for r in runs)
        if all("sampled_saved_vs_in_memory" in r for r in runs):
            row["sampled_saved_vs_in_memory"] = max(r["sampled_saved_vs_in_memory"] for r in runs)
        table[method] = row
    for method, row in table.items():
        base = _unedited_ns(results.get(method, []), unedited)
        if "NS" in row and base > 0:
            row["NS_vs_unedited"] = row["NS"][0] / base
        for base in ("dpo", "lora"):
            if "seconds_per_step" in table.get(base, {}) and "seconds_per_step" in row:
                row[f"step_vs_{base}"] = row["seconds_per_step"][0] / table[base]["seconds_per_step"][0]
    return table


def _unedited_ns(runs: list[dict], unedited: list[dict[str, float]]) -> float:
    """The unedited model's mean NS over the seeds ``runs`` ran (all seeds for the unedited row itself, or for
    runs that store no seed): a method with fewer seeds is compared with the same records."""
    seeds = {r.get("seed") for r in runs}
    same = [u for u in unedited if u.get("seed") in seeds] if runs and None not in seeds else unedited
    return statistics.mean(u["NS"] for u in same) if same and all("NS" in u for u in same) else 0.0


def plot_rounds(results: dict[str, list[dict]], path: Path, title: str) -> None:
    """Score over all edits so far after each round, mean over seeds, one line per method and one panel
    per probability score: the sequential decay that the table's "final" and "forget" columns summarise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))[0]["rounds"][-1]["all"]
    names = [n for n in ("ES", "PS", "NS", "pass@1", "multi_hop_acc") if n in first]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, runs in results.items():
            rounds = [r["eval_round"] for r in runs[0]["rounds"]]
            means = [statistics.mean(run["rounds"][i]["all"][name] for run in runs) for i in range(len(rounds))]
            ax.plot(rounds, means, marker="o", lw=2.5 if method == "corsa" else 1.2, label=method)
        ax.set_title(f"{name}, all edits so far")
        ax.set_xlabel("after round")
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seed_note(seeds: dict[str, list[int]]) -> str:
    """The seeds behind the table: one list when every method ran the same ones, else per method."""
    lists = {tuple(v) for v in seeds.values()}
    return str(list(lists.pop())) if len(lists) == 1 else ", ".join(f"{m} {v}" for m, v in seeds.items())


def markdown(table: dict[str, dict], args: argparse.Namespace, seeds: dict[str, list[int]]) -> str:
    code = [c for c in CODE_COLUMNS if any(c in row for row in table.values())] if any(
        "pass@1" in row for row in table.values()) else []
    code += [c for c in MQUAKE_COLUMNS if any(c in row for row in table.values())]  # the benchmark's own columns
    head = ["method"] + [f"{c} (final)" for c in ("ES", "PS", "NS", *code)] + [
        "NS / unedited", "gen. tok. acc", "loc. tok. acc", "PS imm.", "forget ES", "forget PS"] + [
        f"forget {c}" for c in code[:1]] + ["s / round", "step / dpo", "step / lora"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        fmt = lambda key: f"{row[key][0]:.3f} ± {row[key][1]:.3f}" if key in row else "-"  # noqa: E731
        ratio = lambda key: f"{row[key]:.2f}" if key in row else "-"  # noqa: E731
        seconds = f"{row['seconds_per_round'][0]:.2f}" if "seconds_per_round" in row else "-"
        cells = [method, fmt("ES"), fmt("PS"), fmt("NS"), *map(fmt, code), ratio("NS_vs_unedited"),
                 fmt("generality_token_acc"), fmt("locality_token_acc"), fmt("immediate_PS"), fmt("forgetting_ES"),
                 fmt("forgetting_PS"), *(fmt(f"forgetting_{c}") for c in code[:1]),
                 seconds, ratio("step_vs_dpo"), ratio("step_vs_lora")]
        lines.append("| " + " | ".join(cells) + " |")
    locate = [m for m in seeds if not MethodConfig.read(m).takes_optimizer_steps]
    largest = lambda key: max(row.get(key, 0.0) for row in table.values())  # noqa: E731
    lines.append(f"\n{args.benchmark}, {args.rounds} rounds x {args.edits_per_round} edits, "
                 f"{args.epochs_per_round} epochs per round"
                 + (f" ({', '.join(locate)}: one write per round, their overlays' data settings)" if locate else "")
                 + f", seeds {_seed_note(seeds)}; final = the saved result (adapter or edited weights) read back from "
                 f"disk, over all edits (largest difference from the run's own last evaluation: "
                 f"{largest('saved_vs_in_memory'):.3f}"
                 + (f"; Pass@k, whose samples the reload draws anew: {largest('sampled_saved_vs_in_memory'):.3f}"
                    if code else "")
                 + "); imm. = each round's edits right after their round; forget = docs/corsa.md §6 (positive = "
                 "forgotten); s / round = median training seconds per edit round (no validation); step = median "
                 "seconds per optimizer step, as a ratio (none for methods without optimizer steps).")
    return "\n".join(lines)


def locate_overrides(text: str) -> dict[str, Any]:
    """``--locate``: a YAML mapping of LocateSettings fields (checked when the module is built)."""
    value = yaml.safe_load(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--locate takes a YAML mapping such as '{{layers: null}}', not {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["lora", "sam", "dpo", "corsa", "easyedit_dpo"],
                        help="overlays of configs/methods/ (also rome, memit, alphaedit)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--benchmark", choices=sorted(DATAMODULES), default="counterfact")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--edits-per-round", type=int, default=20)
    parser.add_argument("--epochs-per-round", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3,
                        help="the world's default; the paper's 2e-4 leaves the world model unedited (README)")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-targets", nargs="+", default=None,
                        help="LoRA target module names (peft's target_modules); default: every decoder Linear")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--locality-weight", type=float, default=0.0, help="docs/corsa.md §9; 0 = the paper's objective")
    parser.add_argument("--locality-anchors", type=int, default=0, help="anchor prompts per edit for the locality term")
    parser.add_argument("--locate", type=locate_overrides, default={},
                        help="YAML mapping over the locate overlays' locate block (lit_corsa/locate/settings.py), "
                             "as --model.locate on the CLI (null: the paper's value); the README's SmolLM2 section "
                             "shows the one for a real model")
    parser.add_argument("--max-new-tokens", type=int, default=6, help="greedy generation length of the gen. scores")
    parser.add_argument("--model", default="world:model", help="model_name_or_path (an HF directory, .gguf, hub id)")
    parser.add_argument("--source", default=None, help="benchmark file; default: the world's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs side by side in worker processes (step costs are then measured under the same load)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "edit_quality.json")
    args = parser.parse_args(argv)
    if args.locate and all(MethodConfig.read(m).takes_optimizer_steps for m in args.methods):
        parser.error(f"--locate sets the locate methods' settings, and none of --methods {args.methods} is one "
                     "(rome, memit, alphaedit)")
    return args


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = [(UNEDITED, seed) for seed in args.seeds] + [(m, seed) for seed in args.seeds for m in args.methods]
    done: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task, result in completed(args, tasks, Path(tmp)):
            done[task] = result
            table = save(args, done, final=len(done) == len(tasks))
    return table


UNEDITED = "unedited"


def run_task(args: argparse.Namespace, task: tuple[str, int], tmp: Path) -> dict:
    """One unit of the benchmark: the unedited model's scores for a seed, or one (method, seed) run."""
    method, seed = task
    if method == UNEDITED:
        return {**scores_of_all_edits(args, seed), "seed": seed}  # the seed: bench.edit_combine matches runs by it
    return timed_run(args, method, seed, tmp / f"{method}-{seed}")


def completed(args: argparse.Namespace, tasks: list[tuple[str, int]], tmp: Path) -> Iterator[tuple[tuple[str, int], dict]]:
    """(task, result) as each task finishes: in this process, or ``--jobs`` worker processes side by side."""
    if args.jobs == 1:
        yield from ((task, run_task(args, task, tmp)) for task in tasks)
        return
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
        futures = {pool.submit(run_task, args, task, tmp): task for task in tasks}
        yield from ((futures[future], future.result()) for future in as_completed(futures))


def save(args: argparse.Namespace, done: dict[tuple[str, int], dict], final: bool) -> dict[str, dict]:
    """Aggregate what has finished and write it (after every task, so a stopped benchmark keeps its finished
    runs, marked ``complete: false``); the table and plot are printed and drawn once everything is done."""
    unedited = [done[(UNEDITED, s)] for s in args.seeds if (UNEDITED, s) in done]
    results = {m: [done[(m, s)] for s in args.seeds if (m, s) in done] for m in args.methods}
    results = {m: runs for m, runs in results.items() if runs}
    if not unedited or not results:
        return {}
    table = aggregate(results, unedited)
    text = markdown(table, args, {m: [s for s in args.seeds if (m, s) in done] for m in results})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()}, "complete": final,
                                    "table": table, "runs": results, "unedited": unedited, "markdown": text},
                                   indent=1) + "\n")
    if final:
        print(text)
        plot_rounds(results, args.out.with_suffix(".png"), f"{args.benchmark}: mean over seeds {args.seeds}, lr "
                    f"{args.learning_rate}")
    return table


if __name__ == "__main__":
    main()
