"""Running the project's command-line entry points from tests, as a user would (a subprocess in the repo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """The test environment: offline, one thread per process, no fault injected unless asked."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra}
    if "LIT_TEST_KILL" not in extra:
        env.pop("LIT_TEST_KILL", None)
    return env


def cli_command(script: str, config: Path, *extra: str) -> list[str]:
    """``python <script> fit --config <config> ...`` (train.py or quantize.py)."""
    return [sys.executable, script, "fit", "--config", str(config), *extra]


def run_cli(command: list[str], kill: str | None = None) -> subprocess.CompletedProcess:
    """Run to the end; ``kill`` arms tests/faults/kill_switch.py (``"<hook>:<value>:<signal>"``)."""
    env = cli_env(LIT_TEST_KILL=kill) if kill else cli_env()
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
