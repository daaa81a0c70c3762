"""Scoring a (quantized) model on held-out data: task accuracy, answer NLL and text NLL.

Accuracy is the world's teacher-forced exact match (the definition of
:func:`data.world_model.answer_accuracy`: every answer token is the argmax given the gold prefix), with
the same prompt / " answer" tokenisation; it is computed here, in the same forward pass as the answer
NLL and on the model's device, so that GPU models and the benchmark's many models cost one pass each.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_tacq.calibration import EvaluationData


def _pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


def _device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (a packed model may hold buffers only)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def answer_outcomes(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> tuple[list[bool], float]:
    """(exact match of every pair's answer under teacher forcing, mean negative log-likelihood in nats per
    answer token); per-pair outcomes let two models be compared fact by fact."""
    correct: list[bool] = []
    nll, tokens = 0.0, 0
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = _device(model)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [tokenizer(p)["input_ids"] for p, _ in chunk]
        answers = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for _, a in chunk]
        ids, mask = _pad([p + a for p, a in zip(prompts, answers)], pad_id)
        logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for r, (prompt, answer) in enumerate(zip(prompts, answers)):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
            targets = torch.tensor(answer, device=device)
            row = logprobs[r, positions]
            correct.append(bool((row.argmax(-1) == targets).all()))
            nll -= row.gather(1, targets[:, None]).sum().item()
            tokens += len(answer)
    return correct, nll / tokens


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
        ids = torch.stack(windows[start : start + batch_size]).to(_device(model))
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
