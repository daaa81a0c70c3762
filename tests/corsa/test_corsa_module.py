"""EditModule end to end on a tiny world: sequential rounds, outputs, resume mid-sequence."""

import json
import os
import shutil
import signal
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from callbacks.edit_report import EditReport
from callbacks.run_checkpoint import RunCheckpoint
from data.base import round_protocol
from data.counterfact import CounterFactDataModule
from lit_corsa.module import EditModule
from lit_corsa.settings import (
    EvaluationSettings,
    LoraSettings,
    ObjectiveSettings,
    OptimizerSettings,
)

EPOCHS = 4  # per round


def _run(tiny_assets, tmp_path, *, method="corsa", rounds=3, stop_after=None, ckpt_path=None, fresh=False,
         precision="32-true", dtype="float32", learning_rate=1e-2, max_steps=-1, accumulate=1, callbacks=(),
         merge=False):
    root, _ = tiny_assets
    L.seed_everything(0, verbose=False)
    dm = CounterFactDataModule(source=str(root / "world" / "counterfact.json"), tokenizer=str(root / "model"),
                               num_updates=rounds, edits_per_update=4, epochs_per_update=EPOCHS, batch_size=2)
    module = EditModule(model_name_or_path=str(root / "model"), method=method, dtype=dtype,
                        optimizer=OptimizerSettings(learning_rate=learning_rate, warmup_steps=1, accumulate=accumulate,
                                                    fresh_per_round=fresh),
                        lora=LoraSettings(r=4, alpha=8), evaluation=EvaluationSettings(max_new_tokens=4))
    protocol = round_protocol(rounds, EPOCHS)
    if stop_after is not None:
        protocol["max_epochs"] = EPOCHS * stop_after
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=precision, max_steps=max_steps, **protocol,
        logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[EditReport(output_dir=str(tmp_path / "run"), merge_adapter=merge),
                   RunCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=3), *callbacks],
    )
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    metrics = tmp_path / "run" / "metrics.json"
    return trainer, module, json.loads(metrics.read_text()) if metrics.exists() else None


@pytest.fixture(scope="module")
def uninterrupted(tiny_assets, tmp_path_factory):
    """The reference run: 3 rounds of CoRSA, adapter merged at the end; (directory, module, metrics)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _, module, metrics = _run(tiny_assets, out, merge=True)
    return out, module, metrics


@pytest.fixture(scope="module")
def stopped_after_round_0(tiny_assets, tmp_path_factory):
    """The same run stopped after its first round (its checkpoint is what a resume starts from)."""
    out = tmp_path_factory.mktemp("stopped")
    trainer, _, _ = _run(tiny_assets, out, stop_after=1)
    trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(out))  # what SLURM's SIGUSR1 does
    return out


def test_sequential_rounds_write_metrics_plot_and_adapter(tiny_assets, uninterrupted):
    out, module, metrics = uninterrupted
    assert [r["eval_round"] for r in metrics["rounds"]] == [0, 1, 2]
    # after round k every edit of rounds 0..k is scored
    assert [sorted(r["by_edit_round"]) for r in metrics["rounds"]] == [["0"], ["0", "1"], ["0", "1", "2"]]
    summary = metrics["summary"]
    for name in ("ES", "PS", "NS", "reliability_token_acc", "generality_token_acc", "locality_token_acc",
                 "reliability_gen", "generality_gen"):
        assert 0.0 <= summary["after_last_round"][name] <= 1.0
        assert name in summary["forgetting"]
        assert name in metrics["protocol"]["metrics"]
    assert metrics["objective"]["use_sam"] and metrics["objective"]["use_dpo"]
    assert (out / "run" / "metrics.png").stat().st_size > 10_000
    # the edit did something: efficacy after its round beats the unedited model's preference for the truth
    assert summary["immediate"]["ES"] > 0.5
    adapter = out / "run" / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_assets[0] / "model")
    reloaded = PeftModel.from_pretrained(base, adapter)
    ids = torch.tensor([[1, 5, 6, 7]])
    torch.testing.assert_close(reloaded(input_ids=ids).logits, module.model(input_ids=ids).logits)
    merged = AutoModelForCausalLM.from_pretrained(out / "run" / "merged")  # a plain HF model, no peft
    torch.testing.assert_close(merged(input_ids=ids).logits, module.model(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_checkpoint_holds_adapter_optimizer_and_round(uninterrupted):
    ckpt = torch.load(uninterrupted[0] / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"][0]["state"], "AdamW moments are in the checkpoint"
    assert ckpt["CounterFactDataModule"]["current_round"] == 2
    assert len(ckpt["callbacks"][next(k for k in ckpt["callbacks"] if "EditReport" in k)]["history"]) == 3


def test_resume_mid_sequence_matches_uninterrupted(tiny_assets, uninterrupted, stopped_after_round_0, tmp_path):
    shutil.copytree(stopped_after_round_0, tmp_path, dirs_exist_ok=True)
    _, _, resumed = _run(tiny_assets, tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed["rounds"] == uninterrupted[2]["rounds"]  # every score of every round, exactly


class TerminateAfterBatch(L.Callback):
    """SIGTERM to this process after the ``batches``-th micro-batch of the run."""

    def __init__(self, batches: int) -> None:
        self.batches = batches

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx + 1 == self.batches:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_halfway_through_a_gradient_accumulation_matches_uninterrupted(tiny_assets, tmp_path):
    """Two micro-batches per optimiser step; SIGTERM after the first micro-batch of epoch 2 saves the
    half-accumulated update with the checkpoint, and the resumed run ends exactly like an uninterrupted one."""
    _, _, uninterrupted = _run(tiny_assets, tmp_path / "a", rounds=2, accumulate=2)
    with pytest.raises(SystemExit) as stopped:
        _run(tiny_assets, tmp_path / "b", rounds=2, accumulate=2, callbacks=[TerminateAfterBatch(5)])
    assert stopped.value.code == 143
    checkpoint = torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["edit_accumulated"] is not None and checkpoint["global_step"] == 2
    _, _, resumed = _run(tiny_assets, tmp_path / "b", rounds=2, accumulate=2, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert resumed["rounds"] == uninterrupted["rounds"]


def test_requeued_slurm_job_resumes_from_the_hpc_checkpoint(tiny_assets, uninterrupted, stopped_after_round_0,
                                                            tmp_path, monkeypatch):
    """What a requeued SLURM job does: Lightning saved hpc_ckpt_<n>.ckpt on the signal, and a new fit without
    ckpt_path picks it up by itself; the sequence then ends as if never interrupted."""
    shutil.copytree(stopped_after_round_0, tmp_path, dirs_exist_ok=True)
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "corsa", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    trainer, _, resumed = _run(tiny_assets, tmp_path)
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    assert Path(trainer.ckpt_path).name == "hpc_ckpt_1.ckpt"  # resumed, not restarted
    assert resumed["rounds"] == uninterrupted[2]["rounds"]


def test_bf16_base_with_bf16_mixed_precision_edits_and_keeps_the_base(tiny_assets, tmp_path):
    """The real-model configs' setting: a bf16 base under bf16-mixed autocast, fp32 LoRA weights."""
    base = {n: p.clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_assets[0] / "model",
                                                                          dtype=torch.bfloat16).named_parameters()}
    _, module, metrics = _run(tiny_assets, tmp_path, precision="bf16-mixed", dtype="bfloat16")
    lora = {n: p for n, p in module.model.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    frozen = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
              for n, p in module.model.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, base[n]) for n, p in frozen.items())  # SAM left it alone
    assert metrics["summary"]["immediate"]["ES"] > 0.5


