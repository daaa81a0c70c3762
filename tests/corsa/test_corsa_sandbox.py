"""The sandbox: limits, the pass rule, isolation, and the check programs of ``build_program``.

Each escape test asserts the escape fails (a program that exits 0 without running to its end, kills
the trainer, writes project files, outlives the run, forks without bound, reaches the network or the
trainer's environment), so it fails where the escape works. They are meant to run as root too (CI
does): the sandbox must hold for a root trainer.
"""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
import warnings
from pathlib import Path

import pytest

import lit_corsa
from lit_corsa import sandbox
from lit_corsa.sandbox import SandboxUnavailable, build_program, run_python

REPO = Path(lit_corsa.__file__).resolve().parent.parent
TRAINER = Path(__file__).with_name("sandbox_trainer.py")


def _unisolated(code, **kwargs):
    """``run_python`` with the weaker guards only; its once-per-process warning is tested on its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run_python(code, isolation="none", **kwargs)


def _processes_with(token: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line contains ``token``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _start_trainer(tmp_path, code: str, timeout_s: float = 10, **env: str) -> subprocess.Popen:
    """A stand-in trainer process running ``code`` in the sandbox (see sandbox_trainer.py), with ``env``
    added to its environment; its temporary files go under ``tmp_path``, also when it is killed."""
    program = tmp_path / f"program-{uuid.uuid4().hex}.py"
    program.write_text(code)
    return subprocess.Popen([sys.executable, str(TRAINER), str(program), str(timeout_s)], cwd=REPO,
                            env=dict(os.environ, TMPDIR=str(tmp_path), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trainer_result(trainer: subprocess.Popen) -> dict:
    out, err = trainer.communicate(timeout=60)
    assert trainer.returncode == 0, f"the trainer died ({trainer.returncode}): {err[-2000:]}"
    return json.loads(out)


def test_passing_program():
    result = run_python("print(6 * 7)")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.stdout.strip() == "42"


def test_failing_assertion():
    result = run_python("assert 1 + 1 == 3, 'arithmetic'")
    assert not result.passed and result.returncode == 1 and not result.timed_out
    assert "AssertionError: arithmetic" in result.stderr


@pytest.mark.parametrize("code", [
    "import os\ntry:\n    assert 1 + 1 == 3\nexcept AssertionError:\n    os._exit(0)\n",
    "import sys\nsys.exit(0)\n",
    "exit()\n",
    "raise SystemExit(0)\n",
    "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "import os, signal\nos.kill(os.getppid(), signal.SIGINT)\nimport time\ntime.sleep(5)\n",
    "print('SANDBOX: passed 2 tests')\nimport os\nos._exit(0)\n",
], ids=["os._exit(0)", "sys.exit(0)", "exit()", "SystemExit", "kills-itself", "interrupts-supervisor",
        "prints-the-pass-line"])
def test_a_program_that_does_not_run_to_its_end_does_not_pass(code):
    result = run_python(code)
    assert not result.passed, result


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1)
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("timeout_s, memory_mb", [(0, 512), (-1, 512), (float("nan"), 512), (10, 0), (10, -64)])
def test_limits_must_be_positive(timeout_s, memory_mb):
    with pytest.raises(ValueError, match="must be positive"):
        run_python("print(1)", timeout_s=timeout_s, memory_mb=memory_mb)


def test_memory_bomb_is_stopped():
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 2**20))"
    result = run_python(bomb, timeout_s=20, memory_mb=256)
    assert not result.passed and not result.timed_out
    assert "MemoryError" in result.stderr


def test_runaway_output_is_capped():
    result = run_python("while True:\n    print('x' * 1000)", timeout_s=20, max_output_mb=1)
    assert not result.passed and not result.timed_out
    assert len(result.stdout) <= 2**20


def test_environment_is_scrubbed_and_cwd_is_a_fresh_temp_dir(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent/injected")
    code = "\n".join([
        "import os, sys",
        "print(os.environ.get('HF_TOKEN'))",
        "print(sys.path)",
        "print(os.getcwd())",
        "print(os.listdir('.'))",
    ])
    result = run_python(code)
    assert result.passed
    token, path, cwd, listing = result.stdout.splitlines()
    assert token == "None" and "/nonexistent/injected" not in path
    assert Path(cwd).name.startswith("corsa-sandbox-") and not Path(cwd).exists()
    assert "main.py" in listing


def test_the_program_runs_without_privileges():
    code = textwrap.dedent("""
        import os
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        print(int(status["CapEff"], 16), int(status["CapPrm"], 16), status["NoNewPrivs"].strip(), os.getuid())
    """)
    result = run_python(code)
    assert result.passed, result.stderr
    effective, permitted, no_new_privs, uid = result.stdout.split()
    assert effective == permitted == "0" and no_new_privs == "1"
    if os.geteuid() == 0:
        assert uid == str(sandbox.NOBODY)


def test_packages_of_the_venv_import_inside():
    result = run_python("import numpy\nprint(numpy.__file__)")
    assert result.passed, result.stderr
    assert result.stdout.startswith(sys.prefix)


# Program code: wait until a process with `token` in its command line runs, so a test that it is gone
# afterwards cannot pass because it never started.
_SEE_TOKEN = """
import os, time

