import json

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lit_tacq.gptq import gptq_quantize
from lit_tacq.io import load_quantized, measured_bits_per_weight, quantized_modules, save_quantized
from lit_tacq.layers import find_decoder_blocks, find_linears
from lit_tacq.qlinear import QuantLinear

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100)


# (block, Linear, bits, group size): per-row 3-bit attention in block 0, 2-bit groups in block 1's MLP
PLAN = [(0, f"self_attn.{p}_proj", 3, None) for p in "qkvo"] + [(1, "mlp.up_proj", 2, 32), (1, "mlp.down_proj", 2, 32)]


def _quantize_some(model: torch.nn.Module, plan=PLAN) -> None:
    """Masked GPTQ (2 % kept weights) on the planned layers, swapped for QuantLinear in place."""
    g = torch.Generator().manual_seed(0)
    for block_idx, name, bits, group_size in plan:
        block = find_decoder_blocks(model)[block_idx]
        linear = find_linears(block)[name]
        X = torch.randn(64, linear.in_features, generator=g)
        keep = torch.rand(linear.weight.shape, generator=g) < 0.02
        result = gptq_quantize(linear.weight.data, 2 * X.T @ X / 64, bits, keep_mask=keep, group_size=group_size)
        block.set_submodule(name, QuantLinear.from_result(result, linear.bias, dtype=torch.bfloat16))


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(99)} | {"<unk>": 99}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                   unk_token="<unk>")


@pytest.mark.parametrize(
    "model_cls,config",
    [
        (LlamaForCausalLM, LlamaConfig(**TINY, tie_word_embeddings=True)),
        (Qwen2ForCausalLM, Qwen2Config(**TINY, tie_word_embeddings=False)),  # q/k/v carry biases
    ],
    ids=["llama-tied", "qwen2-bias"],
)
def test_save_load_round_trip(tmp_path, model_cls, config):
    torch.manual_seed(0)
    # built like from_pretrained(dtype=...) builds it (rotary buffers stay float32), as the loader does
    model = model_cls._from_config(config, dtype=torch.bfloat16).eval()
    _quantize_some(model)
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits

    save_quantized(model, tmp_path, tokenizer=_tokenizer(), extra={"fraction": 0.02})
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    meta = json.loads((tmp_path / "quantization.json").read_text())
    assert set(meta["modules"]) == set(quantized_modules(model))
    assert meta["modules"]["model.layers.1.mlp.up_proj"]["bits"] == 2
    assert meta["modules"]["model.layers.1.mlp.up_proj"]["group_size"] == 32
    assert meta["extra"] == {"fraction": 0.02}

    loaded = load_quantized(tmp_path)
    assert set(quantized_modules(loaded)) == set(meta["modules"])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    if config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    out = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=4, do_sample=False))
    assert AutoTokenizer.from_pretrained(tmp_path).convert_tokens_to_ids("t7") == 7

    assert measured_bits_per_weight(tmp_path) == pytest.approx(meta["bits_per_weight"])
    assert measured_bits_per_weight(loaded) == pytest.approx(meta["bits_per_weight"])


def test_load_is_strict(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    _quantize_some(model, PLAN[:1])
    save_quantized(model, tmp_path)
    meta_path = tmp_path / "quantization.json"
    meta = json.loads(meta_path.read_text())
    meta["modules"]["model.layers.0.self_attn.q_proj"]["nnz"] += 1  # shell no longer fits the stored CSR
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RuntimeError):
        load_quantized(tmp_path)


def test_save_refuses_an_unquantized_model(tmp_path):
    with pytest.raises(ValueError):
        save_quantized(LlamaForCausalLM(LlamaConfig(**TINY)), tmp_path)
