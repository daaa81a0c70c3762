"""SpQR (lit_tacq/spqr.py, qlinear.SpQRLinear): its statistics, its outliers, its error, and its packed export."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from lit_tacq import cpu_kernel
from lit_tacq.gptq import gptq_quantize
from lit_tacq.io import (
    accounted_bits_per_weight,
    load_quantized,
    measured_bits_per_weight,
    quantized_modules,
    save_quantized,
)
from lit_tacq.pipeline import QuantSettings, quantize_model
from lit_tacq.qlinear import SpQRLinear
from lit_tacq.quantizer import dequantize, quantize
from lit_tacq import spqr
from lit_tacq.spqr import decode_statistics, quantize_statistics, spqr_quantize

CONFIG = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64)
# the paper's relative threshold (one GPTQ pass per layer; the budget search is tested on single layers above)
SPQR = QuantSettings(bits=3, group_size=16, quantizer="spqr", saliency="none", outlier_threshold=0.2)
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("bits", [2, 3])
def test_second_level_statistics_round_trip_within_their_grid(bits):
    """Each scale decodes to within half a step of its β2-row grid (plus the fp16 rounding of the decoded value);
    40 rows = two full groups of 16 and a narrower last one."""
    g = torch.Generator().manual_seed(0)
    scales = torch.exp(torch.randn(40, 3, generator=g) * 2) * 1e-2  # four orders of magnitude
    codes, minimum, step = quantize_statistics(scales, bits, 16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    assert minimum.shape == step.shape == (3, 3) and minimum.dtype == step.dtype == torch.float16
    decoded = decode_statistics(codes, minimum, step, 16)
    half_step = step.float().repeat_interleave(16, dim=0)[:40] / 2
    bound = half_step + scales * 2**-11  # 2**-11: half an fp16 ulp, relative
    assert ((decoded - scales).abs() <= bound).all()
    assert ((decoded - scales).abs() > half_step / 4).any()  # the bound is not vacuous: the grid is coarse
    assert torch.equal(decoded, decoded.half().float())  # what QuantLinear stores as fp16, exactly


def test_outliers_are_the_weights_of_largest_sensitivity():
    """Hand-checkable: both rows' grids are fixed by weights on their grid points (row 0: -4..3, scale 1; row 1:
    -2..1.5, scale 0.5), four weights sit halfway between grid points, and H is diagonal, so GPTQ moves no error
    and a weight's sensitivity (w - q(w))^2 / [H^-1]_jj is err^2 * h_j: (0, 5) 0.25 * 2, (0, 6) 0.25 * 0.5,
    (1, 5) 0.0625 * 2, (1, 9) 0.0625 * 12. With a budget of two, SpQR keeps (1, 9) and (0, 5): not (0, 6),
    the largest of the four and one of the two largest errors, since its input matters least."""
    W = torch.tensor([[-4.0, 3, 0, 1, 2, 0.5, 1.5, -1, -2, -3, 0, 1, 2, 3, -4, 0],
                      [-2.0, 1.5, 0, 0.5, 1, 0.25, -0.5, -1, -1.5, 0.75, 0, 0.5, 1, 1.5, -2, 0]])
    h = torch.ones(16)
    h[5], h[6], h[9] = 2, 0.5, 12
    result = spqr_quantize(W, torch.diag(h), 3, group_size=16, fraction=2 / 32, percdamp=0.01)

    assert result.quant.scale.flatten().tolist() == [1.0, 0.5] and result.quant.zero.flatten().tolist() == [4, 4]
    assert result.quant.keep_mask.nonzero().tolist() == [[0, 5], [1, 9]]
    damped = h + 0.01 * h.mean()  # 1 / [H^-1]_jj
    grid = dequantize(quantize(W, result.quant.scale, result.quant.zero, 3), result.quant.scale, result.quant.zero)
    sensitivity = (W - grid).square() * damped
    top = set(sensitivity.flatten().topk(2).indices.tolist())
    assert top == set(result.quant.keep_mask.flatten().nonzero().flatten().tolist())
    kept = result.quant.keep_mask
    assert torch.equal(result.quant.dequantized[kept], W[kept])  # kept at their value (nothing moved them)


def test_spqr_beats_per_row_gptq_on_a_toy_layer():
    """Layer error ||(W - Q) X^T||^2 of SpQR (3-bit, β1 = β2 = 16, 1 % outliers) below per-row 3-bit GPTQ's."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(128, 64, generator=g)
    W[torch.rand(W.shape, generator=g) < 0.005] *= 8  # a few outliers, as LLM weights have
    X = torch.randn(1024, 64, generator=g) * torch.rand(64, generator=g) * 2
    H = 2 * X.T @ X / len(X)

    def error(Q):
        return float(((W - Q) @ X.T).square().sum())

    spqr = spqr_quantize(W, H, 3, group_size=16, fraction=0.01)
    gptq = gptq_quantize(W, H, 3)
    assert 0 < spqr.kept <= 0.01 * W.numel()
    assert error(spqr.quant.dequantized) < 0.7 * error(gptq.dequantized)


