import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lit_common.layers import decoder_linears, find_decoder_blocks
from lit_tacq import pipeline
from lit_tacq.gptq import HessianAccumulator
from lit_tacq.io import quantized_modules
from lit_tacq.pipeline import (
    QuantSettings,
    capture_block_inputs,
    linear_groups,
    quantize_model,
    quantize_weight,
    saliency_scores,
    sequential_pass,
)
from lit_tacq.qlinear import QuantLinear
from lit_tacq.workdir import WorkDir

CONFIG = LlamaConfig(vocab_size=50, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


@pytest.fixture
def sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (n,), generator=g) for n in (9, 14, 6, 11)]


def test_linear_groups_follow_the_data_flow(model, sequences):
    inputs = capture_block_inputs(model, sequences, progress=False)
    groups = linear_groups(find_decoder_blocks(model)[0], inputs)
    assert [sorted(g) for g in groups] == [
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]


def _hessians_of(model, sequences):
    """H of every decoder Linear's inputs, measured by running ``model`` itself."""
    accumulators, hooks = {}, []
    for name, linear in decoder_linears(model).items():
        accumulators[name] = HessianAccumulator(linear.in_features)
        hooks.append(linear.register_forward_pre_hook(lambda m, args, acc=accumulators[name]: acc.add_batch(args[0])))
    with torch.no_grad():
        for ids in sequences:
            model(input_ids=ids[None])
    for hook in hooks:
        hook.remove()
    return {name: acc.H for name, acc in accumulators.items()}


def test_sequential_pass_sees_the_already_quantized_layers(model, sequences):
    fp_hessians = _hessians_of(model, sequences)
    settings = QuantSettings(bits=2, saliency="none")
    seen = {}

    def rtn_in_place(full, block, name, H):
        seen[full] = H
        linear = block.get_submodule(name)
        linear.weight.data.copy_(quantize_weight(linear.weight, None, "rtn", settings).dequantized)

    sequential_pass(model, sequences, rtn_in_place, need_hessians=True, on_copies=False, desc="", progress=False)
    # every layer's H is that of the final model, whose earlier layers are all quantized ...
    quantized_hessians = _hessians_of(model, sequences)
    for name, H in seen.items():
        torch.testing.assert_close(H, quantized_hessians[name], rtol=1e-4, atol=1e-5)
    # ... which is not the H of the original model (from o_proj of block 0 on)
    assert torch.equal(seen["model.layers.0.self_attn.q_proj"], fp_hessians["model.layers.0.self_attn.q_proj"])
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert not torch.allclose(seen[name], fp_hessians[name], rtol=1e-2), name


def test_tacq_keeps_the_global_top_p(model, sequences):
    linears = decoder_linears(model)
    n_weights = sum(linear.weight.numel() for linear in linears.values())
    grads = {name: torch.rand(linear.weight.shape) for name, linear in linears.items()}
    settings = QuantSettings(bits=3, fraction=0.01)
    summary = quantize_model(model, sequences, settings, grads, progress=False)

    modules = quantized_modules(model)
    assert set(modules) == set(linears) and all(isinstance(m, QuantLinear) for m in modules.values())
    assert sum(summary.kept.values()) == math.floor(0.01 * n_weights) == sum(m.outlier_values.numel()
                                                                               for m in modules.values())
    assert summary.kept_fraction == pytest.approx(0.01, abs=1 / n_weights)
    assert set(summary.seconds) == {"saliency", "mask", "quantize"}
    with torch.no_grad():
        logits = model(input_ids=sequences[0][None]).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("reference", ["gptq", "rtn"])
def test_reference_pass_scores_gptq_weights_on_copies(model, sequences, reference):
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ones = {name: torch.ones_like(linear.weight) for name, linear in decoder_linears(model).items()}
    settings = QuantSettings(bits=2, saliency="grad_delta", reference=reference)  # with A = 1: |Q(W) - W|
    scores = saliency_scores(model, sequences, settings, ones, progress=False)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())

    first = "model.layers.0.self_attn.q_proj"  # its inputs are the same in the original model
    W = decoder_linears(model)[first].weight.detach()
    H = _hessians_of(model, sequences)[first]
    expected = quantize_weight(W, H, reference, settings).dequantized
    torch.testing.assert_close(scores[first], (expected - W).abs())


