"""Editing a packed model: the same CoRSA edit on the fp world model, on its 3-bit TaCQ packed export and on a
bitsandbytes NF4 base (``load_in_4bit``): edit quality and step cost.

    python -m bench.edit_packed run --seeds 0 1 2                         # the world model (CPU, one thread)
    python -m bench.edit_packed run --packed runs/demo_tacq/export        # an export already made
    python -m bench.edit_packed steps --label world --fp world:model --packed runs/bench_edit_packed/tacq3/export
    python -m bench.edit_packed steps --label smollm2 --fp models/smollm2-135m-instruct --packed /tmp/smolq/export \
        --config configs/smollm2_counterfact.yaml --edits 8 --epochs 3 --repeats 1

``run``: the packed base is ``python quantize.py fit --config configs/demo_tacq.yaml`` written into the work
directory (or ``--packed``, an export already made); then, per seed and base, the CoRSA demo edit
(``python train.py fit --config configs/demo_counterfact.yaml``: 5 rounds x 20 edits, with the seed as run
seed and record shuffle seed) on that base, with :class:`StepLog` added to its callbacks (the config the run ran
is kept beside it). ES / PS / NS are scored from the saved adapter read back over its base (every edit in one
validation pass, as ``bench/edit_quality.py`` scores a saved adapter), next to the run's own final scores.

Step cost: the CPU time (one thread) of a training batch (one CoRSA step: two forward/backward passes, SAM)
after the first tenth, its wall time beside it, the time spent decoding packed weights within it
(``QuantLinear.dequantize``, timed by :class:`StepLog`), and the peak RSS of the editing process. ``run``'s runs are one thread
(``OMP_NUM_THREADS=1``) and one after another: on a machine shared with other jobs their step times drift with the
load. ``steps`` measures the step cost for comparison: a short run (one round) on each base, the three at the
same time, so that they share whatever load there is; it also times a real model, where a whole run would take
too long (SmolLM2).

Writes ``bench/results/edit_packed.json`` (``run``: ``"complete": false`` until the last run, and a markdown
table; ``steps``: under ``step_cost``, by ``--label``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import yaml

from bench.edit_quality import StepTimer
from lit_corsa.module import EditModule
from lit_tacq.qlinear import QuantLinear, quantized_modules

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "edit_packed.json"
EDIT_CONFIG = ROOT / "configs" / "demo_counterfact.yaml"
QUANT_CONFIG = ROOT / "configs" / "demo_tacq.yaml"
BASES = ("fp", "tacq3_packed", "nf4")


class StepLog(StepTimer):
    """Wall and CPU time of every training batch, the CPU time of it spent decoding packed weights, and the
    process's peak RSS, written to ``path`` (JSON) when the fit ends. CPU time (one thread) is what a step costs
    on a machine shared with other jobs, where wall time also counts the waits for a core. The decode time comes
    from wrapping ``QuantLinear.dequantize`` in this process for the length of the fit (as
    tests/faults/kill_switch.py wraps its hook); a base without packed layers decodes nothing."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.cpu_seconds: list[float] = []
        self.decode_cpu_seconds: list[float] = []
        self.decode_calls: list[int] = []
        self._decode = [0.0, 0]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._original = QuantLinear.dequantize
        log, original = self._decode, self._original

        def timed(module: QuantLinear) -> torch.Tensor:
            start = time.process_time()
            weight = original(module)
            log[0] += time.process_time() - start
            log[1] += 1
            return weight

        QuantLinear.dequantize = timed

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        QuantLinear.dequantize = self._original

    def on_train_batch_start(self, *args: Any) -> None:
        self._decode[:] = [0.0, 0]
        self._cpu_start = time.process_time()
        super().on_train_batch_start(*args)

    def on_train_batch_end(self, *args: Any) -> None:
        super().on_train_batch_end(*args)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        self.decode_cpu_seconds.append(self._decode[0])
        self.decode_calls.append(self._decode[1])

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.write_text(json.dumps({
            "seconds": self.seconds, "cpu_seconds": self.cpu_seconds, "decode_cpu_seconds": self.decode_cpu_seconds,
            "decode_calls": self.decode_calls, "packed_layers": len(quantized_modules(pl_module.model)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }) + "\n")


def run_command(command: list[str], log: Path) -> float:
    """A CLI run as a user would start it (offline, one thread), its output in ``log``; its wall seconds. A
    failure raises with the log's tail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def packed_export(work: Path) -> Path:
    """The world model's 3-bit TaCQ export, made by ``quantize.py`` on configs/demo_tacq.yaml in ``work`` (one
    already there is reused: remove it to quantize again)."""
    out = work / "tacq3"
    if (out / "export" / "report.json").exists():
        return out / "export"
    out.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(QUANT_CONFIG.read_text())
    config["trainer"]["default_root_dir"] = str(out)
    tacq = next(c for c in config["trainer"]["callbacks"] if c["class_path"] == "callbacks.tacq.TaCQCallback")
    tacq["init_args"].update(export_dir=str(out / "export"), progress=False)
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    run_command([sys.executable, "quantize.py", "fit", "--config", str(out / "config.yaml"), "--ckpt_path", "null"],
                out / "quantize.log")
    return out / "export"


def edit_config(base: str, load_in_4bit: bool, seed: int, run_dir: Path, config: Path = EDIT_CONFIG,
                data: dict[str, Any] | None = None) -> dict[str, Any]:
    """``config`` (the CoRSA demo) on this base and seed, logging into ``run_dir``, with :class:`StepLog` added;
    ``data`` overrides the data module's settings."""
    settings = yaml.safe_load(config.read_text())
    settings["seed_everything"] = seed
    settings["trainer"]["enable_progress_bar"] = False
    settings["trainer"]["logger"]["init_args"].update(save_dir=str(run_dir), name="edit", version=0)
    settings["trainer"]["callbacks"].append({"class_path": "bench.edit_packed.StepLog",
                                             "init_args": {"path": str(run_dir / "steps.json")}})
    settings["model"].update(model_name_or_path=base, load_in_4bit=load_in_4bit)
    settings["data"]["init_args"].update(shuffle_seed=seed, **(data or {}))
    return settings