def see(token):
    for _ in range(200):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if token.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                    return print("seen", flush=True)
            except OSError:
                pass
        time.sleep(0.01)
"""


def _sleeper(token: str, **popen_kwargs) -> str:
    """Program code that starts a 60-second sleeper with ``token`` in its command line and sees it run."""
    return _SEE_TOKEN + textwrap.dedent(f"""
        import subprocess, sys
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", {token!r}], **{popen_kwargs!r})
        see({token!r})
    """)


def test_background_children_are_killed_after_the_run():
    token = f"sandbox-child-{uuid.uuid4().hex}"
    result = run_python(_sleeper(token))
    assert result.passed and result.stdout == "seen\n", result.stderr
    assert not _processes_with(token)


def test_a_timeout_kills_the_whole_tree():
    token = f"sandbox-child-{uuid.uuid4().hex}"
    result = run_python(_sleeper(token, start_new_session=True) + "while True:\n    pass\n", timeout_s=1)
    assert result.timed_out and not result.passed and result.stdout == "seen\n"
    assert not _processes_with(token)


def test_setsid_and_double_forked_children_die_with_the_run():
    token = f"sandbox-grandchild-{uuid.uuid4().hex}"
    outside = Path(tempfile.mkdtemp(prefix="sandbox-outside-"))
    try:
        outside.chmod(0o777)
        marker = outside / "escaped"
        late_write = "import sys, time; time.sleep(0.5); open(sys.argv[1], 'w').write('escaped')"
        code = _SEE_TOKEN + textwrap.dedent(f"""
            import sys
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    os.execv(sys.executable, [sys.executable, "-c", {late_write!r}, {str(marker)!r}, {token!r}])
                os._exit(0)
            see({token!r})
        """)
        result = run_python(code)
        assert result.passed and result.stdout == "seen\n", result.stderr
        assert not _processes_with(token)
        time.sleep(1.0)
        assert not marker.exists()
        assert not _processes_with(token)
    finally:
        for path in outside.iterdir():
            path.unlink()
        outside.rmdir()


def test_the_sandbox_dies_with_the_trainer(tmp_path):
    token = f"sandbox-orphan-{uuid.uuid4().hex}"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", {token!r}], start_new_session=True)
        time.sleep(60)
    """)
    trainer = _start_trainer(tmp_path, code, timeout_s=60)
    try:
        # upper bounds, not delays: the trainer's imports alone took over 10 s on a loaded 2-core machine
        assert _wait_until(lambda: _processes_with(token), 45), "the program did not start its child"
        trainer.kill()
        trainer.wait()
        assert _wait_until(lambda: not _processes_with(token), 15)
    finally:
        trainer.kill()
        trainer.communicate()
        for pid in _processes_with(token):
            os.kill(pid, signal.SIGKILL)


def test_the_program_cannot_kill_the_trainer_or_other_processes(tmp_path):
    token = f"sandbox-sentinel-{uuid.uuid4().hex}"
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", token])
    try:
        code = textwrap.dedent(f"""
            import os, signal

            def kill(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                    return "killed"
                except OSError as error:
                    return type(error).__name__

            print("parent", kill(os.getppid()))
            print("sentinel", kill({sentinel.pid}))
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    if {token!r}.encode() in open(f"/proc/{{pid}}/cmdline", "rb").read():
                        print("found", kill(int(pid)))
                except OSError:
                    pass
        """)
        result = _trainer_result(_start_trainer(tmp_path, code))
        assert result["passed"], result["stderr"]
        time.sleep(0.1)
        assert sentinel.poll() is None, result["stdout"]
        assert "found" not in result["stdout"]
    finally:
        sentinel.kill()
        sentinel.wait()


def test_the_trainers_environment_is_out_of_reach(tmp_path):
    code = textwrap.dedent("""
        import os
        print("own", "LIT_EDITQ_TEST_SECRET" in os.environ)
        for pid in ["self", str(os.getppid()), "1", *filter(str.isdigit, os.listdir("/proc"))]:
            try:
                if b"LIT_EDITQ_TEST_SECRET=" in open(f"/proc/{pid}/environ", "rb").read():
                    print("found in", pid)
            except OSError:
                pass
    """)
    result = _trainer_result(_start_trainer(tmp_path, code, LIT_EDITQ_TEST_SECRET=uuid.uuid4().hex))
    assert result["passed"], result["stderr"]
    assert result["stdout"] == "own False\n"


