"""Running model-generated Python under limits, and composing CodeUpdateArena-style check programs.

Pass@k on code updates means executing programs a model wrote. ``run_python`` never runs them in this
process: each program gets a fresh ``python -I`` (isolated mode: no PYTHONPATH, no user site, no
current directory on ``sys.path``) in its own temporary directory and process session, with

- a scrubbed environment (no tokens, no PYTHONPATH, single-threaded BLAS);
- resource limits set by a small bootstrap in the child before the program runs: address space
  (``memory_mb``), CPU seconds, no core dumps, output/file size, and processes. They are set in the
  child rather than through ``preexec_fn``, which is unsafe when the caller has threads (a trainer
  does). ``RLIMIT_NPROC`` caps the tasks (processes and threads) of the user: inside the user
  namespace below it counts only the sandbox's own, so the cap is ``max_processes``; without one it
  counts every task the user runs, so the cap is "what the user runs now" plus ``max_processes``. The
  kernel never applies it to the real root user (uid 0), in a namespace or not;
- a wall-clock timeout, after which the whole process group is killed (also after a normal exit, to
  end background children);
- no network, best effort: the bootstrap replaces socket creation and name resolution with functions
  that raise ``OSError``, which stops ordinary code but not code that goes around ``socket`` (ctypes, a
  subprocess such as ``curl``). When unprivileged user namespaces work (``unshare -rn``), the child
  also runs in an empty network namespace, which no Python trick escapes; that is probed once and
  used automatically.

This is a guard against accidents of generated code (infinite loops, memory blow-ups, stray network
calls), not a security boundary against hostile code: use a container or VM for that.
"""

from __future__ import annotations

import ast
import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

_BOOTSTRAP = r"""
import resource, sys
_mem, _cpu, _fsize, _nproc = (int(v) for v in sys.argv[1:5])
_program = sys.argv[5]

def _cap(limit, soft, hard):
    # Never above the inherited hard limit: raising it needs privileges and would abort the run.
    inherited = resource.getrlimit(limit)[1]
    if inherited != resource.RLIM_INFINITY:
        soft, hard = min(soft, inherited), min(hard, inherited)
    resource.setrlimit(limit, (soft, hard))

for _limit, _value in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_CORE, 0),
                       (resource.RLIMIT_FSIZE, _fsize), (resource.RLIMIT_NPROC, _nproc)):
    _cap(_limit, _value, _value)
_cap(resource.RLIMIT_CPU, _cpu, _cpu + 1)

import _socket, socket

def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")

_RawSocket = _socket.socket

class _NoRawSocket(_RawSocket):
    # socket.socket.__init__ calls _socket.socket.__init__ by name, so this also guards socket.socket.
    # Wrapping an existing descriptor (socketpair, accept) is local; creating a new socket is not.
    def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None:
            _no_network()
        _RawSocket.__init__(self, family, type, proto, fileno)

_socket.socket = _socket.SocketType = _NoRawSocket
for _module in (socket, _socket):
    for _name in ("create_connection", "create_server", "fromfd", "getaddrinfo", "getnameinfo",
                  "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        if hasattr(_module, _name):
            setattr(_module, _name, _no_network)

import runpy
sys.argv = [_program]
runpy.run_path(_program, run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run; ``timed_out`` covers both the wall-clock and the CPU limit."""

    passed: bool
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


