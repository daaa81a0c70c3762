"""The gradient of one CoRSA micro-batch (docs/corsa.md §3 steps 1-4), without Lightning.

One pass = one forward of chosen and rejected rows as a single batch of 2B sequences; both losses come
from that forward (SFT from the chosen rows' token log-probs, DPO from the summed log-probs of both),
and the two task gradients are two vector-Jacobian products on the same graph. The SAM step runs the
pass at φ, moves to φ + ε along the merged gradient, runs the pass again and restores φ bit-exactly.
Which losses and which merge are used is the :class:`~lit_corsa.objectives.Objective`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lit_corsa.losses import dpo_loss, next_token_kl, sequence_logprobs, sft_loss, token_counts
from lit_corsa.objectives import Objective
from lit_corsa.pcgrad import project_conflicting
from lit_corsa.sam import global_grad_norm, sam_perturb, sam_restore

Grads = list[Optional[Tensor]]


@dataclass
class PassResult:
    grads: Grads
    sft: Tensor
    locality: Tensor | None
    dpo: Tensor | None
    margin: Tensor | None
    projected: bool


def _stack_rows(batch: dict[str, Any], with_rejected: bool) -> tuple[Tensor, Tensor, Tensor]:
    chosen = batch["chosen"]
    if not with_rejected:
        return chosen["input_ids"], chosen["attention_mask"], chosen["labels"]
    rejected = batch["rejected"]
    return tuple(torch.cat([chosen[k], rejected[k]]) for k in ("input_ids", "attention_mask", "labels"))


class EditStep:
    """Computes the update direction of one micro-batch for an objective.

    ``reference`` holds the frozen base model's summed log-probs of the chosen and rejected answers,
    ``[B, 2]`` (computed once per edit by the caller); it is only read when the objective uses DPO.
    ``anchor_reference`` holds the base model's next-token log-probs after the batch's ``anchors`` prompts,
    ``[A, V]`` (computed per batch by the caller); it is only read when the objective has a locality term.
    ``scale`` divides the losses (1 / gradient-accumulation steps).
    """

    def __init__(self, objective: Objective, beta: float = 0.1, rho: float = 0.05) -> None:
        self.objective, self.beta, self.rho = objective, beta, rho

    def one_pass(self, model: nn.Module, params: list[Tensor], batch: dict[str, Any],
                 reference: Tensor | None, scale: float = 1.0, anchor_reference: Tensor | None = None) -> PassResult:
        objective = self.objective
        input_ids, attention_mask, labels = _stack_rows(batch, objective.use_dpo)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        logps = sequence_logprobs(logits, labels)
        rows = batch["chosen"]["input_ids"].shape[0]
        sft = sft_loss(logps[:rows], token_counts(labels[:rows])) * objective.sft_weight
        locality = None
        if objective.locality_weight > 0:
            anchors = batch["anchors"]
            anchor_logits = model(input_ids=anchors["input_ids"], attention_mask=anchors["attention_mask"]).logits
            locality = next_token_kl(anchor_logits, anchors["attention_mask"], anchor_reference)
            sft = sft + objective.locality_weight * locality
        if not objective.use_dpo:
            return PassResult(_grad(sft * scale, params), sft.detach(), _detached(locality), None, None, False)
        has_rejected = batch["has_rejected"]
        if bool(has_rejected.any()):
            dpo, margin, _ = dpo_loss(logps[:rows][has_rejected], logps[rows:][has_rejected],
                                      reference[has_rejected, 0], reference[has_rejected, 1], self.beta)
            dpo = dpo * objective.dpo_weight
        else:  # no old answer in this batch: the margin term contributes nothing
            dpo, margin = logps.sum() * 0.0, None
        if not objective.needs_two_gradients:
            return PassResult(_grad((sft + dpo) * scale, params), sft.detach(), _detached(locality), dpo.detach(),
                              margin, False)
        g_dpo = _grad(dpo * scale, params, retain_graph=True)
        g_sft = _grad(sft * scale, params)
        merged, projected = project_conflicting(g_dpo, g_sft, objective.merge)
        return PassResult(merged, sft.detach(), _detached(locality), dpo.detach(), margin, projected)

    def __call__(self, model: nn.Module, params: list[Tensor], batch: dict[str, Any],
                 reference: Tensor | None = None, scale: float = 1.0,
                 anchor_reference: Tensor | None = None) -> tuple[Grads, dict[str, Tensor]]:
        """The update gradient (at φ + ε for SAM objectives, at φ otherwise) and what to log; ``sft`` is
        logged with the locality term included (it is one loss on the SFT side of the merge)."""
        first = self.one_pass(model, params, batch, reference, scale, anchor_reference)
        logs = {"sft": first.sft}
        if first.locality is not None:
            logs["locality"] = first.locality
        if first.dpo is not None:
            logs["dpo"] = first.dpo
            logs["projected"] = torch.tensor(float(first.projected))
        if first.margin is not None:
            logs["margin"] = first.margin.mean()
        if not self.objective.use_sam:
            return first.grads, logs
        logs["sam_grad_norm"] = global_grad_norm(first.grads)
        saved = sam_perturb(params, first.grads, self.rho)
        if saved is None:  # zero or non-finite direction: no ascent this step
            logs["sam_skipped"] = torch.tensor(1.0)
            return first.grads, logs
        try:
            second = self.one_pass(model, params, batch, reference, scale, anchor_reference)
        finally:
            sam_restore(params, saved)
        if second.dpo is not None:
            logs["projected_at_perturbed"] = torch.tensor(float(second.projected))
        return second.grads, logs


def _detached(value: Tensor | None) -> Tensor | None:
    return None if value is None else value.detach()


def _grad(loss: Tensor, params: list[Tensor], retain_graph: bool = False) -> Grads:
    return list(torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True))
