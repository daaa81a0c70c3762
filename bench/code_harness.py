"""Can Pass@k on code updates be trusted? Every reference solution of a real file, through the scoring path.

    python -m bench.code_harness ../shared/data/real/codeupdatearena_grouped_first70.jsonl
    python -m bench.code_harness FILE --jobs 2 --out bench/results/code_harness_first70.json

A generated body is scored by :func:`lit_corsa.sandbox.run_solution` (what
:func:`lit_corsa.evaluation.solution_passes` calls for every sample): the example as the reader made it
(prompt's prelude and header, the example's imports, the update, the unit tests) plus the body. Here the
body is the reference solution's own (the probe's target), read by ``CodeUpdateDataModule`` with every
example made a program probe (``train_examples=0``). A reference that fails there is a harness bug or an
environment gap, never the model's fault, so each failure is listed with its cause.

The yardstick is the dataset's own check (CodeUpdateArena's test bed), rebuilt here from its layout:
per unit test one program of the example's imports, the updated implementation, its install statement
(``math.sin = sin``; ``del`` + ``setattr`` for a renamed function; ``setattr`` for a new one), the whole
reference solution, the test and its call, 15 s each (its timeout). It runs in the same sandbox with the
same memory limit, so a package missing here fails both. Every example lands in one cell of (scoring path,
dataset's check): agreement is what the harness must show; "only the scoring path fails" is a harness bug.
What this rebuild does not copy from the original runs: no memory limit there, multi-threaded BLAS there
(one thread here), and modules its harness process had imported already (``random``, via ``tempfile``).

Prints a table (passed / failed by cause, agreement) and writes JSON (per example: id, package, causes).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data.code_update import CodeUpdateDataModule, split_unit_tests, test_function_names
from data.formats import Probe, read_records
from lit_corsa.sandbox import SandboxResult, run_python, run_solution
from lit_corsa.settings import EvaluationSettings

DATASET_TEST_TIMEOUT_S = 15.0  # CodeUpdateArena's test bed: 15 s per unit test, each in its own program
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt|Iteration|Warning))\b:? ?(.*)$")


@dataclass(frozen=True)
class Outcome:
    """One example through the scoring path and through the dataset's check."""

    example: str
    package: str
    header_differs: bool  # the solution's own def header differs from the dataset's solution_signature
    passed: bool
    cause: str
    detail: str  # the last line of the error, or "" when it passed
    dataset_passed: bool
    dataset_cause: str


def failure_cause(result: SandboxResult) -> str:
    """The reason a run failed, from its error output: a missing package by name, the stage (the dataset's
    set-up code, the solution, a unit test) and the exception type."""
    if result.passed:
        return "passed"
    if result.timed_out:
        return "timed out"
    stderr = result.stderr
    missing = re.findall(r"No module named '([\w.]+)'", stderr)
    if missing:
        return f"package not installed: {missing[-1].split('.')[0]}"
    exceptions = [m for m in (_EXCEPTION_LINE.match(line) for line in stderr.splitlines()) if m]
    kind = exceptions[-1][1] if exceptions else f"exit status {result.returncode}"
    if "SANDBOX: the solution failed to load" in stderr:
        return f"solution: {kind}"
    if "SANDBOX: failed test" in stderr:
        return f"unit test: {kind}"
    return f"set-up (imports, update): {kind}"


def failure_detail(result: SandboxResult, limit: int = 160) -> str:
    """The error's last line (``AttributeError: `np.NaN` was removed in the NumPy 2.0 release...``)."""
    if result.passed:
        return ""
    if result.timed_out:
        return "the program ran out of time"
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("SANDBOX:")]
    return lines[-1].strip()[:limit] if lines else f"exit status {result.returncode}, no error output"


# ---- the dataset's own check, as its test bed lays it out ------------------------------------------------

