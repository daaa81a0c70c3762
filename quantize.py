"""Task-circuit quantization from the command line: ``python quantize.py fit --config configs/demo_tacq.yaml``.

A LightningCLI over :class:`lit_tacq.module.CalibrationModule` and
:class:`lit_tacq.calibration.CalibrationDataModule`; the :class:`callbacks.tacq.TaCQCallback` named in
the config's ``trainer.callbacks`` (required: the CLI refuses a config without it) accumulates gradients
during the one calibration epoch and writes the packed model at its end. The tokenizer follows the model;
the calibration is exactly one epoch. ``ckpt_path`` defaults to ``last``: rerunning the same command
resumes an interrupted calibration or quantization (the latter per decoder block).

Edit, then quantize (``configs/demo_edit_then_tacq.yaml``): ``model.adapter`` names an editing run's saved
adapter, merged into the model before calibration, and ``data.edits`` (the editing run's data module) with
``data.edit_share`` calibrates on its edits; the packed model's manifest records both. Score the reloaded
export on its edits with ``python -m bench.edit_then_quantize score <export_dir>``.
"""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

from callbacks.run_checkpoint import resume_by_default
from callbacks.tacq import TaCQCallback
from lit_tacq.calibration import CalibrationDataModule
from lit_tacq.module import CalibrationModule


class QuantizeCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.model_name_or_path")
        parser.set_defaults({"trainer.max_epochs": 1})

    def before_fit(self) -> None:
        """Refuse a calibration whose result nobody keeps: the TaCQCallback is what quantizes and exports it.
        Runs after the config is parsed and before the model is loaded."""
        count = sum(isinstance(callback, TaCQCallback) for callback in self.trainer.callbacks)
        if count != 1:
            raise ValueError(
                f"quantize.py fit needs exactly one callbacks.tacq.TaCQCallback in trainer.callbacks, found {count}: "
                "without it the calibration's gradients are thrown away, with two every gradient is counted twice "
                "(see configs/demo_tacq.yaml)")


def main(args: list[str] | None = None) -> QuantizeCLI:
    # the model stays in eval mode on purpose: per-example gradients of the deterministic network
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    return QuantizeCLI(CalibrationModule, CalibrationDataModule, save_config_kwargs={"overwrite": True}, args=args,
                       parser_kwargs=resume_by_default("fit"))


if __name__ == "__main__":
    main()
