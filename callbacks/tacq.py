"""TaCQCallback: accumulate A = sum_n |dL_n/dW| during the calibration epoch, then quantize and export.

A run, hook by hook:

- ``setup``: refuse fp16 loss scaling; agree on one run id across ranks (a resume takes the checkpoint's).
- ``on_train_batch_start`` / ``on_after_backward`` (one example per step, see ``lit_tacq.module``): every
  decoder Linear's |grad| is added to a float32 accumulator. A non-finite gradient stops the run with the
  example's index (the module does the same for a non-finite loss), before it can reach the mask.
- ``on_save_checkpoint``: every rank writes its accumulators to a safetensors side file,
  ``<checkpoint dir>/tacq_state/accumulators-step<N>-rank<R>.safetensors``, and the checkpoint's state of
  this callback names it; ``state_dict`` only returns plain data. With the data module's resumable loader,
  an interrupted calibration resumes where it stopped and ends with the same A.
- ``on_fit_end``: once every example has its gradient, the accumulators are summed across ranks and rank 0
  runs the TaCQ pipeline (``lit_tacq.pipeline``: reference GPTQ -> saliency -> global top-p mask -> masked
  GPTQ), writes the packed model with a ``report.json``, reloads it from disk and prints its accuracy and
  bits per weight. For an edited model (an adapter merged by ``CalibrationModule``, its edits named in the
  calibration data) the report and the manifest's ``extra`` record which adapter and which edits it carries.
  A calibration that stopped early (``max_steps``, ``limit_train_batches``) is an error that says how far it
  got and how to resume; nothing is quantized from part of the data.

Why ``on_fit_end`` and not ``on_train_end``: in Lightning 2.6 ``Trainer._run`` -> ``fit_loop.run()``
returns at once when the loop is already done, i.e. on a rerun that resumes from the checkpoint saved at the
end of the calibration epoch, so ``on_train_start``/``on_train_end`` never run there and a run killed during
quantization would "resume" to exit 0 with no export. ``on_fit_end`` runs after every fit that raised
nothing, fresh or resumed: one path for both. It comes after ``strategy.teardown()``, which moves the module
to the CPU (the DDP process group is still up), so the module goes back to ``strategy.root_device`` first.

Quantization is resumable per decoder block: the pipeline persists its progress in ``<export_dir>.partial/``
(``lit_tacq.workdir``), the export is written to ``<export_dir>.partial/export/`` and moved to
``export_dir`` in one rename once its report.json is complete; then the work directory and this run's
accumulator side files (needed until then: a crash during quantization resumes from the calibration's
checkpoint) are deleted. A rerun of a finished run finds its id in ``export_dir/report.json``, says so and
redoes nothing. The GPTQ Hessians are not accumulated during the epoch: docs/tacq.md §2 wants each layer's
H from inputs that went through the already-quantized earlier layers, which only exist during the pipeline's
sequential passes. The model weights are never written to a checkpoint (the module drops them).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
import uuid
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

from lit_common.files import replace_atomically, write_atomically
from lit_common.layers import decoder_linears
from lit_tacq.calibration import example_index
from lit_tacq.evaluation import evaluate
from lit_tacq.io import (
    accounted_bits_per_weight,
    load_quantized,
    measured_bits_per_weight,
    save_quantized,
)
from lit_tacq.pipeline import QuantSettings, quantize_model

STATE_VERSION = 2  # 2: run id; side files named by on_save_checkpoint
REPORT_FILE = "report.json"


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when a GPU is used), in MiB, so far.

    ``ru_maxrss`` is the peak over the process's whole life: to measure one run, give it its own process
    (``bench/quant_quality.py`` does, and reads this same probe)."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


class TaCQCallback(Callback):
    """Task-circuit quantization of the module's model at the end of a calibration fit.

    Args:
        export_dir: where the packed model, its tokenizer and ``report.json`` are written; the quantization's
            work directory is ``<export_dir>.partial`` until the export is complete.
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
        if not isinstance(quant, QuantSettings):
            raise TypeError(f"quant must be a QuantSettings, got {type(quant).__name__}")
        if not isinstance(keep_state_files, int) or keep_state_files < 1:
            raise ValueError(f"keep_state_files={keep_state_files!r}, expected an integer >= 1")
        if not isinstance(eval_batch_size, int) or eval_batch_size < 1:
            raise ValueError(f"eval_batch_size={eval_batch_size!r}, expected an integer >= 1")
        if accumulator_device is not None:
            try:
                torch.device(accumulator_device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"accumulator_device={accumulator_device!r}, expected a torch device such as "
                                 f"'cpu' or 'cuda' ({err})") from err
        self.export_dir = Path(export_dir)
        self.quant = quant
        self.accumulator_device = accumulator_device
        self.state_dir = state_dir
        self.keep_state_files = keep_state_files
        self.evaluate = evaluate
        self.evaluate_fp = evaluate_fp
        self.eval_batch_size = eval_batch_size
        self.progress = progress

        self.run_id = uuid.uuid4().hex
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
        self._example = 0  # index in the calibration list of the example being processed

    @property
    def work_dir(self) -> Path:
        """The quantization's work directory (module docstring)."""
        return self.export_dir.with_name(f"{self.export_dir.name}.partial")

    # ---- setup and accumulation -----------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "16-mixed" in str(trainer.precision):
            raise ValueError("TaCQ reads raw per-example gradients: use precision 32-true or bf16-true, "
                             "not 16-mixed (its loss scaling would scale A)")
        self._trainer = trainer
        self.run_id = trainer.strategy.broadcast(self.run_id, src=0)

    def _linears(self, pl_module: L.LightningModule) -> dict[str, torch.nn.Linear]:
        model = getattr(pl_module, "model", None)
        if model is None:
            raise TypeError("TaCQCallback needs the LightningModule's Hugging Face model at `pl_module.model`")
        return decoder_linears(model)

    def _ensure_accumulators(self, pl_module: L.LightningModule) -> None:
        if self.grad_abs_sum is not None:
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

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._example = example_index(trainer, batch_idx)

    @torch.no_grad()
    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert self.grad_abs_sum is not None
        grads = {name: linear.weight.grad for name, linear in self._layers.items() if linear.weight.grad is not None}
        finite = [torch.isfinite(grad).all() for grad in grads.values()]
        if finite and not bool(torch.stack(finite).all()):  # one device sync per example
            bad = [name for name, ok in zip(grads, finite) if not ok]
            raise FloatingPointError(
                f"calibration example {self._example} gave a non-finite gradient in {', '.join(bad[:3])}"
                f"{' and more' if len(bad) > 3 else ''}: the run stops before it reaches A (and the mask). Check "
                "that example, or calibrate in float32 (model.dtype) if the model overflows in half precision.")
        for name, grad in grads.items():
            accumulator = self.grad_abs_sum[name]
            accumulator.add_(grad.abs().to(accumulator.device, torch.float32))
        self.examples_done += 1

    # ---- end of the fit: reduce, quantize, export -------------------------------------------------------
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._epoch_started is not None:
            self.calibration_seconds += time.perf_counter() - self._epoch_started
            self._epoch_started = None
        if trainer.strategy.broadcast(trainer.is_global_zero and self._already_exported(), src=0):
            rank_zero_info(f"TaCQ: {self.export_dir} already holds this run's export (run {self.run_id}); "
                           "nothing to redo")
            self._clean_up(trainer)
            return
        pl_module.to(trainer.strategy.root_device)  # teardown moved it to the CPU
        self._ensure_accumulators(pl_module)
        examples = getattr(trainer.datamodule, "examples", None)
        if examples is None:
            raise TypeError("TaCQCallback needs a data module with the calibration `examples` (CalibrationDataModule)")
        count = torch.tensor(float(self.examples_done), device=trainer.strategy.root_device)
        done = int(trainer.strategy.reduce(count, reduce_op="sum").item())
        if done < len(examples):
            raise RuntimeError(self._incomplete_message(trainer, done, len(examples)))
        if done > len(examples):
            raise RuntimeError(f"{done} gradients were accumulated for {len(examples)} examples: some examples "
                               "were counted twice (under DDP keep use_distributed_sampler=True)")
        assert self.grad_abs_sum is not None
        grads = {name: trainer.strategy.reduce(a, reduce_op="sum") for name, a in self.grad_abs_sum.items()}
        self.grad_abs_sum = None
        finite = torch.stack([torch.isfinite(a).all() for a in grads.values()])
        if not bool(finite.all()):
            bad = [name for name, ok in zip(grads, finite.tolist()) if not ok]
            raise FloatingPointError(f"the accumulated gradients A of {', '.join(bad[:3])} are not finite after "
                                     f"{done} examples (float32 overflow): nothing was quantized")
        if trainer.is_global_zero:
            rank_zero_info(f"TaCQ: calibration complete ({done} examples); quantizing with its progress in "
                           f"{self.work_dir} (a rerun continues after the last finished block)")
            self.report = self._quantize_and_export(trainer, pl_module, grads)
        del grads
        trainer.strategy.barrier("tacq_export")
        self._clean_up(trainer)

    def _incomplete_message(self, trainer: L.Trainer, done: int, total: int) -> str:
        limits = [f"trainer.{name}={value}" for name, value, default in (
            ("max_steps", trainer.max_steps, -1), ("limit_train_batches", trainer.limit_train_batches, 1.0))
            if value != default]
        checkpoint = trainer.checkpoint_callback
        saved = (getattr(checkpoint, "last_model_path", "") or getattr(checkpoint, "best_model_path", "")
                 or trainer.ckpt_path)  # saved in this process, else the one it resumed from
        where = (f"rerun the same command to resume from {saved}" if saved else
                 "no checkpoint was saved (add callbacks.run_checkpoint.RunCheckpoint), so a rerun starts over")
        stopped = f" ({' and '.join(limits)} stopped the epoch: raise or remove it for the rerun)" if limits else ""
        return (f"TaCQ calibration incomplete: {done} of {total} examples done{stopped}. Nothing was quantized; "
                f"{where}.")

    def _already_exported(self) -> bool:
        """Whether ``export_dir`` holds this run's complete export (report.json, written last, has its id)."""
        try:
            report = json.loads((self.export_dir / REPORT_FILE).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(report, dict) or report.get("run_id") != self.run_id:
            return False
        if report.get("quant") != asdict(self.quant):
            raise ValueError(f"{self.export_dir} holds this run's export made with other quantization settings "
                             f"({report.get('quant')}); its accumulated gradients were removed after that export, so "
                             "quantizing with new settings needs a new calibration: rerun with --ckpt_path null")
        return True

    def _quantize_and_export(
        self, trainer: L.Trainer, pl_module: L.LightningModule, grads: dict[str, Tensor]
    ) -> dict[str, Any]:
        datamodule = trainer.datamodule
        model = pl_module.model
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        eval_data = datamodule.evaluation_data() if self.evaluate else None
        report: dict[str, Any] = {
            "run_id": self.run_id,
            "quant": asdict(self.quant),
            "calibration": {
                "examples": len(datamodule.examples),
                "tokens": sum(len(e) for e in datamodule.examples),
                "mode": datamodule.hparams.get("mode"),
                "source": datamodule.hparams.get("source"),
                "general_source": datamodule.hparams.get("general_source"),  # mixed into task mode, with its share
                "general_share": datamodule.hparams.get("general_share", 0.0),
                "seconds": self.calibration_seconds,
            },
        }
        report.update(self._provenance(pl_module, datamodule))
        if eval_data is not None and self.evaluate_fp:
            report["fp"] = evaluate(model, datamodule.tokenizer, eval_data, self.eval_batch_size)

        summary = quantize_model(model, [e.input_ids for e in datamodule.examples], self.quant, grads,
                                 progress=self.progress, work_dir=self.work_dir)
        report["quantization_seconds"] = sum(summary.seconds.values())  # over every attempt
        report["stage_seconds"] = summary.seconds
        report["kept_fraction"] = summary.kept_fraction
        report["bits_accounted"] = accounted_bits_per_weight(model)
        report.update(peak_memory_mb())

        staged = self.work_dir / "export"
        shutil.rmtree(staged, ignore_errors=True)  # an export a kill interrupted
        extra = {key: report[key] for key in ("quant", "calibration", "adapter", "edits") if key in report}
        save_quantized(model, staged, datamodule.tokenizer, extra=extra)
        report["bits_measured"] = measured_bits_per_weight(staged)
        report["export_dir"] = str(self.export_dir)
        if eval_data is not None:
            reloaded = load_quantized(staged, device=next(model.parameters()).device)
            report["quantized"] = evaluate(reloaded, datamodule.tokenizer, eval_data, self.eval_batch_size)
            del reloaded
        (staged / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if self.export_dir.exists():
            rank_zero_info(f"TaCQ: replacing the earlier export in {self.export_dir}")
        self.export_dir.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(staged, self.export_dir)
        rank_zero_info(self._summary_line(report))
        return report

    @staticmethod
    def _provenance(pl_module: L.LightningModule, datamodule: Any) -> dict[str, Any]:
        """What the packed model carries besides the base: the adapter merged into it (``adapter``, from
        ``CalibrationModule.adapter_record``) and its edits with their share of the calibration (``edits``, from
        ``CalibrationDataModule.edit_record``), each only when there is one. Both go into report.json and the
        manifest's ``extra``, so the artefact says which adapter and which edits it carries."""
        found = {"adapter": getattr(pl_module, "adapter_record", None),
                 "edits": getattr(datamodule, "edit_record", None)}
        return {key: value for key, value in found.items() if value is not None}

    @staticmethod
    def _summary_line(report: dict[str, Any]) -> str:
        accounted = f"{report['bits_accounted']:.3f} by the formula of docs/tacq.md §2"
        parts = [f"TaCQ export: {report['export_dir']}",
                 f"{report['bits_measured']:.3f} bits/weight measured ({accounted})",
                 f"{report['quantization_seconds']:.1f} s"]
        for key in ("accuracy", "answer_nll", "preference", "perplexity"):
            if key in report.get("quantized", {}):
                fp = report.get("fp", {}).get(key)
                parts.append(f"{key} {report['quantized'][key]:.4f}" + (f" (fp {fp:.4f})" if fp is not None else ""))
        return " | ".join(parts)

    def _clean_up(self, trainer: L.Trainer) -> None:
        """The export is complete: the work directory and this run's accumulator side files go (every rank its
        own), so do the side-file directories once empty."""
        if trainer.is_global_zero:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        directories = {self._side_dir()} | ({Path(self._resume["state_dir"])}
                                            if self._resume and self._resume.get("state_dir") else set())
        for directory in directories:
            for path in directory.glob(f"*accumulators-step*-rank{trainer.global_rank}.safetensors*"):  # and .tmp
                path.unlink()
        self._written.clear()
        trainer.strategy.barrier("tacq_clean_up")
        if trainer.is_global_zero:
            for directory in directories:
                if directory.is_dir() and not any(directory.iterdir()):
                    directory.rmdir()
        self.finished = True

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
        """Plain data only; the accumulators go to side files in ``on_save_checkpoint``."""
        trainer = self._trainer
        return {
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "quant": asdict(self.quant),
            "calibration_seconds": self.calibration_seconds
            + (time.perf_counter() - self._epoch_started if self._epoch_started is not None else 0.0),
            "world_size": trainer.world_size if trainer is not None else 1,
        }

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Every rank writes its own accumulators (atomically); only rank 0's checkpoint is written, and it
        names the files of all ranks by (directory, step, rank)."""
        if self.grad_abs_sum is None:
            return
        directory = self._side_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = self._side_file(directory, trainer.global_step, trainer.global_rank)
        tensors = {name: a.contiguous() for name, a in self.grad_abs_sum.items()}
        metadata = {"examples_done": str(self.examples_done)}
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
        if path not in self._written:
            self._written.append(path)
        while len(self._written) > self.keep_state_files:
            self._written.pop(0).unlink(missing_ok=True)
        checkpoint["callbacks"][self.state_key].update(step=trainer.global_step, state_dir=str(directory))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"TaCQ callback state version {state.get('version')}, expected {STATE_VERSION}: this "
                             "checkpoint was written by another version; restart the calibration (--ckpt_path null)")
        self._resume = state
        self.run_id = state["run_id"]
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
