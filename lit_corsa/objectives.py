"""What each editing method optimises, stated once.

Every baseline and ablation runs through the same module and metrics; they differ only in the fields
below. Nothing falls back silently: ``lora`` optimises SFT alone *because its objective says so*, not
because some other flag happened to be off (the reference trainer drops SFT when ρ = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

Merge = Literal["sequential", "symmetric", "average", "weighted_sum"]


@dataclass(frozen=True)
class Objective:
    """How a step turns the SFT and DPO losses into one update.

    use_dpo: add the DPO margin loss (needs the old answer and cached reference log-probs).
    use_sam: take the SAM two-pass step (ascent of ρ along the merged gradient, then the update there).
    merge: how the two task gradients combine: PCGrad ``sequential`` (the reference: only DPO is ever
        projected) or ``symmetric``, then averaged; ``average`` without projection; ``weighted_sum`` =
        sft_weight·g_sft + dpo_weight·g_dpo (EasyEdit's DPO editor: one loss, 0.99·SFT + 0.01·DPO).
    """

    use_dpo: bool
    use_sam: bool
    merge: Merge = "sequential"
    sft_weight: float = 1.0
    dpo_weight: float = 1.0

    @property
    def needs_two_gradients(self) -> bool:
        """PCGrad and averaging need g_sft and g_dpo apart; a weighted sum needs only their sum."""
        return self.use_dpo and self.merge != "weighted_sum"


METHODS: dict[str, Objective] = {
    "lora": Objective(use_dpo=False, use_sam=False),
    "sam": Objective(use_dpo=False, use_sam=True),
    "dpo": Objective(use_dpo=True, use_sam=False, merge="sequential"),
    "corsa": Objective(use_dpo=True, use_sam=True, merge="sequential"),
    "easyedit_dpo": Objective(use_dpo=True, use_sam=False, merge="weighted_sum", sft_weight=0.99, dpo_weight=0.01),
}


def resolve_objective(method: str, projection: str | None = None, sft_weight: float | None = None,
                      dpo_weight: float | None = None) -> Objective:
    """A named method, with optional overrides (``projection``: "sequential", "symmetric" or "none")."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    objective = METHODS[method]
    if projection is not None:
        if not objective.needs_two_gradients:
            raise ValueError(f"projection={projection!r} has no effect on method {method!r} (it has one loss)")
        merges = {"sequential": "sequential", "symmetric": "symmetric", "none": "average"}
        if projection not in merges:
            raise ValueError(f"unknown projection {projection!r}; choose one of {sorted(merges)}")
        objective = replace(objective, merge=merges[projection])
    if sft_weight is not None:
        objective = replace(objective, sft_weight=sft_weight)
    if dpo_weight is not None:
        objective = replace(objective, dpo_weight=dpo_weight)
    return objective
