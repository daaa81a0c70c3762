"""Calibration data for TaCQ: which token sequences the gradients and Hessians are measured on.

Two settings (docs/tacq.md §3), both under one token budget:

- ``task``: whole task examples (prompt + " " + answer), shuffled with a fixed seed and taken until the
  next one would exceed the budget, never truncated. The source is a JSONL file of
  ``{"prompt", "answer", "split"}`` records (the world's ``task_qa.jsonl`` format); its ``calibration``
  split calibrates, its ``evaluation`` split scores.
- ``general``: ``budget // window`` random ``window``-token windows of a text (a local file, one
  document per line, or a hub dataset ``"<id>[:<config>]"``), the "unconditioned" setting.

One example is one batch: TaCQ needs each example's own gradient (A = sum_n |dL_n/dW|), and batch size 1
gives it exactly with no padding. The same example list feeds the gradient epoch and both GPTQ passes.

Resuming mid-epoch: the train loader is a :class:`data.loaders.ResumableLoader`, whose position Lightning stores in
the checkpoint and restores before iterating, so a resumed calibration sees exactly the examples that
were not yet done; the data module's own state is a fingerprint of the examples, so resuming with other
data settings fails instead of mixing two example lists. Under DDP the list is padded with empty examples to a multiple of the world size, so
Lightning's DistributedSampler splits it without repeating (and so double counting) any example.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as L
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from data.formats import RecordReader, read_records
from data.loaders import ResumableLoader
from lit_common.sources import is_local, load_tokenizer, resolve
from lit_common.tokenization import IGNORE_INDEX, AnswerTokenizer
from lit_tacq.evaluation import EvaluationData

TASK_FIELDS = ("prompt", "answer", "split")


@dataclass(frozen=True)
class CalibrationExample:
    """One calibration sequence; ``labels`` is ``input_ids`` with ``-100`` where the loss ignores a token."""

    input_ids: Tensor  # int64 [seq]
    labels: Tensor  # int64 [seq]

    def __len__(self) -> int:
        return self.input_ids.numel()


def read_task_records(path: str | Path, split: str | None = None) -> list[dict[str, str]]:
    """The ``{"prompt", "answer", "split"}`` records of a task JSONL file, optionally only those of ``split``;
    a bad file or record fails with the file, record and field (``data.formats``)."""
    records = []
    for index, record in enumerate(read_records(path)):
        reader = RecordReader(str(path), index, record)
        fields = {key: reader.string(key) for key in TASK_FIELDS}
        if split is None or fields["split"] == split:
            records.append(fields)
    if not records:
        raise ValueError(f"{path} has no records" + (f" in split {split!r}" if split else ""))
    return records


def task_examples(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    token_budget: int,
    seed: int = 0,
    answer_only: bool = False,
) -> list[CalibrationExample]:
    """Whole examples in a seeded shuffle until the next one would exceed ``token_budget`` tokens.

    The loss covers every token by default (as the reference does); ``answer_only`` keeps the answer's.
    """
    encoder = AnswerTokenizer(tokenizer, max_length=token_budget)
    order = list(records)
    random.Random(seed).shuffle(order)
    examples, total = [], 0
    for record in order:
        prompt_ids, answer_ids = encoder.encode(record["prompt"], record["answer"])
        ids = torch.tensor(prompt_ids + answer_ids, dtype=torch.long)
        if total + len(ids) > token_budget:
            break
        labels = ids.clone()
        if answer_only:
            labels[: len(prompt_ids)] = IGNORE_INDEX
        examples.append(CalibrationExample(ids, labels))
        total += len(ids)
    if not examples:
        raise ValueError(f"token_budget={token_budget} is smaller than the first example; raise it")
    return examples


def read_text(source: str, split: str = "train", text_field: str = "text") -> str:
    """A text corpus as one string: a local file as is, or the ``text_field`` of a hub dataset's ``split``
    (``source`` = ``"<dataset id>[:<config>]"``), documents joined by blank lines."""
    if is_local(source):
        return Path(resolve(source)).read_text(encoding="utf-8")
    from datasets import load_dataset

    path, _, config = source.partition(":")
    dataset = load_dataset(path, config or None, split=split)
    if text_field not in dataset.column_names:
        raise ValueError(f"{source} ({split}) has no column {text_field!r}; columns: {dataset.column_names}")
    return "\n\n".join(dataset[text_field])


def text_windows(ids: Tensor, window: int, count: int, seed: int = 0) -> list[Tensor]:
    """``count`` windows of ``window`` tokens at seeded random offsets of ``ids`` (GPTQ's calibration)."""
    if ids.numel() < window:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {window}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - window + 1, (count,), generator=generator).tolist()
    return [ids[s : s + window].clone() for s in starts]


