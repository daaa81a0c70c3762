"""The world's definition of knowing a fact: a (prompt, answer) pair counts when every answer token is the
model's argmax given the gold prefix (teacher forcing; the same as greedy decoding of the answer span).

One scorer for the world model's card (``data.world_model``), TaCQ's evaluation (``lit_tacq``) and the
quantization benchmark, so they can never disagree; the answer NLL comes from the same forward pass, on
the model's device. Per-pair scores (:func:`pair_scores`) also give the preference of an answer over an
alternative (:func:`preferred`), which has signal where a small model rarely knows a fact exactly.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

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


@dataclass(frozen=True)
class PairScore:
    """One (prompt, answer) pair under teacher forcing: whether every answer token is the argmax (the module's
    definition of knowing it), and the answer's summed negative log-likelihood (nats) over its ``tokens``."""

    correct: bool
    nll: float
    tokens: int

    @property
    def mean_logprob(self) -> float:
        """Per-token log-probability: comparable across answers of different lengths."""
        return -self.nll / self.tokens


@torch.no_grad()
def pair_scores(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> list[PairScore]:
    """Every pair's :class:`PairScore`, one forward pass per batch on the model's device. Pairs are tokenised
    and padded exactly as training and calibration do it (:mod:`lit_common.tokenization`)."""
    encoder = AnswerTokenizer(tokenizer, max_length=sys.maxsize)  # scoring never cuts a pair
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    scores: list[PairScore] = []
    for start in range(0, len(pairs), batch_size):
        prompts, answers = zip(*(encoder.encode(prompt, answer) for prompt, answer in pairs[start : start + batch_size]))
        batch = right_padded(list(prompts), list(answers), pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        logprobs = logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
        targets = batch["labels"][:, 1:].to(device)
        scored = targets != IGNORE_INDEX
        hits = (logprobs.argmax(-1) == targets) | ~scored
        nll = -logprobs.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1).masked_fill(~scored, 0).sum(-1)
        scores += [PairScore(bool(c), float(n), int(t))
                   for c, n, t in zip(hits.all(-1).tolist(), nll.tolist(), scored.sum(-1).tolist())]
    return scores


def outcomes(scores: list[PairScore]) -> tuple[list[bool], float]:
    """(per-pair exact match, mean negative log-likelihood in nats per answer token over all pairs)."""
    return [s.correct for s in scores], sum(s.nll for s in scores) / sum(s.tokens for s in scores)


def preferred(answers: list[PairScore], alternatives: list[PairScore]) -> list[bool]:
    """Per pair, whether the answer's mean-token log-probability exceeds the alternative's (ROME's probability
    comparison of the true and the counterfactual object, per token so length does not decide it)."""
    if len(answers) != len(alternatives):
        raise ValueError(f"{len(answers)} answers but {len(alternatives)} alternatives to compare them with")
    return [a.mean_logprob > b.mean_logprob for a, b in zip(answers, alternatives)]


def answer_accuracy(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 64
) -> float:
    """Fraction of the pairs whose answer the model knows (module docstring)."""
    correct, _ = outcomes(pair_scores(model, tokenizer, pairs, batch_size))
    return sum(correct) / len(pairs)
