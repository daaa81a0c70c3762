"""A bitsandbytes NF4 base (QLoRA-style) edits through the same step: only the adapter trains."""

import bitsandbytes as bnb
import torch

from data.tokenization import EncodedRequest, RequestCollator
from lit_common.sources import load_causal_lm
from lit_corsa.lora import wrap_with_lora
from lit_corsa.objectives import METHODS
from lit_corsa.step import EditStep


def test_corsa_step_on_a_4bit_base():
    model = wrap_with_lora(load_causal_lm("world:model", dtype="float32", load_in_4bit=True), r=4, alpha=8)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    batch = RequestCollator(pad_id=0)([EncodedRequest(0, [2, 40, 41, 42], [43], [44]),
                                       EncodedRequest(1, [2, 45, 46], [47, 48], [49])])
    before = [p.detach().clone() for p in params]
    grads, logs = EditStep(METHODS["corsa"])(model, params, batch, reference=torch.zeros(2, 2))
    assert all(torch.isfinite(v).all() for v in logs.values())
    assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_an_evaluation_leaves_a_4bit_base_trainable():
    """An eval-mode call without gradients (where bitsandbytes would repack the weights for its inference kernel,
    on CPUs with AVX512-BF16) leaves the gradient of a later training step through the frozen base unchanged."""
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = []
    for evaluate_first in (False, True):
        torch.manual_seed(0)  # the same adapter initialisation on both
        model = wrap_with_lora(load_causal_lm("world:model", dtype="float32", load_in_4bit=True), r=4, alpha=8)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # B = 0 would leave A without a gradient
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:  # the first block's adapters get their gradient through every 4-bit layer above them
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
