import math

import pytest
import torch
import torch.nn.functional as F

from lit_corsa.losses import dpo_loss, sequence_logprobs, sft_loss, token_counts


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 6, 7, generator=g) * 3
    labels = torch.randint(0, 7, (3, 6), generator=g)
    labels[0, :2] = -100  # prompt of 2, answer of 4
    labels[1, :4] = -100  # prompt of 4, answer of 1, one padding
    labels[1, 5] = -100
    labels[2, :1] = -100  # prompt of 1, answer of 5
    return logits, labels


def _manual_logprobs(logits, labels):
    out = []
    for b in range(labels.shape[0]):
        total = 0.0
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                total += torch.log_softmax(logits[b, t - 1].double(), dim=-1)[labels[b, t]].item()
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_sequence_logprobs_matches_a_manual_loop():
    logits, labels = _batch()
    got = sequence_logprobs(logits, labels)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _manual_logprobs(logits, labels), atol=1e-5, rtol=1e-6)


def test_sequence_logprobs_on_hand_numbers_uses_the_causal_shift():
    # position 0 predicts label[1]=0 with p=1/2; position 1 predicts label[2]=1 with p=1/4;
    # the last position's logits predict nothing and are set to something absurd.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(1 / 8), abs=1e-6)


def test_sequence_logprobs_computes_in_fp32_from_bf16_logits():
    logits, labels = _batch(1)
    low = logits.bfloat16()
    got = sequence_logprobs(low, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sequence_logprobs(low.float(), labels), atol=0, rtol=0)


def test_token_counts_follow_the_shift():
    labels = torch.tensor([[5, -100, 3, 4], [-100, -100, -100, 2], [-100, -100, -100, -100]])
    # labels[0, 0] is never predicted, so it does not count.
    assert token_counts(labels).tolist() == [2, 1, 0]


def _sft(logits, labels):
    return sft_loss(sequence_logprobs(logits, labels), token_counts(labels))


def test_sft_loss_is_the_token_level_mean_like_cross_entropy():
    logits, labels = _batch(2)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(_sft(logits, labels), expected, atol=1e-6, rtol=1e-6)
    # and not the mean of per-example means (answers have 4, 1 and 5 tokens)
    per_example = -sequence_logprobs(logits, labels) / token_counts(labels)
    assert abs(_sft(logits, labels).item() - per_example.mean().item()) > 1e-3


def test_sft_loss_on_hand_numbers():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    assert _sft(logits, labels).item() == pytest.approx(3 * math.log(2) / 2, abs=1e-6)


def test_sft_loss_without_answer_tokens_is_zero_with_zero_gradient():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.full((2, 4), -100)
    loss = _sft(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dpo_loss_on_hand_picked_numbers():
    pc = torch.tensor([-1.0, -4.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    rc = torch.tensor([-2.0, -2.0])
    rr = torch.tensor([-2.0, -2.0])
    loss, margin, reward_margin = dpo_loss(pc, pr, rc, rr, beta=0.5)
    # z = β[(πc − rc) − (πr − rr)] = 0.5·[1 − (−1)] = 1  and  0.5·[−2 − 1] = −1.5
    z = [1.0, -1.5]
    expected = sum(math.log1p(math.exp(-v)) for v in z) / 2  # −log σ(z) = log(1 + e^{−z})
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert margin.tolist() == [2.0, -3.0]
    assert reward_margin.tolist() == pytest.approx(z)
    assert not margin.requires_grad and not reward_margin.requires_grad
    loss.backward()
    # d loss / d πc = −β (1 − σ(z)) / B
    sig = [1 / (1 + math.exp(-v)) for v in z]
    assert pc.grad.tolist() == pytest.approx([-0.5 * (1 - s) / 2 for s in sig], abs=1e-6)
    assert pr.grad.tolist() == pytest.approx([0.5 * (1 - s) / 2 for s in sig], abs=1e-6)


def test_dpo_loss_default_beta_and_stability():
    zero = torch.zeros(1)
    loss, _, reward_margin = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), zero, zero)
    assert reward_margin.item() == pytest.approx(0.1)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-6)
    # a hopeless margin: −log σ(−300) = 300, not inf
    loss, _, _ = dpo_loss(torch.tensor([-3000.0]), torch.tensor([0.0]), zero, zero)
    assert loss.item() == pytest.approx(300.0, rel=1e-6)
