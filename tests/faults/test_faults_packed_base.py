"""Fault injection on an editing run whose base is a packed model (a TaCQ export: every decoder Linear stored as
3-bit codes plus kept 16-bit weights, adapted QLoRA-style): killed (SIGKILL) in the middle of a round and rerun
with the same command, it must end exactly where an uninterrupted run ends: the same adapter tensors, the same
round state and every score of every round. (The fp-base faults, SIGTERM and kills at round boundaries included,
are in tests/faults/test_faults_edit.py.)"""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lit_common.sources import load_causal_lm, load_tokenizer
from lit_tacq.io import save_quantized
from lit_tacq.pipeline import QuantSettings, quantize_model
from lit_tacq.qlinear import quantized_modules
from tests.cli import ROOT, cli_command, cli_env, run_cli
from tests.faults.edit_config import CONFIG

# 3 batches an epoch, 6 optimiser steps a round, 12 in all; last.ckpt at steps 4 and 8 and after each round's
# evaluation (step 6); step 8 is the middle of round 1's first epoch


@pytest.fixture(scope="module")
def packed_world(tiny_assets, tmp_path_factory) -> Path:
    """The tiny world model quantized by TaCQ's pipeline (masked GPTQ, 3 bits, the top 2 % of weights by Hessian
    saliency kept in 16 bits, calibrated on the world's corpus) and saved as a packed export with its tokenizer."""
    root, _ = tiny_assets
    model = load_causal_lm(str(root / "model")).eval()
    tokenizer = load_tokenizer(str(root / "model"))
    lines = (root / "world" / "corpus.txt").read_text().splitlines()[:32]
    sequences = [torch.tensor(tokenizer(line)["input_ids"]) for line in lines]
    quantize_model(model, sequences, QuantSettings(bits=3, saliency="hessian", fraction=0.02), progress=False)
    assert len(quantized_modules(model)) == 14  # 7 Linears in each of the 2 decoder blocks
    return save_quantized(model, tmp_path_factory.mktemp("packed_world") / "export", tokenizer)


def _command(out: Path, model: Path, data: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    config = out / "config.yaml"
    config.write_text(CONFIG.format(out=out / "runs", model=model, data=data, num_updates=2))
    return cli_command("train.py", config)


def _finished(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The last version's metrics.json and its saved adapter's tensors."""
    versions = sorted((out / "runs" / "run").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    return (json.loads((versions[-1] / "metrics.json").read_text()),
            load_file(versions[-1] / "adapter" / "adapter_model.safetensors"))


def test_a_run_on_a_packed_base_killed_mid_round_resumes_to_the_uninterrupted_result(
        packed_world, tiny_assets, tmp_path):
    data = tiny_assets[0] / "world" / "counterfact.json"
    # the uninterrupted run goes side by side with the one to be killed (half the wall time on two cores)
    log = tmp_path / "uninterrupted.log"
    with log.open("w") as out:
        uninterrupted = subprocess.Popen(_command(tmp_path / "a", packed_world, data), cwd=ROOT, env=cli_env(),
                                         stdout=out, stderr=subprocess.STDOUT)
        command = _command(tmp_path / "b", packed_world, data)
        checkpoint = tmp_path / "b" / "runs" / "run" / "checkpoints" / "last.ckpt"
        killed = run_cli(command, "train_batch_end:10:KILL")  # mid-round 1; last save: step 8, mid-epoch
        assert uninterrupted.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert killed.returncode == -9
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["global_step"] == 8 and saved["CounterFactDataModule"]["current_round"] == 1
    finished = run_cli(command)
    assert finished.returncode == 0, finished.stderr[-3000:]
    resumed_line = next((line for line in finished.stderr.splitlines() if "Resumed from" in line), "")
    assert "at step 8 " in resumed_line, finished.stderr[-3000:]

    (expected, expected_adapter), (resumed, resumed_adapter) = _finished(tmp_path / "a"), _finished(tmp_path / "b")
    assert [r["eval_round"] for r in resumed["rounds"]] == [0, 1]
    assert resumed["rounds"] == expected["rounds"]  # every score of every round, exactly
    assert resumed_adapter.keys() == expected_adapter.keys()
    assert len(expected_adapter) == 2 * 14  # A and B on every packed layer
    assert any(t.abs().sum() > 0 for n, t in expected_adapter.items() if "lora_B" in n)  # B starts at 0: it trained
    for name, tensor in expected_adapter.items():
        assert torch.equal(resumed_adapter[name], tensor), name
    ends = [torch.load(out / "runs" / "run" / "checkpoints" / "last.ckpt", weights_only=True) for out in
            (tmp_path / "a", tmp_path / "b")]
    assert [e["global_step"] for e in ends] == [12, 12]
    assert ends[0]["CounterFactDataModule"] == ends[1]["CounterFactDataModule"]  # the update round and its state
