"""Knowledge editing from the command line: ``python train.py fit --config configs/demo_counterfact.yaml``.

A LightningCLI over :class:`lit_corsa.module.EditModule` (the adapter methods; the default ``model``) or
its sibling :class:`lit_corsa.locate.module.LocateEditModule` (ROME, MEMIT, AlphaEdit: chosen by
``model.class_path``, as ``configs/methods/{rome,memit,alphaedit}.yaml`` do; a config without a class path
configures EditModule) and any :class:`data.base.EditDataModule` (CounterFact, ZsRE, code updates). The
rounds of the sequential protocol are configured once, on the data (``num_updates``, ``epochs_per_update``);
the trainer settings they imply (``data.base.round_protocol``) are derived from them, and the tokenizer
follows the model. ``ckpt_path`` defaults to ``last`` (``configs/defaults/resume.yaml``): rerunning the
same command resumes the run from the checkpoint that :class:`callbacks.run_checkpoint.RunCheckpoint` keeps.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

import lit_tacq  # noqa: F401  registers TaCQ's packed format with transformers: an edit may start from an export
from callbacks.run_checkpoint import resume_by_default
from data.base import EditDataModule, round_protocol
from lit_corsa.module import EditModule


class EditCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": "lit_corsa.module.EditModule"}})
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer")
        protocol = ("data.init_args.num_updates", "data.init_args.epochs_per_update")
        for key in round_protocol(1, 1):
            parser.link_arguments(protocol, f"trainer.{key}", compute_fn=lambda rounds, epochs, key=key:
                                  round_protocol(rounds, epochs)[key])


def main(args: list[str] | None = None) -> None:
    EditCLI(EditModule, EditDataModule, subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True}, args=args,
            parser_kwargs=resume_by_default("fit", "validate", "test"))


if __name__ == "__main__":
    main()