def test_the_project_tree_is_out_of_reach():
    assert (REPO / "README.md").is_file() and (REPO / "lit_corsa").is_dir()
    target = REPO / f"sandbox-escape-{uuid.uuid4().hex}.txt"
    code = textwrap.dedent(f"""
        for action, path, mode in (("write", {str(target)!r}, "w"), ("read", {str(REPO / "README.md")!r}, "r")):
            try:
                with open(path, mode) as handle:
                    handle.write("escaped") if mode == "w" else handle.read()
                print(action, "worked")
            except OSError as error:
                print(action, "failed:", type(error).__name__)
        import os
        print(os.listdir({str(REPO)!r}))
    """)
    try:
        result = run_python(code)
        assert result.passed, result.stderr
        write, read, listing = result.stdout.splitlines()
        assert write.startswith("write failed") and read.startswith("read failed")
        assert "lit_corsa" not in listing and "README.md" not in listing
        assert not target.exists()
    finally:
        target.unlink(missing_ok=True)


def test_process_count_is_limited():
    code = textwrap.dedent("""
        import os, time
        made = 0
        for _ in range(200):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(10)
                os._exit(0)
            made += 1
        print(made)
    """)
    result = run_python(code, timeout_s=20, max_processes=8)
    assert result.passed, result.stderr
    assert 1 <= int(result.stdout) <= 8


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.3)
    yield server
    server.close()


def _connected(server) -> bool:
    try:
        conn, _ = server.accept()
    except socket.timeout:
        return False
    conn.close()
    return True


_CONNECT_IN_A_SUBPROCESS = """
import subprocess, sys
connect = "import socket; socket.create_connection(('127.0.0.1', {port})).sendall(b'hi')"
subprocess.run([sys.executable, "-c", connect], check=True)
"""


@pytest.mark.parametrize("isolation", ["namespaces", "none"])
def test_network_access_fails(listener, isolation):
    run = run_python if isolation == "namespaces" else _unisolated
    port = listener.getsockname()[1]
    blocked = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'hi')",
        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
        "import socket\nsocket.getaddrinfo('example.org', 80)",
    ]
    if isolation == "namespaces":  # a fresh interpreter has the real socket module: only the namespace stops it
        blocked.append(_CONNECT_IN_A_SUBPROCESS.format(port=port))
    for code in blocked:
        result = run(code)
        assert not result.passed, code
        assert not _connected(listener), code
    assert run("import socket\na, b = socket.socketpair()\na.sendall(b'x')\nassert b.recv(1) == b'x'").passed


