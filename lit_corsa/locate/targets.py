"""Keys and target values of edit requests: what ROME's k*, v* and MEMIT's z are computed from.

A fact is read at the subject's last token (ROME's ``subject_last``) of the request's prompt, and of the
prompt behind a few short *context prefixes* sampled from the unedited model (ROME §3.1: the key is the
mean over them, so it does not depend on one exact wording). The target value comes from gradient descent
on a vector δ added to an edit site's output at that token (ROME's v*, MEMIT's z): the new answer's
mean-token NLL over all prefixed prompts, plus ``kl_factor`` x the KL divergence of the next token after
"<subject> is a" from the unedited model's (keeping the subject itself intact), plus a weight decay on δ,
with ‖δ‖ clamped to ``clamp_norm_factor`` x the norm of the value it is added to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_common.tokenization import AnswerTokenizer, pad_token_id, right_padded
from lit_corsa.locate.settings import LocateSettings
from lit_corsa.locate.sites import add_to_output, as_index, capture
from lit_corsa.losses import sequence_logprobs, token_counts


@dataclass(frozen=True)
class Fact:
    """One edit request as the locate-then-edit methods read it."""

    prompt: str
    subject: str
    target: str


@dataclass(frozen=True)
class Rows:
    """Right-padded prompt(+answer) rows and, per row, the position of the subject's last token."""

    batch: dict[str, Tensor]
    subject_positions: Tensor  # [rows]
    prompt_lengths: Tensor  # [rows]


def subject_end(text: str, subject: str, start: int, what: str) -> int:
    """The character index just past the first ``subject`` in ``text[start:]``."""
    at = text.find(subject, start)
    if at < 0:
        raise ValueError(f"{what}: the subject {subject!r} does not occur in {text[start:]!r}; ROME, MEMIT and "
                         "AlphaEdit read a fact at the subject's last token")
    return at + len(subject)


def last_token_before(tokenizer: PreTrainedTokenizerBase, text: str, end: int, prompt_ids: list[int]) -> int:
    """Index of the last token of ``text`` (as :class:`AnswerTokenizer` encodes it) that starts before ``end``."""
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: finding the subject's last token "
                         "needs character offsets")
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    if encoded["input_ids"] != prompt_ids:
        raise ValueError(f"{text!r} tokenizes differently with offsets than as a prompt")
    starts = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if b > a and a < end]
    if not starts:
        raise ValueError(f"no token of {text!r} lies before character {end}")
    return starts[-1]


def encode_rows(tokenizer: PreTrainedTokenizerBase, texts: list[tuple[str, int]], answers: list[str | None]) -> Rows:
    """Rows of ``text`` (+ " answer"), each with its subject's last token (``texts``: (text, subject end))."""
    tok = AnswerTokenizer(tokenizer, max_length=10**6)
    prompts, answer_ids, positions = [], [], []
    for (text, end), answer in zip(texts, answers):
        prompt_ids = tok.encode_prompt(text)
        prompts.append(prompt_ids)
        answer_ids.append(tok.encode(text, answer)[1] if answer is not None else [])
        positions.append(last_token_before(tokenizer, text, end, prompt_ids))
    batch = right_padded(prompts, answer_ids, pad_token_id(tokenizer))
    return Rows(batch, torch.tensor(positions), torch.tensor([len(p) for p in prompts]))


def contexts(fact: Fact, prefixes: list[str]) -> list[tuple[str, int]]:
    """The fact's prompt behind each prefix ("" first), with the subject's end in each."""
    out = []
    for prefix in ["", *prefixes]:
        text = prefix + fact.prompt
        out.append((text, subject_end(text, fact.subject, len(prefix), f"edit prompt {fact.prompt!r}")))
    return out


def _on(rows: Rows, device: torch.device) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    batch = {k: v.to(device) for k, v in rows.batch.items()}
    return batch, as_index(list(range(rows.subject_positions.numel())), device), rows.subject_positions.to(device)


@torch.no_grad()
def keys_at(model: nn.Module, tokenizer: PreTrainedTokenizerBase, site: nn.Module, facts: list[Fact],
            prefixes: list[str]) -> Tensor:
    """K [d_in, n]: each fact's key at ``site``, the mean over its prompt and prefixed prompts."""
    device = next(model.parameters()).device
    keys = []
    for fact in facts:
        rows = encode_rows(tokenizer, contexts(fact, prefixes), [None] * (len(prefixes) + 1))
        batch, row_index, positions = _on(rows, device)
        with capture(site, row_index, positions, "input") as found:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        keys.append(found["value"].to(torch.float64).mean(0))
    return torch.stack(keys, dim=1)


@torch.no_grad()
def outputs_at(model: nn.Module, tokenizer: PreTrainedTokenizerBase, module: nn.Module, facts: list[Fact]) -> Tensor:
    """[d_out, n]: ``module``'s output at each fact's subject token of its own prompt (no prefix)."""
    device = next(model.parameters()).device
    rows = encode_rows(tokenizer, [contexts(f, [])[0] for f in facts], [None] * len(facts))
    batch, row_index, positions = _on(rows, device)
    with capture(module, row_index, positions, "output") as found:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return found["value"].to(torch.float64).T


def optimise_delta(model: nn.Module, tokenizer: PreTrainedTokenizerBase, fact: Fact, prefixes: list[str],
                   site: nn.Module, norm_of: nn.Module, settings: LocateSettings) -> Tensor:
    """δ [d_out] to add at ``site``'s output (module docstring); its norm is bounded by ``norm_of``'s output
    at the subject token (the MLP's value for ROME, the residual stream for MEMIT)."""
    device = next(model.parameters()).device
    texts = contexts(fact, prefixes)
    kl_text = settings.kl_prompt.format(fact.subject)
    texts.append((kl_text, subject_end(kl_text, fact.subject, 0, f"kl_prompt {settings.kl_prompt!r}")))
    rows = encode_rows(tokenizer, texts, [fact.target] * (len(texts) - 1) + [None])
    batch, row_index, positions = _on(rows, device)
    kl_row, kl_position = len(texts) - 1, int(rows.prompt_lengths[-1]) - 1
    labels = batch["labels"]
    counts = token_counts(labels[:-1]).clamp(min=1)

    def forward(delta: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        with capture(norm_of, row_index[:1], positions[:1], "output") as found:
            if delta is None:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            else:
                with add_to_output(site, row_index, positions, lambda: delta.expand(len(texts), -1)):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = -(sequence_logprobs(logits[:-1], labels[:-1]) / counts).mean()
        kl_logp = torch.log_softmax(logits[kl_row, kl_position].float(), dim=-1)
        return nll, kl_logp, found["value"][0].detach()

    with torch.no_grad():
        _, kl_before, reference = forward(None)
    max_norm = settings.clamp_norm_factor * reference.norm()
    delta = torch.zeros_like(reference, dtype=torch.float32, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=settings.v_lr)
    for _ in range(settings.v_steps):
        nll, kl_logp, _ = forward(delta)
        kl = F.kl_div(kl_logp, kl_before, log_target=True, reduction="sum")
        loss = nll + settings.kl_factor * kl + settings.v_weight_decay * delta.norm() / reference.norm() ** 2
        if float(nll.detach()) < 5e-2:  # ROME's early stop: the new answer is already near-certain
            break
        (grad,) = torch.autograd.grad(loss, [delta])
        delta.grad = grad
        optimizer.step()
        with torch.no_grad():
            if delta.norm() > max_norm:
                delta.mul_(max_norm / delta.norm())
    return delta.detach().to(torch.float64)

