"""One table from several ``bench.edit_quality`` result files: seeds and methods run as separate jobs.

    python -m bench.edit_combine bench/results/smollm2_edit_counterfact*.json --base lora \
        --out bench/results/smollm2_edit_counterfact_combined.json

A user who runs one seed (or one method) per job, as a SLURM array or one CPU run at a time, gets one file
per job; this puts their runs side by side as if one command had run them all: the mean ± std table of
``bench.edit_quality``, a per-seed table, and each method's paired difference from ``--base`` (the method minus
the base on the same seed's edits, mean ± standard error over the seeds both ran), plus the per-round plot.
Costs are left out: times are only comparable within one command's runs (read them in the source files).

It refuses what would not be a fair table, naming the file and the field: files that edit other records or
score them otherwise (benchmark, model, source, rounds, edits per round, generation length), adapter methods
trained with other settings, one locate method run with other ``--locate`` settings, two files with the same
(method, seed), or two files whose unedited scores for one seed differ (then the seed picked other records).
A run is matched to its seed by the seed the bench stores with it; in files written before it stored one, a
method that ran every seed of the ``seeds`` setting is matched in order, and one that ran only some is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.edit_quality import UNEDITED, MethodConfig, aggregate, markdown, plot_rounds

# settings that decide which records are edited and how they are scored: equal in every file
PROTOCOL = ("benchmark", "model", "source", "rounds", "edits_per_round", "max_new_tokens")
# settings of the methods that take optimizer steps: equal in every file that ran one
TRAINING = ("epochs_per_round", "batch_size", "learning_rate", "rho", "beta", "lora_r", "lora_targets",
            "warmup_steps", "locality_weight", "locality_anchors")
LOCATE = ("locate",)  # equal in every file that ran a locate method (rome, memit, alphaedit)
PAIRED = ("ES", "PS", "NS")
COST = ("seconds_per_round", "seconds_per_step")  # left out: compare them within one bench.edit_quality file


class CombineError(ValueError):
    """The files cannot share one table (the message names the file and the field)."""


def seeded_runs(path: Path, saved: dict[str, Any]) -> tuple[dict[tuple[str, int], dict], dict[int, dict]]:
    """(method, seed) -> run and seed -> unedited scores of one result file."""
    seeds = json.loads(saved["settings"]["seeds"])

    def seed_of(entry: dict, index: int, count: int, what: str) -> int:
        if "seed" in entry:
            return int(entry["seed"])
        if count == len(seeds):  # one entry per seed, in seed order (bench.edit_quality.save)
            return seeds[index]
        raise CombineError(f"{path}: {what} #{index} stores no seed, and {count} of the seeds {seeds} ran (an "
                           "unfinished file), so which seed it ran is unknown")

    runs = {}
    for method, entries in saved["runs"].items():
        for i, run in enumerate(entries):
            runs[(method, seed_of(run, i, len(entries), f"{method} run"))] = run
    unedited = {seed_of(u, i, len(saved["unedited"]), "unedited row"): u for i, u in enumerate(saved["unedited"])}
    return runs, unedited


def _takes_steps(method: str) -> bool:
    return MethodConfig.read(method).takes_optimizer_steps


def check_settings(files: dict[Path, dict[str, Any]]) -> dict[str, str]:
    """The settings the files share, or a :class:`CombineError` naming the first field two of them differ in:
    the protocol in all files, the training settings among files with an adapter method, and ``--locate``
    among the files that ran the same locate method (each reads only its own fields of it)."""
    methods = {m for saved in files.values() for m in saved["runs"]}
    groups = [(PROTOCOL, lambda runs: True), (TRAINING, lambda runs: any(_takes_steps(m) for m in runs))]
    groups += [(LOCATE, lambda runs, m=m: m in runs) for m in sorted(methods) if not _takes_steps(m)]
    combined: dict[str, str] = {}
    for fields, applies in groups:
        first: Path | None = None
        for path, saved in files.items():
            if not applies(saved["runs"]):
                continue
            first = first or path
            for field in fields:
                mine, theirs = saved["settings"].get(field), files[first]["settings"].get(field)
                if mine != theirs:
                    raise CombineError(f"{path}: {field} = {mine}, but {first} has {theirs}: their runs are not "
                                       "comparable in one table")
                if fields is not LOCATE:  # per method: the source files keep it
                    combined[field] = mine
    return combined


def combine(paths: list[Path]) -> tuple[dict[str, list[dict]], list[dict], dict[str, Any]]:
    """Runs by method (in seed order, each with its ``seed``), the unedited rows of the seeds, and the shared
    settings of the files at ``paths``."""
    files = {path: json.loads(path.read_text()) for path in paths}
    for path, saved in files.items():
        if not {"settings", "runs", "unedited"} <= saved.keys():
            raise CombineError(f"{path}: not a bench.edit_quality result (it needs 'settings', 'runs' and 'unedited')")
    settings = check_settings(files)
    runs: dict[tuple[str, int], tuple[Path, dict]] = {}
    unedited: dict[int, tuple[Path, dict]] = {}
    for path, saved in files.items():
        file_runs, file_unedited = seeded_runs(path, saved)
        for key, run in file_runs.items():
            if key in runs:
                raise CombineError(f"{path}: {key[0]} seed {key[1]} is also in {runs[key][0]}; pass one of them")
            # no cost columns: times of runs from different commands were measured under different loads
            kept = {k: v for k, v in run.items() if k not in COST}
            runs[key] = (path, {**kept, "seed": key[1]})
        for seed, scores in file_unedited.items():
            if seed in unedited:
                other, before = unedited[seed]
                differs = [k for k in PAIRED if k in scores and k in before and not math.isclose(scores[k], before[k])]
                if differs:
                    raise CombineError(f"{path}: the unedited {differs[0]} of seed {seed} is {scores[differs[0]]}, "
                                       f"{other} has {before[differs[0]]}: the seed edited other records there")
            else:
                unedited[seed] = (path, {**scores, "seed": seed})
    missing = sorted({seed for _, seed in runs} - set(unedited))
    if missing:
        raise CombineError(f"no file scores the unedited model on seed(s) {missing}")
    methods = list(dict.fromkeys(method for method, _ in runs))
    by_method = {m: [runs[(m, s)][1] for s in sorted(s for mm, s in runs if mm == m)] for m in methods}
    seeds = sorted({seed for _, seed in runs})
    return by_method, [unedited[s][1] for s in seeds], {**settings, "seeds": str(seeds)}


def paired_differences(results: dict[str, list[dict]], base: str) -> dict[str, dict[str, list[float]]]:
    """method -> score -> [mean, standard error, seeds] of (method - base) over the seeds both ran."""
    base_by_seed = {run["seed"]: run["saved_adapter"] for run in results.get(base, [])}
    out: dict[str, dict[str, list[float]]] = {}
    for method, runs in results.items():
        shared = [run for run in runs if run["seed"] in base_by_seed and method != base]
        if not shared:
            continue
        out[method] = {}
        for name in (n for n in PAIRED if all(n in r["saved_adapter"] for r in shared)):
            diffs = [r["saved_adapter"][name] - base_by_seed[r["seed"]][name] for r in shared]
            se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.nan
            out[method][name] = [statistics.mean(diffs), se, len(diffs)]
    return out


def per_seed_markdown(results: dict[str, list[dict]], unedited: list[dict]) -> str:
    """One row per (seed, method): the saved result's scores, NS against that seed's unedited model."""
    head = ["seed", "method", "ES", "PS", "NS", "NS / unedited", "loc. tok. acc", "PS imm.", "forget ES", "forget PS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cell = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for base in unedited:
        seed = base["seed"]
        rows = [(UNEDITED, base, {}, {})] + [
            (m, r["saved_adapter"], r["summary"]["immediate"], r["summary"].get("forgetting", {}))
            for m, runs in results.items() for r in runs if r["seed"] == seed]
        for method, scores, immediate, forgetting in rows:
            ns_share = scores["NS"] / base["NS"] if "NS" in scores and base.get("NS") else None
            lines.append("| " + " | ".join([str(seed), method, *(cell(scores.get(k)) for k in ("ES", "PS", "NS")),
                                            cell(ns_share), cell(scores.get("locality_token_acc")),
                                            cell(immediate.get("PS")), cell(forgetting.get("ES")),
                                            cell(forgetting.get("PS"))]) + " |")
    return "\n".join(lines)


def paired_markdown(paired: dict[str, dict[str, list[float]]], base: str) -> str:
    names = [n for n in PAIRED if any(n in d for d in paired.values())]
    lines = [f"| method minus {base} | " + " | ".join(names) + " | seeds |", "|" + "---|" * (len(names) + 2)]
    for method, diffs in paired.items():
        cells = [("-" if n not in diffs else f"{100 * diffs[n][0]:+.1f}" if math.isnan(diffs[n][1])
                  else f"{100 * diffs[n][0]:+.1f} ± {100 * diffs[n][1]:.1f}") for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {next(iter(diffs.values()))[2]} |")
    return "\n".join(lines) + "\n\n(points: mean ± standard error of the per-seed differences)"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="bench.edit_quality result files")
    parser.add_argument("--base", default="lora", help="the method the paired differences are taken from")
    parser.add_argument("--out", type=Path, required=True, help="the combined JSON (a .png plot beside it)")
    args = parser.parse_args(argv)
    try:
        results, unedited, settings = combine(args.files)
    except CombineError as error:
        parser.error(str(error))
    table = aggregate(results, unedited)
    seeds = {m: [r["seed"] for r in runs] for m, runs in results.items()}
    note = argparse.Namespace(**{k: settings.get(k) for k in ("benchmark", "rounds", "edits_per_round",
                                                              "epochs_per_round")})
    paired = paired_differences(results, args.base)
    differences = paired_markdown(paired, args.base) if paired else f"(no method shares a seed with {args.base})"
    text = "\n\n".join([markdown(table, note, seeds), per_seed_markdown(results, unedited), differences])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    combined = {"combined_from": [str(p) for p in args.files], "settings": settings, "complete": True,
                "table": table, "paired_vs_base": {"base": args.base, **paired}, "runs": results,
                "unedited": unedited, "markdown": text}
    args.out.write_text(json.dumps(combined, indent=1) + "\n")
    title = f"{settings['benchmark']}: mean over seeds {settings['seeds']}"
    plot_rounds(results, args.out.with_suffix(".png"), title)
    print(text)
    return combined


if __name__ == "__main__":
    main()
