"""Editing batches: edit requests and probes encoded by :class:`lit_common.tokenization.AnswerTokenizer`,
and the collate functions that pad them (right for training and teacher forcing, left for generation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from data.formats import PROBE_KINDS, EditRequest, Probe
from lit_common.tokenization import (
    AnswerTokenizer,
    right_padded,
)


@dataclass(frozen=True)
class EncodedRequest:
    request_id: int
    prompt_ids: list[int]
    new_ids: list[int]
    old_ids: list[int] | None
    anchor_ids: tuple[list[int], ...] = ()  # prompts the run does not edit, for the locality term


@dataclass(frozen=True)
class EncodedProbe:
    probe_id: int
    edit_round: int
    probe: Probe
    prompt_ids: list[int]
    target_ids: list[int]
    contrast_ids: list[int] | None


def encode_request(tok: AnswerTokenizer, request_id: int, request: EditRequest,
                   anchor_ids: tuple[list[int], ...] = ()) -> EncodedRequest:
    prompt_ids, new_ids = tok.encode(request.prompt, request.target_new)
    old_ids = tok.encode(request.prompt, request.target_old)[1] if request.target_old else None
    return EncodedRequest(request_id, prompt_ids, new_ids, old_ids, anchor_ids)


def encode_probe(tok: AnswerTokenizer, probe_id: int, edit_round: int, probe: Probe) -> EncodedProbe:
    prompt_ids, target_ids = tok.encode(probe.prompt, probe.target)
    contrast_ids = tok.encode(probe.prompt, probe.contrast)[1] if probe.contrast else None
    return EncodedProbe(probe_id, edit_round, probe, prompt_ids, target_ids, contrast_ids)


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
        "first": right_padded(prompts, first, pad_id, width),
        "second": right_padded(prompts, seconds, pad_id, width),
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
    """Training batches: ``chosen`` (prompt + new answer) and ``rejected`` (prompt + old answer), and the
    requests' locality ``anchors`` (right-padded prompts), when they have any."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: list[EncodedRequest]) -> dict[str, Any]:
        pair = _pair([i.prompt_ids for i in items], [i.new_ids for i in items], [i.old_ids for i in items], self.pad_id)
        batch = {
            "request_id": torch.tensor([i.request_id for i in items]),
            "chosen": pair["first"],
            "rejected": pair["second"],
            "has_rejected": pair["has_second"],
        }
        anchors = [a for i in items for a in i.anchor_ids]
        if anchors:
            padded = right_padded(anchors, [[] for _ in anchors], self.pad_id)
            batch["anchors"] = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
        return batch


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