def edit(base: str, load_in_4bit: bool, seed: int, run_dir: Path) -> tuple[dict[str, Any], float | None]:
    """The CoRSA demo edit on ``base``; its config and wall seconds (None when a finished run with the same config
    is reused: remove its directory to edit again)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = edit_config(base, load_in_4bit, seed, run_dir)
    config, text = run_dir / "config.yaml", yaml.safe_dump(settings, sort_keys=False)
    done = run_dir / "edit" / "version_0" / "adapter" / "adapter_model.safetensors"
    if done.exists() and (run_dir / "steps.json").exists() and config.exists() and config.read_text() == text:
        return settings, None
    config.write_text(text)
    seconds = run_command([sys.executable, "train.py", "fit", "--config", str(config), "--ckpt_path", "null"],
                          run_dir / "train.log")
    return settings, seconds


def saved_adapter_scores(settings: dict[str, Any], adapter: Path) -> dict[str, float]:
    """Every edit of the run scored in one validation pass of the saved adapter read back over its base (the
    run's model and data settings, all its edits in one round)."""
    data_settings = settings["data"]["init_args"]
    L.seed_everything(settings["seed_everything"], verbose=False)
    module_name, _, class_name = settings["data"]["class_path"].rpartition(".")
    data_class = getattr(importlib.import_module(module_name), class_name)
    edits = data_settings["num_updates"] * data_settings["edits_per_update"]
    data = data_class(**{**data_settings, "num_updates": 1, "edits_per_update": edits, "epochs_per_update": 1,
                         "tokenizer": settings["model"]["model_name_or_path"]})
    module = EditModule(**settings["model"], adapter=str(adapter))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, datamodule=data, verbose=False)
    return module.scores.all


