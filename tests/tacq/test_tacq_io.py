import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models
from torch.profiler import ProfilerActivity, profile
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lit_common.layers import find_decoder_blocks, find_linears
from lit_tacq.gptq import gptq_quantize
from lit_tacq.io import (
    load_quantized,
    measured_bits_per_weight,
    quantized_modules,
    save_quantized,
)
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
    meta = _manifest(tmp_path)
    assert meta["quant_method"] == "lit_tacq" and (meta["bits"], meta["group_size"]) == ([2, 3], [None, 32])
    assert set(meta["modules"]) == set(quantized_modules(model))
    assert meta["modules"]["model.layers.1.mlp.up_proj"]["bits"] == 2
    assert meta["modules"]["model.layers.1.mlp.up_proj"]["group_size"] == 32
    modules = quantized_modules(model).values()
    weights = sum(m.in_features * m.out_features for m in modules)
    assert meta["kept_fraction"] == sum(m.outliers.kept() for m in modules) / weights
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


def test_transformers_loads_saves_and_adapts_the_packed_directory(tmp_path):
    """from_pretrained (after ``import lit_tacq``) equals load_quantized, honours dtype, save_pretrained writes
    the very same tensors back, and a peft LoRA adapter trains on top of the packed layers."""
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(LlamaConfig(**TINY), dtype=torch.bfloat16).eval()
    _quantize_some(model)
    save_quantized(model, tmp_path / "saved", extra={"fraction": 0.02})
    ids = torch.randint(0, 100, (2, 9))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, load_quantized(tmp_path / "saved")(ids).logits)
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    loaded.save_pretrained(tmp_path / "again")
    first, again = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("saved", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert all(first[k].dtype == again[k].dtype for k in first)
    assert _manifest(tmp_path / "again") == _manifest(tmp_path / "saved")

    widened = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    q_proj = quantized_modules(widened)[Q_PROJ]
    assert widened.model.norm.weight.dtype == torch.float32  # the 16-bit weights follow dtype ...
    assert (q_proj.scale.dtype, q_proj.outlier_values.dtype) == (torch.float16, torch.bfloat16)  # ... the format not

    from peft import LoraConfig, get_peft_model

    from lit_common.adapters import with_packed_layers

    adapted = get_peft_model(widened, with_packed_layers(LoraConfig(r=4, target_modules=["q_proj", "up_proj"]), widened))
    loss = adapted(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    assert any("layers.0.self_attn.q_proj.lora_A" in n for n in grads)  # a packed layer carries the adapter


def _saved(tmp_path, plan=PLAN[:1]):
    model = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    _quantize_some(model, plan)
    save_quantized(model, tmp_path)
    return model


def _manifest(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def _edit_manifest(tmp_path, edit) -> None:
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config["quantization_config"])
    path.write_text(json.dumps(config))


Q_PROJ = "model.layers.0.self_attn.q_proj"


def test_load_is_strict(tmp_path):
    _saved(tmp_path)
    _edit_manifest(tmp_path, lambda meta: meta["modules"][Q_PROJ].update(nnz=meta["modules"][Q_PROJ]["nnz"] + 1))
    # the shell no longer fits the stored kept weights: found in the weights file's header, before loading
    with pytest.raises(ValueError, match=rf"\n  model.safetensors: {Q_PROJ}.outlier_gaps: shape \[\d+\], expected"):
        load_quantized(tmp_path)

    _saved(tmp_path)  # a tensor missing from the weights file: named, not left at its random initial values
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.norm.weight"], tensors[f"{Q_PROJ}.scale"]
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{Q_PROJ}.scale: missing from the weights files\n  "
                                         r"model.norm.weight: missing from the weights files"):
        load_quantized(tmp_path)


def test_truncated_weights_and_other_format_versions_are_named(tmp_path):
    _saved(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file \(truncated"):
        load_quantized(tmp_path)

    (tmp_path / "v3").mkdir()  # an export of format 3 kept its manifest beside config.json
    (tmp_path / "v3/config.json").write_text(json.dumps(LlamaConfig(**TINY).to_dict()))
    (tmp_path / "v3/quantization.json").write_text("{}")
    with pytest.raises(ValueError, match=r"v3: not a packed lit_tacq model: .* format v3 or older: re-export it"):
        load_quantized(tmp_path / "v3")

    _saved(tmp_path)
    _edit_manifest(tmp_path, lambda meta: meta.update(format_version=3))
    with pytest.raises(ValueError, match=r"config.json: quantization_config: format 'lit_tacq.packed' v3, this "
                                         r"version of lit_tacq reads 'lit_tacq.packed' v4"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _set(field, value):
    return lambda meta: meta["modules"][Q_PROJ].__setitem__(field, value)


@pytest.mark.parametrize("edit,message", [
    (_set("outlier_dtype", "int8"), rf"{Q_PROJ}: outlier_dtype 'int8', expected one of \['bfloat16', 'float16'\]"),
    (_set("bits", 5), rf"{Q_PROJ}: bits 5, expected one of \(2, 3, 4, 8\)"),
    (_set("bits", "3"), rf"{Q_PROJ}: bits '3', expected one of"),
    (_set("group_size", 0), rf"{Q_PROJ}: group_size 0, expected null or a positive integer"),
    (_set("nnz", -1), rf"{Q_PROJ}: nnz -1, expected a non-negative integer"),
    (_set("in_features", True), rf"{Q_PROJ}: in_features True, expected a positive integer"),
    (_set("bias", "no"), rf"{Q_PROJ}: bias 'no', expected true or false"),
    (_set("scale_dtype", "float16"), rf"{Q_PROJ}: unknown field 'scale_dtype'"),
    (lambda meta: meta["modules"][Q_PROJ].pop("nnz"), rf"{Q_PROJ}: nnz missing"),
    (lambda meta: meta.update(dtype="int8"), r"quantization_config:\n  unknown field 'dtype'"),
    (lambda meta: meta.update(bits_per_weight=0), r"bits_per_weight 0, expected a positive number"),
    (lambda meta: meta.update(modules={}), r"modules \{\}, expected a non-empty object"),
    (lambda meta: meta["modules"].update({"model.layers.7.mlp.up_proj": meta["modules"][Q_PROJ]}),
     r"model.layers.7.mlp.up_proj: no such Linear layer in the model of config.json"),
    (_set("out_features", 128), rf"{Q_PROJ}: out_features 128, the layer in config.json's model has 64"),
    (_set("outlier_dtype", "float16"), rf"{Q_PROJ}.outlier_values: dtype BF16, expected F16 from config.json"),
], ids=["int8", "bits", "bits-str", "group0", "nnz", "in-bool", "bias", "unknown", "missing", "dtype", "bpw", "empty",
        "no-layer", "shape", "outlier-dtype-vs-file"])
def test_every_manifest_field_is_checked(tmp_path, edit, message):
    _saved(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ValueError, match=message) as error:
        load_quantized(tmp_path)
    assert str(tmp_path) in str(error.value)  # the file is named


def test_oversized_shapes_fail_before_anything_large_is_allocated(tmp_path):
    """A JSON edit of a few bytes claiming 2**31 kept weights (8 GB of shells): refused from the header."""
    _saved(tmp_path)
    _edit_manifest(tmp_path, _set("nnz", 2**31))
    refusal = rf"{Q_PROJ}.outlier_values: shape \[\d+\], expected \[2147483648\]"
    with (profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
          pytest.raises(ValueError, match=refusal)):
        load_quantized(tmp_path)
    largest = max((event.cpu_memory_usage for event in prof.events()), default=0)
    assert largest < 2**20, f"allocated {largest} bytes at once before refusing"


def test_kept_weight_positions_beyond_the_matrix_fail_at_load(tmp_path):
    _saved(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    gaps = tensors[f"{Q_PROJ}.outlier_gaps"]
    gaps[-1] = 2**15 - 1  # a step of 32768 from the last kept position: past the 64 x 64 matrix
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{tmp_path}: {Q_PROJ}.outlier_gaps: kept positions reach \d+, "
                                         r"beyond the 64 x 64 = 4096 weights"):
        load_quantized(tmp_path)


def test_save_refuses_an_unquantized_model(tmp_path):
    with pytest.raises(ValueError):
        save_quantized(LlamaForCausalLM(LlamaConfig(**TINY)), tmp_path)
