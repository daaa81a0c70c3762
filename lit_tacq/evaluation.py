"""Scoring a (quantized) model on held-out data: task accuracy, answer NLL, preference and text NLL.

Accuracy and answer NLL come from the world's scorer (:mod:`lit_common.scoring`: teacher-forced exact match,
one forward pass on the model's device for both). When the pairs come with alternatives (CounterFact's
counterfactual objects), ``preference`` is the share of pairs whose answer has a higher mean-token
log-probability than its alternative: a small model rarely knows a fact token for token, but usually
prefers the true object, so this metric still moves when quantization damages what the model knows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_common.scoring import model_device, outcomes, pair_scores, preferred


@dataclass
class EvaluationData:
    """What a calibrated model is scored on: (prompt, answer) pairs, optionally one alternative answer per pair
    (empty: none), and/or token windows of text."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    windows: list[Tensor] = field(default_factory=list)
    alternatives: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.alternatives and len(self.alternatives) != len(self.pairs):
            raise ValueError(f"{len(self.alternatives)} alternatives for {len(self.pairs)} pairs: give one per pair "
                             "or none")


def text_nll(model: nn.Module, windows: list[Tensor], batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over equal-length token windows."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.stack(windows[start : start + batch_size]).to(model_device(model))
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def scored_evaluation(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: EvaluationData, batch_size: int = 64
) -> tuple[dict[str, float], list[bool]]:
    """:func:`evaluate`'s metrics and the per-pair exact-match outcomes behind its accuracy (for comparing two
    models fact by fact), from one scoring of the pairs."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    correct: list[bool] = []
    if data.pairs:
        scores = pair_scores(model, tokenizer, data.pairs, batch_size)
        correct, nll = outcomes(scores)
        metrics["accuracy"], metrics["answer_nll"] = sum(correct) / len(correct), nll
        if data.alternatives:
            others = [(prompt, other) for (prompt, _), other in zip(data.pairs, data.alternatives)]
            wins = preferred(scores, pair_scores(model, tokenizer, others, batch_size))
            metrics["preference"] = sum(wins) / len(wins)
    if data.windows:
        metrics["text_nll"] = text_nll(model, data.windows, max(1, batch_size // 8))
        metrics["perplexity"] = math.exp(metrics["text_nll"])
    model.train(was_training)
    return metrics, correct


def evaluate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: EvaluationData, batch_size: int = 64
) -> dict[str, float]:
    """``accuracy`` and ``answer_nll`` on the pairs (``preference`` too when they have alternatives),
    ``text_nll`` and ``perplexity`` on the windows."""
    return scored_evaluation(model, tokenizer, data, batch_size)[0]
