"""EditDataModule: the sequential-update protocol shared by every editing benchmark.

The edits are split into ``num_updates`` rounds of ``edits_per_update``. Round k is trained for
``epochs_per_update`` epochs (the round of an epoch is ``epoch // epochs_per_update``); after it, every
edit of rounds 0..k is evaluated, which is how forgetting is measured. The current round is part of the
DataModule's ``state_dict`` (so it travels in Lightning checkpoints) together with a fingerprint of the
edit data, so resuming against different data fails loudly instead of mixing rounds.

Subclasses only say how to turn raw rows of their format into :class:`EditRecord`s (``parse_rows``).

What the editing module reads (its whole interface to the data, all valid after ``setup``):
``num_updates``, ``epochs_per_update`` and ``current_round`` (the protocol and where it stands),
``request_count``, ``requests_of_round(k)``, ``request_loader(requests)``, ``has_old_answers()``,
``optimizer_steps_per_round(world_size, accumulate)`` and ``eval_probes(k)``. The trainer settings the
protocol implies are stated once, in :func:`round_protocol`.
"""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as L
import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from data.formats import DataFormatError, EditRecord, read_records
from data.loaders import ResumableLoader
from data.tokenization import (
    EncodedProbe,
    EncodedRequest,
    ProbeCollator,
    RequestCollator,
    encode_probe,
    encode_request,
)
from lit_common.sources import load_tokenizer, locate
from lit_common.tokenization import AnswerTokenizer, pad_token_id


def round_protocol(num_updates: int, epochs_per_update: int) -> dict[str, Any]:
    """The Trainer settings of the sequential protocol: train each round's epochs, evaluate after the
    round's last one, a new loader (the round's requests) every epoch, no sanity evaluation."""
    return {"max_epochs": num_updates * epochs_per_update, "check_val_every_n_epoch": epochs_per_update,
            "reload_dataloaders_every_n_epochs": 1, "num_sanity_val_steps": 0}