@pytest.mark.parametrize("bits", [2, 3])
def test_the_threshold_search_fills_the_budget_in_few_passes(monkeypatch, bits):
    """The layer keeps 98-100 % of floor(fraction * weights), found in at most 6 GPTQ passes (geometric bisection
    needed 6 and 10 passes on this layer at 2 and 3 bits)."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(192, 576, generator=g) * 0.02
    W[torch.rand(W.shape, generator=g) < 0.001] *= 4
    X = torch.randn(1024, 576, generator=g) * torch.rand(576, generator=g) * 2
    passes = []
    original = spqr._spqr_pass
    monkeypatch.setattr(spqr, "_spqr_pass", lambda *a: passes.append(a[-1]) or original(*a))
    result = spqr_quantize(W, 2 * X.T @ X / len(X), bits, group_size=16, fraction=0.0035)
    budget = int(0.0035 * W.numel())
    assert 0.98 * budget <= result.kept <= budget
    assert len(passes) <= 6, passes


@pytest.mark.parametrize("tokens", [3, 40])  # the fused kernel, and the tiled one (cpu_kernel.FUSED_MAX_TOKENS)
def test_the_cpu_kernel_computes_an_spqr_layer_like_its_decoded_weight(tokens):
    """A layer large enough for the packed C kernel (cpu_kernel.MIN_WEIGHTS) with 16-column groups and outliers."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 256, generator=g)
    X = torch.randn(512, 256, generator=g)
    layer = SpQRLinear.from_result(spqr_quantize(W, 2 * X.T @ X / len(X), 3, threshold=0.2), bias=None)
    assert cpu_kernel.library() is not None and layer.in_features * layer.out_features >= cpu_kernel.MIN_WEIGHTS
    assert layer.outlier_values.numel() > 0
    x = torch.randn(tokens, 256, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny Llama quantized by the pipeline with SpQR, its logits, and its export."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 100, (n,), generator=g) for n in (12, 9, 16)]
    summary = quantize_model(model, sequences, SPQR, progress=False)
    ids = torch.randint(0, 100, (2, 9), generator=g)
    with torch.no_grad():
        logits = model(ids).logits
    directory = save_quantized(model, tmp_path_factory.mktemp("spqr") / "export")
    return model, summary, ids, logits, directory


def test_stored_bits_equal_the_accounting(exported):
    model, summary, _, _, directory = exported
    modules = quantized_modules(model)
    assert len(modules) == 14 and all(isinstance(m, SpQRLinear) for m in modules.values())
    weights = sum(m.in_features * m.out_features for m in modules.values())
    kept = sum(m.outliers.kept() for m in modules.values())
    assert 0 < kept < 0.05 * weights and kept == sum(summary.kept.values())
    # every width here is a multiple of 32 (no code padding) and no kept weights are far apart (no fillers)
    formula = 3 + (3 + 3) / 16 + 32 / (16 * 16) + 32 * kept / weights
    assert measured_bits_per_weight(directory) == accounted_bits_per_weight(model) == pytest.approx(formula, rel=1e-12)


def test_save_reload_gives_identical_logits(exported):
    model, _, ids, logits, directory = exported
    entry = json.loads((directory / "config.json").read_text())["quantization_config"]["modules"][Q_PROJ]
    assert (entry["kind"], entry["kind_version"], entry["stat_bits"], entry["stat_group_size"]) == ("spqr", 1, 3, 16)
    assert "scale" not in load_file(str(directory / "model.safetensors"))  # decoded at load, never stored
    loaded = load_quantized(directory)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)
    reloaded = quantized_modules(loaded)[Q_PROJ]
    assert torch.equal(reloaded.scale, quantized_modules(model)[Q_PROJ].scale)
    out = loaded.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, model.generate(ids[:1], max_new_tokens=4, do_sample=False))


