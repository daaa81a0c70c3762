"""The world's definition of knowing a fact: a (prompt, answer) pair counts when every answer token is the
model's argmax given the gold prefix (teacher forcing; the same as greedy decoding of the answer span).

One scorer for the world model's card (``data.world_model``), TaCQ's evaluation (``lit_tacq``) and the
quantization benchmark, so they can never disagree; the answer NLL comes from the same forward pass, on
the model's device.
"""

from __future__ import annotations

import itertools
import sys

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_common.tokenization import (
    IGNORE_INDEX,
    AnswerTokenizer,
    pad_token_id,
    right_padded,
)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (a packed model may hold buffers only)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def answer_outcomes(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> tuple[list[bool], float]:
    """(exact match of every pair's answer under teacher forcing, mean negative log-likelihood in nats per
    answer token); per-pair outcomes let two models be compared fact by fact. Pairs are tokenised and
    padded exactly as training and calibration do it (:mod:`lit_common.tokenization`)."""
    encoder = AnswerTokenizer(tokenizer, max_length=sys.maxsize)  # scoring never cuts a pair
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    correct: list[bool] = []
    nll, tokens = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        prompts, answers = zip(*(encoder.encode(prompt, answer) for prompt, answer in pairs[start : start + batch_size]))
        batch = right_padded(list(prompts), list(answers), pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        logprobs = logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != IGNORE_INDEX
        hits = (logprobs.argmax(-1) == targets) | ~scored
        correct += hits.all(-1).tolist()
        nll -= logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)[scored].sum().item()
        tokens += int(scored.sum())
    return correct, nll / tokens


def answer_accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> float:
    """Fraction of the pairs whose answer the model knows (module docstring)."""
    correct, _ = answer_outcomes(model, tokenizer, pairs, batch_size)
    return sum(correct) / len(pairs)