def steady(values: list[float]) -> float:
    """The median after the first tenth (warm-up)."""
    return statistics.median(values[len(values) // 10:])


def one_run(name: str, base: str, load_in_4bit: bool, seed: int, work: Path) -> dict[str, Any]:
    """One row: the edit on this base and seed, its saved adapter scored on reload, its step cost."""
    run_dir = work / f"seed{seed}" / name
    settings, wall = edit(base, load_in_4bit, seed, run_dir)
    version = run_dir / "edit" / "version_0"
    metrics = json.loads((version / "metrics.json").read_text())
    steps = json.loads((run_dir / "steps.json").read_text())
    saved = saved_adapter_scores(settings, version / "adapter")
    final = metrics["summary"]["final"]
    return {"base": name, "model": base, "load_in_4bit": load_in_4bit, "seed": seed, "saved_adapter": saved,
            "final_in_run": final, "saved_vs_in_run": max(abs(saved[k] - final[k]) for k in saved),
            **step_cost(steps), "wall_seconds": wall}


def step_cost(steps: dict[str, Any]) -> dict[str, Any]:
    """A run's step cost from its :class:`StepLog` record: medians per step after the first tenth."""
    return {"cpu_per_step": steady(steps["cpu_seconds"]), "wall_per_step": steady(steps["seconds"]),
            "decode_cpu_per_step": steady(steps["decode_cpu_seconds"]),
            "decode_calls_per_step": steady(steps["decode_calls"]), "steps": len(steps["seconds"]),
            "packed_layers": steps["packed_layers"], "peak_rss_mb": steps["peak_rss_mb"]}


def _mean_std(values: list[float], digits: int = 3) -> str:
    mean = statistics.mean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(rows: list[dict[str, Any]], bits: dict[str, Any]) -> str:
    """Markdown: one line per base, mean ± std over its seeds; step cost in CPU seconds (one thread)."""
    head = "| base | bits/w | ES | PS | NS | CPU s/step | of it decoding | step vs fp | wall s/step | peak RSS MB | seeds |"
    lines = [head, "|---" * head.count(" | ") + "|---|"]
    fp = [r["cpu_per_step"] for r in rows if r["base"] == "fp"]
    for name in (b for b in BASES if any(r["base"] == b for r in rows)):
        group = [r for r in rows if r["base"] == name]
        cells = [_mean_std([r["saved_adapter"][k] for r in group]) for k in ("ES", "PS", "NS")]
        cpu = [r["cpu_per_step"] for r in group]
        decode = statistics.mean(r["decode_cpu_per_step"] / r["cpu_per_step"] for r in group)
        ratio = f"{statistics.mean(cpu) / statistics.mean(fp):.2f}" if fp else "-"
        lines.append(f"| {name} | {bits.get(name, '-')} | {' | '.join(cells)} | {_mean_std(cpu, 4)} | "
                     f"{100 * decode:.0f} % | {ratio} | {_mean_std([r['wall_per_step'] for r in group], 4)} | "
                     f"{statistics.mean([r['peak_rss_mb'] for r in group]):.0f} | {len(group)} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(1)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    packed = Path(args.packed).resolve() if args.packed else packed_export(work)
    report = json.loads((packed / "report.json").read_text()) if (packed / "report.json").exists() else {}
    bases = {"fp": ("world:model", False), "tacq3_packed": (str(packed), False), "nf4": ("world:model", True)}
    bits = {"fp": 32, "tacq3_packed": round(report["bits_measured"], 3) if report else "-", "nf4": "4 (NF4)"}
    results: dict[str, Any] = {"settings": {"seeds": args.seeds, "bases": args.bases, "packed": str(packed),
                                            "edit": str(EDIT_CONFIG.relative_to(ROOT)), "threads": 1},
                               "rows": [], "complete": False}

    def save() -> None:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # the step cost measurements (``steps``, maybe running meanwhile) stay
            results["step_cost"] = json.loads(out.read_text()).get("step_cost", {})
        out.write_text(json.dumps(results, indent=1) + "\n")

    for seed in args.seeds:
        for name in args.bases:
            try:
                row = one_run(name, *bases[name], seed, work)
            except Exception as err:  # noqa: BLE001 - one failed run is reported, the others still run
                results.setdefault("failed", []).append({"base": name, "seed": seed,
                                                         "error": f"{type(err).__name__}: {err}"[-2000:]})
                save()
                print(f"{name} seed {seed} FAILED: {err}", file=sys.stderr, flush=True)
                continue
            results["rows"].append(row)
            save()
            print(f"{name} seed {seed}: ES {row['saved_adapter']['ES']:.3f} PS {row['saved_adapter']['PS']:.3f} "
                  f"NS {row['saved_adapter']['NS']:.3f}, {row['cpu_per_step']:.4f} CPU s/step "
                  f"(decode {row['decode_cpu_per_step']:.4f})", file=sys.stderr, flush=True)
    results["complete"] = not results.get("failed")
    results["table"] = table(results["rows"], bits)
    save()
    print(results["table"])
    return results


def steps(args: argparse.Namespace) -> dict[str, Any]:
    """Step cost side by side: one short editing run (one round of ``--edits`` edits, ``--epochs`` epochs) on each
    base, the three at the same time (so a shared machine's load falls on all of them alike), ``--repeats``
    times; each base's median step time per repeat and its ratio to the fp base's in the same repeat."""
    bases = {"fp": (args.fp, False), "tacq3_packed": (args.packed, False), "nf4": (args.fp, True)}
    data = {"num_updates": 1, "edits_per_update": args.edits, "epochs_per_update": args.epochs,
            **({"source": args.source} if args.source else {})}
    work = Path(args.work_dir).resolve() / f"steps_{args.label}"
    repeats = []
    for repeat in range(args.repeats):
        def one(name: str, repeat: int = repeat) -> dict[str, Any]:
            run_dir = work / f"repeat{repeat}" / name
            run_dir.mkdir(parents=True, exist_ok=True)
            settings = edit_config(*bases[name], 0, run_dir, Path(args.config), data)
            settings["model"]["evaluation"] = {**settings["model"].get("evaluation", {}), "max_new_tokens": 2}
            (run_dir / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
            wall = run_command([sys.executable, "train.py", "fit", "--config", str(run_dir / "config.yaml"),
                                "--ckpt_path", "null"], run_dir / "train.log")
            return {**json.loads((run_dir / "steps.json").read_text()), "wall_seconds": wall}

        with ThreadPoolExecutor(len(bases)) as pool:
            runs = dict(zip(bases, pool.map(one, bases)))
        costs = {name: step_cost(times) for name, times in runs.items()}
        for name, cost in costs.items():
            cost.update(vs_fp=cost["cpu_per_step"] / costs["fp"]["cpu_per_step"], wall_seconds=runs[name]["wall_seconds"])
        repeats.append(costs)
        print(f"repeat {repeat}: " + ", ".join(f"{n} {c['cpu_per_step']:.4f} CPU s/step (x{c['vs_fp']:.2f}, decode "
                                               f"{c['decode_cpu_per_step']:.4f})" for n, c in costs.items()),
              file=sys.stderr, flush=True)
    result = {"settings": {**{k: v for k, v in vars(args).items() if k != "command"}, "threads": 1},
              "repeats": repeats, "median_vs_fp": {n: statistics.median(r[n]["vs_fp"] for r in repeats) for n in bases},
              "median_cpu_per_step": {n: statistics.median(r[n]["cpu_per_step"] for r in repeats) for n in bases},
              "median_decode_share": {n: statistics.median(r[n]["decode_cpu_per_step"] / r[n]["cpu_per_step"]
                                                           for r in repeats) for n in bases}}
    print(json.dumps({k: result[k] for k in ("median_cpu_per_step", "median_vs_fp", "median_decode_share")}))
    out = Path(args.output)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.setdefault("step_cost", {})[args.label] = result
    out.write_text(json.dumps(previous, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("run", help="the CoRSA demo edit on the fp, packed and NF4 world model")
    bench.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    bench.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    bench.add_argument("--packed", help="a packed export of the world model to use instead of making one")
    bench.add_argument("--work-dir", default="runs/bench_edit_packed", help="export, runs and logs")
    bench.add_argument("--output", default=str(RESULTS))
    cost = commands.add_parser("steps", help="step cost of the three bases side by side (short runs)")
    cost.add_argument("--label", required=True, help="the key of this measurement in the results' step_cost")
    cost.add_argument("--fp", required=True, help="the fp model (its NF4 base is this with load_in_4bit)")
    cost.add_argument("--packed", required=True, help="its packed export")
    cost.add_argument("--config", default=str(EDIT_CONFIG), help="the editing config the runs start from")
    cost.add_argument("--source", help="the edit records (default: the config's)")
    cost.add_argument("--edits", type=int, default=20)
    cost.add_argument("--epochs", type=int, default=4)
    cost.add_argument("--repeats", type=int, default=2)
    cost.add_argument("--work-dir", default="runs/bench_edit_packed")
    cost.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    return run(args) if args.command == "run" else steps(args)


if __name__ == "__main__":
    main()
