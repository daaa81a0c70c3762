"""Sequence log-probabilities and the two CoRSA losses (SFT on the new answer, sigmoid DPO new-vs-old).

Pure functions on tensors. Conventions shared by all of them:

- ``logits`` are ``[B, T, V]`` from a causal LM and ``labels`` are ``[B, T]`` token ids with
  ``ignore_index`` (-100) on prompt and padding positions, aligned with the *inputs*: the usual causal
  shift applies, ``logits[:, t]`` predicts ``labels[:, t + 1]``. ``labels[:, 0]`` is therefore never
  scored (it is always prompt).
- Log-probabilities are computed in fp32 whatever the logits' dtype: bf16 log-softmax over a 128k
  vocabulary loses the small differences that DPO margins are made of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-position ``log p(label_t | prefix)`` in fp32 (zero where masked) and the answer mask, both [B, T-1].

    Uses ``gather - logsumexp`` instead of a full log-softmax so only one fp32 copy of the logits exists.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [B, T]")
    logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != ignore_index
    safe_targets = targets.masked_fill(~mask, 0).unsqueeze(-1)
    picked = logits.gather(-1, safe_targets).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return logp.masked_fill(~mask, 0.0), mask


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Summed answer log-probability per example, ``[B]`` fp32: the quantity the DPO margin compares."""
    logp, _ = _token_logprobs(logits, labels, ignore_index)
    return logp.sum(dim=-1)


def token_counts(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Number of scored answer tokens per example, ``[B]`` (after the causal shift, like the log-probs)."""
    return (labels[:, 1:] != ignore_index).sum(dim=-1)


def sft_loss(sequence_logps: Tensor, counts: Tensor) -> Tensor:
    """Mean negative log-likelihood over all answer tokens of the batch (token-level mean), read off the
    summed log-probs and token counts the DPO term uses too (one forward serves both losses).

    Equals ``F.cross_entropy(..., ignore_index=-100)`` on shifted logits, except that a batch with no
    answer token gives 0 (and a zero gradient) instead of NaN, so one fully truncated batch cannot poison
    the SAM norm; the check costs no device sync.
    """
    return -sequence_logps.sum() / counts.sum().clamp(min=1)


def dpo_loss(
    policy_chosen: Tensor,
    policy_rejected: Tensor,
    ref_chosen: Tensor,
    ref_rejected: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO on summed sequence log-probs: new answer = chosen, old answer = rejected.

    ``loss = mean_b -log σ(β[(πc − rc) − (πr − rr)])``, via ``F.logsigmoid`` so large negative
    arguments do not underflow to ``log 0``. The reference log-probs come from the frozen base model
    and carry no gradient.

    Returns ``(loss, margin, reward_margin)``: ``margin = πc − πr`` per example (the paper's m(φ)) and
    ``reward_margin = β[(πc − rc) − (πr − rr)]`` per example (TRL's ``rewards/margins``); both are
    detached, they are for logging.
    """
    reward_margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -F.logsigmoid(reward_margin).mean()
    return loss, (policy_chosen - policy_rejected).detach(), reward_margin.detach()


def next_token_kl(logits: Tensor, attention_mask: Tensor, reference_logps: Tensor) -> Tensor:
    """Mean over rows of KL(reference || model) of the next-token distribution after each right-padded
    prompt (its last real position): the locality term (docs/corsa.md §9), zero when the adapted model
    predicts what the base model predicted. ``reference_logps`` are the base model's log-probs there, [B, V]."""
    logps = next_token_logprobs(logits, attention_mask)
    return F.kl_div(logps, reference_logps, log_target=True, reduction="batchmean")


def next_token_logprobs(logits: Tensor, attention_mask: Tensor) -> Tensor:
    """fp32 log-probs of the token after each right-padded prompt, [B, V] (the locality reference)."""
    last = attention_mask.sum(dim=-1) - 1
    return logits[torch.arange(logits.shape[0], device=logits.device), last].float().log_softmax(-1)
