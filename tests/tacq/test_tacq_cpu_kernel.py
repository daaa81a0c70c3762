"""The C packed matmul of the CPU against the reference decode (QuantLinear.reference_forward)."""

import dataclasses

import pytest
import torch

import lit_tacq.qlinear as qlinear
from lit_tacq.cpu_kernel import BLOCK_COLUMNS, FUSED_MAX_TOKENS, MIN_WEIGHTS, library, packed_matmul
from lit_tacq.qlinear import QuantLinear
from lit_tacq.quantizer import rtn_quantize


def _module(out_features: int, in_features: int, bits: int, group_size: int | None, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g)
    keep = torch.rand(out_features, in_features, generator=g) < 0.03
    result = rtn_quantize(W, bits, group_size=group_size, mse=False)
    result = dataclasses.replace(result, keep_mask=keep, dequantized=torch.where(keep, 3 * W, result.dequantized))
    return QuantLinear.from_result(result, bias=torch.randn(out_features, generator=g))


def test_the_kernel_library_builds_here():
    assert library() is not None  # else every test below would pass through the fallback, testing nothing


def _relative_error(module: QuantLinear, x: torch.Tensor) -> float:
    y = packed_matmul(x, module.qweight, module.scale, module.zero, module.bits, module.group_size, module.outliers)
    expected = module.reference_forward(x).float() - module.bias.float()
    return ((y - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("rows", [1, FUSED_MAX_TOKENS + 2], ids=["fused", "blocked"])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packed_matmul_equals_the_reference_decode(bits, group_size, rows):
    module = _module(24, 100, bits, group_size)  # neither a multiple of 32 codes nor of the groups
    x = torch.randn(rows, 100, generator=torch.Generator().manual_seed(1))
    assert _relative_error(module, x) < 1e-5


@pytest.mark.parametrize("in_features,group_size,rows", [
    (40, 64, 1),  # one group wider than the layer
    (3 * BLOCK_COLUMNS + 5, 48, FUSED_MAX_TOKENS + 1),  # tiles across groups and periods, a ragged last one
    (3 * BLOCK_COLUMNS + 5, None, 9),
    (300, 100, 2),
])
def test_odd_shapes_and_groups(in_features, group_size, rows):
    module = _module(37, in_features, 3, group_size)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(2))
    assert _relative_error(module, x) < 1e-5


def test_quantlinear_uses_the_kernel_for_inference_and_the_reference_for_training(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return packed_matmul(*args)

    monkeypatch.setattr(qlinear, "packed_matmul", spy)
    module = _module(256, MIN_WEIGHTS // 256, 3, 128)
    x = torch.randn(2, 5, module.in_features)
    with torch.no_grad():
        y = module(x)
    assert calls == [(10, module.in_features)]  # tokens flattened
    torch.testing.assert_close(y, module.reference_forward(x), rtol=1e-5, atol=1e-4)

    bf16 = x.bfloat16()
    with torch.no_grad():
        y16 = module(bf16)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), module.reference_forward(bf16).float(), rtol=2e-2, atol=2e-1)

    trained = x.clone().requires_grad_()
    module(trained).sum().backward()  # a LoRA step needs d/dx: the decoded weight through F.linear
    assert len(calls) == 2 and trained.grad is not None

    small = _module(8, 16, 3, None)
    with torch.no_grad():
        small(torch.randn(1, 16))
    assert len(calls) == 2  # below MIN_WEIGHTS: decoded directly, no compiled call
