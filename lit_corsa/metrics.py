"""Edit-quality metrics (docs/corsa.md §6) as torchmetrics ``Metric``s, plus the forgetting summary.

Every metric keeps only sums (hits, totals) with ``dist_reduce_fx="sum"``, so under DDP each rank
scores its shard and the reduction is exact: a mean of per-rank means would weight ranks, not examples.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class _FractionMetric(Metric):
    """A fraction ``numerator / denominator`` of two summed counters (NaN before any update)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("numerator", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        return self.numerator / self.denominator


class ProbabilityComparison(_FractionMetric):
    """CounterFact's ES / PS / NS: the fraction of examples whose answer comparison holds.

    Counts p(target) > p(contrast), strictly: for efficacy and paraphrase probes the target is the new
    answer and the contrast the old one; for neighbourhood probes the target is the neighbour's true answer
    and the contrast the edit's new answer (unrelated subjects must keep their truth).

    ROME's convention: the two answers are compared by their *length-normalised* log-probability (mean
    token log-prob, i.e. ROME's mean token NLL), so a multi-token answer is not penalised for its length.
    ``update`` takes the summed log-probs and the token counts (``losses.sequence_logprobs`` and
    ``losses.token_counts``) and normalises itself.
    """

    def update(self, logp_target: Tensor, logp_contrast: Tensor, count_target: Tensor, count_contrast: Tensor) -> None:
        if bool((count_target <= 0).any()) or bool((count_contrast <= 0).any()):
            raise ValueError("every answer needs at least one scored token to be compared")
        holds = logp_target.double() / count_target > logp_contrast.double() / count_contrast
        self.numerator += holds.sum()
        self.denominator += holds.numel()


class TokenAccuracy(_FractionMetric):
    """EasyEdit-style teacher-forced token accuracy, averaged over examples.

    For each example: the fraction of answer tokens (labels != ``ignore_index``, after the causal shift)
    where ``argmax`` of the logits equals the target token; the metric is the mean of these per-example
    fractions (EasyEdit's reliability / generality / locality). Examples with no answer token are
    skipped rather than counted as 0 or 1.
    """

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index

    def update(self, logits: Tensor, labels: Tensor) -> None:
        targets = labels[:, 1:]
        mask = targets != self.ignore_index
        correct = (logits[:, :-1].argmax(dim=-1) == targets) & mask
        tokens = mask.sum(dim=-1)
        scored = tokens > 0
        self.numerator += (correct.sum(dim=-1)[scored].double() / tokens[scored]).sum()
        self.denominator += scored.sum()


class GenerationMatch(_FractionMetric):
    """Generation-based reliability / generality: the expected answer appears in the generation.

    Case-insensitive substring containment, as the paper's Reliability/Generality; answers are
    stripped first (CounterFact targets carry a leading space). An empty answer would match everything,
    so it is an error.
    """

    def update(self, generations: Sequence[str], answers: Sequence[str]) -> None:
        if len(generations) != len(answers):
            raise ValueError(f"{len(generations)} generations but {len(answers)} answers")
        hits = 0
        for generation, answer in zip(generations, answers):
            answer = answer.strip().lower()
            if not answer:
                raise ValueError("empty expected answer: containment would be vacuous")
            hits += answer in generation.lower()
        self.numerator += hits
        self.denominator += len(answers)


def answer_matches(generation: str, answers: Sequence[str]) -> bool:
    """MQuAKE's answer check on a greedy generation: its first line, stripped, is one of ``answers`` (the
    answer and its aliases), ignoring case as MQuAKE-Remastered does, or begins with one followed by a
    non-word character (a base model continues past the answer: "united kingdom ." answers "United
    Kingdom", "ukraine" does not answer "UK"). Runs of whitespace count as one space."""
    def normal(text: str) -> str:
        return " ".join(text.split()).lower()

    said = normal(generation.strip().split("\n", 1)[0]) if generation.strip() else ""
    for answer in map(normal, answers):
        if not answer:
            raise ValueError("empty expected answer: a prefix match would be vacuous")
        if said == answer or (said.startswith(answer) and not said[len(answer)].isalnum()):
            return True
    return False


class CaseAccuracy(Metric):
    """The fraction of cases whose probes' hits satisfy ``rule``: ``"all"`` (MQuAKE's instance-wise
    accuracy: every single hop answered), ``"any"`` (multi-hop accuracy: any of the case's questions
    answered) or ``"each"`` (every probe is a case of its own: edit-wise accuracy).

    The states are the (case, hit) pairs themselves, gathered over ranks (``dist_reduce_fx="cat"``), since a
    case's probes may be scored on different ranks; a probe scored twice (a padded distributed batch) does
    not change whether its case counts under ``all`` or ``any``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    RULES = ("all", "any", "each")

    def __init__(self, rule: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if rule not in self.RULES:
            raise ValueError(f"rule must be one of {self.RULES}, got {rule!r}")
        self.rule = rule
        self.add_state("cases", default=[], dist_reduce_fx="cat")
        self.add_state("hits", default=[], dist_reduce_fx="cat")

    def update(self, cases: Tensor, hits: Tensor) -> None:
        if cases.shape != hits.shape:
            raise ValueError(f"{cases.numel()} case ids but {hits.numel()} hits")
        self.cases.append(cases.reshape(-1).long())
        self.hits.append(hits.reshape(-1).bool())

    def compute(self) -> Tensor:
        cases, hits = dim_zero_cat(self.cases), dim_zero_cat(self.hits).double()
        if self.rule == "each":
            return hits.mean()
        ids, which = torch.unique(cases, return_inverse=True)
        reduce = "amin" if self.rule == "all" else "amax"
        per_case = torch.zeros(len(ids), dtype=torch.float64, device=hits.device).scatter_reduce(
            0, which, hits, reduce, include_self=False)
        return per_case.mean()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples of which ``c`` are correct (Chen et al. 2021).

    ``1 − C(n−c, k) / C(n, k)`` in the product form ``1 − Π_{i=n−c+1}^{n} (1 − k/i)``, which never forms
    the huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got c={c}, n={n}")
    if n < k:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


class PassAtK(Metric):
    """Mean over problems of the unbiased pass@k, for several k at once; ``compute`` gives {"pass@k": value}."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: int | Iterable[int] = (1,), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = (k,) if isinstance(k, int) else tuple(k)
        if not self.ks or any(kk < 1 for kk in self.ks):
            raise ValueError(f"k must be positive integers, got {self.ks}")
        self.add_state("pass_sum", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("problems", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, num_samples: Tensor, num_correct: Tensor) -> None:
        ns, cs = num_samples.reshape(-1).tolist(), num_correct.reshape(-1).tolist()
        if len(ns) != len(cs):
            raise ValueError(f"{len(ns)} sample counts but {len(cs)} correct counts")
        sums = [sum(pass_at_k(n, c, k) for n, c in zip(ns, cs)) for k in self.ks]
        self.pass_sum += torch.tensor(sums, dtype=torch.float64, device=self.pass_sum.device)
        self.problems += len(ns)

    def compute(self) -> dict[str, Tensor]:
        return {f"pass@{k}": self.pass_sum[i] / self.problems for i, k in enumerate(self.ks)}


def forgetting(scores_by_round: dict[int, dict[int, float]]) -> float:
    """Mean drop of earlier rounds' edit scores between right after their round and after the last one.

    ``scores_by_round[eval_round][edit_round]`` is the score of ``edit_round``'s edits measured after
    training round ``eval_round``. With ``last`` the latest evaluated round::

        forgetting = mean_{r < last} (scores[r][r] − scores[last][r])

    over every evaluated round ``r`` before ``last``; each needs both entries (else ``KeyError``).
    Positive = the model forgot (scores fell); negative = later rounds helped (backward transfer).
    Undefined before a second round exists, which raises ``ValueError``.
    """
    if not scores_by_round:
        raise ValueError("no evaluation rounds")
    last = max(scores_by_round)
    earlier = sorted(r for r in scores_by_round if r < last)
    if not earlier:
        raise ValueError(f"forgetting needs a round evaluated before the last one ({last})")
    drops = []
    for r in earlier:
        if r not in scores_by_round[r]:
            raise KeyError(f"round {r}'s edits were not scored right after round {r}")
        if r not in scores_by_round[last]:
            raise KeyError(f"round {r}'s edits were not scored after the last round {last}")
        drops.append(scores_by_round[r][r] - scores_by_round[last][r])
    return sum(drops) / len(drops)
