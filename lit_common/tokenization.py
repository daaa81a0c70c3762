"""Tokenising (prompt, answer) pairs for causal LMs, and padding them: one encoder, one padder, one pad id.

Both products score answers as continuations of their prompt, with a leading space (CounterFact's
convention) or as the assistant turn of the model's chat template. The boundary between prompt and answer
tokens is found by encoding prompt and prompt+answer and checking that the first is a prefix of the second
(true for BPE and word-level tokenizers); when a tokenizer merges across the boundary the answer is encoded
on its own instead. Labels are -100 on prompt and padding, so losses and metrics see answer tokens only.
Editing batches (``data.tokenization``), TaCQ's calibration examples and every answer score
(``lit_common.scoring``) go through :class:`AnswerTokenizer` and :func:`right_padded`, so a pair is split
into the same tokens wherever it is used.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its end-of-sequence token (many causal
    LMs have no pad token; padded positions are masked out, so which id fills them does not matter)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a pad nor an end-of-sequence token to pad with")
    return pad


class AnswerTokenizer:
    """Encodes (prompt, answer) pairs into prompt ids and answer ids of at most ``max_length`` tokens together.

    A pair that does not fit is an error, not a truncation: cutting the prompt would silently change the
    question being edited or scored (a code prompt cut to its last token asks for nothing)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, chat_template: bool = False, max_length: int = 256,
                 append_eos: bool = False) -> None:
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True but the tokenizer has no chat template")
        self.tokenizer, self.chat_template, self.max_length = tokenizer, chat_template, max_length
        self.append_eos = append_eos


    def _ids(self, text: str, special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=special)["input_ids"]

    def encode_prompt(self, prompt: str) -> list[int]:
        if self.chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            return self._ids(text, special=False)
        return self._ids(prompt, special=True)

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.encode_prompt(prompt)
        if self.chat_template:
            full_text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], tokenize=False
            )
            full = self._ids(full_text, special=False)
        else:
            full = self._ids(f"{prompt} {answer}", special=True)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            answer_ids = full[len(prompt_ids):]
        else:
            answer_ids = self._ids(" " + answer, special=False)
        eos = self.tokenizer.eos_token_id
        if self.append_eos and eos is not None and answer_ids[-1:] != [eos]:
            answer_ids = answer_ids + [eos]  # teaches the model to stop after the answer (programs need it)
        if len(prompt_ids) + len(answer_ids) > self.max_length:
            raise ValueError(f"prompt and answer take {len(prompt_ids)} + {len(answer_ids)} tokens, more than "
                             f"max_length={self.max_length}")
        return prompt_ids, answer_ids


def right_padded(prompts: list[list[int]], answers: list[list[int]], pad_id: int,
                 width: int | None = None) -> dict[str, torch.Tensor]:
    """Prompt + answer rows padded on the right to ``width`` (default: the longest), with ``labels`` on the
    answer tokens only and an ``attention_mask``."""
    width = width or max(len(p) + len(a) for p, a in zip(prompts, answers))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        sequence = prompt + answer
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
