"""The Triton kernel under the Triton interpreter (CPU tensors) against QuantLinear's PyTorch path.

TRITON_INTERPRET=1 has to be in the environment before triton builds the kernel, so the comparison
runs in a fresh Python process (this file, run as a script) and the tests read its JSON report.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |kernel - torch| / max |torch|: the two differ in summation order and, for half
# precision, in the final rounding of each output
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1.6e-2}
OUT_FEATURES, IN_FEATURES = 24, 100  # neither a multiple of the 64 x 32 tiles
CASES = [
    (bits, group_size, batch, dtype)
    for bits in (2, 3, 4, 8)
    for group_size in (None, 32)
    for batch in (1, 5, 17)  # 17 takes the larger BLOCK_M
    for dtype in DTYPES
]


def _name(bits, group_size, batch, dtype) -> str:
    return f"b{bits}-g{group_size}-m{batch}-{dtype}"


def _relative_errors() -> dict[str, float]:
    from lit_tacq.kernels import quant_matmul
    from lit_tacq.qlinear import QuantLinear
    from lit_tacq.quantizer import rtn_quantize

    errors = {}
    g = torch.Generator().manual_seed(0)
    for bits, group_size, batch, dtype in CASES:
        W = torch.randn(OUT_FEATURES, IN_FEATURES, generator=g)
        keep = torch.rand(OUT_FEATURES, IN_FEATURES, generator=g) < 0.03
        result = rtn_quantize(W, bits, group_size=group_size, mse=False)
        result = dataclasses.replace(result, keep_mask=keep, dequantized=torch.where(keep, 3 * W, result.dequantized))
        module = QuantLinear.from_result(result, bias=None)
        x = torch.randn(batch, IN_FEATURES, generator=g).to(DTYPES[dtype])
        expected = module.reference_forward(x).float()
        y = quant_matmul(x, module.qweight, module.scale, module.zero, bits, group_size, module.outliers)
        assert y.dtype == x.dtype and y.shape == expected.shape
        error = (y.float() - expected).abs().max() / expected.abs().max()
        errors[_name(bits, group_size, batch, dtype)] = error.item()
    return errors


@pytest.fixture(scope="module")
def report() -> dict[str, float]:
    pytest.importorskip("triton")
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bits,group_size,batch,dtype", CASES, ids=[_name(*c) for c in CASES])
def test_kernel_matches_pytorch_path(report, bits, group_size, batch, dtype):
    assert report[_name(bits, group_size, batch, dtype)] <= TOLERANCE[dtype]


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    print(json.dumps(_relative_errors()))