def tokenize_text(text: str, tokenizer: PreTrainedTokenizerBase) -> Tensor:
    """All tokens of ``text`` (no special tokens), one line at a time so no tokenizer length limit bites."""
    ids: list[int] = []
    for line in text.splitlines():
        if line.strip():
            ids += tokenizer(line, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def example_index(trainer: L.Trainer, batch_idx: int) -> int:
    """The calibration example a rank's batch ``batch_idx`` holds: DistributedSampler without shuffling deals
    the (padded) list out round-robin, rank r taking r, r + world_size, ..."""
    return batch_idx * trainer.world_size + trainer.global_rank


def collate_one(items: list[CalibrationExample | None]) -> dict[str, Tensor]:
    """A batch of one example; ``None`` (DDP padding) becomes an empty batch that the module skips."""
    if len(items) != 1:
        raise ValueError(f"calibration batches hold one example each (per-example gradients), got {len(items)}")
    item = items[0]
    if item is None:
        empty = torch.zeros(1, 0, dtype=torch.long)
        return {"input_ids": empty, "labels": empty}
    return {"input_ids": item.input_ids[None], "labels": item.labels[None]}


class CalibrationDataModule(L.LightningDataModule):
    """Calibration examples for one epoch, and the data a quantized model is evaluated on.

    Args:
        source: task JSONL (``mode="task"``) or text (``mode="general"``): a path, ``world:`` alias or hub id.
        mode: ``task`` (whole examples) or ``general`` (random windows of text).
        model_name_or_path: where the tokenizer comes from (the CLI links it to the model's).
        token_budget: calibration tokens (docs/tacq.md §3: about 128 x 2048).
        window: tokens per window in ``general`` mode.
        split: the calibration split (``calibration`` of a task file, e.g. ``train`` of a hub dataset).
        answer_only: restrict each example's loss to its answer tokens (task mode).
        eval_source: what to evaluate on: a task JSONL gives accuracy + answer NLL on ``eval_split``, text
            gives per-token NLL over ``eval_windows`` windows; default: ``source`` in task mode, none otherwise.
        eval_max_items: cap on evaluation pairs (None: all).
    """

    def __init__(
        self,
        source: str = "world:task_qa",
        mode: Literal["task", "general"] = "task",
        model_name_or_path: str = "world:model",
        token_budget: int = 128 * 2048,
        window: int = 2048,
        split: str = "calibration",
        answer_only: bool = False,
        seed: int = 0,
        text_field: str = "text",
        eval_source: str | None = None,
        eval_split: str = "evaluation",
        eval_windows: int = 40,
        eval_max_items: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if mode not in ("task", "general"):
            raise ValueError(f"mode must be 'task' or 'general', got {mode!r}")
        if answer_only and mode != "task":
            raise ValueError("answer_only needs task examples (mode='task')")
        self.save_hyperparameters()
        self.examples: list[CalibrationExample] = []
        self._tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.hparams.model_name_or_path)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if not self.examples:
            self.examples = self.build_examples()

    def build_examples(self) -> list[CalibrationExample]:
        hp = self.hparams
        if hp.mode == "task":
            records = read_task_records(resolve(hp.source), hp.split)
            return task_examples(records, self.tokenizer, hp.token_budget, hp.seed, hp.answer_only)
        ids = tokenize_text(read_text(hp.source, hp.split, hp.text_field), self.tokenizer)
        windows = text_windows(ids, hp.window, max(1, hp.token_budget // hp.window), hp.seed)
        return [CalibrationExample(w, w.clone()) for w in windows]

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        world_size = self.trainer.world_size if self.trainer is not None else 1
        padding = -len(self.examples) % world_size
        items: list[CalibrationExample | None] = [*self.examples, *([None] * padding)]
        return ResumableLoader(items, batch_size=1, shuffle=False, collate_fn=collate_one,
                               num_workers=self.hparams.num_workers)

    def evaluation_data(self) -> EvaluationData:
        """The held-out data of ``eval_source`` (empty when there is none)."""
        hp = self.hparams
        source = hp.eval_source or (hp.source if hp.mode == "task" else None)
        if source is None:
            return EvaluationData()
        if resolve(source).endswith(".jsonl"):
            records = read_task_records(resolve(source), hp.eval_split)[: hp.eval_max_items]
            return EvaluationData(pairs=[(r["prompt"], r["answer"]) for r in records])
        ids = tokenize_text(read_text(source, hp.eval_split, hp.text_field), self.tokenizer)
        count = min(hp.eval_windows, ids.numel() // hp.window)
        return EvaluationData(windows=[ids[i * hp.window : (i + 1) * hp.window] for i in range(count)])

    def fingerprint(self) -> str:
        """A hash of the calibration examples (token ids and labels), in order."""
        self.setup()
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(example.input_ids.numpy().tobytes())
            digest.update(example.labels.numpy().tobytes())
        return digest.hexdigest()[:16]

    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint(), "examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resuming against other calibration data would mix two example lists: fail loudly instead."""
        if state["fingerprint"] != self.fingerprint():
            raise ValueError(f"the checkpoint was calibrated on other examples ({state['examples']}, fingerprint "
                             f"{state['fingerprint']}) than this data module builds ({len(self.examples)}, "
                             f"{self.fingerprint()}): resume with the same data settings")
