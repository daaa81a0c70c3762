"""The editing module's settings, in four small groups, each checked whole when it is made.

A config names them as nested keys (``model.lora.r``, ``model.optimizer.learning_rate``, ...); every
numeric setting is range-checked at configuration time, and a group reports all of its bad values at
once, so nothing fails after a round of training. The groups hold plain values only, so they travel in a
checkpoint's hyper-parameters as plain dictionaries (checkpoints load with ``weights_only=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

from lit_corsa.sandbox import DEFAULT_MEMORY_MB

Projection = Literal["sequential", "symmetric", "none"]


def _check(group: str, rules: dict[str, tuple[bool, str]], values: Any) -> None:
    bad = [f"model.{group}.{name} = {getattr(values, name)!r} (expected {expected})"
           for name, (ok, expected) in rules.items() if not ok]
    if bad:
        raise ValueError("invalid settings: " + "; ".join(bad))


@dataclass(frozen=True)
class ObjectiveSettings:
    """How the SFT and DPO terms are weighed and merged (see :mod:`lit_corsa.objectives`).

    beta: DPO temperature. rho: SAM radius. projection: PCGrad ``sequential`` (the reference's rule),
    ``symmetric``, or ``none`` (the two gradients averaged, the no-projection ablation); ``None`` keeps
    the method's own. sft_weight / dpo_weight: override the method's loss weights. locality_weight: weight
    of the locality term (docs/corsa.md §9; 0, the paper's objective, leaves it out; > 0 needs the data's
    ``locality_anchors``).
    """

    beta: float = 0.1
    rho: float = 0.05
    projection: Projection | None = None
    sft_weight: float | None = None
    dpo_weight: float | None = None
    locality_weight: float = 0.0

    def __post_init__(self) -> None:
        _check("objective", {
            "beta": (self.beta > 0, "> 0"),
            "rho": (self.rho >= 0, ">= 0"),
            "projection": (self.projection in (None, "sequential", "symmetric", "none"),
                           "sequential, symmetric, none or null"),
            "sft_weight": (self.sft_weight is None or self.sft_weight >= 0, ">= 0"),
            "dpo_weight": (self.dpo_weight is None or self.dpo_weight >= 0, ">= 0"),
            "locality_weight": (self.locality_weight >= 0, ">= 0"),
        }, self)


@dataclass(frozen=True)
class LoraSettings:
    """The adapter: rank, scale, dropout, and target module names (``None``: every decoder Linear)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        _check("lora", {
            "r": (self.r >= 1, ">= 1"),
            "alpha": (self.alpha > 0, "> 0"),
            "dropout": (0 <= self.dropout < 1, "in [0, 1)"),
            "target_modules": (self.target_modules is None or len(self.target_modules) > 0, "null or a non-empty list"),
        }, self)


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW with a linear warm-up/decay schedule that restarts every round.

    accumulate: micro-batches per optimiser step (ours: Lightning's does not apply to manual
    optimisation). fresh_per_round: also clear AdamW's moments when a round starts.
    """

    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 5
    max_grad_norm: float = 1.0
    accumulate: int = 1
    fresh_per_round: bool = False

    def __post_init__(self) -> None:
        _check("optimizer", {
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_steps": (self.warmup_steps >= 0, ">= 0"),
            "max_grad_norm": (self.max_grad_norm > 0, "> 0"),
            "accumulate": (self.accumulate >= 1, ">= 1"),
        }, self)


@dataclass(frozen=True)
class EvaluationSettings:
    """How each round is scored; the only settings a resumed run may change.

    generation: also score greedy-generation reliability/generality (slower); MQuAKE's hop probes are generated
    regardless, since generation is how that benchmark is scored. pass_k / code_samples /
    code_temperature / code_max_new_tokens / sandbox_timeout_s / sandbox_memory_mb: Pass@k of sampled code
    solutions (the sandbox's wall-clock and address-space limits per program).
    """

    generation: bool = True
    max_new_tokens: int = 16
    pass_k: tuple[int, ...] = (1, 5)
    code_samples: int = 5
    code_temperature: float = 0.8
    code_max_new_tokens: int | None = None  # None: twice the longest reference body of the batch (from the data)
    sandbox_timeout_s: float = 30.0  # per program (all its tests); real ones took up to 15 s (bench/code_harness.py)
    sandbox_memory_mb: int = DEFAULT_MEMORY_MB  # address space; ``import torch`` alone maps ~1 GB

    def __post_init__(self) -> None:
        object.__setattr__(self, "pass_k", tuple(self.pass_k))
        largest = max(self.pass_k, default=1)
        _check("evaluation", {
            "max_new_tokens": (self.max_new_tokens >= 1, ">= 1"),
            "pass_k": (len(self.pass_k) > 0 and min(self.pass_k) >= 1, "a non-empty list of k >= 1"),
            "code_samples": (self.code_samples >= largest, f">= the largest k of pass_k ({largest})"),
            "code_temperature": (self.code_temperature > 0, "> 0"),
            "code_max_new_tokens": (self.code_max_new_tokens is None or self.code_max_new_tokens >= 1,
                                    ">= 1, or null to derive it from the reference solutions"),
            "sandbox_timeout_s": (self.sandbox_timeout_s > 0, "> 0 seconds"),
            "sandbox_memory_mb": (self.sandbox_memory_mb >= 256, ">= 256 MB (a Python interpreter's own address space)"),
        }, self)


def as_plain(settings: Any) -> dict[str, Any]:
    """A settings group as a plain dictionary (what a checkpoint stores)."""
    return {f.name: getattr(settings, f.name) for f in fields(settings)}
