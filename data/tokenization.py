"""Prompt/answer tokenisation for causal LMs and the collate functions that pad it.

Answers are scored as continuations of their prompt, with a leading space (CounterFact's convention) or
as the assistant turn of the model's chat template. The boundary between prompt and answer tokens is
found by encoding prompt and prompt+answer and checking that the first is a prefix of the second (true
for BPE and word-level tokenizers); when a tokenizer merges across the boundary the answer is encoded on
its own instead. Labels are -100 on prompt and padding, so losses and metrics see answer tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from data.formats import PROBE_KINDS, EditRequest, Probe

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


@dataclass(frozen=True)
class EncodedRequest:
    request_id: int
    prompt_ids: list[int]
    new_ids: list[int]
    old_ids: list[int] | None


@dataclass(frozen=True)
class EncodedProbe:
    probe_id: int
    edit_round: int
    probe: Probe
    prompt_ids: list[int]
    target_ids: list[int]
    contrast_ids: list[int] | None


def encode_request(tok: AnswerTokenizer, request_id: int, request: EditRequest) -> EncodedRequest:
    prompt_ids, new_ids = tok.encode(request.prompt, request.target_new)
    old_ids = tok.encode(request.prompt, request.target_old)[1] if request.target_old else None
    return EncodedRequest(request_id, prompt_ids, new_ids, old_ids)


def encode_probe(tok: AnswerTokenizer, probe_id: int, edit_round: int, probe: Probe) -> EncodedProbe:
    prompt_ids, target_ids = tok.encode(probe.prompt, probe.target)
    contrast_ids = tok.encode(probe.prompt, probe.contrast)[1] if probe.contrast else None
    return EncodedProbe(probe_id, edit_round, probe, prompt_ids, target_ids, contrast_ids)


def _right_padded(prompts: list[list[int]], answers: list[list[int]], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        sequence = prompt + answer
        ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, len(prompt) : len(sequence)] = torch.tensor(answer)
        mask[row, : len(sequence)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _left_padded(prompts: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _pair(prompts: list[list[int]], first: list[list[int]], second: list[list[int] | None], pad_id: int) -> dict[str, Any]:
    """Two right-padded batches of the same width (so a module can run them as one batch of 2B rows);
    rows whose second answer is missing get an all-masked second sequence and ``has_second`` False."""
    seconds = [s if s is not None else [] for s in second]
    width = max(len(p) + max(len(a), len(b)) for p, a, b in zip(prompts, first, seconds))
    return {
        "first": _right_padded(prompts, first, width, pad_id),
        "second": _right_padded(prompts, seconds, width, pad_id),
        "has_second": torch.tensor([s is not None for s in second]),
    }


class ProbeList:
    """The probes of a batch, in a plain container: Lightning moves tensors in batches to the device by
    rebuilding collections and dataclasses, which frozen probes refuse; this holder is left alone."""

    def __init__(self, probes: list[Probe]) -> None:
        self._probes = tuple(probes)

    def __len__(self) -> int:
        return len(self._probes)

    def __iter__(self):
        return iter(self._probes)

    def __getitem__(self, index: int) -> Probe:
        return self._probes[index]


class RequestCollator:
    """Training batches: ``chosen`` (prompt + new answer) and ``rejected`` (prompt + old answer)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[EncodedRequest]) -> dict[str, Any]:
        pair = _pair([i.prompt_ids for i in items], [i.new_ids for i in items], [i.old_ids for i in items], self.pad_id)
        return {
            "request_id": torch.tensor([i.request_id for i in items]),
            "chosen": pair["first"],
            "rejected": pair["second"],
            "has_rejected": pair["has_second"],
        }


class ProbeCollator:
    """Evaluation batches: teacher-forced target and contrast sequences, plus left-padded prompts for
    greedy generation, plus the probes themselves (answers as text, programs to run)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[EncodedProbe]) -> dict[str, Any]:
        prompts = [i.prompt_ids for i in items]
        pair = _pair(prompts, [i.target_ids for i in items], [i.contrast_ids for i in items], self.pad_id)
        return {
            "edit_round": torch.tensor([i.edit_round for i in items]),
            "kind": torch.tensor([PROBE_KINDS.index(i.probe.kind) for i in items]),
            "target": pair["first"],
            "contrast": pair["second"],
            "has_contrast": pair["has_second"],
            "prompt": _left_padded(prompts, self.pad_id),
            "probes": ProbeList([i.probe for i in items]),
        }
