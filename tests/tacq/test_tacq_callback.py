import json
import logging

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from callbacks.run_checkpoint import RunCheckpoint
from callbacks.tacq import TaCQCallback
from lit_common.layers import decoder_linears
from lit_common.sources import load_causal_lm
from lit_tacq.calibration import CalibrationDataModule
WEIGHTS_FILE = "model.safetensors"  # what save_pretrained writes for a model this small
from lit_tacq.module import CalibrationModule
from lit_tacq.pipeline import QuantSettings

BUDGET = 300  # about 20 examples of the tiny world
QUANT = QuantSettings(bits=2, fraction=0.02)


def _parts(tiny, tmp_path, name="run", **callback_kwargs):
    module = CalibrationModule(tiny.model_dir)
    data = CalibrationDataModule(tiny.task_qa, model_name_or_path=tiny.model_dir, token_budget=BUDGET)
    callback = TaCQCallback(export_dir=str(tmp_path / name / "export"), quant=QUANT, progress=False, **callback_kwargs)
    return module, data, callback


def _trainer(tmp_path, name, callbacks, **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path / name), callbacks=callbacks, **kwargs)


def test_accumulator_equals_an_explicit_per_example_loop(tiny, tmp_path):
    module, data, callback = _parts(tiny, tmp_path)
    steps = 6
    data.setup()
    expected = (rf"calibration incomplete: {steps} of {len(data.examples)} examples done "
                rf"\(trainer.max_steps={steps} stopped the epoch.*resume from .*step={steps}.ckpt")
    with pytest.raises(RuntimeError, match=expected):
        _trainer(tmp_path, "run", [callback], max_steps=steps).fit(module, data)  # stops early: nothing quantized
    assert callback.examples_done == steps and not callback.finished
    assert not (tmp_path / "run" / "export").exists()

    model = load_causal_lm(tiny.model_dir)
    expected, summed = {}, {}
    for example in data.examples[:steps]:
        model.zero_grad()
        model(input_ids=example.input_ids[None], labels=example.labels[None]).loss.backward()
        for name, linear in model.named_modules():
            if name in callback.grad_abs_sum:
                expected[name] = expected.get(name, 0) + linear.weight.grad.abs()
                summed[name] = summed.get(name, 0) + linear.weight.grad
    assert set(expected) == set(callback.grad_abs_sum) and len(expected) == 2 * 7
    for name, accumulated in callback.grad_abs_sum.items():
        assert accumulated.dtype == torch.float32
        torch.testing.assert_close(accumulated, expected[name], rtol=1e-5, atol=1e-9)
    # the sum of |g_n| is not |sum g_n|: per-example gradients really were kept apart
    name = "model.layers.0.mlp.down_proj"
    assert not torch.allclose(callback.grad_abs_sum[name], summed[name].abs(), rtol=1e-3)


def _export_tensors(path):
    return load_file(str(path / WEIGHTS_FILE))


def test_interrupted_calibration_resumes_to_the_same_mask(tiny, tmp_path):
    module, data, callback = _parts(tiny, tmp_path, "full")
    _trainer(tmp_path, "full", [callback]).fit(module, data)
    reference = _export_tensors(tmp_path / "full" / "export")
    n_examples = len(data.examples)

    # interrupted after 7 examples, checkpointed mid-epoch (every 7 steps = every 7 examples)
    module, data, callback = _parts(tiny, tmp_path, "resumed")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=7, save_top_k=-1)
    ckpt = tmp_path / "ckpt" / "epoch=0-step=7.ckpt"
    with pytest.raises(RuntimeError, match=f"7 of {n_examples} examples done.*rerun the same command to resume from "
                                           f"{ckpt}"):
        _trainer(tmp_path, "resumed", [callback, checkpoints], max_steps=7).fit(module, data)
    assert not (tmp_path / "resumed" / "export").exists()
    assert (tmp_path / "ckpt" / "tacq_state" / "accumulators-step000000007-rank0.safetensors").exists()

    # a fresh process would build everything anew: so do we
    module, data, callback = _parts(tiny, tmp_path, "resumed")
    steps = []
    counter = L.Callback()
    counter.on_train_batch_start = lambda trainer, pl_module, batch, batch_idx: steps.append(batch_idx)
    _trainer(tmp_path, "resumed", [callback, counter]).fit(module, data, ckpt_path=ckpt)
    assert steps == list(range(7, n_examples))  # only the examples not yet done
    assert callback.examples_done == n_examples and callback.finished
    # the export is complete: no work directory, no accumulator side file is left
    assert not (tmp_path / "resumed" / "export.partial").exists() and not (tmp_path / "ckpt" / "tacq_state").exists()

    resumed = _export_tensors(tmp_path / "resumed" / "export")
    n_weights = sum(linear.weight.numel() for linear in decoder_linears(load_causal_lm(tiny.model_dir)).values())
    kept = [name for name in reference if name.endswith("outlier_gaps")]
    assert len(kept) == 14 and sum(reference[name].numel() for name in kept) == int(QUANT.fraction * n_weights)
    for name in reference:  # the same mask, and in fact the same stored model
        assert torch.equal(reference[name], resumed[name]), name


