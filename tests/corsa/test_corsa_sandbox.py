import os
import socket
import textwrap
import time
from pathlib import Path

import pytest

from lit_corsa import sandbox
from lit_corsa.sandbox import build_program, run_python


def test_passing_program():
    result = run_python("print(6 * 7)")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.stdout.strip() == "42"


def test_failing_assertion():
    result = run_python("assert 1 + 1 == 3, 'arithmetic'")
    assert not result.passed and result.returncode == 1 and not result.timed_out
    assert "AssertionError: arithmetic" in result.stderr


def test_infinite_loop_times_out():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1)
    assert result.timed_out and not result.passed
    assert time.monotonic() - start < 10


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


def test_background_children_are_killed_after_the_run():
    code = "import subprocess\nprint(subprocess.Popen(['sleep', '60']).pid)"
    result = run_python(code)
    assert result.passed
    pid = int(result.stdout)
    time.sleep(0.2)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z")  # a zombie is dead, only not yet reaped by init


def test_process_count_is_limited():
    if os.geteuid() == 0:
        pytest.skip("the kernel never applies RLIMIT_NPROC to uid 0 (also when a user namespace maps it to 0)")
    code = textwrap.dedent("""
        import os, time
        made = 0
        for _ in range(100):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            made += 1
        print(made)
    """)
    result = run_python(code, timeout_s=20, max_processes=8)
    assert result.passed
    assert int(result.stdout) <= 8


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


@pytest.mark.parametrize("namespace", [True, False], ids=["with-unshare", "socket-patch-only"])
def test_network_access_fails(listener, monkeypatch, namespace):
    if namespace and sandbox._unshare_command() is None:
        pytest.skip("unprivileged network namespaces are not available here")
    if not namespace:
        monkeypatch.setattr(sandbox, "_unshare_command", lambda: None)
    port = listener.getsockname()[1]
    for code in (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port})).sendall(b'hi')",
        f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))",
        f"import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', {port}))",
        "import socket\nsocket.getaddrinfo('example.org', 80)",
    ):
        result = run_python(code)
        assert not result.passed, code
        assert not _connected(listener), code
    assert run_python("import socket\na, b = socket.socketpair()\na.sendall(b'x')\nassert b.recv(1) == b'x'").passed


_CTYPES_CONNECT = """
import ctypes, struct
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.socket(2, 1, 0)
address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)
print(libc.connect(fd, address, len(address)))
"""


def test_network_namespace_stops_what_the_socket_patch_cannot(listener, monkeypatch):
    if sandbox._unshare_command() is None:
        pytest.skip("unprivileged network namespaces are not available here")
    code = _CTYPES_CONNECT.format(port=listener.getsockname()[1])
    inside = run_python(code)
    assert inside.passed and inside.stdout.strip() == "-1"
    assert not _connected(listener)
    # without the namespace, raw libc calls go around the patched socket module: best effort only
    monkeypatch.setattr(sandbox, "_unshare_command", lambda: None)
    outside = run_python(code)
    assert outside.stdout.strip() == "0"
    assert _connected(listener)


# A made-up API update: math.floor gains a `step` argument.
IMPORTS = "import math\nold_floor = math.floor\nsetattr(math, 'old_floor', old_floor)"
IMPLEMENTATION = "def floor(x, step=1):\n    return old_floor(x / step) * step\n"
TESTS = [
    "def test_positive():\n    assert floor_to_tens([12, 27]) == [10, 20]\n",
    "def test_negative():\n    assert floor_to_tens([-1]) == [-10]\n",
]
USES_UPDATE = "import math\n\ndef floor_to_tens(values):\n    return [math.floor(v, step=10) for v in values]\n"


def _check(solution, tests=TESTS, implementation=IMPLEMENTATION, path="math.floor", **kwargs):
    return run_python(build_program(IMPORTS, implementation, path, solution, tests, **kwargs))


def test_solution_using_the_update_passes_every_test():
    result = _check(USES_UPDATE)
    assert result.passed, result.stderr
    assert "passed 2 tests" in result.stdout


def test_solution_using_the_old_api_fails():
    old = "import math\n\ndef floor_to_tens(values):\n    return [math.floor(v) for v in values]\n"
    result = _check(old)
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
