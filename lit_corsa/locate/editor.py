"""ROME, MEMIT and AlphaEdit as one editor: a batch of facts in, weights written in place.

- ``rome``: one fact at a time (as in the paper, sequentially within a batch): k* at the layer, δ at
  its down projection's output, v* = W k* + δ, the rank-one update of :func:`~lit_corsa.locate.updates.rome_update`.
- ``memit``: all facts of the batch at once. Each fact's target z = h + δ is the residual stream after the
  last edit layer L at its subject token (δ optimised there); then, layer by layer in increasing order,
  the keys and the current h are recomputed and the layer takes 1 / (layers left) of the remaining
  residual z - h (MEMIT Alg. 1).
- ``alphaedit``: MEMIT's schedule with AlphaEdit's null-space-projected update; after the batch, each
  layer's keys of these facts join its *preserved keys* Kₚ, so later batches keep them (the sequential
  form of the paper, its ``cache_c``).

The key covariance C per layer and the context prefixes come from the *unedited* model (computed at the
first edit, inside ``disable_adapter()``), so a resumed run derives the same ones. What a run must carry
across a resume is :meth:`LocateEditor.state_dict`: AlphaEdit's preserved keys (the edited weights travel
as the module's parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from lit_corsa.locate.covariance import cached_key_covariances
from lit_corsa.locate.edited import EditedModel
from lit_corsa.locate.settings import LocateSettings
from lit_corsa.locate.sites import edit_sites, weight_matrix
from lit_corsa.locate.targets import Fact, keys_at, optimise_delta, outputs_at
from lit_corsa.locate.updates import (
    alphaedit_update,
    memit_update,
    nullspace_projector,
    rome_update,
)
from lit_corsa.seeding import seeded

METHODS = ("rome", "memit", "alphaedit")


def sample_prefixes(model: EditedModel, tokenizer: PreTrainedTokenizerBase, count: int, tokens: int,
                    seed: int) -> list[str]:
    """``count`` texts of ``tokens`` tokens sampled from the unedited model after its BOS token, each ending
    in ". " (ROME's context templates), seeded so every process draws the same."""
    if count == 0:
        return []
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("context prefixes are sampled after a BOS or EOS token; the tokenizer has neither")
    device = next(model.parameters()).device
    with model.disable_adapter(), seeded(seed, device):
        out = model.generate(input_ids=torch.tensor([[start]] * count, device=device),
                             attention_mask=torch.ones(count, 1, dtype=torch.long, device=device),
                             do_sample=True, top_k=0, max_new_tokens=tokens, min_new_tokens=tokens,
                             pad_token_id=start)
    texts = tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return [text.replace("\n", " ").strip() + ". " for text in texts]


class LocateEditor:
    """Writes facts into ``model`` with ``method`` (module docstring); ``settings`` as given (``None``
    hyper-parameters become the method's paper values)."""

    def __init__(self, method: str, settings: LocateSettings, layers: list[int]) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown locate-then-edit method {method!r}; choose one of {METHODS}")
        if method == "rome" and len(layers) != 1:
            raise ValueError(f"rome writes one layer, got model.locate.layers {layers}")
        self.method, self.settings, self.layers = method, settings.for_method(method), list(layers)
        self.preserved: dict[int, Tensor] = {}  # AlphaEdit's Kₚ per layer, [d_in, edits so far]
        self._prefixes: list[str] | None = None
        self._covariance: dict[int, Tensor] = {}
        self._projector: dict[int, Tensor] = {}

    # ---- what is derived once from the unedited model ------------------------------------------------------
    @property
    def prepared(self) -> bool:
        return self._prefixes is not None

    def prepare(self, model: EditedModel, tokenizer: PreTrainedTokenizerBase, seed: int) -> None:
        if self.prepared:
            return
        s = self.settings
        sites = {i: layer for i, (_, layer, _) in edit_sites(model.base, self.layers).items()}
        with model.disable_adapter():
            self._covariance = cached_key_covariances(model.base, tokenizer, sites, s.covariance_source,
                                                      s.covariance_tokens, s.covariance_window, s.covariance_cache)
        device = next(model.parameters()).device
        self._covariance = {i: c.to(device) for i, c in self._covariance.items()}
        if self.method == "alphaedit":
            self._projector = {i: nullspace_projector(c, s.nullspace_threshold) for i, c in self._covariance.items()}
            empty = [i for i, p in self._projector.items() if p.trace() < 0.5]
            if empty:
                raise ValueError(f"the key covariance of layers {empty} has no eigenvalue below "
                                 f"model.locate.nullspace_threshold={s.nullspace_threshold}: AlphaEdit's null space is "
                                 "empty and it could write nothing; raise the threshold")
        self._prefixes = sample_prefixes(model, tokenizer, s.context_prefixes, s.prefix_tokens, seed)

    def null_space_dims(self) -> dict[int, int]:
        """AlphaEdit's null-space dimension per layer (the directions it may write)."""
        return {i: round(float(p.trace())) for i, p in self._projector.items()}

    # ---- editing -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _write(self, layer: torch.nn.Module, update: Tensor) -> None:
        weight = weight_matrix(layer)
        weight.add_(update.to(weight.dtype))

    def edit(self, model: EditedModel, tokenizer: PreTrainedTokenizerBase, facts: list[Fact]) -> None:
        """Write ``facts`` into ``model`` (after :meth:`prepare`)."""
        if not self.prepared:
            raise RuntimeError("LocateEditor.prepare() must run before edit()")
        was_training = model.training
        model.eval()
        try:
            if self.method == "rome":
                for fact in facts:
                    self._rome(model, tokenizer, fact)
            else:
                self._spread(model, tokenizer, facts)
        finally:
            model.train(was_training)

    def _rome(self, model: EditedModel, tokenizer: PreTrainedTokenizerBase, fact: Fact) -> None:
        (index,) = self.layers
        _, layer, _ = edit_sites(model.base, self.layers)[index]
        key = keys_at(model, tokenizer, layer, [fact], self._prefixes)[:, 0]
        delta = optimise_delta(model, tokenizer, fact, self._prefixes, layer, layer, self.settings)
        weight = weight_matrix(layer).detach()
        value = weight.to(torch.float64) @ key + delta
        self._write(layer, rome_update(weight, key, value, self._covariance[index]))

    def _spread(self, model: EditedModel, tokenizer: PreTrainedTokenizerBase, facts: list[Fact]) -> None:
        sites = edit_sites(model.base, self.layers)
        _, last_layer, last_block = sites[self.layers[-1]]
        deltas = [optimise_delta(model, tokenizer, f, self._prefixes, last_layer, last_block, self.settings)
                  for f in facts]
        targets = outputs_at(model, tokenizer, last_block, facts) + torch.stack(deltas, dim=1)
        for j, index in enumerate(self.layers):
            _, layer, _ = sites[index]
            keys = keys_at(model, tokenizer, layer, facts, self._prefixes)
            residuals = (targets - outputs_at(model, tokenizer, last_block, facts)) / (len(self.layers) - j)
            if self.method == "memit":
                update = memit_update(residuals, keys, self._covariance[index], self.settings.mom2_weight)
            else:
                update = alphaedit_update(residuals, keys, self._projector[index], self.preserved.get(index),
                                          self.settings.l2)
            self._write(layer, update)
        if self.method == "alphaedit":
            for index in self.layers:
                keys = keys_at(model, tokenizer, sites[index][1], facts, self._prefixes).float().cpu()
                before = self.preserved.get(index)
                self.preserved[index] = keys if before is None else torch.cat([before, keys], dim=1)

    # ---- resumable state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"preserved": {str(i): k for i, k in self.preserved.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.preserved = {int(i): k for i, k in state["preserved"].items()}
