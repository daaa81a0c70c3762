"""The world's definition of knowing a fact: a (prompt, answer) pair counts when every answer token is the
model's argmax given the gold prefix (teacher forcing; the same as greedy decoding of the answer span).

One scorer for the world model's card (``data.world_model``) and TaCQ's evaluation (``lit_tacq``), so
the two can never disagree; the answer NLL comes from the same forward pass, on the model's device.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from data.tokenization import pad_token_id


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors are (a packed model may hold buffers only)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _right_pad(rows: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    return ids, mask


@torch.no_grad()
def answer_outcomes(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> tuple[list[bool], float]:
    """(exact match of every pair's answer under teacher forcing, mean negative log-likelihood in nats per
    answer token); per-pair outcomes let two models be compared fact by fact."""
    correct: list[bool] = []
    nll, tokens = 0.0, 0
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts = [tokenizer(p)["input_ids"] for p, _ in chunk]
        answers = [tokenizer(" " + a, add_special_tokens=False)["input_ids"] for _, a in chunk]
        ids, mask = _right_pad([p + a for p, a in zip(prompts, answers)], pad_id)
        logprobs = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float().log_softmax(-1)
        for r, (prompt, answer) in enumerate(zip(prompts, answers)):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1, device=device)
            targets = torch.tensor(answer, device=device)
            row = logprobs[r, positions]
            correct.append(bool((row.argmax(-1) == targets).all()))
            nll -= row.gather(1, targets[:, None]).sum().item()
            tokens += len(answer)
    return correct, nll / tokens


def answer_accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> float:
    """Fraction of the pairs whose answer the model knows (module docstring)."""
    correct, _ = answer_outcomes(model, tokenizer, pairs, batch_size)
    return sum(correct) / len(pairs)
