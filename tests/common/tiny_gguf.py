"""A tiny Llama written as a GGUF file the way llama.cpp writes SmolLM2's: Q4_1 Linears, a Q8_0 token
embedding, F32 norms, q/k rows permuted for llama.cpp's RoPE, and a byte-level BPE tokenizer with a chat
template in the metadata. Small enough that a test writes and dequantizes one in well under a second.

``write_tiny_gguf`` returns the Hugging Face model holding exactly the weights the file decodes to
(quantized, then dequantized with the ``gguf`` package), the reference a loader must reproduce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ R", "o m", "Ġ P"]
CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 128, 2


def vocabulary() -> list[str]:
    """Special tokens first (ids 0-2, as SmolLM2), then the 256 byte symbols, then the merged tokens."""
    merged = ["".join(merge.split(" ")) for merge in MERGES]
    return SPECIALS + list(bytes_to_unicode().values()) + merged


def _permute(weight: np.ndarray, heads: int, undo: bool = False) -> np.ndarray:
    """llama.cpp's q/k row order (its RoPE rotates interleaved row pairs); transformers undoes it on loading."""
    half = weight.shape[0] // heads // 2
    split = (heads, half, 2) if undo else (heads, 2, half)
    return weight.reshape(*split, -1).swapaxes(1, 2).reshape(weight.shape)


def _round_trip(weight: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    packed = quantize(weight, qtype)
    return packed, dequantize(packed, qtype).reshape(weight.shape)


def write_tiny_gguf(path: Path, architecture: str = "llama", seed: int = 0) -> LlamaForCausalLM:
    """Write the file; return the float32 model its dequantized weights define. Another ``architecture``
    than llama writes the same tensors under that name (a file transformers should refuse)."""
    tokens = vocabulary()
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
                         max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(config).eval()
    state = {name: t.detach().numpy().astype(np.float32) for name, t in reference.state_dict().items()}
    rng = np.random.default_rng(seed)
    for name, value in state.items():
        if name.endswith("norm.weight"):  # non-trivial norms, so a mis-mapped norm shows in the logits
            state[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)

    writer = GGUFWriter(path, architecture)
    writer.add_name("tiny test llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3 = control, 1 = normal
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def put(gguf_name: str, hf_name: str, qtype: GGMLQuantizationType | None, heads: int | None = None) -> None:
        weight = state[hf_name]
        if heads is not None:
            weight = _permute(weight, heads)
        if qtype is None:
            writer.add_tensor(gguf_name, weight)
            return
        packed, decoded = _round_trip(weight, qtype)
        writer.add_tensor(gguf_name, packed, raw_dtype=qtype)
        if heads is not None:  # the reference keeps transformers' row order
            decoded = _permute(decoded, heads, undo=True)
        state[hf_name] = decoded

    q4 = GGMLQuantizationType.Q4_1
    put("token_embd.weight", "model.embed_tokens.weight", GGMLQuantizationType.Q8_0)
    put("output_norm.weight", "model.norm.weight", None)
    for i in range(LAYERS):
        hf = f"model.layers.{i}"
        put(f"blk.{i}.attn_norm.weight", f"{hf}.input_layernorm.weight", None)
        put(f"blk.{i}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", None)
        put(f"blk.{i}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", q4, HEADS)
        put(f"blk.{i}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", q4, KV_HEADS)
        put(f"blk.{i}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", q4)
        put(f"blk.{i}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", q4)
        put(f"blk.{i}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", q4)
        put(f"blk.{i}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", q4)
        put(f"blk.{i}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", q4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    reference.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(t)) for name, t in state.items()})
    return reference