def test_checkpoints_hold_no_weights_and_the_export_is_separate(tiny, tmp_path):
    module, data, callback = _parts(tiny, tmp_path)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, "run", [callback, checkpoints])
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "after_fit.ckpt")  # the module now holds QuantLinear layers

    for path in (tmp_path / "ckpt" / "last.ckpt", tmp_path / "after_fit.ckpt"):
        checkpoint = torch.load(path, weights_only=True)
        assert checkpoint["state_dict"] == {}
        assert not any(isinstance(v, torch.Tensor) for v in checkpoint["callbacks"][next(
            k for k in checkpoint["callbacks"] if k.startswith("TaCQCallback"))].values())
    original = load_file(f"{tiny.model_dir}/model.safetensors")
    exported = _export_tensors(tmp_path / "run" / "export")
    assert "model.layers.0.self_attn.q_proj.qweight" in exported
    assert "model.layers.0.self_attn.q_proj.weight" not in exported
    assert torch.equal(load_file(f"{tiny.model_dir}/model.safetensors")["model.embed_tokens.weight"],
                       original["model.embed_tokens.weight"])
    report = json.loads((tmp_path / "run" / "export" / "report.json").read_text())
    assert report["bits_measured"] == pytest.approx(callback.report["bits_measured"])
    assert {"accuracy", "answer_nll"} <= set(report["quantized"]) and {"accuracy", "answer_nll"} <= set(report["fp"])


def test_state_dict_writes_nothing_and_checkpoints_write_the_side_files(tiny, tmp_path):
    module, data, callback = _parts(tiny, tmp_path, evaluate=False)
    side_dir = tmp_path / "ckpt" / "tacq_state"
    seen = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 6:
                before = sorted(side_dir.iterdir())
                states = [callback.state_dict() for _ in range(3)]  # as Lightning may call it at any time
                seen.update(before=before, after=sorted(side_dir.iterdir()), state=states[0])

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _trainer(tmp_path, "run", [callback, Probe(), checkpoints]).fit(module, data)
    assert [p.name for p in seen["before"]] == ["accumulators-step000000004-rank0.safetensors"] == \
           [p.name for p in seen["after"]]
    assert set(seen["state"]) == {"version", "run_id", "quant", "calibration_seconds", "world_size"}
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=True)["callbacks"]["TaCQCallback"]
    assert state["step"] == 4 and state["state_dir"] == str(side_dir)  # the checkpoint names its side file


def test_a_rerun_of_a_finished_run_redoes_nothing(tiny, tmp_path, caplog):
    module, data, callback = _parts(tiny, tmp_path, evaluate=False)
    _trainer(tmp_path, "run", [callback, RunCheckpoint()]).fit(module, data)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    export = tmp_path / "run" / "export"
    written = (export / WEIGHTS_FILE).stat().st_mtime_ns
    assert not (tmp_path / "run" / "checkpoints" / "tacq_state").exists()  # removed with the export complete

    module, data, callback = _parts(tiny, tmp_path, evaluate=False)
    with caplog.at_level(logging.INFO):
        _trainer(tmp_path, "run", [callback, RunCheckpoint()]).fit(module, data, ckpt_path=last)
    assert f"{export} already holds this run's export" in caplog.text
    assert (export / WEIGHTS_FILE).stat().st_mtime_ns == written and callback.finished

    module, data, _ = _parts(tiny, tmp_path)
    other = TaCQCallback(export_dir=str(export), quant=QuantSettings(bits=3, fraction=0.02), progress=False)
    with pytest.raises(ValueError, match="holds this run's export made with other quantization settings"):
        _trainer(tmp_path, "run", [other, RunCheckpoint()]).fit(module, data, ckpt_path=last)


class NaNLossAt(CalibrationModule):
    """A calibration module whose loss is NaN at one step."""

    def __init__(self, model_name_or_path: str, step: int) -> None:
        super().__init__(model_name_or_path)
        self.step = step

    def example_loss(self, input_ids, labels):
        loss = super().example_loss(input_ids, labels)
        return loss * float("nan") if self.global_step == self.step else loss


def test_a_non_finite_loss_stops_the_calibration_naming_the_example(tiny, tmp_path):
    _, data, callback = _parts(tiny, tmp_path)
    with pytest.raises(FloatingPointError, match=r"calibration example 3 has a non-finite loss \(nan\)"):
        _trainer(tmp_path, "run", [callback]).fit(NaNLossAt(tiny.model_dir, 3), data)
    assert callback.examples_done == 3 and not (tmp_path / "run" / "export").exists()


def test_a_non_finite_gradient_stops_the_calibration_naming_the_example(tiny, tmp_path):
    module, data, callback = _parts(tiny, tmp_path)

    class PoisonGradient(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 4:
                weight = pl_module.model.model.layers[1].mlp.up_proj.weight
                weight.register_hook(lambda grad: grad * float("inf"))

    with pytest.raises(FloatingPointError, match="calibration example 4 gave a non-finite gradient in "
                                                 "model.layers.1.mlp.up_proj"):
        _trainer(tmp_path, "run", [PoisonGradient(), callback]).fit(module, data)
    assert callback.examples_done == 4 and torch.isfinite(callback.grad_abs_sum["model.layers.1.mlp.up_proj"]).all()


@pytest.mark.parametrize("kwargs,message", [
    ({"keep_state_files": 0}, "keep_state_files=0, expected an integer >= 1"),
    ({"eval_batch_size": 0}, "eval_batch_size=0, expected an integer >= 1"),
    ({"accumulator_device": "gpu0"}, "accumulator_device='gpu0', expected a torch device"),
    ({"quant": {"bits": 3}}, "quant must be a QuantSettings, got dict"),
])
def test_callback_arguments_are_checked_when_made(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TaCQCallback(**kwargs)
