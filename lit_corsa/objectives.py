"""What each editing method optimises, stated once.

Every baseline and ablation runs through the same module and metrics; they differ only in the fields
below. Nothing falls back silently: ``lora`` optimises SFT alone *because its objective says so*, not
because some other flag happened to be off (the reference trainer drops SFT when ρ = 0).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from lit_corsa.pcgrad import Mode as Projection
from lit_corsa.settings import ObjectiveSettings

Merge = Literal[Projection, "weighted_sum"]


@dataclass(frozen=True)
class Objective:
    """How a step turns the SFT and DPO losses into one update.

    use_dpo: add the DPO margin loss (needs the old answer and cached reference log-probs).
    use_sam: take the SAM two-pass step (ascent of ρ along the merged gradient, then the update there).
    merge: how the two task gradients combine: a PCGrad mode (:mod:`lit_corsa.pcgrad`: ``sequential``, the
        reference's rule, ``symmetric``, or ``none``, then averaged), or ``weighted_sum`` =
        sft_weight·g_sft + dpo_weight·g_dpo (EasyEdit's DPO editor: one loss, 0.99·SFT + 0.01·DPO).
    locality_weight: adds locality_weight·KL(base || adapted) on prompts the run does not edit to the SFT
        loss (docs/corsa.md §9), so it sits on the SFT side of the merge; 0 leaves it out.
    """

    use_dpo: bool
    use_sam: bool
    merge: Merge = "sequential"
    sft_weight: float = 1.0
    dpo_weight: float = 1.0
    locality_weight: float = 0.0

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


def resolve_objective(method: str, settings: ObjectiveSettings = ObjectiveSettings()) -> Objective:
    """A named method, with the settings' overrides of its projection and loss weights."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    objective = METHODS[method]
    if settings.projection is not None:
        if not objective.needs_two_gradients:
            raise ValueError(f"projection={settings.projection!r} has no effect on method {method!r} (it has one loss)")
        objective = replace(objective, merge=settings.projection)
    if settings.sft_weight is not None:
        objective = replace(objective, sft_weight=settings.sft_weight)
    if settings.dpo_weight is not None:
        objective = replace(objective, dpo_weight=settings.dpo_weight)
    return replace(objective, locality_weight=settings.locality_weight)
