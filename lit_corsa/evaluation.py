"""Scoring probe batches after each round: probability comparisons, token accuracies, greedy-generation
matches and Pass@k, per edit round and over all edits so far.

The protocol behind every number is stated in :data:`PROTOCOLS` and travels with the numbers into
``metrics.json``, because editing tools disagree on it (teacher-forced token accuracy vs probability
comparison; mean-token vs summed log-probs; generation greedy vs sampled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from data.formats import PROBE_GROUPS, PROBE_KINDS, Probe, ProgramTest
from lit_common.tokenization import IGNORE_INDEX, pad_token_id
from lit_corsa.losses import sequence_logprobs, token_counts
from lit_corsa.metrics import (
    CaseAccuracy,
    GenerationMatch,
    PassAtK,
    ProbabilityComparison,
    TokenAccuracy,
    answer_matches,
)
from lit_corsa.sandbox import DEFAULT_MEMORY_MB, run_solution
from lit_corsa.seeding import seeded
from lit_corsa.settings import EvaluationSettings

# every benchmark sub-kind's own metric (e.g. portability_reasoning_token_acc): its kind's token accuracy
# over its probes only
GROUP_METRICS = {(kind, group): f"{kind}_{group}_token_acc"
                 for kind in ("portability", "locality") for group in PROBE_GROUPS[kind] if group}
# MQuAKE's accuracies: each hop group's metric and how a case's probes count (metrics.CaseAccuracy)
CASE_METRICS = {"edit": ("edit_wise_acc", "each"), "single_hop": ("instance_wise_acc", "all"),
                "multi_hop": ("multi_hop_acc", "any")}

PROTOCOLS = {
    "ES": "efficacy: fraction of edit prompts with mean-token log p(new) > log p(old) (ROME), teacher-forced",
    "PS": "paraphrase score: the same comparison on paraphrase prompts",
    "NS": "neighbourhood score: fraction of neighbour prompts with log p(true) > log p(new)",
    "reliability_token_acc": "EasyEdit reliability: teacher-forced token accuracy of the new answer on edit prompts",
    "generality_token_acc": "EasyEdit generality: teacher-forced token accuracy of the new answer on paraphrases",
    "locality_token_acc": "EasyEdit locality: fraction of neighbour/locality answer tokens whose argmax is "
                          "unchanged from the unedited model (adapter disabled)",
    "reliability_gen": "greedy generation from the edit prompt contains the new answer (case- and "
                       "whitespace-insensitive)",
    "generality_gen": "greedy generation from a paraphrase contains the new answer (case- and whitespace-insensitive)",
    "portability_token_acc": "EasyEdit portability: teacher-forced token accuracy of the answer a question has once "
                             "the edit holds (KnowEdit's Reasoning / Subject_Aliasing / Logical_Generalization, "
                             "EasyEdit's New Question / New Answer), all sub-kinds together",
    "portability_gen": "greedy generation from a portability question contains its answer (case- and "
                       "whitespace-insensitive)",
    "pass@k": "unbiased pass@k of sampled solutions to held-out problems, run in a sandbox against unit tests "
              "with the API update patched in; each sample may take code_max_new_tokens, or by default twice "
              "the longest reference body of its batch",
    **{name: f"{kind}_token_acc over the {group} probes only (a {kind} sub-kind of KnowEdit or EasyEdit)"
       for (kind, group), name in GROUP_METRICS.items()},
    "edit_wise_acc": "MQuAKE edit-wise accuracy: fraction of rewrites whose own prompt's greedy generation gives the "
                     "new object (first line, ignoring case, equal to it or beginning with it then a non-word "
                     "character); MQuAKE's probes are generated even with model.evaluation.generation off",
    "instance_wise_acc": "MQuAKE instance-wise accuracy: fraction of cases where the greedy generation of every "
                         "new_single_hops question gives its answer or an alias (the same match)",
    "multi_hop_acc": "MQuAKE multi-hop accuracy: fraction of cases where the greedy generation of any of its "
                     "questions gives new_answer or an alias (the same match, case-insensitive as in "
                     "MQuAKE-Remastered)",
}


# which metrics each probe kind feeds; comparisons only where the probe has a contrast answer
_BY_KIND = {
    "efficacy": ("ES", "reliability_token_acc", "reliability_gen"),
    "paraphrase": ("PS", "generality_token_acc", "generality_gen"),
    "neighborhood": ("NS", "locality_token_acc"),
    "locality": ("locality_token_acc",),
    "portability": ("portability_token_acc", "portability_gen"),
    "program": ("pass@k",),
    "hop": (),  # its group's CASE_METRICS entry
}
_COMPARISONS = {"ES", "PS", "NS"}


def metric_names(probes: Iterable[Probe], generation: bool) -> set[str]:
    """The metrics a set of probes can be scored on (the same on every rank, since data is global)."""
    names = set()
    for probe in probes:
        if probe.kind == "hop":
            names.add(CASE_METRICS[probe.group][0])
        elif probe.group:
            names.add(GROUP_METRICS[probe.kind, probe.group])
        for name in _BY_KIND[probe.kind]:
            if name in _COMPARISONS and probe.contrast is None:
                continue
            if name.endswith("_gen") and not generation:
                continue
            names.add(name)
    return names


def solution_passes(test: ProgramTest, body: str, timeout_s: float = 10.0,
                    memory_mb: int = DEFAULT_MEMORY_MB) -> bool:
    """Run a generated solution body against its unit tests, with the API update patched in, in the sandbox
    (``bench/code_harness.py`` runs every reference solution through :func:`run_solution` to check this)."""
    return run_solution(test, body, timeout_s, memory_mb).passed


@dataclass(frozen=True)
class RoundScores:
    """What one evaluation measured: every metric over all edits so far, and per edit round."""

    eval_round: int
    all: dict[str, float]
    by_edit_round: dict[int, dict[str, float]]


class ProbeEvaluator(nn.Module):
    """Holds one set of torchmetrics per scope ("all" and each edit round) and fills them from batches.

    ``lockstep``: the model is sharded (FSDP), so every forward is a collective and all ranks must run the
    same ones: a conditional forward (the unedited model, generation, code sampling) runs on every rank
    when any rank needs it, a rank without rows for it runs its first row and discards the result, and
    generation keeps stepping until every rank is done (``synced_gpus``).
    """

    def __init__(self, num_rounds: int, settings: EvaluationSettings = EvaluationSettings(),
                 lockstep: bool = False) -> None:
        super().__init__()
        self.pass_k, self.code_samples, self.code_temperature = settings.pass_k, settings.code_samples, settings.code_temperature
        self.max_new_tokens, self.code_max_new_tokens = settings.max_new_tokens, settings.code_max_new_tokens
        self.sandbox_timeout_s, self.generation, self.lockstep = settings.sandbox_timeout_s, settings.generation, lockstep
        self.sandbox_memory_mb = settings.sandbox_memory_mb
        self.scopes = ["all"] + [f"round_{r}" for r in range(num_rounds)]
        self.metrics = nn.ModuleDict({scope: self._metric_set() for scope in self.scopes})

    def _metric_set(self) -> nn.ModuleDict:
        return nn.ModuleDict({
            "ES": ProbabilityComparison(), "PS": ProbabilityComparison(), "NS": ProbabilityComparison(),
            "reliability_token_acc": TokenAccuracy(), "generality_token_acc": TokenAccuracy(),
            "locality_token_acc": TokenAccuracy(), "reliability_gen": GenerationMatch(),
            "generality_gen": GenerationMatch(), "portability_token_acc": TokenAccuracy(),
            "portability_gen": GenerationMatch(), "pass@k": PassAtK(self.pass_k),
            **{name: TokenAccuracy() for name in GROUP_METRICS.values()},
            **{name: CaseAccuracy(rule) for name, rule in CASE_METRICS.values()},
        })

    def reset(self) -> None:
        for metric_set in self.metrics.values():
            for metric in metric_set.values():
                metric.reset()

    def _update(self, name: str, rows: Tensor, edit_round: Tensor, *args: Any) -> None:
        """Update metric ``name`` in scope "all" and in each edit round's scope, with the rows selected."""
        def select(arg: Any, keep: Tensor) -> Any:
            if torch.is_tensor(arg):
                return arg[keep]
            return [a for a, k in zip(arg, keep.tolist()) if k]

        if not bool(rows.any()):
            return
        self.metrics["all"][name].update(*(select(a, rows) for a in args))
        for r in edit_round[rows].unique().tolist():
            keep = rows & (edit_round == r)
            self.metrics[f"round_{r}"][name].update(*(select(a, keep) for a in args))

    def _rows_to_run(self, wanted: Tensor) -> Tensor | None:
        """Row indices to run a conditional forward on, or None to skip it (see the class docstring)."""
        local = bool(wanted.any())
        needed = local
        if self.lockstep and dist.is_initialized():
            flag = torch.tensor([int(local)], device=wanted.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            needed = bool(flag)
        if not needed:
            return None
        return wanted.nonzero().squeeze(1) if local else torch.zeros(1, dtype=torch.long, device=wanted.device)

    @torch.no_grad()
    def update(self, model: PeftModel, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> None:
        """Score one batch of probes; ``seed`` fixes the sampled code solutions (a function of the batch's
        position, so a resumed run samples what an uninterrupted one does)."""
        kinds = batch["kind"]
        edit_round = batch["edit_round"]
        is_kind = {k: kinds == PROBE_KINDS.index(k) for k in PROBE_KINDS}
        target, contrast = batch["target"], batch["contrast"]
        rows = target["input_ids"].shape[0]
        ids = torch.cat([target["input_ids"], contrast["input_ids"]])
        mask = torch.cat([target["attention_mask"], contrast["attention_mask"]])
        labels = torch.cat([target["labels"], contrast["labels"]])
        logits = model(input_ids=ids, attention_mask=mask).logits
        logps, counts = sequence_logprobs(logits, labels), token_counts(labels)
        has_contrast = batch["has_contrast"]
        for kind, name in (("efficacy", "ES"), ("paraphrase", "PS"), ("neighborhood", "NS")):
            self._update(name, is_kind[kind] & has_contrast, edit_round,
                         logps[:rows], logps[rows:], counts[:rows], counts[rows:])
        target_logits = logits[:rows]
        self._update("reliability_token_acc", is_kind["efficacy"], edit_round, target_logits, target["labels"])
        self._update("generality_token_acc", is_kind["paraphrase"], edit_round, target_logits, target["labels"])
        self._update("portability_token_acc", is_kind["portability"], edit_round, target_logits, target["labels"])
        groups = [probe.group for probe in batch["probes"]]
        in_group = {key: is_kind[key[0]] & torch.tensor([g == key[1] for g in groups], device=kinds.device)
                    for key in GROUP_METRICS}
        for (kind, group), name in GROUP_METRICS.items():
            if kind == "portability":
                self._update(name, in_group[kind, group], edit_round, target_logits, target["labels"])
        keep_rows = is_kind["neighborhood"] | is_kind["locality"]
        if self._rows_to_run(keep_rows) is not None:
            with model.disable_adapter():
                before = model(input_ids=target["input_ids"], attention_mask=target["attention_mask"]).logits
            # labels = the unedited model's own predictions at the answer positions
            unchanged = target["labels"].clone()
            answer = target["labels"][:, 1:] != IGNORE_INDEX
            unchanged[:, 1:][answer] = before[:, :-1].argmax(-1)[answer]
            self._update("locality_token_acc", keep_rows, edit_round, target_logits, unchanged)
            for (kind, group), name in GROUP_METRICS.items():
                if kind == "locality":
                    self._update(name, in_group[kind, group], edit_round, target_logits, unchanged)
        self._score_generations(model, batch, tokenizer, is_kind, edit_round)
        self._score_programs(model, batch, tokenizer, is_kind["program"], edit_round, seed)

    def _generate(self, model: PeftModel, prompt: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase,
                  max_new_tokens: int, samples: int = 1, temperature: float | None = None) -> list[str]:
        sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0} if temperature else {"do_sample": False}
        out = model.generate(
            input_ids=prompt["input_ids"], attention_mask=prompt["attention_mask"], max_new_tokens=max_new_tokens,
            num_return_sequences=samples, pad_token_id=pad_token_id(tokenizer), synced_gpus=self.lockstep, **sampling,
        )
        return tokenizer.batch_decode(out[:, prompt["input_ids"].shape[1]:], skip_special_tokens=True)

    def _score_generations(self, model: PeftModel, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                           is_kind: dict[str, Tensor], edit_round: Tensor) -> None:
        """Greedy generations: the ``*_gen`` metrics when ``generation`` is on, and MQuAKE's hop probes always
        (generation is the only way that benchmark is scored)."""
        contained = is_kind["efficacy"] | is_kind["paraphrase"] | is_kind["portability"]
        index = self._rows_to_run(is_kind["hop"] | (contained if self.generation else torch.zeros_like(contained)))
        if index is None:
            return
        prompt = {k: v[index] for k, v in batch["prompt"].items()}
        texts = self._generate(model, prompt, tokenizer, self.max_new_tokens)
        generations = [""] * len(batch["probes"])
        for row, text in zip(index.tolist(), texts):
            generations[row] = text
        self._score_hops(batch["probes"], generations, is_kind["hop"], edit_round)
        if not self.generation:
            return
        # whitespace-insensitive: tokenizers differ in how they space decoded text ("math . comb ( n )")
        generations = ["".join(text.split()) for text in generations]
        answers = ["".join(p.target.split()) for p in batch["probes"]]
        self._update("reliability_gen", is_kind["efficacy"], edit_round, generations, answers)
        self._update("generality_gen", is_kind["paraphrase"], edit_round, generations, answers)
        self._update("portability_gen", is_kind["portability"], edit_round, generations, answers)

    def _score_hops(self, probes: Sequence[Probe], generations: list[str], is_hop: Tensor, edit_round: Tensor) -> None:
        """Each hop probe's hit (its generation gives its answer or an alias) into its group's case metric."""
        device = is_hop.device
        hits = torch.tensor([p.kind == "hop" and answer_matches(text, (p.target, *p.aliases))
                             for p, text in zip(probes, generations)], device=device)
        cases = torch.tensor([p.case if p.case is not None else -1 for p in probes], device=device)
        for group, (name, _) in CASE_METRICS.items():
            in_group = is_hop & torch.tensor([p.group == group for p in probes], device=device)
            self._update(name, in_group, edit_round, cases, hits)

    def _code_budget(self, batch: dict[str, Any], index: Tensor) -> int:
        """New tokens a sampled solution may take: ``code_max_new_tokens``, else twice the longest reference
        body (answer tokens, with its EOS) among the rows generated for, the same on every rank. Real
        solution bodies run to hundreds of tokens: a fixed short budget would fail them all unfinished."""
        if self.code_max_new_tokens is not None:
            return self.code_max_new_tokens
        lengths = (batch["target"]["labels"][index] != IGNORE_INDEX).sum(1)
        budget = 2 * lengths.max().reshape(1)
        if self.lockstep and dist.is_initialized():
            dist.all_reduce(budget, op=dist.ReduceOp.MAX)
        return int(budget)

    def _score_programs(self, model: PeftModel, batch: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                        is_program: Tensor, edit_round: Tensor, seed: int) -> None:
        index = self._rows_to_run(is_program)
        if index is None:
            return
        prompt = {k: v[index] for k, v in batch["prompt"].items()}
        with seeded(seed, prompt["input_ids"].device):
            bodies = self._generate(model, prompt, tokenizer, self._code_budget(batch, index), self.code_samples,
                                    self.code_temperature)
        correct = torch.zeros(len(batch["probes"]), dtype=torch.long)
        for position, row in enumerate(index.tolist()):
            if not bool(is_program[row]):  # rows run only to keep the ranks in lockstep
                continue
            test = batch["probes"][row].program
            for body in bodies[position * self.code_samples : (position + 1) * self.code_samples]:
                correct[row] += solution_passes(test, body, self.sandbox_timeout_s, self.sandbox_memory_mb)
        samples = torch.full_like(correct, self.code_samples)
        self._update("pass@k", is_program.cpu(), edit_round.cpu(), samples, correct)

    def compute(self, eval_round: int, names_by_round: dict[int, set[str]]) -> RoundScores:
        """The scores after round ``eval_round``: each scope computes only the metrics its probes can have
        (``metric_names``), so nothing is computed from zero updates."""
        def compute_set(metric_set: nn.ModuleDict, names: set[str]) -> dict[str, float]:
            values: dict[str, float] = {}
            for name in sorted(names):
                result = metric_set[name].compute()
                if isinstance(result, dict):
                    values.update({k: float(v) for k, v in result.items()})
                else:
                    values[name] = float(result)
            return values

        return RoundScores(
            eval_round=eval_round,
            all=compute_set(self.metrics["all"], set().union(*names_by_round.values())),
            by_edit_round={r: compute_set(self.metrics[f"round_{r}"], names) for r, names in names_by_round.items()},
        )
