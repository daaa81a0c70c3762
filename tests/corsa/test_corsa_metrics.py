import math

import pytest
import torch

from lit_corsa.metrics import (
    GenerationMatch,
    PassAtK,
    ProbabilityComparison,
    TokenAccuracy,
    forgetting,
    pass_at_k,
)

# summed log-probs and token counts; normalised: new = [-2, -2, -3, -1], old = [-3, -1, -3, -1.5]
LOGP_NEW = torch.tensor([-2.0, -6.0, -3.0, -4.0])
COUNT_NEW = torch.tensor([1, 3, 1, 4])
LOGP_OLD = torch.tensor([-3.0, -1.0, -3.0, -1.5])
COUNT_OLD = torch.tensor([1, 1, 1, 1])


def test_probability_comparison_is_length_normalised_and_strict():
    es = ProbabilityComparison()
    es.update(LOGP_NEW, LOGP_OLD, COUNT_NEW, COUNT_OLD)
    # holds for examples 0 and 3; example 3 only after length normalisation (-4 < -1.5 summed); 2 is a tie
    assert es.compute().item() == pytest.approx(0.5)
    reverse = ProbabilityComparison()  # the other way round: strict both ways, so the tie counts for neither
    reverse.update(LOGP_OLD, LOGP_NEW, COUNT_OLD, COUNT_NEW)
    assert reverse.compute().item() == pytest.approx(0.25)


def test_probability_comparison_accumulates_over_updates():
    es = ProbabilityComparison()
    es.update(LOGP_NEW[:1], LOGP_OLD[:1], COUNT_NEW[:1], COUNT_OLD[:1])  # 1 of 1
    es.update(LOGP_NEW[1:], LOGP_OLD[1:], COUNT_NEW[1:], COUNT_OLD[1:])  # 1 of 3
    assert es.compute().item() == pytest.approx(0.5)


def test_probability_comparison_rejects_bad_input():
    with pytest.raises(ValueError, match="token"):
        ProbabilityComparison().update(LOGP_NEW, LOGP_OLD, torch.tensor([1, 0, 1, 1]), COUNT_OLD)


def _one_hot_logits(predictions, vocab=4):
    """Logits whose argmax at position t is predictions[b][t]."""
    return torch.nn.functional.one_hot(torch.tensor(predictions), vocab).float() * 5


def test_token_accuracy_averages_per_example_fractions():
    # argmax at positions 0..2 predicts labels 1..3 (the last position predicts nothing)
    predictions = [[2, 0, 1, 3], [1, 0, 2, 2], [0, 0, 0, 0]]
    labels = torch.tensor([
        [-100, 2, 3, 1],  # right, wrong, right -> 2/3
        [-100, -100, 0, -100],  # one answer token, right -> 1 (padding after it is ignored)
        [-100, -100, -100, -100],  # no answer token -> skipped
    ])
    acc = TokenAccuracy()
    acc.update(_one_hot_logits(predictions), labels)
    # per-example mean (2/3 + 1)/2 = 5/6, not the token-level 3/4
    assert acc.compute().item() == pytest.approx(5 / 6)


def test_generation_match_is_case_insensitive_containment():
    gm = GenerationMatch()
    gm.update(["The answer is Italian.", "it is german", "Paris"], [" italian", "German", "Rome"])
    assert gm.compute().item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="empty"):
        gm.update(["anything"], ["  "])
    with pytest.raises(ValueError, match="answers"):
        gm.update(["a", "b"], ["a"])


def test_pass_at_k_matches_the_combinatorial_formula():
    for n in range(1, 8):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)
    assert pass_at_k(5, 2, 1) == pytest.approx(2 / 5)  # pass@1 is the fraction correct
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_pass_at_k_metric_averages_over_problems_for_several_k():
    metric = PassAtK(k=(1, 2))
    metric.update(torch.tensor([5, 5]), torch.tensor([0, 1]))
    metric.update(torch.tensor([5]), torch.tensor([5]))
    out = metric.compute()
    assert set(out) == {"pass@1", "pass@2"}
    # pass@1: (0 + 1/5 + 1)/3; pass@2: (0 + [1 − C(4,2)/C(5,2) = 0.4] + 1)/3
    assert out["pass@1"].item() == pytest.approx(1.2 / 3)
    assert out["pass@2"].item() == pytest.approx(1.4 / 3)


def test_states_merge_like_ranks_under_ddp():
    # two "ranks" with unequal shards must give the single-process answer (sums, not means of means)
    predictions = [[2, 0, 1, 3], [1, 0, 2, 2], [3, 3, 3, 3]]
    labels = torch.tensor([[-100, 2, 3, 1], [-100, -100, 0, -100], [-100, 0, 0, 0]])
    whole, left, right = TokenAccuracy(), TokenAccuracy(), TokenAccuracy()
    whole.update(_one_hot_logits(predictions), labels)
    left.update(_one_hot_logits(predictions[:1]), labels[:1])
    right.update(_one_hot_logits(predictions[1:]), labels[1:])
    left.merge_state(right)
    assert left.compute().item() == pytest.approx(whole.compute().item())
    assert whole.compute().item() == pytest.approx((2 / 3 + 1 + 0) / 3)  # mean of rank means: 7/12

    a, b = PassAtK(k=1), PassAtK(k=1)
    a.update(torch.tensor([4]), torch.tensor([4]))
    b.update(torch.tensor([4, 4, 4]), torch.tensor([0, 0, 0]))
    a.merge_state(b)
    assert a.compute()["pass@1"].item() == pytest.approx(0.25)


def test_forgetting_on_a_hand_made_table():
    scores = {
        1: {1: 0.90},
        2: {1: 0.70, 2: 0.95},
        3: {1: 0.60, 2: 0.80, 3: 1.00},
    }
    # round 1: 0.90 − 0.60 = 0.30; round 2: 0.95 − 0.80 = 0.15; the last round is not counted
    assert forgetting(scores) == pytest.approx(0.225)
    improved = {1: {1: 0.5}, 2: {1: 0.7, 2: 0.9}}
    assert forgetting(improved) == pytest.approx(-0.2)  # negative: later training helped


def test_forgetting_needs_two_rounds_and_complete_entries():
    with pytest.raises(ValueError):
        forgetting({1: {1: 0.9}})
    with pytest.raises(KeyError):
        forgetting({1: {1: 0.9}, 2: {2: 0.8}})  # round-1 edits not rescored after round 2
    with pytest.raises(KeyError):
        forgetting({1: {}, 2: {1: 0.5, 2: 0.8}})  # round-1 edits not scored right after round 1