_CTYPES_CONNECT = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
print(libc.connect(fd, address, len(address)))
"""


def test_network_namespace_stops_what_the_socket_patch_cannot(listener):
    port = listener.getsockname()[1]
    inside = run_python(_CTYPES_CONNECT.format(port=port))
    assert inside.passed and inside.stdout.strip() == "-1"
    assert not _connected(listener)
    # without the namespace, raw libc calls and subprocesses go around the patched socket module
    outside = _unisolated(_CTYPES_CONNECT.format(port=port))
    assert outside.stdout.strip() == "0"
    assert _connected(listener)
    assert _unisolated(_CONNECT_IN_A_SUBPROCESS.format(port=port)).passed
    assert _connected(listener)


def test_refuses_to_run_without_isolation(monkeypatch):
    monkeypatch.delenv(sandbox.UNSAFE_ENV_VAR, raising=False)
    monkeypatch.setattr(sandbox, "_isolation_failure", lambda: "the kernel said no")
    with pytest.raises(SandboxUnavailable) as caught:
        run_python("print(1)")
    message = str(caught.value)
    assert "the kernel said no" in message and "unshare" in message
    assert f"{sandbox.UNSAFE_ENV_VAR}=1" in message and "isolation='none'" in message


def test_the_probe_reports_missing_tools(monkeypatch, tmp_path):
    monkeypatch.delenv(sandbox.UNSAFE_ENV_VAR, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare, no setpriv
    monkeypatch.setattr(sandbox, "_isolation_failure", functools.cache(sandbox._isolation_failure.__wrapped__))
    with pytest.raises(SandboxUnavailable, match="setpriv.*not found on PATH"):
        run_python("print(1)")


@pytest.mark.parametrize("opt_out", ["environment", "argument"])
def test_the_opt_out_runs_with_weaker_guards_and_warns_once(monkeypatch, opt_out):
    monkeypatch.setattr(sandbox, "_isolation_failure", lambda: "the kernel said no")
    monkeypatch.setattr(sandbox, "_warn_unisolated", functools.cache(sandbox._warn_unisolated.__wrapped__))
    kwargs = {"isolation": "none"} if opt_out == "argument" else {}
    if opt_out == "environment":
        monkeypatch.setenv(sandbox.UNSAFE_ENV_VAR, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT namespace isolation"):
        assert run_python("print(6 * 7)", **kwargs).passed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run_python("print(6 * 7)", **kwargs).passed


def test_unknown_isolation_is_rejected():
    with pytest.raises(ValueError, match="isolation"):
        run_python("print(1)", isolation="docker")


# A made-up API update: math.floor gains a `step` argument.
IMPORTS = "import math\nold_floor = math.floor\nsetattr(math, 'old_floor', old_floor)"
IMPLEMENTATION = "def floor(x, step=1):\n    return old_floor(x / step) * step\n"
TESTS = [
    "def test_positive():\n    assert floor_to_tens([12, 27]) == [10, 20]\n",
    "def test_negative():\n    assert floor_to_tens([-1]) == [-10]\n",
]
USES_UPDATE = "import math\n\ndef floor_to_tens(values):\n    return [math.floor(v, step=10) for v in values]\n"
WRONG = "import math\n\ndef floor_to_tens(values):\n    return [math.floor(v) for v in values]\n"


def _check(solution, tests=TESTS, implementation=IMPLEMENTATION, path="math.floor", **kwargs):
    return run_python(build_program(IMPORTS, implementation, path, solution, tests, **kwargs))


def test_solution_using_the_update_passes_every_test():
    result = _check(USES_UPDATE)
    assert result.passed, result.stderr
    assert "passed 2 tests" in result.stdout


def test_solution_using_the_old_api_fails():
    result = _check(WRONG)
    assert not result.passed
    assert "failed test_positive" in result.stderr


def test_a_later_test_failure_is_caught():
    half = (
        "import math\n\ndef floor_to_tens(values):\n"
        "    return [math.floor(v, step=10) if v >= 0 else 0 for v in values]\n"
    )
    result = _check(half)
    assert not result.passed
    assert "failed test_negative" in result.stderr


def test_unit_tests_as_one_string():
    result = _check(USES_UPDATE, tests="\n\n".join(TESTS))
    assert result.passed and "passed 2 tests" in result.stdout


def test_solution_that_does_not_parse_fails_without_raising_here():
    result = _check("def floor_to_tens(values) return []")
    assert not result.passed
    assert "SyntaxError" in result.stderr and "solution failed to load" in result.stderr


def test_solution_exit_is_a_failure_and_its_main_block_does_not_run():
    assert not _check("import sys\nsys.exit(0)\n").passed
    demo = USES_UPDATE + "\nif __name__ == '__main__':\n    raise SystemExit(input())\n"
    assert _check(demo).passed


@pytest.mark.parametrize("cheat", [
    "import os\nos._exit(0)\n",
    "import sys\nsys.exit = lambda *args: None\n",
    "import os, sys\nsys.exit = lambda *args: os._exit(0)\n",
    "import atexit, os\natexit.register(os._exit, 0)\n",
    "print('SANDBOX: passed 2 tests')\n",
], ids=["os._exit(0)", "sys.exit-does-nothing", "sys.exit-is-os._exit(0)", "atexit-os._exit(0)", "pass-line"])
def test_a_wrong_solution_cannot_fake_a_pass(cheat):
    assert not _check(WRONG).passed
    result = _check(cheat + WRONG)
    assert not result.passed, result


def test_renamed_function():
    renamed = "def floor_step(x, step=1):\n    return old_floor(x / step) * step\n"
    solution = "import math\n\ndef floor_to_tens(values):\n    return [math.floor_step(v, 10) for v in values]\n"
    old_gone = TESTS + ["def test_old_name_gone():\n    import math\n    assert not hasattr(math, 'floor')\n"]
    assert _check(solution, old_gone, renamed, update_type="modify-function-name").passed
    assert not _check(solution, old_gone, renamed).passed  # a new function is added beside the old one
    assert _check(solution, TESTS, renamed).passed


def test_patching_a_class_attribute():
    implementation = "def encode(self, o):\n    return 'patched'\n"
    solution = "import json\n\ndef dump(x):\n    return json.JSONEncoder().encode(x)\n"
    tests = ["def test_patched():\n    assert dump(1) == 'patched'\n"]
    assert _check(solution, tests, implementation, path="json.JSONEncoder.encode").passed


def test_build_program_rejects_unusable_records():
    with pytest.raises(ValueError, match="no test"):
        build_program(IMPORTS, IMPLEMENTATION, "math.floor", USES_UPDATE, ["def helper():\n    pass\n"])
    with pytest.raises(ValueError, match="dotted"):
        build_program(IMPORTS, IMPLEMENTATION, "floor", USES_UPDATE, TESTS)
    two = "def a():\n    pass\n\ndef b():\n    pass\n"
    with pytest.raises(ValueError, match="replaces"):
        build_program(IMPORTS, two, "math.floor", USES_UPDATE, TESTS)
