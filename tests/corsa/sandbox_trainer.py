"""A stand-in trainer for the sandbox tests: runs one program through ``run_python`` in a process of its own.

A program that kills its parent or reads its parent's environment then hits this process, not pytest,
and this process's environment is fixed at its start (``/proc/<pid>/environ`` shows only that).

Usage: ``python sandbox_trainer.py PROGRAM_FILE [TIMEOUT_S]``; prints the ``SandboxResult`` as JSON.
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lit_corsa.sandbox import run_python  # noqa: E402

timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 10.0
result = run_python(Path(sys.argv[1]).read_text(), timeout_s=timeout_s)
print(json.dumps(dataclasses.asdict(result)))
