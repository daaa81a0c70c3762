import math

import pytest
import torch

from lit_tacq.saliency import (
    NEEDS,
    SCORERS,
    LayerStats,
    global_topk_mask,
    score,
    tacq_saliency,
)

W = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.0]])
A = torch.tensor([[1.0, 2.0, 0.0], [3.0, 1.0, 1.0]])
Q = torch.tensor([[1.5, -2.0, 2.0], [0.0, 0.5, -0.5]])  # |Q - W| = [[.5, 0, 1], [.5, .5, .5]]


def test_tacq_saliency_hand_computed():
    expected = torch.tensor([[1 * 1 * 0.5, 2 * 2 * 0.0, 3 * 0 * 1.0], [0.5 * 3 * 0.5, 0 * 1 * 0.5, 1 * 1 * 0.5]])
    assert torch.equal(tacq_saliency(W, A, Q), expected)
    assert torch.equal(score("tacq", LayerStats(W, A, Q)), expected)


def test_ablation_scorers_hand_computed():
    stats = LayerStats(W, grad_abs_sum=A, quantized=Q)
    assert torch.equal(score("grad_delta", stats), torch.tensor([[0.5, 0.0, 0.0], [1.5, 0.5, 0.5]]))
    assert torch.equal(score("weight_grad", stats), torch.tensor([[1.0, 4.0, 0.0], [1.5, 0.0, 1.0]]))
    assert torch.equal(score("magnitude", stats), W.abs())


def test_hessian_scorer_with_identity_hessian():
    # H = I damped by 1 % -> H^-1 = I / 1.01, so U_jj^2 = 1 / 1.01 and the score is 1.01 (W - Q)^2
    stats = LayerStats(W, quantized=Q, hessian=torch.eye(3))
    torch.testing.assert_close(score("hessian", stats), 1.01 * (W - Q).square())


def test_hessian_scorer_weighs_columns_by_inverse_hessian():
    H = torch.diag(torch.tensor([1.0, 1.0, 100.0]))  # column 2 sees large inputs: errors there cost more
    stats = LayerStats(torch.zeros(1, 3), quantized=torch.ones(1, 3), hessian=H)
    s = score("hessian", stats)[0]
    assert s[2] > 10 * s[0]


def test_random_scorer_is_seeded():
    a = score("random", LayerStats(W, seed=1))
    assert torch.equal(a, score("random", LayerStats(W, seed=1)))
    assert not torch.equal(a, score("random", LayerStats(W, seed=2)))


def test_scorer_errors():
    with pytest.raises(ValueError, match="grad_abs_sum"):
        score("tacq", LayerStats(W, quantized=Q))
    with pytest.raises(ValueError, match="unknown scorer"):
        score("nope", LayerStats(W))


def test_global_topk_is_one_ranking_over_all_layers():
    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(8, 16, generator=g),
        "b": torch.rand(4, 4, generator=g) + 1.0,  # every entry beats every other layer's
        "c": torch.rand(32, 8, generator=g),
    }
    total = sum(s.numel() for s in scores.values())
    fraction = 0.05
    masks = global_topk_mask(scores, fraction)
    k = math.floor(fraction * total)
    assert sum(int(m.sum()) for m in masks.values()) == k
    assert masks["b"].sum() == min(k, 16)  # all of b beats everything else: no per-layer budget
    flat = torch.cat([s.flatten() for s in scores.values()])
    flat_mask = torch.cat([m.flatten() for m in masks.values()])
    assert flat[flat_mask].min() > flat[~flat_mask].max()
    assert set(flat[flat_mask].tolist()) == set(flat.topk(k).values.tolist())


def test_global_topk_breaks_ties_by_order_and_handles_signs():
    scores = {"x": torch.full((2, 3), 0.5), "y": torch.tensor([[-1.0, 0.5, 2.0]])}
    masks = global_topk_mask(scores, 4 / 9)  # k = 4: the 2.0, then three of the seven 0.5s
    assert masks["y"].tolist() == [[False, False, True]]
    assert masks["x"].tolist() == [[True, True, True], [False, False, False]]
    assert global_topk_mask({"n": torch.tensor([-3.0, -1.0, -2.0])}, 0.34)["n"].tolist() == [False, True, False]


def test_global_topk_edge_fractions():
    scores = {"a": torch.rand(3, 3)}
    assert not global_topk_mask(scores, 0.0)["a"].any()
    assert global_topk_mask(scores, 1.0)["a"].all()
    with pytest.raises(ValueError):
        global_topk_mask(scores, 1.5)
    with pytest.raises(ValueError, match="NaN"):
        global_topk_mask({"a": torch.tensor([float("nan"), 1.0])}, 0.5)


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_needs_lists_exactly_what_each_scorer_reads(name):
    available = {"grad_abs_sum": A, "quantized": Q, "hessian": torch.eye(3)}
    assert set(NEEDS) == set(SCORERS)
    score(name, LayerStats(W, **{k: v for k, v in available.items() if k in NEEDS[name]}))
    for missing in NEEDS[name]:
        with pytest.raises(ValueError, match=missing):
            score(name, LayerStats(W, **{k: v for k, v in available.items() if k in NEEDS[name] - {missing}}))
