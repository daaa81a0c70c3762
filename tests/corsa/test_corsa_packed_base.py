"""An adapter on a packed (TaCQ) base: peft's LoRA wraps the packed layers, the codes stay packed, and a step
is the step on the decoded weights."""

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lit_common.layers import decoder_linears
from lit_common.sources import load_causal_lm
from lit_corsa.lora import wrap_with_lora
from lit_tacq.io import save_quantized
from lit_tacq.qlinear import QuantLinear
from lit_tacq.quantizer import rtn_quantize

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100)


def _packed_and_decoded() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A tiny Llama with every decoder Linear packed at 3 bits, and its twin holding the decoded weights."""
    torch.manual_seed(0)
    packed = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    for name, linear in decoder_linears(packed).items():
        packed.set_submodule(name, QuantLinear.from_result(rtn_quantize(linear.weight.data, 3, 32), linear.bias))
    assert decoder_linears(packed) == {}  # packed layers are no Linears to quantize again
    decoded = copy.deepcopy(packed)
    for name, module in packed.named_modules():
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight.data = module.dequantize()
            decoded.set_submodule(name, linear)
    return packed, decoded


def test_a_lora_step_on_packed_layers_is_the_step_on_their_decoded_weights():
    packed, decoded = _packed_and_decoded()
    ids = torch.randint(0, 100, (2, 7))
    grads = []
    for base in (packed, decoded):
        torch.manual_seed(1)  # the same adapter initialisation on both
        model = wrap_with_lora(base, r=4, alpha=8)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)  # B = 0 would leave A without a gradient
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(grads[0]) == 2 * 7 * 2  # A and B on all 7 Linears of both blocks: the packed ones are adapted
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_an_export_loads_as_an_editing_base(tmp_path):
    packed, _ = _packed_and_decoded()
    save_quantized(packed, tmp_path / "export")
    model = wrap_with_lora(load_causal_lm(str(tmp_path / "export")), r=4, alpha=8)
    wrapped = [m for m in model.modules() if hasattr(m, "base_layer") and isinstance(m.base_layer, QuantLinear)]
    assert len(wrapped) == 14  # every packed layer carries the adapter; its codes are untouched
    ids = torch.randint(0, 100, (1, 5))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
