"""SliM-LLM (lit_tacq/slim_llm.py) and its mixed-precision storage (lit_tacq/mixed_linear.py): allocation, packing,
forward, export and the loader's checks."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lit_common.adapters import with_packed_layers
from lit_common.layers import (
    decoder_linears,
    find_adaptable_linears,
    find_decoder_blocks,
)
from lit_tacq import pipeline
from lit_tacq.cpu_kernel import MIN_WEIGHTS
from lit_tacq.gptq import gptq_quantize
from lit_tacq.io import (
    accounted_bits_per_weight,
    load_quantized,
    measured_bits_per_weight,
    quantized_modules,
    save_quantized,
)
from lit_tacq.mixed_linear import MixedQuantLinear
from lit_tacq.packing import pack_codes, unpack_codes
from lit_tacq.pipeline import QuantSettings, quantize_model
from lit_tacq.slim_llm import (
    allocate,
    group_sums,
    output_error,
    slim_llm_quantize,
    weight_salience,
)
from lit_tacq.workdir import WorkDir

CONFIG = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
SETTINGS = QuantSettings(bits=2, group_size=32, saliency="none", quantizer="slim_llm")


def _layer_problem(rows: int = 64, cols: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and a Hessian whose inputs grow in scale along the columns, so later groups matter more."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g) * torch.linspace(0.2, 3.0, cols)
    return W, 2 * X.T @ X / X.shape[0]


def _structured_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    for linear in decoder_linears(model).values():
        linear.weight.data *= torch.linspace(0.25, 4.0, linear.in_features)
    return model


@pytest.fixture(scope="module")
def quantized():
    """A tiny Llama quantized by the pipeline with SliM-LLM at 2 bits (groups of 32 columns). Its weights are scaled
    along the input features, so salience differs between column groups as the paper finds it does in LLMs (at random
    initialisation it does not, and the split search rightly keeps every group at 2 bits)."""
    model = _structured_model()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 50, (n,), generator=g) for n in (30, 24, 28, 26)]
    quantize_model(model, sequences, SETTINGS, progress=False)
    return model, sequences


@pytest.mark.parametrize("bits,cols", [(2, 256), (3, 240)])  # 240: a narrower last group, kept at the target width
def test_average_code_bits_equal_the_target(bits, cols):
    W, H = _layer_problem(cols=cols)
    result = slim_llm_quantize(W, H, bits, group_size=32, splits=5)
    widths = torch.tensor(result.group_bits)
    assert set(result.group_bits) <= {bits - 1, bits, bits + 1}
    assert int((widths == bits + 1).sum()) == int((widths == bits - 1).sum()) == result.split > 0
    layer = MixedQuantLinear.from_codes(result.codes, result.scale, result.zero, result.group_bits, 32, None)
    assert layer.average_code_bits() == bits and layer.bits == bits
    assert result.split == min(result.split_errors, key=result.split_errors.get)
    assert len(result.split_errors) > 1  # a search, not one candidate


def test_the_most_salient_groups_get_the_most_bits():
    # H = 2 I: every column's conditional inverse Hessian is the same, so a group's salience is its sum of w^2
    W = torch.ones(4, 6 * 8) * torch.tensor([3.0, 1.0, 5.0, 2.0, 4.0, 6.0]).repeat_interleave(8)
    U = torch.eye(48) / 2**0.5
    salience = group_sums(weight_salience(W, U), 8)
    assert torch.allclose(salience, 2 * 4 * 8 * torch.tensor([9.0, 1, 25, 4, 16, 36]))
    assert allocate(salience, 2, split=2, rankable=6) == [2, 1, 3, 1, 2, 3]
    assert allocate(salience, 3, split=1, rankable=5) == [3, 2, 4, 3, 3, 3]  # the last (narrower) group is not ranked
    assert allocate(salience, 2, split=0, rankable=6) == [2] * 6

    # end to end: the allocation follows the salience of the layer's own Hessian
    W, H = _layer_problem()
    result = slim_llm_quantize(W, H, 2, group_size=32)
    order = torch.argsort(result.salience, descending=True).tolist()
    ranked = [result.group_bits[g] for g in order]
    assert ranked == sorted(ranked, reverse=True) and result.group_bits[-1] == 3 and result.group_bits[0] == 1


def test_mixing_widths_lowers_the_output_error_against_uniform_gptq():
    W, H = _layer_problem()
    slim = slim_llm_quantize(W, H, 2, group_size=32)
    uniform = gptq_quantize(W, H, 2, group_size=32)
    assert slim.split_errors[slim.split] < slim.split_errors[0]
    assert output_error(slim.dequantized - W, H) < output_error(uniform.dequantized - W, H)


def test_one_bit_codes_pack_and_unpack():
    codes = torch.randint(0, 2, (3, 70), generator=torch.Generator().manual_seed(0))
    packed = pack_codes(codes, 1)
    assert packed.shape == (3, 3)  # 70 codes padded to 96: three words
    assert torch.equal(unpack_codes(packed, 1, 70), codes.to(torch.uint8))


@pytest.mark.parametrize("tokens", [3, 40])  # the fused kernel (<= 8 rows) and the tiled one
def test_mixed_forward_equals_the_decoded_reference(tokens):
    g = torch.Generator().manual_seed(2)
    widths = [3, 1, 2]  # groups of 128 columns, each part 512 x 128: large enough for the C kernel
    codes = torch.cat([torch.randint(0, 2**b, (512, 128), generator=g) for b in widths], dim=1).to(torch.uint8)
    scale = torch.rand(512, 3, generator=g).add(0.1).half().float()
    zero = torch.tensor([3.0, 0.5, 1.0]).expand(512, 3)  # a 1-bit grid's zero point need not be an integer
    bias = torch.randn(512, generator=g)
    layer = MixedQuantLinear.from_codes(codes, scale, zero, widths, 128, bias)
    expected = scale.repeat_interleave(128, dim=1) * (codes.float() - zero.repeat_interleave(128, dim=1))
    assert torch.equal(layer.dequantize(), expected)
    parts = list(layer.parts.values())
    assert [p.bits for p in parts] == [1, 2, 3] and all(p.in_features * p.out_features >= MIN_WEIGHTS for p in parts)
    x = torch.randn(tokens, 384, generator=g)
    with torch.no_grad():  # the parts' packed kernels
        y = layer(x)
    assert torch.allclose(y, layer.reference_forward(x), atol=1e-3, rtol=1e-4)
    assert torch.allclose(y, x @ expected.T + bias.half().float(), atol=1e-3, rtol=1e-4)
    x.requires_grad_(True)  # a differentiable forward decodes
    layer(x).sum().backward()
    assert torch.allclose(x.grad, expected.sum(0).expand_as(x), atol=1e-3)

    restored = MixedQuantLinear.from_buffers(layer.state_dict(), 384, 128)  # what a resumed run rebuilds
    assert restored.widths() == widths and torch.equal(restored.dequantize(), expected)


def test_stored_bits_equal_the_accounting(quantized, tmp_path):
    model, _ = quantized
    modules = quantized_modules(model)
    assert len(modules) == 14 and all(isinstance(m, MixedQuantLinear) for m in modules.values())
    assert all(m.average_code_bits() == 2 for m in modules.values())
    assert all(set(m.widths()) == {1, 3} for m in modules.values())  # every layer's search moved all its groups
    save_quantized(model, tmp_path)
    # every group is 32 columns: no code padding, so the stored bytes are exactly the accounting
    weights = sum(m.in_features * m.out_features for m in modules.values())
    groups = sum(len(m.widths()) for m in modules.values())
    by_hand = (2 * weights + 32 * sum(m.out_features * len(m.widths()) for m in modules.values()) + 8 * groups) / weights
    assert measured_bits_per_weight(tmp_path) == accounted_bits_per_weight(model) == pytest.approx(by_hand, abs=1e-12)
    assert measured_bits_per_weight(model) == measured_bits_per_weight(tmp_path)


def test_save_reload_gives_identical_logits(quantized, tmp_path):
    model, sequences = quantized
    save_quantized(model, tmp_path)
    manifest = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    entry = manifest["modules"]["model.layers.1.mlp.down_proj"]
    assert entry["kind"] == "mixed" and entry["group_size"] == 32 and len(entry["group_bits"]) == 4
    assert manifest["bits"] == 2 and manifest["kept_fraction"] == 0

    reloaded = load_quantized(tmp_path)
    for name, module in quantized_modules(model).items():
        loaded = reloaded.get_submodule(name)
        assert isinstance(loaded, MixedQuantLinear) and loaded.widths() == module.widths()
    ids = sequences[0][None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
        generated = reloaded.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(generated, model.generate(ids[:, :5], max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_lora_adapts_the_mixed_layers_not_their_parts(quantized):
    model, sequences = quantized
    base = copy.deepcopy(model)
    targets = {name.rsplit(".", 1)[-1] for block in find_decoder_blocks(base) for name in find_adaptable_linears(block)}
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # no parts
    peft_model = get_peft_model(base, with_packed_layers(LoraConfig(r=4, target_modules=sorted(targets)), base))
    adapted = {name.rsplit(".", 1)[-1] for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ids = sequences[0][None]
    peft_model(ids, labels=ids).loss.backward()
    lora_b = [p for name, p in peft_model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 14 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)


def _rewrite_manifest(directory, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config["quantization_config"]["modules"])
    (directory / "config.json").write_text(json.dumps(config))


def test_a_tampered_export_fails_clearly(quantized, tmp_path):
    model, _ = quantized
    name = "model.layers.1.mlp.down_proj"
    widths = quantized_modules(model)[name].widths()

    bad_width = tmp_path / "bad_width"
    save_quantized(model, bad_width)
    _rewrite_manifest(bad_width, lambda modules: modules[name].update(group_bits=[5] * len(widths)))
    with pytest.raises(ValueError, match=rf"{name}: group_bits \[5, .*expected a list of one width"):
        load_quantized(bad_width)

    # the same widths in another order: every part keeps its shape, so only the stored map can tell
    swapped = tmp_path / "swapped"
    save_quantized(model, swapped)
    reordered = [widths[1], widths[0], *widths[2:]] if widths[0] != widths[1] else list(reversed(widths))
    assert reordered != widths
    _rewrite_manifest(swapped, lambda modules: modules[name].update(group_bits=reordered))
    with pytest.raises(ValueError, match=rf"{name}.group_bits: stored widths .* differ from the manifest's"):
        load_quantized(swapped)

    # a part of another width in the weights file: its shape and name disagree with the manifest
    wider = tmp_path / "wider"
    save_quantized(model, wider)
    tensors = load_file(str(wider / "model.safetensors"))
    tensors[f"{name}.parts.bits3.qweight"] = torch.cat([tensors[f"{name}.parts.bits3.qweight"]] * 2)
    save_file(tensors, str(wider / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.parts.bits3.qweight: shape .* expected"):
        load_quantized(wider)


def test_settings_are_checked():
    for bad in ({"bits": 4}, {"group_size": None}, {"saliency": "tacq"}, {"slim_splits": 0}, {"salience_weight": 0.5}):
        with pytest.raises(ValueError, match="invalid QuantSettings"):
            QuantSettings(**{**vars(SETTINGS), **bad})


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_layers(quantized, tmp_path, monkeypatch):
    model, sequences = quantized
    original = WorkDir.finish_final_block

    def commit_then_stop(self, index, *args):
        original(self, index, *args)
        if index == 0:
            raise Interrupted

    fresh = _structured_model()
    with monkeypatch.context() as patch:
        patch.setattr(WorkDir, "finish_final_block", commit_then_stop)
        with pytest.raises(Interrupted):
            quantize_model(fresh, sequences, SETTINGS, progress=False, work_dir=tmp_path / "work")
    resumed = _structured_model()
    calls = []
    monkeypatch.setattr(pipeline, "slim_llm_quantize", lambda *args, **kw: calls.append(1) or slim_llm_quantize(*args, **kw))
    quantize_model(resumed, sequences, SETTINGS, progress=False, work_dir=tmp_path / "work")
    assert len(calls) == 7  # block 0's layers restored from the work directory, block 1's quantized
    expected = quantized_modules(model)
    for name, module in quantized_modules(resumed).items():
        assert isinstance(module, MixedQuantLinear)
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, expected[name].state_dict()[key]), f"{name}.{key}"
