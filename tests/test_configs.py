"""Every shipped config parses against its entry point (class paths import, keys and types are right),
and the README's quick-start commands point at things that exist."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
OVERLAYS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))


def _print_config(capsys, monkeypatch, *configs: Path) -> str:
    """Parse through the entry point's own CLI (train.py or quantize.py) and return the printed config."""
    entry = importlib.import_module("quantize" if "tacq" in configs[0].name else "train")
    monkeypatch.setattr("sys.argv", [f"{entry.__name__}.py"])
    args = [arg for c in configs for arg in ("--config", str(c))]
    with pytest.raises(SystemExit) as exit_info:
        entry.main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_configs_exist():
    assert {c.name for c in CONFIGS} >= {"demo_counterfact.yaml", "demo_tacq.yaml", "llama3_8b_counterfact.yaml"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses(config, capsys, monkeypatch):
    assert "class_path" in _print_config(capsys, monkeypatch, config)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_method_overlays_compose(overlay, capsys, monkeypatch):
    printed = _print_config(capsys, monkeypatch, ROOT / "configs" / "demo_counterfact.yaml", overlay)
    assert f"method: {overlay.stem}" in printed


@pytest.mark.parametrize("overlay", sorted((ROOT / "configs" / "strategies").glob("*.yaml")), ids=lambda p: p.name)
def test_strategy_overlays_compose_with_the_8b_config(overlay, capsys, monkeypatch):
    printed = _print_config(capsys, monkeypatch, ROOT / "configs" / "llama3_8b_counterfact.yaml", overlay)
    assert "ModelParallelStrategy" in printed and "tensor_parallel_size: 1" in printed


@pytest.mark.parametrize("script", sorted((ROOT / "configs" / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_slurm_scripts_launch_a_command_that_parses(script, capsys, monkeypatch):
    srun = [line for line in script.read_text().splitlines() if line.startswith("srun python train.py fit")]
    assert len(srun) == 1, "one srun line per script"
    args = srun[0].split()[4:]  # after "srun python train.py fit"
    monkeypatch.setattr("sys.argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module("train").main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "num_nodes: 2" in printed and "strategy: ddp" in printed


def test_readme_quick_start():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert "\n" not in main_job and "\n" not in tests, "each quick-start command is one line"
    assert "torch==2.13.0" in main_job and "torch==2.13.0" in tests
    for config in re.findall(r"--config (\S+)", main_job):
        assert (ROOT / config).is_file(), config
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci, ".ci/run must run exactly the README's test command"