@pytest.mark.parametrize("group, setting, value", [
    (ObjectiveSettings, "rho", -0.05), (ObjectiveSettings, "beta", 0.0), (EvaluationSettings, "sandbox_timeout_s", 0.0),
    (OptimizerSettings, "accumulate", 0), (LoraSettings, "dropout", 1.0), (EvaluationSettings, "pass_k", (1, 10)),
])
def test_bad_settings_fail_at_configuration(group, setting, value):
    with pytest.raises(ValueError, match=r"invalid settings: model\.\w+\.\w+ = "):
        group(**{setting: value})


def test_every_bad_setting_of_a_group_is_reported_at_once():
    with pytest.raises(ValueError, match=r"model\.objective\.beta = -1 .*; model\.objective\.rho = -1 "):
        ObjectiveSettings(beta=-1, rho=-1)


def test_a_diverging_run_stops_before_stepping_or_saving(tiny_assets, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* Lower model.optimizer.learning_rate \(now 1e\+30\)"):
        _run(tiny_assets, tmp_path, learning_rate=1e30)
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_a_resume_refuses_other_settings_and_a_corrupted_checkpoint(tiny_assets, tmp_path):
    _run(tiny_assets, tmp_path, max_steps=3)  # stops mid-round, mid-epoch
    checkpoint = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(ValueError, match=r"method: 'corsa' in the checkpoint, 'lora' now.*--ckpt_path null"):
        _run(tiny_assets, tmp_path, method="lora", ckpt_path=str(checkpoint))
    state = torch.load(checkpoint, weights_only=True)
    name = next(iter(state["state_dict"]))
    state["state_dict"][name].view(-1)[0] = float("nan")  # one flipped exponent bit is enough
    torch.save(state, checkpoint)
    parameter = name.replace("model.", "", 1)  # the checkpoint key is the module's attribute path
    with pytest.raises(ValueError, match=rf"non-finite values in {parameter} after restoring .*corrupted"):
        _run(tiny_assets, tmp_path, ckpt_path=str(checkpoint))


@pytest.mark.parametrize("method", ["lora", "easyedit_dpo"])
def test_baselines_run_through_the_same_harness(tiny_assets, tmp_path, method):
    _, module, metrics = _run(tiny_assets, tmp_path, method=method, rounds=2, fresh=True)
    assert metrics["method"] == method
    assert metrics["objective"]["use_sam"] is False
    assert metrics["summary"]["immediate"]["ES"] > 0.5  # it trained: the unedited model prefers the old answers


def test_world_reference_solutions_pass_and_old_ones_fail(world):
    """The Pass@k path end to end without a model: the new-API reference body passes the unit tests with
    the update patched in; the old-API body (what an unedited model writes) fails them."""
    from data.code_update import parse_code_update_rows
    from data.world_writers import code_update_records
    from lit_corsa.evaluation import solution_passes

    records = parse_code_update_rows(code_update_records(world), "world")
    assert len(records) == 8
    for record in records:
        program = next(p for p in record.probes if p.kind == "program")
        assert solution_passes(program.program, program.target), record.record_id
        assert not solution_passes(program.program, program.contrast), record.record_id
        spaced = " ".join(program.target.replace("(", " ( ").replace(")", " ) ").replace(",", " , ").split())
        assert solution_passes(program.program, spaced), "space-joined decoding stays valid Python"