def test_kept_weights_lower_the_layer_error(model, sequences):
    """With the same calibration, keeping 2 % of the weights must not quantize worse than keeping none."""
    reference = LlamaForCausalLM(CONFIG).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randint(0, 50, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = reference(input_ids=x).logits
    errors = {}
    for fraction in (0.0, 0.02):
        candidate = LlamaForCausalLM(CONFIG).eval()
        candidate.load_state_dict(reference.state_dict())
        quantize_model(candidate, sequences, QuantSettings(bits=2, fraction=fraction, saliency="magnitude"),
                       progress=False)
        with torch.no_grad():
            errors[fraction] = (candidate(input_ids=x).logits - target).square().mean().item()
    assert errors[0.02] < errors[0.0]


def test_settings_and_inputs_are_checked(model, sequences):
    with pytest.raises(ValueError, match="saliency='loudest', expected 'none' or one of"):
        QuantSettings(saliency="loudest")
    with pytest.raises(ValueError, match="bits"):
        QuantSettings(bits=5)
    with pytest.raises(ValueError, match="accumulated gradients"):
        quantize_model(model, sequences, QuantSettings(saliency="tacq"), None, progress=False)
    with pytest.raises(ValueError, match="shape"):
        grads = {name: torch.zeros(1) for name in decoder_linears(model)}
        quantize_model(model, sequences, QuantSettings(saliency="tacq"), grads, progress=False)


@pytest.mark.parametrize("field,value,expected", [
    ("bits", 5, r"one of \(2, 3, 4, 8\)"),
    ("bits", 3.0, "one of"),
    ("bits", True, "one of"),
    ("group_size", 0, r"None \(one grid per row\) or a positive integer"),
    ("group_size", -4, r"None \(one grid per row\) or a positive integer"),
    ("group_size", 32.0, r"None \(one grid per row\) or a positive integer"),
    ("fraction", 1.0, r"a number in \[0, 1\)"),
    ("fraction", float("nan"), r"a number in \[0, 1\)"),
    ("reference", "awq", "'gptq' or 'rtn'"),
    ("quantizer", "nf4", "'gptq', 'rtn', 'slim_llm' or 'spqr'"),
    ("percdamp", 0, r"a number in \(0, 1\]"),
    ("percdamp", -0.01, r"a number in \(0, 1\]"),
    ("percdamp", 1.5, r"a number in \(0, 1\]"),
    ("block_size", 0, "a positive integer"),
    ("block_size", 12.5, "a positive integer"),
    ("act_order", "yes", "a bool"),
    ("mse", 1, "a bool"),
    ("outlier_dtype", "int8", r"one of \['bfloat16', 'float16'\]"),
    ("seed", 1.5, "an integer"),
])
def test_every_setting_is_checked_when_made(field, value, expected):
    with pytest.raises(ValueError, match=rf"invalid QuantSettings: {field}={value!r}, expected {expected}"):
        QuantSettings(**{field: value})


def test_all_bad_settings_are_reported_at_once_and_act_order_excludes_groups():
    with pytest.raises(ValueError, match=r"bits=5, expected .*; percdamp=0, expected"):
        QuantSettings(bits=5, percdamp=0)
    with pytest.raises(ValueError, match="act_order=True, expected a bool, and False with a group_size"):
        QuantSettings(act_order=True, group_size=32)
    QuantSettings(act_order=True)  # per-row grids: fine


class Interrupted(Exception):
    pass


def _interrupt_after(monkeypatch, method: str, blocks: int) -> None:
    """Stop the run (as a kill would) right after ``blocks`` blocks of a pass are committed."""
    original = getattr(WorkDir, method)

    def commit_then_stop(self, index, *args):
        original(self, index, *args)
        if index + 1 == blocks:
            raise Interrupted

    monkeypatch.setattr(WorkDir, method, commit_then_stop)


def _copy_of(model):
    clone = LlamaForCausalLM(CONFIG).eval()
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("method,blocks,quantized_on_resume", [
    ("finish_reference_block", 1, 7 + 14),  # reference block 1, then the whole final pass
    ("finish_reference_block", 2, 14),  # every score stored, the mask not yet ranked
    ("finish_final_block", 1, 7),  # only the final pass's block 1
])
def test_quantization_interrupted_after_a_block_resumes_bit_identical(model, sequences, tmp_path, monkeypatch, method,
                                                                       blocks, quantized_on_resume):
    grads = {name: torch.rand(linear.weight.shape, generator=torch.Generator().manual_seed(3))
             for name, linear in decoder_linears(model).items()}
    settings = QuantSettings(bits=2, fraction=0.02)
    uninterrupted = _copy_of(model)
    expected = quantize_model(uninterrupted, sequences, settings, grads, progress=False)

    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, method, blocks)
        with pytest.raises(Interrupted):
            quantize_model(_copy_of(model), sequences, settings, grads, progress=False, work_dir=work)
    assert {p.suffix for p in work.iterdir()} == {".safetensors", ".json"}  # no pickle, no temporary file left

    calls = []
    original = pipeline.quantize_weight
    monkeypatch.setattr(pipeline, "quantize_weight", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    resumed = _copy_of(model)
    summary = quantize_model(resumed, sequences, settings, grads, progress=False, work_dir=work)
    assert len(calls) == quantized_on_resume  # finished blocks are restored, not recomputed
    assert summary.kept == expected.kept and summary.total_weights == expected.total_weights
    modules, reference = quantized_modules(resumed), quantized_modules(uninterrupted)
    assert set(modules) == set(reference) and len(modules) == 14
    for name, module in modules.items():
        for buffer, tensor in module.state_dict().items():
            assert torch.equal(tensor, reference[name].state_dict()[buffer]), f"{name}.{buffer}"
    assert work.exists()  # the caller removes it once the model is stored


def test_a_work_directory_of_another_quantization_is_refused(model, sequences, tmp_path, monkeypatch):
    work = tmp_path / "work"
    with monkeypatch.context() as patch:
        _interrupt_after(patch, "finish_final_block", 1)
        with pytest.raises(Interrupted):
            quantize_model(_copy_of(model), sequences, QuantSettings(bits=2, saliency="magnitude", fraction=0.02),
                           progress=False, work_dir=work)
    other_model = _copy_of(model)
    with torch.no_grad():
        other_model.model.layers[1].mlp.down_proj.weight[0, 0] += 1e-3
    for candidate, settings, data in [
        (_copy_of(model), QuantSettings(bits=3, saliency="magnitude", fraction=0.02), sequences),  # settings
        (other_model, QuantSettings(bits=2, saliency="magnitude", fraction=0.02), sequences),  # weights
        (_copy_of(model), QuantSettings(bits=2, saliency="magnitude", fraction=0.02), sequences[:3]),  # calibration
    ]:
        with pytest.raises(ValueError, match=f"{work} holds the progress of another quantization"):
            quantize_model(candidate, data, settings, progress=False, work_dir=work)
