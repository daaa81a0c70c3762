"""Speed and memory of the packed TaCQ format, side by side in one run (prints tables, writes JSON).

layer: ``y = x @ W^T`` for one Linear of 4096 x 4096 and of Llama-3-8B's MLP (14336 outputs x 4096 inputs),
at 2 / 3 / 4 bits in groups of 128 with 0.35 % kept weights, for 1 and 64 tokens: the fp32 matmul on the dense
weight, the reference decode (``QuantLinear.reference_forward``: the whole weight decoded, then matmul) and
the packed kernel (``QuantLinear``'s own forward: C on the CPU, Triton on CUDA). Ratios are to the fp32 matmul
timed in the same loop, interleaved, so a busy machine slows both alike.

model (``--packed DIR --model M``): greedy tokens/s and peak memory of the fp32 model, the packed export
(``AutoModelForCausalLM.from_pretrained``) and bitsandbytes NF4 (``load_in_4bit``), each in a process of its own
so that its peak RSS is its own.

gpu: with CUDA, the Triton kernel against the fp16 matmul and dequantize-then-matmul, and its error against the
PyTorch path; without, the JSON says the figures are missing.

    python -m bench.packed_speed --packed runs/smollm2_tacq/export --model models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lit_tacq.qlinear import QuantLinear
from lit_tacq.quantizer import rtn_quantize

SHAPES = {"4096x4096": (4096, 4096), "llama3-8b mlp 14336x4096": (14336, 4096)}
BITS = (2, 3, 4)
TOKENS = (1, 64)
GROUP_SIZE, KEPT = 128, 0.0035
PROMPT = "The Eiffel Tower is located in the city of"


def packed_layer(out_features: int, in_features: int, bits: int, seed: int = 0) -> QuantLinear:
    """A QuantLinear of random weights: RTN grid in groups of 128, 0.35 % of the weights kept in 16 bits."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    keep = torch.rand(out_features, in_features, generator=g) < KEPT
    result = rtn_quantize(W, bits, GROUP_SIZE, mse=False)
    result = dataclasses.replace(result, keep_mask=keep, dequantized=torch.where(keep, W, result.dequantized))
    return QuantLinear.from_result(result, bias=None)


