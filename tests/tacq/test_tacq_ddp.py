import shutil
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from callbacks.tacq import TaCQCallback
from lit_common.sources import load_causal_lm
from lit_tacq.calibration import CalibrationDataModule
from lit_tacq.io import load_quantized
from lit_tacq.module import CalibrationModule
from lit_tacq.pipeline import QuantSettings


class CopySideFiles(L.Callback):
    """Keeps a copy of the accumulator side files before TaCQCallback (listed after it) removes them."""

    def __init__(self, source: Path, target: Path) -> None:
        self.source, self.target = source, target

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            shutil.copytree(self.source, self.target)
        trainer.strategy.barrier()


def test_ddp_ranks_split_the_examples_and_the_sum_is_exact(tiny, tmp_path):
    """Two CPU processes: each rank's accumulator holds its own examples (no DDP gradient averaging, no
    example twice), the ranks' sum is the single-process A, and rank 0 exports the model; then every
    rank's side file is gone."""
    data = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=300)
    callback = TaCQCallback(export_dir=str(tmp_path / "export"), quant=QuantSettings(bits=2, fraction=0.02),
                            progress=False, evaluate=False)
    copy = CopySideFiles(tmp_path / "ckpt" / "tacq_state", tmp_path / "copied")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[copy, callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")])
    trainer.fit(CalibrationModule(tiny.model_dir), data)
    assert not (tmp_path / "ckpt" / "tacq_state").exists() and not (tmp_path / "export.partial").exists()

    data.setup()
    n = len(data.examples)
    steps = (n + 1) // 2
    ranks = [load_file(str(tmp_path / "copied" / f"accumulators-step{steps:09d}-rank{r}.safetensors")) for r in (0, 1)]
    model = load_causal_lm(tiny.model_dir)
    expected = {}
    for example in data.examples:
        model.zero_grad()
        model(input_ids=example.input_ids[None], labels=example.labels[None]).loss.backward()
        for name, module in model.named_modules():
            if name in ranks[0]:
                expected[name] = expected.get(name, 0) + module.weight.grad.abs()
    name = "model.layers.1.mlp.up_proj"
    assert not torch.allclose(ranks[0][name], expected[name], rtol=0.05)  # each rank saw only part
    for name in expected:
        torch.testing.assert_close(ranks[0][name] + ranks[1][name], expected[name], rtol=1e-5, atol=1e-9)
    assert load_quantized(tmp_path / "export") is not None
