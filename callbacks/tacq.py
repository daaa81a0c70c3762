"""TaCQCallback: accumulate A = sum_n |dL_n/dW| during the calibration epoch, quantize at its end.

During the epoch (one example per step, see ``lit_tacq.module``) every backward adds each decoder
Linear's |grad| to a float32 accumulator. When the epoch is complete, the accumulators are summed across
DDP ranks (once), and rank 0 runs the TaCQ pipeline (``lit_tacq.pipeline``: reference GPTQ -> saliency
-> global top-p mask -> masked GPTQ), writes the packed model to ``export_dir`` with a ``report.json``,
reloads it from disk and prints its accuracy and bits per weight.

The GPTQ Hessians are not accumulated during the epoch: spec §2 wants each layer's H from inputs that
went through the already-quantized earlier layers, which only exist during the pipeline's sequential
passes (an H of the unquantized model's activations would be the wrong matrix for every layer after the
first group), so the pipeline measures them there, on the same calibration examples.

Resumable: the callback's state (progress, settings, timing) lives in the Lightning checkpoint, the
model-sized accumulators in safetensors side files next to it (``<checkpoint dir>/tacq_state/``, one per
rank and save), which the state points to. Together with the data module's resumable loader, an
interrupted calibration resumes where it stopped and ends with the same mask. The model weights are never
written to a checkpoint (the module drops them), quantized or not.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from lit_tacq.evaluation import evaluate
from lit_tacq.io import accounted_bits_per_weight, load_quantized, measured_bits_per_weight, save_quantized
from lit_tacq.layers import decoder_linears
from lit_tacq.pipeline import QuantSettings, quantize_model

STATE_VERSION = 1


def _peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when a GPU is used), in MiB."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class TaCQCallback(Callback):
    """Task-circuit quantization of the module's model at the end of a calibration fit.

    Args:
        export_dir: where the packed model, its tokenizer and ``report.json`` are written.
        quant: bits, group size, kept fraction p, saliency scorer, reference and final quantizer.
        accumulator_device: where A lives ("cpu" saves accelerator memory; default: with the weights).
        state_dir: directory of the accumulator side files (default: ``<checkpoint dir>/tacq_state``).
        keep_state_files: side files kept per rank (older checkpoints then cannot be resumed).
        evaluate: score the reloaded quantized model on the data module's evaluation data.
        evaluate_fp: also score the unquantized model first (the reference for "% of fp").
        eval_batch_size: batch size of those evaluations.
        progress: show progress bars during quantization.
    """

    def __init__(
        self,
        export_dir: str = "tacq_export",
        quant: QuantSettings = QuantSettings(),
        accumulator_device: str | None = None,
        state_dir: str | None = None,
        keep_state_files: int = 2,
        evaluate: bool = True,
        evaluate_fp: bool = True,
        eval_batch_size: int = 64,
        progress: bool = True,
    ) -> None:
        if keep_state_files < 1:
            raise ValueError("keep_state_files must be at least 1")
        self.export_dir = Path(export_dir)
        self.quant = quant
        self.accumulator_device = accumulator_device
        self.state_dir = state_dir
        self.keep_state_files = keep_state_files
        self.evaluate = evaluate
        self.evaluate_fp = evaluate_fp
        self.eval_batch_size = eval_batch_size
        self.progress = progress

        self.grad_abs_sum: dict[str, Tensor] | None = None
        self.examples_done = 0  # on this rank
        self.calibration_seconds = 0.0
        self.finished = False
        self.report: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None
        self._resume: dict[str, Any] | None = None
        self._epoch_started: float | None = None
        self._written: list[Path] = []
        self._layers: dict[str, torch.nn.Linear] = {}

    # ---- setup and accumulation -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "16-mixed" in str(trainer.precision):
            raise ValueError("TaCQ reads raw per-example gradients: use precision 32-true or bf16-true, "
                             "not 16-mixed (its loss scaling would scale A)")
        self._trainer = trainer

    def _linears(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Linear]:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise TypeError("TaCQCallback needs the LightningModule's Hugging Face model at `pl_module.model`")
        return decoder_linears(model)

    def _ensure_accumulators(self, pl_module: L.LightningModule) -> None:
        if self.grad_abs_sum is not None or self.finished:
            return
        linears = self._linears(pl_module)
        if self._resume is not None and self._resume.get("step") is not None:
            self.grad_abs_sum = self._load_side_file(linears)
            return
        self.grad_abs_sum = {
            name: torch.zeros(linear.weight.shape, dtype=torch.float32,
                              device=self.accumulator_device or linear.weight.device)
            for name, linear in linears.items()
        }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_accumulators(pl_module)
        self._layers = self._linears(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch > 0:
            raise RuntimeError("calibration is exactly one epoch (a second one would count every example twice); "
                               "set trainer.max_epochs=1")
        self._epoch_started = time.perf_counter()

    @torch.no_grad()
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.grad_abs_sum is not None
        for name, linear in self._layers.items():
            if linear.weight.grad is not None:
                accumulator = self.grad_abs_sum[name]
                accumulator.add_(linear.weight.grad.abs().to(accumulator.device, torch.float32))
        self.examples_done += 1

    # ---- end of the epoch: reduce, quantize, export ---------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.finished:
            return
        self._ensure_accumulators(pl_module)
        if self._epoch_started is not None:
            self.calibration_seconds += time.perf_counter() - self._epoch_started
            self._epoch_started = None
        examples = getattr(trainer.datamodule, "examples", None)
        if examples is None:
            raise TypeError("TaCQCallback needs a data module with the calibration `examples` (CalibrationDataModule)")
        count = torch.tensor(float(self.examples_done), device=pl_module.device)
        done = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if done < len(examples):
            rank_zero_info(f"TaCQ: calibration incomplete ({done}/{len(examples)} examples); "
                           "resume from a checkpoint to finish it. Nothing was quantized.")
            return
        if done > len(examples):
            raise RuntimeError(f"{done} gradients were accumulated for {len(examples)} examples: some examples "
                               "were counted twice (under DDP keep use_distributed_sampler=True)")
        assert self.grad_abs_sum is not None
        grads = {name: trainer.strategy.reduce(a, reduce_op="sum") for name, a in self.grad_abs_sum.items()}
        self.grad_abs_sum = None
        if trainer.is_global_zero:
            self.report = self._quantize_and_export(trainer, pl_module, grads)
        del grads
        self.finished = True
        trainer.strategy.barrier("tacq_export")

    def _quantize_and_export(
        self, trainer: L.Trainer, pl_module: L.LightningModule, grads: dict[str, Tensor]
    ) -> dict[str, Any]:
        datamodule = trainer.datamodule
        model = pl_module.model
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        eval_data = datamodule.evaluation_data() if self.evaluate else None
        report: dict[str, Any] = {
            "quant": asdict(self.quant),
            "calibration": {
                "examples": len(datamodule.examples),
                "tokens": sum(len(e) for e in datamodule.examples),
                "mode": datamodule.hparams.get("mode"),
                "source": datamodule.hparams.get("source"),
                "seconds": self.calibration_seconds,
            },
        }
        if eval_data is not None and self.evaluate_fp:
            report["fp"] = evaluate(model, datamodule.tokenizer, eval_data, self.eval_batch_size)

        start = time.perf_counter()
        summary = quantize_model(model, [e.input_ids for e in datamodule.examples], self.quant, grads,
                                 progress=self.progress)
        report["quantization_seconds"] = time.perf_counter() - start
        report["stage_seconds"] = summary.seconds
        report["kept_fraction"] = summary.kept_fraction
        report["bits_accounted"] = accounted_bits_per_weight(model)
        report.update(_peak_memory_mb())

        out = save_quantized(model, self.export_dir, datamodule.tokenizer,
                             extra={"quant": report["quant"], "calibration": report["calibration"]})
        report["bits_measured"] = measured_bits_per_weight(out)
        report["export_dir"] = str(out)
        if eval_data is not None:
            reloaded = load_quantized(out, device=next(model.parameters()).device)
            report["quantized"] = evaluate(reloaded, datamodule.tokenizer, eval_data, self.eval_batch_size)
            del reloaded
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        rank_zero_info(self._summary_line(report))
        return report

    @staticmethod
    def _summary_line(report: dict[str, Any]) -> str:
        parts = [f"TaCQ export: {report['export_dir']}",
                 f"{report['bits_measured']:.3f} bits/weight measured ({report['bits_accounted']:.3f} by spec §2)",
                 f"{report['quantization_seconds']:.1f} s"]
        for key in ("accuracy", "answer_nll", "text_nll"):
            if key in report.get("quantized", {}):
                fp = report.get("fp", {}).get(key)
                parts.append(f"{key} {report['quantized'][key]:.4f}" + (f" (fp {fp:.4f})" if fp is not None else ""))
        return " | ".join(parts)

    # ---- resumable state --------------------------------------------------------------------------------
    def _side_dir(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir)
        trainer = self._trainer
        checkpoint = trainer.checkpoint_callback if trainer is not None else None
        if checkpoint is not None and getattr(checkpoint, "dirpath", None):
            return Path(checkpoint.dirpath) / "tacq_state"
        return Path(trainer.default_root_dir if trainer is not None else ".") / "tacq_state"

    @staticmethod
    def _side_file(directory: Path, step: int, rank: int) -> Path:
        return directory / f"accumulators-step{step:09d}-rank{rank}.safetensors"

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "quant": asdict(self.quant),
            "finished": self.finished,
            "calibration_seconds": self.calibration_seconds
            + (time.perf_counter() - self._epoch_started if self._epoch_started is not None else 0.0),
            "world_size": trainer.world_size if trainer is not None else 1,
            "step": None,
        }
        if self.grad_abs_sum is None or trainer is None:
            return state
        # every rank writes its own accumulators; only rank 0's state reaches the checkpoint, and it
        # names the files of all ranks by (directory, step, rank)
        directory = self._side_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = self._side_file(directory, trainer.global_step, trainer.global_rank)
        tmp = path.with_suffix(".tmp")
        tensors = {name: a.contiguous() for name, a in self.grad_abs_sum.items()}
        save_file(tensors, str(tmp), metadata={"examples_done": str(self.examples_done)})
        tmp.replace(path)
        if path not in self._written:
            self._written.append(path)
        while len(self._written) > self.keep_state_files:
            self._written.pop(0).unlink(missing_ok=True)
        state.update(step=trainer.global_step, state_dir=str(directory))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"TaCQ callback state version {state.get('version')}, expected {STATE_VERSION}")
        self._resume = state
        self.finished = state["finished"]
        self.calibration_seconds = state["calibration_seconds"]

    def _load_side_file(self, linears: dict[str, torch.nn.Linear]) -> dict[str, Tensor]:
        state, trainer = self._resume, self._trainer
        assert state is not None and trainer is not None
        if state["world_size"] != trainer.world_size:
            raise RuntimeError(f"the calibration was checkpointed with {state['world_size']} processes; "
                               f"resume it with the same number (now {trainer.world_size})")
        path = self._side_file(Path(state["state_dir"]), state["step"], trainer.global_rank)
        if not path.exists():
            raise FileNotFoundError(f"TaCQ accumulator file {path} is missing (only the newest "
                                    f"keep_state_files={self.keep_state_files} are kept); restart the calibration")
        with safe_open(str(path), framework="pt") as handle:
            self.examples_done = int(handle.metadata()["examples_done"])
        device = self.accumulator_device
        tensors = load_file(str(path), device=str(device) if device else "cpu")
        if set(tensors) != set(linears):
            raise ValueError(f"{path} holds accumulators for other layers than this model's decoder Linears")
        for name, linear in linears.items():
            if tensors[name].shape != linear.weight.shape:
                raise ValueError(f"{path}: A[{name}] has shape {tuple(tensors[name].shape)}, "
                                 f"the weight {tuple(linear.weight.shape)}")
            if device is None:
                tensors[name] = tensors[name].to(linear.weight.device)
        self._written.append(path)
        return tensors