def _function_names(source: str) -> list[str]:
    return [n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def install_statement(update: dict[str, Any]) -> str:
    """CodeUpdateArena's "update enforce statement" for an update type."""
    path, update_type = update["function_path"], update.get("update_type", "")
    parent, _, old_name = path.rpartition(".")
    names = _function_names(update["implementation"])
    new_name = old_name if old_name in names else names[0]
    if update_type == "modify-function-name":
        return f"del {parent}.{old_name}\nsetattr({parent}, {new_name!r}, {new_name})"
    if update_type == "add-function":
        return f"setattr({parent}, {new_name!r}, {new_name})"
    return f"{path} = {new_name}"


def dataset_check_programs(update: dict[str, Any], example: dict[str, Any]) -> list[str]:
    """One program per unit test: imports, implementation, install, whole reference solution, test, call."""
    imports = example.get("prog_syn_imports", example.get("imports", update["imports"]))
    programs = []
    for test in split_unit_tests(example["unit_tests"]):
        calls = "\n".join(f"{name}()" for name in test_function_names([test]))
        programs.append("\n\n".join((imports, update["implementation"], install_statement(update),
                                     example["ref_solution"], test, calls)) + "\n")
    return programs


def raw_examples(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(update, example) pairs in the reader's order: grouped by ``update_id`` in order of first appearance."""
    grouped: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for row in rows:
        examples = row.get("prog_syn_examples", [row])
        grouped.setdefault(row["update"]["update_id"], []).extend((row["update"], e) for e in examples)
    return [pair for pairs in grouped.values() for pair in pairs]


# ---- one example, both ways ------------------------------------------------------------------------------

def _bare_signature(text: str) -> str:
    return re.sub(r"\s+", "", text).removeprefix("def").rstrip(":")


def _header_differs(example: dict[str, Any], probe: Probe) -> bool:
    return _bare_signature(example["solution_signature"]) != _bare_signature(probe.program.solution_signature)


def check_example(example_id: str, update: dict[str, Any], example: dict[str, Any], probe: Probe,
                  timeout_s: float, memory_mb: int) -> Outcome:
    result = run_solution(probe.program, probe.target, timeout_s, memory_mb)
    dataset_cause = "passed"
    for program in dataset_check_programs(update, example):
        dataset_result = run_python(program, timeout_s=DATASET_TEST_TIMEOUT_S, memory_mb=memory_mb)
        if not dataset_result.passed:
            # its programs end with the test call, not the scoring path's "failed test" marker
            dataset_cause = failure_cause(dataset_result).replace("set-up (imports, update)", "program")
            break
    return Outcome(example_id, update["function_path"].split(".")[0], _header_differs(example, probe),
                   result.passed, failure_cause(result), failure_detail(result), dataset_cause == "passed",
                   dataset_cause)


def program_probes(source: str) -> list[tuple[str, Probe]]:
    """Every example of ``source`` as the product reads it, each a program probe (none held back for training)."""
    records = CodeUpdateDataModule(source, train_examples=0, shuffle_seed=None).load_records()
    return [(f"{record.record_id}#{i}", probe) for record in records
            for i, probe in enumerate(p for p in record.probes if p.kind == "program")]


def run(source: str, timeout_s: float, memory_mb: int, jobs: int,
        progress: Callable[[str], None] = lambda line: None) -> list[Outcome]:
    probes = program_probes(source)
    raw = raw_examples(read_records(source))
    if len(raw) != len(probes):
        raise RuntimeError(f"{source}: the reader made {len(probes)} program probes from {len(raw)} examples")
    for (example_id, probe), (_, example) in zip(probes, raw):
        if probe.target.strip() not in example["ref_solution"].replace("\r\n", "\n"):
            raise RuntimeError(f"{source}: {example_id}: probe and raw example out of step")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(check_example, example_id, update, example, probe, timeout_s, memory_mb)
                   for (example_id, probe), (update, example) in zip(probes, raw)]
        outcomes = []
        for done, future in enumerate(futures, start=1):
            outcomes.append(future.result())
            if done % 25 == 0 or done == len(futures):
                progress(f"{done}/{len(futures)} examples")
    return outcomes


def summarise(outcomes: list[Outcome]) -> dict[str, Any]:
    total = len(outcomes)
    cells = Counter((o.passed, o.dataset_passed) for o in outcomes)
    return {
        "examples": total,
        "scoring_path_passed": sum(o.passed for o in outcomes),
        "dataset_check_passed": sum(o.dataset_passed for o in outcomes),
        "both_passed": cells[True, True],
        "both_failed": cells[False, False],
        "only_scoring_path_failed": cells[False, True],
        "only_dataset_check_failed": cells[True, False],
        "scoring_path_failures": dict(Counter(o.cause for o in outcomes if not o.passed).most_common()),
        "dataset_check_failures": dict(Counter(o.dataset_cause for o in outcomes
                                               if not o.dataset_passed).most_common()),
        "by_package": {package: {"examples": sum(o.package == package for o in outcomes),
                                 "passed": sum(o.passed for o in outcomes if o.package == package)}
                       for package in sorted({o.package for o in outcomes})},
        "headers_differing_from_signature": sum(o.header_differs for o in outcomes),
    }


def table(summary: dict[str, Any], outcomes: list[Outcome]) -> str:
    total = summary["examples"]

    def share(n: int) -> str:
        return f"{n} / {total} ({100 * n / max(total, 1):.1f} %)"

    lines = ["| | examples |", "|---|---|",
             f"| scoring path: passed | {share(summary['scoring_path_passed'])} |",
             f"| dataset's check: passed | {share(summary['dataset_check_passed'])} |",
             f"| both passed | {summary['both_passed']} |", f"| both failed | {summary['both_failed']} |",
             f"| only the scoring path failed | {summary['only_scoring_path_failed']} |",
             f"| only the dataset's check failed | {summary['only_dataset_check_failed']} |"]
    lines += ["", "| failed because (scoring path) | examples |", "|---|---|"]
    lines += [f"| {cause} | {count} |" for cause, count in summary["scoring_path_failures"].items()] or ["| - | 0 |"]
    failed = [o for o in outcomes if not (o.passed and o.dataset_passed)]
    if failed:
        lines += ["", "Failures (scoring path | dataset's check | the error):"]
        lines += [f"- {o.example}: {o.cause} | {o.dataset_cause} | {o.detail}" for o in failed]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="a CodeUpdateArena file (grouped arena.jsonl lines or hub rows)")
    defaults = EvaluationSettings()
    parser.add_argument("--timeout-s", type=float, default=defaults.sandbox_timeout_s,
                        help="per scoring-path program (the evaluation's default)")
    parser.add_argument("--memory-mb", type=int, default=defaults.sandbox_memory_mb)
    parser.add_argument("--jobs", type=int, default=1, help="programs run side by side")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results (default bench/results/code_harness_<file stem>.json)")
    args = parser.parse_args(argv)
    out = args.out or Path("bench/results") / f"code_harness_{Path(args.source).stem}.json"
    start = time.perf_counter()
    outcomes = run(args.source, args.timeout_s, args.memory_mb, args.jobs,
                   progress=lambda line: print(line, file=sys.stderr, flush=True))
    summary = summarise(outcomes)
    print(table(summary, outcomes))
    result = {"settings": {"source": args.source, "timeout_s": args.timeout_s, "memory_mb": args.memory_mb,
                           "jobs": args.jobs, "seconds": round(time.perf_counter() - start, 1)},
              "summary": summary, "examples": [asdict(o) for o in outcomes]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
