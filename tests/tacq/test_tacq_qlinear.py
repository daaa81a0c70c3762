import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lit_tacq.gptq import gptq_quantize
from lit_tacq.packing import unpack_codes
from lit_tacq.qlinear import QuantLinear
from lit_tacq.quantizer import expand_groups, rtn_quantize


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _quantized(out_features, in_features, bits, group_size=None, keep_fraction=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g)
    keep = torch.rand(out_features, in_features, generator=g) < keep_fraction
    result = rtn_quantize(W, bits, group_size=group_size, mse=False)  # the grid search is not under test here
    # keep some weights as if saliency had picked them; the grid codes there are arbitrary
    return dataclasses.replace(result, keep_mask=keep, dequantized=torch.where(keep, W, result.dequantized))


@pytest.mark.parametrize("bits,group_size", [(2, None), (3, None), (3, 16), (4, 32), (8, None)])
def test_dequantize_reproduces_the_result(bits, group_size):
    result = _quantized(24, 72, bits, group_size)
    module = QuantLinear.from_result(result, bias=None)
    keep = result.keep_mask
    W = module.dequantize()
    assert torch.equal(W[~keep], result.dequantized[~keep])
    assert torch.equal(W[keep], result.dequantized[keep].half().float())
    # format invariant: kept positions hold the zero-point code
    codes = unpack_codes(module.qweight.T, bits, 72)
    zero = expand_groups(module.zero.float(), group_size, 72)
    assert torch.equal(codes[keep].float(), zero[keep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_linear_with_the_dequantized_weight(dtype):
    result = _quantized(16, 40, 3)
    bias = torch.randn(16)
    module = QuantLinear.from_result(result, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 40).to(dtype)
    weight = torch.where(result.keep_mask, result.dequantized.to(torch.bfloat16).float(), result.dequantized)
    expected = F.linear(x, weight.to(dtype), bias.to(torch.bfloat16).to(dtype))
    y = module(x)
    assert y.dtype == dtype
    assert torch.equal(y, expected)


def test_gptq_result_with_kept_weights_round_trips():
    W = torch.randn(8, 64)
    X = torch.randn(128, 64)
    keep = torch.zeros_like(W, dtype=torch.bool)
    keep[2, 10] = keep[5, 63] = True
    result = gptq_quantize(W, 2 * X.T @ X / 128, bits=4, keep_mask=keep)
    module = QuantLinear.from_result(result, bias=None)
    assert torch.equal(module.dequantize(), torch.where(keep, result.dequantized.half().float(), result.dequantized))


def test_stored_bytes_is_exactly_the_buffers():
    out_features, in_features, bits = 24, 72, 3
    module = QuantLinear.from_result(_quantized(out_features, in_features, bits, group_size=32), bias=torch.zeros(24))
    nnz = module.outlier_values.numel()
    words = 3 * bits  # 72 codes -> 3 periods of 32 -> 3 * bits words
    expected = out_features * words * 4 + 2 * out_features * 3 * 2 + nnz * (2 + 2)
    assert module.stored_bytes() == expected
    assert module.stored_bytes(include_bias=True) == expected + 24 * 2


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bits_per_weight_matches_the_paper_accounting(bits):
    out_features, in_features, p = 256, 2048, 0.0035
    module = QuantLinear.from_result(_quantized(out_features, in_features, bits, keep_fraction=p), bias=None)
    measured = 8 * module.stored_bytes() / (out_features * in_features)
    p_actual = module.outlier_values.numel() / (out_features * in_features)
    accounting = bits + p_actual * 32 + 32 / in_features  # b + p (16 value + 16 index bits) + fp16 scale, zero
    assert measured == pytest.approx(accounting, rel=1e-12)  # 2048 codes need no padding: nothing else is stored


def test_empty_shell_loads_the_state_dict():
    module = QuantLinear.from_result(_quantized(16, 40, 4, group_size=16), bias=torch.randn(16))
    shell = QuantLinear(40, 16, 4, 16, nnz=module.outlier_values.numel(), bias=True)
    shell.load_state_dict(module.state_dict(), strict=True)
    x = torch.randn(3, 40)
    assert torch.equal(shell(x), module(x))


def test_dtype_casts_do_not_touch_the_format():
    module = QuantLinear.from_result(_quantized(16, 40, 3), bias=None)
    before = {name: buf.clone() for name, buf in module.named_buffers()}
    torch.nn.Sequential(module).to(torch.bfloat16)
    module.double()
    for name, buf in module.named_buffers():
        assert buf.dtype == before[name].dtype
        assert torch.equal(buf, before[name])
