"""y = x @ W^T on the CPU straight from the packed codes, never holding W as one dense float matrix.

The loops are C (``cpu_kernel.c``), compiled once per machine with the system's C compiler (``-O3
-march=native -fopenmp``, about a second) into ``~/.cache/lit-editq/kernels/`` and called through ctypes on the
tensors' memory. Why not torch.compile: Inductor made the same loops fast only for static shapes, i.e. one
compilation (5-15 s) per layer shape and token count, and with symbolic shapes they ran several times slower
(bench/packed_speed.py measured both); a C loop takes any shape at run time. Where no compiler is found the
layer falls back to the reference decode (QuantLinear.reference_forward), with a warning.

* a few rows of x (``rows <= FUSED_MAX_TOKENS``): ``fused_grid_matmul`` decodes each code once, in registers,
  and multiplies it into every row: ``y[m, n] = sum_g s[g, n] * (sum_{j in g} x[m, j] c[j, n] - z[g, n] sum_{j in
  g} x[m, j])``. It reads b bits per weight instead of 32, which is what a matrix-vector product is bound by.
* more rows: ``decode_grid_block`` decodes BLOCK_COLUMNS input features at a time into a float32 tile (a few
  MB, never the whole matrix) and ``addmm`` multiplies it, so decoding is paid once per call, not per row.

The kept 16-bit weights are read straight from their gap encoding and added to y (``add_kept_weights``, few
rows) or into each tile (``add_kept_to_tile``); at their positions the codes decode to exactly 0.
"""

import ctypes
import functools
import hashlib
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from lit_common.wheels import cache_root
from lit_tacq.packing import SparseOutliers

SOURCE = Path(__file__).with_suffix(".c")
FUSED_MAX_TOKENS = 8  # MAX_ROWS in cpu_kernel.c
BLOCK_COLUMNS = 256  # input features decoded per tile: 4 MB of float32 at 4096 output features
MIN_WEIGHTS = 1 << 16  # smaller layers decode in less time than a kernel call takes to set up
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]

_INT64, _INT, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "fused_grid_matmul": [_PTR, _INT, _INT64, _PTR, _INT64, _PTR, _PTR, _INT64, _INT, _PTR, _INT],
    "decode_grid_block": [_PTR, _INT64, _PTR, _PTR, _INT64, _INT, _INT64, _INT64, _PTR, _INT],
    "add_kept_weights": [_PTR, _INT, _INT64, _PTR, _PTR, _INT64, _INT64, _PTR],
    "add_kept_to_tile": [_PTR, _PTR, _INT64, _INT64, _INT64, _INT64, _INT64, _PTR],
}


def _build(target: Path) -> None:
    """Compile the C source into ``target`` (written next to it, then renamed: concurrent builds are safe)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc or gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True)
        built.replace(target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels (built on first use), or None with a warning where they cannot be built."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + platform.node().encode()).hexdigest()[:16]
    target = cache_root() / "kernels" / f"cpu_kernel-{platform.machine()}-{key}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        warnings.warn(f"lit_tacq: the CPU packed-matmul kernel could not be built ({detail}); packed layers decode "
                      "their full weight on every call instead (slower, same results)", stacklevel=2)
        return None
    for name, argtypes in _SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, None
    return lib


def _grids_t(scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group scale and zero ``[N, G]`` as float32 ``[G, N]``: contiguous along the output features."""
    return scale.float().T.contiguous(), zero.float().T.contiguous()


def packed_matmul(x: Tensor, qweight: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int | None,
                  outliers: SparseOutliers) -> Tensor | None:
    """``x [M, K] @ W^T`` in float32 from a QuantLinear's packed buffers (CPU tensors), or None where the kernel
    library is unavailable (the caller then decodes)."""
    lib = library()
    if lib is None:
        return None
    x, qweight = x.float().contiguous(), qweight.contiguous()
    rows, cols = x.shape
    n_out = qweight.shape[1]
    group_size = group_size or cols
    scale_t, zero_t = _grids_t(scale, zero)
    kept_values = outliers.values.float()
    threads = torch.get_num_threads()
    if rows <= FUSED_MAX_TOKENS:
        y = torch.empty(rows, n_out, dtype=torch.float32)
        lib.fused_grid_matmul(x.data_ptr(), rows, cols, qweight.data_ptr(), n_out, scale_t.data_ptr(),
                              zero_t.data_ptr(), group_size, bits, y.data_ptr(), threads)
        lib.add_kept_weights(x.data_ptr(), rows, cols, outliers.gaps.data_ptr(), kept_values.data_ptr(),
                             outliers.nnz, n_out, y.data_ptr())
        return y
    y = torch.zeros(rows, n_out, dtype=torch.float32)
    tile = torch.empty(BLOCK_COLUMNS, n_out, dtype=torch.float32)
    for start in range(0, cols, BLOCK_COLUMNS):
        stop = min(start + BLOCK_COLUMNS, cols)
        lib.decode_grid_block(qweight.data_ptr(), n_out, scale_t.data_ptr(), zero_t.data_ptr(), group_size, bits,
                              start, stop, tile.data_ptr(), threads)
        lib.add_kept_to_tile(outliers.gaps.data_ptr(), kept_values.data_ptr(), outliers.nnz, cols, n_out, start,
                             stop, tile.data_ptr())
        y.addmm_(x[:, start:stop], tile[: stop - start])
    return y
