"""EditReport's summary of a sequential run, on a hand-made history."""

import pytest

from callbacks.edit_report import plot_history, summarise, summary_table

HISTORY = {
    0: {"all": {"ES": 0.9}, "by_edit_round": {0: {"ES": 0.9}}},
    1: {"all": {"ES": 0.8}, "by_edit_round": {0: {"ES": 0.7}, 1: {"ES": 0.9}}},
    2: {"all": {"ES": 0.7}, "by_edit_round": {0: {"ES": 0.5}, 1: {"ES": 0.8}, 2: {"ES": 0.8}}},
}


def test_summary_immediate_final_forgetting():
    summary = summarise(HISTORY)
    assert summary["after_last_round"] == {"ES": 0.7}
    assert summary["immediate"]["ES"] == pytest.approx((0.9 + 0.9 + 0.8) / 3)  # diagonal
    assert summary["final"]["ES"] == pytest.approx((0.5 + 0.8 + 0.8) / 3)  # last row
    assert summary["forgetting"]["ES"] == pytest.approx(((0.9 - 0.5) + (0.9 - 0.8)) / 2)  # rounds before the last


def test_single_round_has_no_forgetting():
    assert summarise({0: HISTORY[0]})["forgetting"] == {}


def test_plot_is_written(tmp_path):
    plot_history(HISTORY, tmp_path / "m.png", "title")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_table_lists_every_metric_with_its_three_numbers():
    summary = summarise(HISTORY)
    lines = summary_table(summary).splitlines()
    assert lines[0].split() == ["metric", "immediate", "final", "forgetting"]
    for line, name in zip(lines[1:], sorted(summary["final"])):
        cells = line.split()
        assert cells[0] == name
        assert [float(c) for c in cells[1:]] == [round(summary[k][name], 3) for k in ("immediate", "final", "forgetting")]


def test_sparse_sub_kinds_are_summarised_over_the_rounds_that_have_them(tmp_path):
    # round 1's edits have no Reasoning question: its score is summarised over rounds 0 and 2
    name = "portability_reasoning_token_acc"
    history = {
        0: {"all": {"ES": 1.0, name: 0.6}, "by_edit_round": {0: {"ES": 1.0, name: 0.6}}},
        1: {"all": {"ES": 0.9, name: 0.5}, "by_edit_round": {0: {"ES": 0.8, name: 0.5}, 1: {"ES": 1.0}}},
        2: {"all": {"ES": 0.8, name: 0.4}, "by_edit_round": {0: {"ES": 0.6, name: 0.2}, 1: {"ES": 0.9},
                                                             2: {"ES": 0.9, name: 0.6}}},
    }
    summary = summarise(history)
    assert summary["edit_rounds"] == {"ES": [0, 1, 2], name: [0, 2]}
    assert summary["immediate"][name] == pytest.approx((0.6 + 0.6) / 2)
    assert summary["final"][name] == pytest.approx((0.2 + 0.6) / 2)
    assert summary["forgetting"][name] == pytest.approx(0.6 - 0.2)
    assert summary["forgetting"]["ES"] == pytest.approx(((1.0 - 0.6) + (1.0 - 0.9)) / 2)
    row = next(line for line in summary_table(summary).splitlines() if line.startswith(name))
    assert [float(c) for c in row.split()[1:]] == [0.6, 0.4, 0.4]
    plot_history(history, tmp_path / "m.png", "knowedit")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sub_kind_only_the_last_round_has_gets_no_forgetting():
    name = "portability_one_hop_token_acc"
    history = {0: {"all": {"ES": 1.0}, "by_edit_round": {0: {"ES": 1.0}}},
               1: {"all": {"ES": 1.0, name: 0.5}, "by_edit_round": {0: {"ES": 1.0}, 1: {"ES": 1.0, name: 0.5}}}}
    summary = summarise(history)
    assert summary["immediate"][name] == summary["final"][name] == 0.5
    assert name not in summary["forgetting"]
    assert "-" in next(line for line in summary_table(summary).splitlines() if line.startswith(name))