def interleaved_ms(candidates: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None]) -> dict:
    """Median milliseconds of each candidate, the candidates run in turn within every repeat."""
    for run in candidates.values():
        run()  # warm-up (and the kernel library's first build)
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(1e3 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def layer_rows(repeats: int) -> list[dict]:
    rows = []
    for shape, (out_features, in_features) in SHAPES.items():
        for bits in BITS:
            module = packed_layer(out_features, in_features, bits)
            dense = module.dequantize()
            for tokens in TOKENS:
                x = torch.randn(tokens, in_features)
                ms = interleaved_ms({
                    "fp32": lambda: torch.nn.functional.linear(x, dense),
                    "reference": lambda: module.reference_forward(x),
                    "packed": lambda: module(x),
                }, repeats, sync=lambda: None)
                error = (module(x) - x @ dense.T).abs().max() / (x @ dense.T).abs().max()
                rows.append({
                    "shape": shape, "bits": bits, "tokens": tokens, **{f"{k}_ms": v for k, v in ms.items()},
                    "packed_vs_fp32": ms["packed"] / ms["fp32"], "reference_vs_fp32": ms["reference"] / ms["fp32"],
                    "packed_mb": module.stored_bytes() / 2**20, "fp32_mb": dense.numel() * 4 / 2**20,
                    "max_relative_error": error.item(),
                })
                print(f"{shape:>26} {bits}-bit {tokens:>3} tok: fp32 {ms['fp32']:8.2f} ms  reference "
                      f"{ms['reference']:8.2f} ms  packed {ms['packed']:8.2f} ms  packed/fp32 "
                      f"{ms['packed'] / ms['fp32']:5.2f}x  ({module.stored_bytes() / 2**20:.1f} MB vs "
                      f"{dense.numel() * 4 / 2**20:.0f} MB)", flush=True)
    return rows


@torch.no_grad()
def gpu_rows(repeats: int) -> dict:
    """The Triton kernel on CUDA against the fp16 matmul and dequantize-then-matmul."""
    if not torch.cuda.is_available():
        return {"available": False, "note": "no CUDA device in this run: the Triton kernel's timing is missing"}
    from lit_tacq.kernels import quant_matmul

    rows = []
    for shape, (out_features, in_features) in SHAPES.items():
        for bits in BITS:
            module = packed_layer(out_features, in_features, bits).cuda()
            dense = module.dequantize().half()
            for tokens in TOKENS:
                x = torch.randn(tokens, in_features, device="cuda", dtype=torch.float16)
                args = (module.qweight, module.scale, module.zero, bits, GROUP_SIZE, module.outliers)
                ms = interleaved_ms({
                    "fp16": lambda: torch.nn.functional.linear(x, dense),
                    "dequantize_then_matmul": lambda: torch.nn.functional.linear(x, module.dequantize().half()),
                    "triton": lambda: quant_matmul(x, *args),
                }, repeats, sync=torch.cuda.synchronize)
                expected = module.reference_forward(x).float()
                error = ((quant_matmul(x, *args).float() - expected).abs().max() / expected.abs().max()).item()
                rows.append({"shape": shape, "bits": bits, "tokens": tokens, **{f"{k}_ms": v for k, v in ms.items()},
                             "triton_vs_fp16": ms["triton"] / ms["fp16"], "max_relative_error": error})
                print(f"GPU {shape} {bits}-bit {tokens} tok: fp16 {ms['fp16']:.3f} ms  dequant+mm "
                      f"{ms['dequantize_then_matmul']:.3f} ms  triton {ms['triton']:.3f} ms  err {error:.1e}")
    return {"available": True, "device": torch.cuda.get_device_name(), "rows": rows}


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's maxrss, not inherited across exec)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def generate_in_this_process(variant: str, path: str, new_tokens: int) -> dict:
    """Load one variant, generate greedily, report tokens/s and this process's peak RSS (JSON on stdout)."""
    from lit_common.sources import load_causal_lm, load_tokenizer
    from lit_tacq.io import load_quantized

    start = time.perf_counter()
    if variant == "packed":
        model = load_quantized(path)
    else:
        model = load_causal_lm(path, dtype="float32", load_in_4bit=variant == "nf4")
    load_s = time.perf_counter() - start
    tokenizer = load_tokenizer(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    settings = dict(do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **settings)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **settings)
        seconds = time.perf_counter() - start
    return {"variant": variant, "tokens_per_s": new_tokens / seconds, "load_s": load_s,
            "peak_rss_mb": peak_rss_mb(),
            "text": tokenizer.decode(out[0, ids.shape[1]:][:12])}


def model_rows(model: str, packed: str, new_tokens: int) -> list[dict]:
    rows = []
    for variant, path in (("fp32", model), ("packed", packed), ("nf4", model)):
        command = [sys.executable, "-m", "bench.packed_speed", "--generate", variant, path, "--new-tokens",
                   str(new_tokens)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"variant": variant, "error": done.stderr[-2000:]})
            print(f"{variant}: failed\n{done.stderr[-2000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{variant:>7}: {row['tokens_per_s']:6.1f} tokens/s  peak RSS {row['peak_rss_mb']:7.0f} MB  load "
              f"{row['load_s']:5.1f} s  -> {row['text']!r}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packed", help="a packed export directory (quantize.py's export_dir) for the model rows")
    parser.add_argument("--model", help="the same model unquantized: HF directory or .gguf (fp32 and NF4 rows)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--out", default="bench/results/packed_speed.json")
    parser.add_argument("--generate", nargs=2, metavar=("VARIANT", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(generate_in_this_process(*args.generate, args.new_tokens)))
        return
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.skip_layers:
        results["layer"] = layer_rows(args.repeats)
    results["gpu"] = gpu_rows(args.repeats)
    if args.packed and args.model:
        results["model"] = {"packed": args.packed, "model": args.model, "new_tokens": args.new_tokens,
                            "rows": model_rows(args.model, args.packed, args.new_tokens)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