@functools.cache
def _unshare_command() -> Optional[list[str]]:
    """``[unshare, -rn, --]`` when an unprivileged network namespace can be created here, else None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    try:
        probe = subprocess.run([unshare, "-rn", "true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [unshare, "-rn", "--"] if probe.returncode == 0 else None


def _tasks_of_current_user() -> int:
    """Threads (kernel tasks) the current real uid runs now: what RLIMIT_NPROC counts against."""
    uid, tasks = os.getuid(), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if int(fields.get("Uid", "-1 ").split()[0]) == uid:
            tasks += int(fields.get("Threads", "1"))
    return tasks


def _clean_env(home: str) -> dict[str, str]:
    return {
        "PATH": os.defpath,
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(
    code: str,
    timeout_s: float = 10,
    memory_mb: int = 512,
    *,
    max_processes: int = 32,
    max_output_mb: int = 16,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed ``python -I`` child; passed = exit status 0 in time.

    ``stdout``/``stderr`` go to files capped at ``max_output_mb`` by RLIMIT_FSIZE: a program printing
    forever fails with "File too large" instead of filling this process's memory.
    """
    output_bytes = max_output_mb * 2**20
    namespace = _unshare_command()
    # In a fresh user namespace RLIMIT_NPROC counts that namespace's tasks only; outside, all the user's.
    tasks = max_processes + 1 if namespace else _tasks_of_current_user() + max_processes
    limits = [memory_mb * 2**20, max(1, math.ceil(timeout_s)), output_bytes, tasks]
    with tempfile.TemporaryDirectory(prefix="corsa-sandbox-") as workdir:
        program = Path(workdir, "main.py")
        program.write_text(code, encoding="utf-8")
        command = [sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP, *map(str, limits), str(program)]
        command = (namespace or []) + command
        stdout_path, stderr_path = Path(workdir, "stdout.txt"), Path(workdir, "stderr.txt")
        timed_out = False
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
            proc = subprocess.Popen(command, cwd=workdir, env=_clean_env(workdir), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                returncode = proc.wait()
        timed_out = timed_out or returncode == -signal.SIGXCPU
        stdout = stdout_path.read_bytes()[:output_bytes].decode("utf-8", errors="replace")
        stderr = stderr_path.read_bytes()[:output_bytes].decode("utf-8", errors="replace")
    return SandboxResult(returncode == 0 and not timed_out, returncode, stdout, stderr, timed_out)


_RESOLVE = '''
import importlib as _cua_importlib
import sys as _cua_sys
import traceback as _cua_traceback


def _cua_resolve(path):
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = _cua_importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError("cannot resolve " + repr(path))
'''

_LOAD_SOLUTION = '''
_cua_namespace = dict(globals(), __name__="__solution__")
try:
    exec(compile({solution!r}, "<solution>", "exec"), _cua_namespace)
except BaseException:
    _cua_traceback.print_exc()
    print("SANDBOX: the solution failed to load", file=_cua_sys.stderr)
    _cua_sys.exit(1)
globals().update((k, v) for k, v in _cua_namespace.items() if k != "__name__")
'''

_RUN_TESTS = '''
for _cua_test in {names!r}:
    try:
        globals()[_cua_test]()
    except BaseException:
        _cua_traceback.print_exc()
        print("SANDBOX: failed " + _cua_test, file=_cua_sys.stderr)
        _cua_sys.exit(1)
print("SANDBOX: passed {count} tests")
'''


def _function_names(source: str) -> list[str]:
    return [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]


def build_program(
    imports: str | Sequence[str],
    implementation: str,
    function_path: str,
    solution: str,
    unit_tests: str | Sequence[str],
    *,
    update_type: str = "",
) -> str:
    """Compose the program that checks one generated ``solution`` against an API update's unit tests.

    Order (as CodeUpdateArena's checker): ``imports``; the updated ``implementation``; the patch that
    installs it at ``function_path`` (``"math.floor"`` → ``setattr(math, "floor", floor)``); the
    solution; the unit tests; then every ``test*`` function is called in order and the program exits
    with status 1 at the first failure. The patch precedes the solution so ``from math import floor``
    inside it sees the update.

    If the implementation defines no function named like the path's last part, its single function
    is installed under its own name beside the old one (a new or renamed API); with
    ``update_type="modify-function-name"`` the old name is then deleted, as CodeUpdateArena does.

    The solution is model output, so it is compiled at run time inside the program (a syntax error
    fails the check, it does not raise here) and with ``__name__`` other than ``"__main__"``, so a demo
    block under ``if __name__ == "__main__":`` does not run (as in the HumanEval harness). The
    imports, implementation and tests come from the dataset and must parse here.
    ``unit_tests``: a list of test-function sources, or one string holding several.
    """
    imports_src = imports if isinstance(imports, str) else "\n".join(imports)
    tests_src = unit_tests if isinstance(unit_tests, str) else "\n\n".join(unit_tests)
    test_names = [name for name in _function_names(tests_src) if name.startswith("test")]
    if not test_names:
        raise ValueError("no test function (def test...) in unit_tests: the check would pass vacuously")
    parent_path, _, old_name = function_path.rpartition(".")
    if not parent_path:
        raise ValueError(f"function_path must be dotted, like 'math.sin'; got {function_path!r}")
    defined = _function_names(implementation)
    if old_name in defined:
        new_name = old_name
    elif len(defined) == 1:
        new_name = defined[0]
    else:
        raise ValueError(f"cannot tell which of {defined} in the implementation replaces {function_path}")
    patch = [f"_cua_parent = _cua_resolve({parent_path!r})", f"setattr(_cua_parent, {new_name!r}, {new_name})"]
    if update_type == "modify-function-name" and new_name != old_name:
        patch.append(f"delattr(_cua_parent, {old_name!r})")
    sections = [
        ("imports", imports_src),
        ("updated implementation", implementation),
        ("install the update", _RESOLVE + "\n" + "\n".join(patch)),
        ("solution", _LOAD_SOLUTION.format(solution=solution)),
        ("unit tests", tests_src),
        ("run the tests", _RUN_TESTS.format(names=test_names, count=len(test_names))),
    ]
    return "\n\n".join(f"# ---- {title} ----\n{body.strip()}\n" for title, body in sections)