class EditDataModule(L.LightningDataModule):
    """Serves one round of edits for training and all rounds so far for evaluation.

    Args:
        source: a local ``.json``/``.jsonl`` file, a hub dataset id (``org/name``), or a ``world:`` alias.
        tokenizer: tokenizer path or hub id (the CLI links it to the model's).
        num_updates: number of sequential rounds.
        edits_per_update: edits per round; ``None`` splits all records evenly.
        epochs_per_update: training epochs spent on each round.
        shuffle_seed: seed of the record order before splitting into rounds (``None`` keeps file order).
        limit: use only the first ``limit`` records (after shuffling), for quick runs.
        split: split name when ``source`` is a hub dataset.
        chat_template: wrap prompts in the tokenizer's chat template (instruct models).
        append_eos: end every answer with the EOS token, so an edited model stops after it (needed where
            whole generations are executed, as for code; chat templates add their own end-of-turn).
        locality_anchors: prompts per edit request for the locality term (docs/corsa.md §9): drawn, with
            ``shuffle_seed``, from the records this run does not edit (those after its edits in the shuffled
            order), never a prompt that is also scored; 0 (the default) draws none.
    """

    hub_split: str = "train"

    def __init__(
        self,
        source: str,
        tokenizer: str = "world:model",
        num_updates: int = 1,
        edits_per_update: int | None = None,
        epochs_per_update: int = 1,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        max_length: int = 256,
        shuffle_seed: int | None = 0,
        limit: int | None = None,
        split: str | None = None,
        chat_template: bool = False,
        append_eos: bool = False,
        locality_anchors: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (("num_updates", num_updates), ("epochs_per_update", epochs_per_update),
                            ("edits_per_update", edits_per_update), ("batch_size", batch_size),
                            ("eval_batch_size", eval_batch_size), ("limit", limit)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data {name} must be a positive integer{' or null' if name in ('edits_per_update', 'limit') else ''}, got {value!r}")
        if max_length < 2:
            raise ValueError(f"data max_length must hold a prompt token and an answer token (>= 2), got {max_length}")
        if num_workers < 0:
            raise ValueError(f"data num_workers must be >= 0, got {num_workers}")
        if locality_anchors < 0:
            raise ValueError(f"data locality_anchors must be >= 0, got {locality_anchors}")
        self.save_hyperparameters()
        self.source, self.tokenizer_name = source, tokenizer
        self.num_updates, self.edits_per_update, self.epochs_per_update = num_updates, edits_per_update, epochs_per_update
        self.batch_size, self.eval_batch_size, self.max_length = batch_size, eval_batch_size, max_length
        self.shuffle_seed, self.limit, self.split = shuffle_seed, limit, split or self.hub_split
        self.chat_template, self.append_eos, self.num_workers = chat_template, append_eos, num_workers
        self.locality_anchors = locality_anchors
        self.current_round = 0
        self.rounds: list[list[EditRecord]] = []
        self._encoded_requests: list[list[EncodedRequest]] = []
        self._encoded_probes: list[list[EncodedProbe]] = []
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # ---- reading -------------------------------------------------------------------------------------
    def parse_rows(self, rows: list[dict[str, Any]], source: str) -> list[EditRecord]:
        """Validate raw rows of this benchmark's format(s) and normalise them (each subclass's job)."""
        raise NotImplementedError

    def read_rows(self) -> tuple[list[dict[str, Any]], str]:
        """Rows from a local file, or from the hub when ``source`` is not on disk and has a hub id's shape
        (a mistyped path fails at once: :func:`lit_common.sources.locate`)."""
        path = locate(self.source)
        if Path(path).exists():
            return read_records(path), path
        from datasets import load_dataset

        try:
            dataset = load_dataset(self.source, split=self.split)
        except Exception as err:  # the hub client raises many types; the user needs the id and the cause
            raise DataFormatError(f"{self.source}: not a local file and could not be loaded from the hub ({err})") from err
        return [dict(row) for row in dataset], f"{self.source}[{self.split}]"

    def load_records(self) -> list[EditRecord]:
        rows, source = self.read_rows()
        records = self.parse_rows(rows, source)
        if not records:
            raise DataFormatError(f"{source}: no usable records")
        if self.shuffle_seed is not None:
            random.Random(self.shuffle_seed).shuffle(records)
        return records[: self.limit] if self.limit else records

    # ---- rounds --------------------------------------------------------------------------------------
    @staticmethod
    def anchor_prompts(unedited: list[EditRecord], scored: set[str]) -> list[str]:
        """Every distinct prompt (requests' and probes') of records the run does not edit, except prompts
        that are also scored: the pool the locality anchors are drawn from."""
        prompts = [request.prompt for record in unedited for request in record.requests]
        prompts += [probe.prompt for record in unedited for probe in record.probes]
        return [p for p in dict.fromkeys(prompts) if p not in scored]

    @staticmethod
    def split_rounds(records: list[EditRecord], num_updates: int, edits_per_update: int | None) -> list[list[EditRecord]]:
        per_round = edits_per_update or len(records) // num_updates
        if per_round < 1 or per_round * num_updates > len(records):
            raise ValueError(
                f"{num_updates} rounds of {edits_per_update or per_round} edits need "
                f"{num_updates * max(per_round, 1)} records, the data has {len(records)}"
            )
        return [records[k * per_round : (k + 1) * per_round] for k in range(num_updates)]

    def round_of_epoch(self, epoch: int) -> int:
        return min(epoch // self.epochs_per_update, self.num_updates - 1)

    @property
    def fingerprint(self) -> str:
        ids = "|".join(r.record_id for round_ in self.rounds for r in round_)
        return hashlib.sha256(ids.encode()).hexdigest()[:16]

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, split and tokenise everything once; nothing is kept if any step fails."""
        if self.rounds:
            return
        records = self.load_records()
        rounds = self.split_rounds(records, self.num_updates, self.edits_per_update)
        tok = AnswerTokenizer(self.tokenizer, self.chat_template, self.max_length, self.append_eos)
        draw_anchors = self._anchor_drawer(records[sum(map(len, rounds)):], rounds, tok)
        requests, probes, next_request, next_probe = [], [], 0, 0
        for k, round_records in enumerate(rounds):
            round_requests, round_probes = [], []
            for record in round_records:
                try:
                    for request in record.requests:
                        round_requests.append(encode_request(tok, next_request, request, draw_anchors()))
                        next_request += 1
                    for probe in record.probes:
                        round_probes.append(encode_probe(tok, next_probe, k, probe))
                        next_probe += 1
                except ValueError as err:
                    raise DataFormatError(f"{self.source}: record {record.record_id}: {err}; raise "
                                          "data.init_args.max_length or leave the record out") from err
            requests.append(round_requests)
            probes.append(round_probes)
        self.rounds, self._encoded_requests, self._encoded_probes = rounds, requests, probes

    def _anchor_drawer(self, unedited: list[EditRecord], rounds: list[list[EditRecord]], tok: AnswerTokenizer
                       ) -> Callable[[], tuple[list[int], ...]]:
        """A function giving each next request its ``locality_anchors`` encoded prompts (a seeded draw)."""
        if not self.locality_anchors:
            return lambda: ()
        scored = {probe.prompt for round_ in rounds for record in round_ for probe in record.probes}
        scored |= {request.prompt for round_ in rounds for record in round_ for request in record.requests}
        pool = self.anchor_prompts(unedited, scored)
        if len(pool) < self.locality_anchors:
            raise ValueError(f"data locality_anchors={self.locality_anchors} needs that many prompts of records the "
                             f"run does not edit; {self.source} leaves {len(pool)} (lower it, or edit fewer records)")
        encoded = [tok.encode_prompt(prompt) for prompt in pool]
        rng = random.Random(f"anchors-{self.shuffle_seed}")
        return lambda: tuple(encoded[i] for i in rng.sample(range(len(encoded)), self.locality_anchors))

    # ---- loaders -------------------------------------------------------------------------------------
    def _sync_round_with_trainer(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.current_round = self.round_of_epoch(trainer.current_epoch)

    def train_dataloader(self) -> ResumableLoader:
        """This round's requests in an order that is a function of (seed, epoch) only, fixed before the
        loader exists, in a loader that skips the batches already done after a mid-epoch resume: a resumed
        run sees exactly the batches of an uninterrupted one (under DDP, Lightning's distributed sampler
        then deals this order out to the ranks)."""
        self._sync_round_with_trainer()
        trainer = getattr(self, "trainer", None)
        epoch = trainer.current_epoch if trainer is not None else 0
        requests = self._encoded_requests[self.current_round]
        order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(10_007 * (self.shuffle_seed or 0) + epoch))
        return ResumableLoader(
            [requests[i] for i in order.tolist()], batch_size=self.batch_size, shuffle=False,
            collate_fn=RequestCollator(self.pad_id), num_workers=self.num_workers,
        )

    def eval_probes(self, upto_round: int | None = None) -> list[EncodedProbe]:
        """Every probe of rounds 0..``upto_round`` (default: the current round)."""
        last = self.current_round if upto_round is None else upto_round
        return [p for round_probes in self._encoded_probes[: last + 1] for p in round_probes]

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.eval_probes(), batch_size=self.eval_batch_size, shuffle=False,
            collate_fn=ProbeCollator(self.pad_id), num_workers=self.num_workers,
        )

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def requests_of_round(self, round_index: int) -> list[EncodedRequest]:
        return self._encoded_requests[round_index]

    def all_requests(self, upto_round: int | None = None) -> list[EncodedRequest]:
        last = self.current_round if upto_round is None else upto_round
        return [r for round_requests in self._encoded_requests[: last + 1] for r in round_requests]

    @property
    def request_count(self) -> int:
        """Requests over all rounds; their ``request_id``s are 0 .. request_count - 1."""
        return sum(len(round_requests) for round_requests in self._encoded_requests)

    def has_old_answers(self) -> bool:
        return any(r.old_ids for r in self.all_requests(self.num_updates - 1))

    def request_loader(self, requests: list[EncodedRequest]) -> DataLoader:
        """Requests in evaluation-sized batches, padded like training batches (for reference log-probs)."""
        return DataLoader(requests, batch_size=self.eval_batch_size, collate_fn=RequestCollator(self.pad_id))

    def optimizer_steps_per_round(self, world_size: int, accumulate: int) -> list[int]:
        """Optimiser steps each round takes on each rank (rounds may hold different numbers of requests, e.g.
        MQuAKE cases of 1-4 rewrites): Lightning's distributed sampler deals a round's requests out evenly
        (padding the last batch), and the module steps every ``accumulate`` batches and at each epoch's end."""
        steps = []
        for k in range(self.num_updates):
            per_rank = math.ceil(len(self.requests_of_round(k)) / world_size)
            batches_per_epoch = math.ceil(per_rank / self.batch_size)
            steps.append(max(1, math.ceil(batches_per_epoch / accumulate) * self.epochs_per_update))
        return steps

    # ---- checkpointed state --------------------------------------------------------------------------
    # what decides which batches a round trains on; a resume with other values would mix two runs
    RESUME_SETTINGS = ("num_updates", "edits_per_update", "epochs_per_update", "batch_size", "max_length",
                       "shuffle_seed", "limit", "chat_template", "append_eos", "locality_anchors")

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_round": self.current_round,
            "records_fingerprint": self.fingerprint if self.rounds else None,
            "settings": {key: getattr(self, key) for key in self.RESUME_SETTINGS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.rounds:
            self.setup()
        saved = state.get("settings", {"num_updates": state.get("num_updates")})
        changed = {k: (v, getattr(self, k)) for k, v in saved.items() if v != getattr(self, k)}
        if state["records_fingerprint"] not in (None, self.fingerprint) or changed:
            raise ValueError(
                "the checkpoint was made with different edit data or rounds "
                f"(records fingerprint {state['records_fingerprint']} vs {self.fingerprint}"
                + "".join(f", {k} {old!r} vs {new!r}" for k, (old, new) in changed.items())
                + "); start a new run (--ckpt_path null) or restore them"
            )
        self.current_round = state["current_round"]
