"""Scoring a (quantized) model on held-out data: task accuracy, answer NLL and text NLL.

Accuracy and answer NLL come from the world's scorer (:mod:`lit_common.scoring`: teacher-forced exact match,
one forward pass on the model's device for both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_common.scoring import answer_outcomes, model_device


@dataclass
class EvaluationData:
    """What a calibrated model is scored on: (prompt, answer) pairs and/or token windows of text."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    windows: list[Tensor] = field(default_factory=list)


def answer_scores(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> tuple[float, float]:
    """(exact-match accuracy, mean negative log-likelihood in nats per answer token) over the pairs."""
    correct, nll = answer_outcomes(model, tokenizer, pairs, batch_size)
    return sum(correct) / len(pairs), nll


def text_nll(model: nn.Module, windows: list[Tensor], batch_size: int = 8) -> float:
    """Mean next-token negative log-likelihood (nats) over equal-length token windows."""
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = torch.stack(windows[start : start + batch_size]).to(model_device(model))
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return total / count


def evaluate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, data: EvaluationData, batch_size: int = 64
) -> dict[str, float]:
    """``accuracy`` and ``answer_nll`` on the pairs, ``text_nll`` and ``perplexity`` on the windows."""
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    if data.pairs:
        metrics["accuracy"], metrics["answer_nll"] = answer_scores(model, tokenizer, data.pairs, batch_size)
    if data.windows:
        metrics["text_nll"] = text_nll(model, data.windows, max(1, batch_size // 8))
        metrics["perplexity"] = math.exp(metrics["text_nll"])
    model.train(was_training)
    return metrics
