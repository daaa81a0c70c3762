"""bench.edit_combine: result files of separate bench.edit_quality jobs in one table."""

import json
import math
import re

import pytest

from bench.edit_combine import main

SETTINGS = {"benchmark": "counterfact", "model": "m", "source": "s.json", "rounds": "2", "edits_per_round": "3",
            "max_new_tokens": "8", "epochs_per_round": "5", "batch_size": "8", "learning_rate": "0.003",
            "rho": "0.05", "beta": "0.1", "lora_r": "8", "lora_targets": "None", "warmup_steps": "2",
            "locality_weight": "3.0", "locality_anchors": "4", "locate": "{}"}


def _scores(es: float, ps: float, ns: float) -> dict[str, float]:
    return {"ES": es, "PS": ps, "NS": ns, "locality_token_acc": 0.9}


def _run(ps: float, seed: int | None = None) -> dict:
    run = {"summary": {"immediate": _scores(1.0, ps, 0.5), "forgetting": _scores(0.0, 0.0, 0.0)},
           "rounds": [{"eval_round": r, "all": _scores(1.0, ps, 0.5)} for r in range(2)],
           "saved_adapter": _scores(1.0, ps, 0.5), "saved_vs_in_memory": 0.0, "seconds_per_round": 3.0,
           "seconds_per_step": 0.5}
    return run if seed is None else {**run, "seed": seed}


def _file(tmp_path, name: str, seeds: list[int], runs: dict[str, list[dict]], complete: bool = True,
          unedited_ns: float = 0.8, **settings) -> str:
    path = tmp_path / name
    unedited = [{**_scores(0.2, 0.3, unedited_ns), "seed": s} for s in seeds]
    path.write_text(json.dumps({"settings": {**SETTINGS, "seeds": str(seeds), **settings}, "complete": complete,
                                "runs": runs, "unedited": unedited}))
    return str(path)


def test_runs_of_separate_jobs_share_one_table_with_paired_differences(tmp_path, capsys):
    first = _file(tmp_path, "a.json", [0, 1], {"lora": [_run(0.5), _run(0.6)], "corsa": [_run(0.6), _run(0.8)]})
    # an older file: no seed stored with its runs, but every seed ran, so the order says which
    second = _file(tmp_path, "b.json", [2], {"lora": [_run(0.7)], "corsa": [_run(0.7)]})
    out = tmp_path / "combined.json"
    combined = main([first, second, "--base", "lora", "--out", str(out)])
    assert [r["seed"] for r in combined["runs"]["corsa"]] == [0, 1, 2]
    diffs = [0.1, 0.2, 0.0]  # corsa minus lora, seed by seed
    mean, se, seeds = combined["paired_vs_base"]["corsa"]["PS"]
    assert math.isclose(mean, 0.1) and math.isclose(se, 0.1 / math.sqrt(3)) and seeds == 3
    assert math.isclose(combined["table"]["corsa"]["PS"][0], 0.7)
    assert "seconds_per_step" not in combined["table"]["corsa"]  # costs of separate commands are not compared
    assert json.loads(out.read_text())["settings"]["seeds"] == "[0, 1, 2]"
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "| corsa | +0.0 ± 0.0 | +10.0 ± 5.8 |" in capsys.readouterr().out


def test_a_locate_method_needs_no_training_settings_in_common(tmp_path):
    adapters = _file(tmp_path, "a.json", [0], {"lora": [_run(0.5, 0)]})
    rome = _file(tmp_path, "r.json", [0], {"rome": [_run(0.9, 0)]}, epochs_per_round="10", locate="{'v_steps': 15}")
    memit = _file(tmp_path, "m.json", [0], {"memit": [_run(0.6, 0)]}, locate="{'mom2_weight': 1607.0}")
    combined = main([adapters, rome, memit, "--out", str(tmp_path / "c.json")])  # each method its own --locate
    assert math.isclose(combined["paired_vs_base"]["rome"]["PS"][0], 0.4)
    other_rome = _file(tmp_path, "r1.json", [1], {"rome": [_run(0.9, 1)]}, locate="{'v_steps': 25}")
    with pytest.raises(SystemExit):  # one method, two --locate settings: refused
        main([adapters, rome, other_rome, "--out", str(tmp_path / "c.json")])


@pytest.mark.parametrize("second, message", [
    ({"runs": {"corsa": [_run(0.7, 1)]}, "edits_per_round": "5"},
     r"b.json: edits_per_round = 5, but .*a.json has 3"),
    ({"runs": {"corsa": [_run(0.7, 1)]}, "learning_rate": "0.001"}, "learning_rate = 0.001"),
    ({"runs": {"lora": [_run(0.7, 0)]}}, r"lora seed 0 is also in .*a.json"),
    ({"runs": {"corsa": [_run(0.7, 0)]}, "unedited_ns": 0.6}, "the unedited NS of seed 0 is 0.6"),
    ({"runs": {"corsa": [_run(0.7)]}, "seeds": [0, 1]}, r"corsa run #0 stores no seed, and 1 of the seeds \[0, 1\]"),
])
def test_files_that_would_not_make_a_fair_table_are_refused(tmp_path, capsys, second, message):
    first = _file(tmp_path, "a.json", [0], {"lora": [_run(0.5, 0)]})
    settings = {k: v for k, v in second.items() if k not in ("runs", "seeds", "unedited_ns")}
    other = _file(tmp_path, "b.json", second.get("seeds", [0]), second["runs"],
                  unedited_ns=second.get("unedited_ns", 0.8), **settings)
    with pytest.raises(SystemExit):
        main([first, other, "--out", str(tmp_path / "c.json")])
    assert re.search(message, capsys.readouterr().err)


def test_ns_is_shared_against_the_unedited_model_on_the_methods_own_seeds(tmp_path):
    first = _file(tmp_path, "a.json", [0], {"lora": [_run(0.5, 0)], "corsa": [_run(0.5, 0)]}, unedited_ns=0.8)
    second = _file(tmp_path, "b.json", [1], {"lora": [_run(0.5, 1)]}, unedited_ns=0.4)
    table = main([first, second, "--out", str(tmp_path / "c.json")])["table"]
    assert math.isclose(table["corsa"]["NS_vs_unedited"], 0.5 / 0.8)  # seed 0 only: not the mean over 0 and 1
    assert math.isclose(table["lora"]["NS_vs_unedited"], 0.5 / 0.6)