def _tamper_manifest(directory, **fields):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["modules"][Q_PROJ].update(fields)
    path.write_text(json.dumps(config))


def _tamper_tensor(directory, name, value):
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors[f"{Q_PROJ}.{name}"] = value(tensors[f"{Q_PROJ}.{name}"])
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("tamper,message", [
    (lambda d: _tamper_manifest(d, kind_version=2), "kind 'spqr' v2, this version of lit_tacq reads v1"),
    (lambda d: _tamper_manifest(d, stat_bits=5), f"{Q_PROJ}: stat_bits 5, expected one of"),
    (lambda d: _tamper_manifest(d, stat_group_size=8), rf"{Q_PROJ}.scale_min: shape \[4, 4\], expected \[8, 4\]"),
    (lambda d: _tamper_tensor(d, "scale_step", lambda t: t.float()), rf"{Q_PROJ}.scale_step: dtype F32, expected F16"),
    (lambda d: _tamper_tensor(d, "scale_step", lambda t: torch.full_like(t, float("nan"))),
     rf"{Q_PROJ}.scale_step: non-finite or negative second-level statistics"),
], ids=["version", "stat_bits", "stat_group_size", "dtype", "nan"])
def test_a_tampered_spqr_export_fails_with_a_clear_message(exported, tmp_path, tamper, message):
    directory = shutil.copytree(exported[-1], tmp_path / "export")
    tamper(directory)
    with pytest.raises(ValueError, match=message):
        load_quantized(directory)


@pytest.mark.parametrize("overrides,expected", [
    ({"saliency": "none"}, "spqr: a group_size"),  # no column groups
    ({"group_size": 16}, "saliency 'none'"),  # a TaCQ mask as well as SpQR's own outliers
    ({"group_size": 16, "saliency": "none", "stat_bits": 5}, "stat_bits=5, expected one of"),
    ({"group_size": 16, "saliency": "none", "outlier_threshold": -0.2}, "outlier_threshold=-0.2, expected"),
])
def test_spqr_settings_are_checked(overrides, expected):
    with pytest.raises(ValueError, match=expected):
        QuantSettings(quantizer="spqr", **overrides)


def test_a_resumed_spqr_quantization_restores_its_finished_blocks(exported, tmp_path, monkeypatch):
    """The work directory holds SpQR layers: a run stopped after block 0 resumes to the same buffers."""
    from lit_tacq.workdir import WorkDir

    _, _, ids, _, _ = exported
    torch.manual_seed(0)
    fresh = LlamaForCausalLM(CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 100, (n,), generator=g) for n in (12, 9, 16)]
    state = {name: t.clone() for name, t in fresh.state_dict().items()}

    def model_from_state() -> LlamaForCausalLM:
        model = LlamaForCausalLM(CONFIG).eval()
        model.load_state_dict(state)
        return model

    # the uninterrupted reference is made here, not taken from the module fixture: that one may have run on
    # another number of intra-op threads (tests/tacq/conftest.py), and float sums then differ in the last bit
    uninterrupted = model_from_state()
    quantize_model(uninterrupted, sequences, SPQR, progress=False)
    original = WorkDir.finish_final_block

    def stop_after_block_0(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(WorkDir, "finish_final_block", stop_after_block_0)
        with pytest.raises(KeyboardInterrupt):
            quantize_model(fresh, sequences, SPQR, progress=False, work_dir=tmp_path / "work")
    resumed = model_from_state()
    quantize_model(resumed, sequences, SPQR, progress=False, work_dir=tmp_path / "work")
    restored = quantized_modules(resumed)[Q_PROJ]
    assert isinstance(restored, SpQRLinear)
    for name, module in quantized_modules(uninterrupted).items():
        for buffer, tensor in module.state_dict().items():
            assert torch.equal(tensor, quantized_modules(resumed)[name].state_dict()[buffer]), f"{name}.{buffer}"
    with torch.no_grad():
        assert torch.equal(resumed(ids).logits, uninterrupted(ids).logits)
