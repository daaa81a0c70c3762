import json

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from callbacks.tacq import TaCQCallback
from lit_tacq.calibration import CalibrationDataModule
from lit_tacq.io import WEIGHTS_FILE
from lit_tacq.layers import decoder_linears
from data.sources import load_causal_lm
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
    _trainer(tmp_path, "run", [callback], max_steps=steps).fit(module, data)  # stops early: nothing quantized
    assert callback.examples_done == steps and not callback.finished

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
    _trainer(tmp_path, "resumed", [callback, checkpoints], max_steps=7).fit(module, data)
    assert not (tmp_path / "resumed" / "export").exists()
    ckpt = tmp_path / "ckpt" / "epoch=0-step=7.ckpt"
    assert (tmp_path / "ckpt" / "tacq_state" / "accumulators-step000000007-rank0.safetensors").exists()

    # a fresh process would build everything anew: so do we
    module, data, callback = _parts(tiny, tmp_path, "resumed")
    steps = []
    counter = L.Callback()
    counter.on_train_batch_start = lambda trainer, pl_module, batch, batch_idx: steps.append(batch_idx)
    _trainer(tmp_path, "resumed", [callback, counter]).fit(module, data, ckpt_path=ckpt)
    assert steps == list(range(7, n_examples))  # only the examples not yet done
    assert callback.examples_done == n_examples and callback.finished

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
