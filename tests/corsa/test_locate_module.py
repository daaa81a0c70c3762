"""ROME, MEMIT and AlphaEdit through the editing harness on a tiny world: rounds, saved edit, resume."""

import json

import lightning.pytorch as L
import pytest
import torch

from callbacks.edit_report import EditReport
from callbacks.run_checkpoint import RunCheckpoint
from data.base import round_protocol
from data.counterfact import CounterFactDataModule
from lit_corsa.locate.edited import load_edited
from lit_corsa.locate.module import LocateEditModule
from lit_corsa.locate.settings import LocateSettings
from lit_corsa.settings import EvaluationSettings

ROUNDS = 2
LAYERS = {"rome": [0], "memit": [0], "alphaedit": [0]}  # the tiny model has 2 blocks; the last cannot be edited


def _run(tiny_assets, out, method, *, stop_after=None, ckpt_path=None):
    root, _ = tiny_assets
    L.seed_everything(0, verbose=False)
    dm = CounterFactDataModule(source=str(root / "world" / "counterfact.json"), tokenizer=str(root / "model"),
                               num_updates=ROUNDS, edits_per_update=3, epochs_per_update=1, batch_size=3)
    settings = LocateSettings(layers=LAYERS[method], covariance_source=str(root / "world" / "corpus.txt"),
                              covariance_tokens=4000, covariance_window=64, covariance_cache=str(out.parent / "cov"),
                              context_prefixes=1, prefix_tokens=4, v_steps=4, mom2_weight=10.0,
                              nullspace_threshold=0.5)
    module = LocateEditModule(model_name_or_path=str(root / "model"), method=method, locate=settings,
                              evaluation=EvaluationSettings(generation=False))
    protocol = round_protocol(ROUNDS, 1)
    if stop_after is not None:
        protocol["max_epochs"] = stop_after
    trainer = L.Trainer(accelerator="cpu", devices=1, **protocol, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out,
                        callbacks=[EditReport(output_dir=str(out / "run"), plot=False),
                                   RunCheckpoint(dirpath=str(out / "ckpt"))])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module, json.loads((out / "run" / "metrics.json").read_text())


@pytest.mark.parametrize("method", ["rome", "memit", "alphaedit"])
def test_a_resumed_run_equals_an_uninterrupted_one(tiny_assets, tmp_path, method):
    """Stopped after round 0 and resumed from last.ckpt: every score of every round and every edited weight
    equal the uninterrupted run's exactly; the saved edit loads back onto the base as the same model."""
    full, full_metrics = _run(tiny_assets, tmp_path / "full", method)
    _run(tiny_assets, tmp_path / "part", method, stop_after=1)
    resumed, resumed_metrics = _run(tiny_assets, tmp_path / "part", method,
                                    ckpt_path=str(tmp_path / "part" / "ckpt" / "last.ckpt"))
    assert [r["eval_round"] for r in full_metrics["rounds"]] == list(range(ROUNDS))
    assert resumed_metrics["rounds"] == full_metrics["rounds"]
    for name, weight in full.model.edited.items():
        assert torch.equal(resumed.model.edited[name], weight)
        assert not torch.equal(weight, full.model._original[name])  # the run did write it
    if method == "alphaedit":
        assert resumed.editor.preserved[0].shape[1] == full.editor.preserved[0].shape[1] == 3 * ROUNDS
        assert torch.equal(resumed.editor.preserved[0], full.editor.preserved[0])
    reloaded = dict(load_edited(tmp_path / "full" / "run" / "adapter").named_parameters())
    for name, weight in full.model.edited.items():
        assert torch.equal(reloaded[name], weight)
    assert full_metrics["method"] == method and full_metrics["objective"]["layers"] == LAYERS[method]
