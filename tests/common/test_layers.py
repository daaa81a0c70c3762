from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lit_common.layers import find_decoder_blocks, find_linears

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=50)
PROJECTIONS = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}


def test_llama_and_qwen2_blocks_and_linears():
    for model in (LlamaForCausalLM(LlamaConfig(**TINY)), Qwen2ForCausalLM(Qwen2Config(**TINY))):
        blocks = find_decoder_blocks(model)
        assert len(blocks) == 3
        assert all(a is b for a, b in zip(blocks, model.model.layers))
        for block in blocks:
            assert set(find_linears(block)) == PROJECTIONS  # no lm_head, no embeddings


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.Linear(8, 8)
        self.experts = nn.ModuleList(nn.Linear(8, 8, bias=False) for _ in range(6))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.layers = nn.ModuleList(_Block() for _ in range(2))
        self.heads = nn.ModuleList([nn.Linear(8, 10), nn.Linear(8, 10), nn.Linear(8, 10)])


def test_blocks_are_found_by_parameters_not_by_list_length():
    model = _Model()  # 6 experts per block and 3 heads outnumber the 2 blocks, but hold fewer weights
    blocks = find_decoder_blocks(model)
    assert all(a is b for a, b in zip(blocks, model.layers)) and len(blocks) == 2
    assert set(find_linears(blocks[0])) == {"attn"} | {f"experts.{i}" for i in range(6)}


def test_gpt2_conv1d_layers_are_linears_for_lora_and_refused_by_tacq_by_name():
    import pytest
    from transformers import GPT2Config, GPT2LMHeadModel

    from lit_common.layers import decoder_linears, require_nn_linear
    from lit_corsa.lora import decoder_linear_names

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    assert decoder_linear_names(model) == ["c_attn", "c_fc", "c_proj"]
    with pytest.raises(ValueError, match=r"transformer.h.0.attn.c_attn is a Conv1D .* nn.Linear layers only"):
        require_nn_linear(decoder_linears(model))
