"""Running model-generated Python in a sandbox, and composing CodeUpdateArena-style check programs.

Pass@k on code updates means executing programs a model wrote. ``run_python`` never runs them in this
process: each program runs in a fresh ``python -I`` (isolated mode: no PYTHONPATH, no user site, no
current directory on ``sys.path``), with a scrubbed environment (no tokens, single-threaded BLAS),
under resource limits, and by default inside fresh Linux namespaces. The imports and updated API
implementations that ``build_program`` takes from the dataset are part of the same program, so
dataset-supplied code runs under exactly the same rules as the model's solution.

What decides a pass. A pass means the program ran to its last line: the child is split in two by a
bootstrap before any program code runs. A supervisor (PID 1 of the sandbox) makes a random nonce and
forks; the fork runs the program as ``__main__`` and, only if that returns normally, writes the nonce
to a pipe the supervisor holds. The supervisor then reports "exit status, nonce seen or not" to the
trainer on a pipe the program's process has closed (and cannot reopen through ``/proc``: the
supervisor is not dumpable). ``passed`` = nonce seen, exit status 0, not timed out. So ``os._exit(0)``,
``sys.exit(0)``/``exit()``/``SystemExit``, killing itself, killing the supervisor, or printing
"SANDBOX: passed" never pass. What remains forgeable: the nonce sits in the memory of the interpreter
that runs the program (that is what lets it report a normal end), so code that deliberately digs it
out of the bootstrap's frames, or that rewrites the harness's own names, can fake a pass. This stops
accidental and naive programs, not one written to cheat this harness.

Isolation (``isolation="namespaces"``, the default). The program runs in new mount, PID, network and
IPC namespaces, set up by a small privileged stage before any program code runs:

- identity: when the trainer is root, the program runs as the unprivileged ``nobody`` (uid/gid 65534,
  no supplementary groups) inside its own user namespace, with no capabilities and ``no_new_privs``.
  (A user namespace alone is not enough for root: an unmapped process keeps its real uid 0 for file
  ownership checks.) When the trainer is not root, the namespaces are made in a user namespace that
  maps the trainer's uid to 0, and every capability is dropped before the program starts; the
  program then keeps the trainer's uid and groups for file permissions (a user cannot drop them);
- files: the program sees the host's file tree read-only, except its working directory (a fresh
  temporary directory, also ``HOME`` and ``TMPDIR``) and a fresh ``/tmp`` and ``/dev/shm`` (in memory,
  ``memory_mb`` each at most). The project tree (the directory holding the ``lit_corsa`` package), the
  trainer's working and home directories, and ``/run`` (daemon sockets) are hidden under empty file
  systems; the interpreter's own directories (``sys.prefix``, ``sys.base_prefix``, stdlib,
  site-packages), wherever they live, are shown again read-only so that the venv's packages (numpy,
  torch) import. Other files on the host stay readable as far as the program's uid may read them;
  nothing else is writable. The program may make namespaces of its own, but the kernel locks the
  mounts it inherits there: it cannot unmount what hides the project nor make anything writable;
- processes: the program sees only its own PID namespace (a fresh ``/proc``), so it cannot see or
  signal the trainer, nor read its environment. When the supervisor ends, the kernel kills every
  process left in the namespace, so double-forked or ``setsid`` children die with the run; the whole
  tree is also killed on timeout, and when the trainer itself dies (parent-death signals);
- network: an empty network namespace (not even a loopback up), which no Python trick leaves;
- ``RLIMIT_NPROC`` caps the tasks (processes and threads) to ``max_processes`` (+1 for the
  supervisor); it is counted per user namespace, so only this run's tasks count, and it holds for a
  root trainer because the program's uid is not root.

This needs util-linux ``unshare`` and ``setpriv``, Linux >= 5.12 (``mount_setattr``), and the right to
create those namespaces (root with ``CAP_SYS_ADMIN``, or unprivileged user namespaces). It is probed
once per process by running a tiny program through it; when it fails, ``run_python`` raises
``SandboxUnavailable`` instead of running anything with weaker guards. It is no defence against
kernel exploits: for code written to attack the host, use a VM.

Weaker guards only (``isolation="none"`` or ``LIT_EDITQ_UNSAFE_SANDBOX=1``, warned about once per
process): the same bootstrap, limits, scrubbed environment and pass rule, but no namespaces. Then
the program runs as the trainer's user and can read and write what it can, see and signal its
processes; children that leave the process group (``setsid``) survive the run; the network block
is only a patch of Python's ``socket`` module, which ``ctypes`` or a subprocess go around; and
``RLIMIT_NPROC`` counts every task of the user (the cap is "what the user runs now" plus
``max_processes``) and does nothing for root.

Resource limits (both modes), set in the child by the bootstrap rather than through ``preexec_fn``,
which is unsafe when the caller has threads (a trainer does): address space (``memory_mb``), CPU
seconds, no core dumps, output/file size (``max_output_mb``), processes; plus a wall-clock timeout.
The address-space default (:data:`DEFAULT_MEMORY_MB`) is sized for the real benchmark's programs:
``import torch`` alone maps about 1 GB (it fails under 512 MB), and CodeUpdateArena's own harness sets
no memory limit at all.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from data.code_update import join_solution, replacing_function, test_function_names
from data.formats import ProgramTest

UNSAFE_ENV_VAR = "LIT_EDITQ_UNSAFE_SANDBOX"
DEFAULT_MEMORY_MB = 4096  # address space: room for ``import torch`` (~1 GB mapped) and the tensors a test makes
NOBODY = 65534  # the kernel's overflow uid/gid, "nobody"/"nogroup" on Debian-like systems

# Stage 1, privileged, PID 1 of the new PID namespace, before any program code runs: build the file
# tree the program will see under a staging directory, make it its root, then exec the privilege drop.
# argv[1] is the JSON plan that ``_mount_plan`` writes.
_SETUP = r"""
import ctypes, json, os, sys

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC = 2, 4, 8, 4096, 16384
MNT_DETACH, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 2, -100, 0x8000, 1
SYS_MOUNT_SETATTR = 442  # the same number on every architecture (syscalls added since Linux 5.1 share one table)
libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def check(result, what):
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


def encode(text):
    return None if text is None else text.encode()


def mount(source, target, fstype=None, flags=0, options=None):
    os.makedirs(target, exist_ok=True)
    check(libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(options)),
          f"mount {source} on {target}")


def set_readonly(target, readonly, recursive):
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY if readonly else 0, attr_clr=0 if readonly else MOUNT_ATTR_RDONLY)
    check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), target.encode(),
                       ctypes.c_long(AT_RECURSIVE if recursive else 0), ctypes.byref(attr),
                       ctypes.c_long(ctypes.sizeof(attr))),
          f"mount_setattr {target}")


def path_depth(path):
    return len([part for part in path.split("/") if part])


def build_root(plan):
    # Directories made in the new empty file systems must be traversable by the unprivileged program.
    os.umask(0o022)
    root = plan["root"]
    mount("/", root, flags=MS_BIND | MS_REC)
    # Shallow first, so a directory kept inside a hidden one is shown again, and hidden again below it.
    for kind, path in sorted(plan["mounts"], key=lambda op: (path_depth(op[1]), op[0] == "bind")):
        if kind == "hide":
            mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
        elif kind == "scratch":
            mount("tmpfs", root + path, "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={plan['scratch_mb']}m")
        else:
            mount(path, root + path, flags=MS_BIND | MS_REC)
    set_readonly(root, True, recursive=True)
    for kind, path in plan["mounts"]:
        if kind == "scratch" or path == plan["workdir"]:
            set_readonly(root + path, False, recursive=False)
    mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    # The staging tree becomes the root, and the old root leaves this mount namespace altogether.
    os.chdir(root)
    check(libc.pivot_root(b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "unmount the old root")
    os.chdir(plan["workdir"])


plan = json.loads(sys.argv[1])
try:
    build_root(plan)
except OSError as error:
    sys.exit(f"sandbox setup failed: {error}")
os.execv(plan["exec"][0], plan["exec"])
"""

# Stage 2, unprivileged: the resource limits, then a supervisor that forks the program and reports how
# it ended on the trainer's report pipe (see the module docstring for why a pass needs the nonce).
_BOOTSTRAP = r"""
import ctypes, os, resource, sys
_mem, _cpu, _fsize, _nproc, _report = (int(v) for v in sys.argv[1:6])
_program = sys.argv[6]


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


def _set_dumpable(dumpable):
    # A non-dumpable process's /proc/<pid>/fd cannot be opened by others of the same uid.
    ctypes.CDLL(None).prctl(4, int(dumpable), 0, 0, 0)  # PR_SET_DUMPABLE


def _block_network():
    # Best effort in Python; without namespaces, ctypes or a subprocess go around it.
    import _socket, socket

    def no_network(*args, **kwargs):
        raise OSError("network access is disabled in the sandbox")

    raw_socket = _socket.socket

    class NoRawSocket(raw_socket):
        # socket.socket.__init__ calls _socket.socket.__init__ by name, so this also guards socket.socket.
        # Wrapping an existing descriptor (socketpair, accept) is local; creating a new socket is not.
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None:
                no_network()
            raw_socket.__init__(self, family, type, proto, fileno)

    _socket.socket = _socket.SocketType = NoRawSocket
    for module in (socket, _socket):
        for name in ("create_connection", "create_server", "fromfd", "getaddrinfo", "getnameinfo",
                     "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
            if hasattr(module, name):
                setattr(module, name, no_network)


def _run_program(verdict_fd, nonce):
    # Only a normal return of the whole program writes the nonce: exit(), os._exit() and signals do not.
    # (Output that cannot be flushed at exit still fails the run: the exit status is then 120.)
    import runpy
    _block_network()
    sys.argv = [_program]
    runpy.run_path(_program, run_name="__main__")
    os.write(verdict_fd, nonce)


def _supervise(child, verdict_fd, nonce):
    # Reap until the program ends (orphans are re-parented here when this is PID 1), then report.
    while True:
        pid, status = os.wait()
        if pid == child:
            break
    os.set_blocking(verdict_fd, False)
    try:
        verdict = os.read(verdict_fd, 2 * len(nonce))
    except BlockingIOError:
        verdict = b""
    os.write(_report, b"%d %d\n" % (os.waitstatus_to_exitcode(status), verdict == nonce))


def _main():
    # SIGINT ends the supervisor (so the run fails) whatever the launching shell left: a background job
    # inherits SIGINT ignored, and a program that signals its supervisor must not pass in one place and
    # fail in another.
    import signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    nonce = os.urandom(16).hex().encode()
    verdict_r, verdict_w = os.pipe()
    _set_dumpable(False)
    child = os.fork()
    if child:
        os.close(verdict_w)
        _supervise(child, verdict_r, nonce)
    else:
        _set_dumpable(True)
        os.close(_report)
        os.close(verdict_r)
        _run_program(verdict_w, nonce)


_main()
"""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run; ``timed_out`` covers both the wall-clock and the CPU limit.

    ``passed``: the program ran to its last line (see the module docstring), exited with status 0 and
    in time. ``returncode``: the program's exit status, negative for a signal as in ``subprocess``; when
    the sandbox itself failed or was killed, the status of its outermost process.
    """

    passed: bool
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool


class SandboxUnavailable(RuntimeError):
    """Namespace isolation cannot be had here, and the caller did not opt out of it."""


def _clean_env(home: str) -> dict[str, str]:
    """The program's whole environment: nothing of the trainer's (tokens, PYTHONPATH) leaks in."""
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


def _kill_group(pgid: int) -> None:
    """SIGKILL a process group that may be gone already."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _hidden_dirs() -> list[str]:
    """What the program must not reach: the project tree, the trainer's working and home directories,
    and ``/run``, where daemons keep their sockets (``docker.sock`` is root on the host to a trainer in
    the ``docker`` group, whose groups a program started by a non-root trainer keeps)."""
    project = Path(__file__).resolve().parent.parent
    candidates = {str(project), os.getcwd(), str(Path.home()), "/run"}
    return sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)} - {"/"})


def _interpreter_dirs() -> list[str]:
    """What the program's interpreter needs to start and import the venv's packages."""
    paths = sysconfig.get_paths()
    candidates = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable)),
                  *(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib"))]
    return sorted({os.path.realpath(path) for path in candidates if os.path.isdir(path)})


def _mount_plan(stage: str, workdir: str, scratch_mb: int, exec_argv: list[str]) -> str:
    """The JSON plan ``_SETUP`` follows: what to hide, what to show again, where the program runs."""
    hidden = _hidden_dirs()
    scratch = [os.path.realpath(path) for path in ("/tmp", "/dev/shm") if os.path.isdir(path)]
    covered = hidden + scratch
    # Only what lies under a hidden or scratch directory needs showing again; the rest is in view already.
    kept = [path for path in _interpreter_dirs() + [workdir]
            if any(Path(path).is_relative_to(cover) for cover in covered)]
    mounts = ([("hide", path) for path in hidden] + [("scratch", path) for path in scratch]
              + [("bind", path) for path in kept])
    if workdir not in kept:  # a working directory in plain view still needs its own writable mount
        mounts.append(("bind", workdir))
    return json.dumps({"root": stage, "workdir": workdir, "scratch_mb": scratch_mb, "mounts": mounts,
                       "exec": exec_argv})


def _give_to_nobody(*paths: str | Path) -> None:
    """A root trainer's program runs as nobody: it must own its working directory and read its program."""
    for path in paths:
        try:
            os.chown(path, NOBODY, NOBODY)
        except OSError as error:
            raise OSError(error.errno, f"cannot give {path} to uid {NOBODY} (nobody): {error.strerror}") from error


def _tool(name: str) -> str:
    """Absolute path of a util-linux tool, looked up once here: the program's PATH is minimal."""
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} (util-linux) not found on PATH")
    return path


def _isolated_command(stage: str, workdir: str, scratch_mb: int, bootstrap: list[str]) -> list[str]:
    """``bootstrap`` wrapped in namespaces: see the module docstring for what each step is for."""
    setpriv, unshare = _tool("setpriv"), _tool("unshare")
    # --pdeathsig=keep: a change of uid clears the parent-death signal that --kill-child set.
    no_privileges = ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--pdeathsig=keep"]
    if os.geteuid() == 0:
        # Real root sets up the mounts, then becomes nobody in a user namespace of its own.
        as_user = []
        drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *no_privileges,
                "--", unshare, "--user", "--map-current-user"]
    else:
        # The trainer's uid is root of a new user namespace while setting up, then loses every capability.
        as_user = ["--user", "--map-root-user"]
        drop = [setpriv, *no_privileges]
    plan = _mount_plan(stage, workdir, scratch_mb, drop + ["--", *bootstrap])
    namespaces = [unshare, *as_user, "--mount", "--pid", "--net", "--ipc", "--fork", "--kill-child"]
    # The outer setpriv makes the whole sandbox die with the trainer.
    return [setpriv, "--pdeathsig=KILL", "--", *namespaces, "--", sys.executable, "-I", "-S", "-c", _SETUP, plan]


def _read_report(fd: int) -> Optional[tuple[int, bool]]:
    """The supervisor's "exit status, nonce seen" line, or None if it never wrote a well-formed one."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, 64)
    except BlockingIOError:
        return None
    match = re.fullmatch(rb"(-?\d+) ([01])\n", data)
    return (int(match[1]), match[2] == b"1") if match else None


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_until_gone(pids: list[int], limit_s: float = 5.0) -> None:
    """Until each process has exited (a zombie has). A PID namespace's init turns into one only after the
    kernel has killed and reaped every process left in its namespace, so this waits for the whole tree."""
    deadline = time.monotonic() + limit_s
    for pid in pids:
        while time.monotonic() < deadline:
            try:
                if Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z":
                    break
            except OSError:
                break
            time.sleep(0.005)


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait for ``proc`` at most ``timeout_s``, then kill its process group; True if it timed out.

    The sandbox's PID 1 (``unshare``'s child) may outlive ``unshare`` by the moments the kernel takes to
    kill the rest of its namespace, so the run is over only when it is gone too."""
    try:
        proc.wait(timeout=timeout_s)
        return False
    except subprocess.TimeoutExpired:
        return True
    finally:
        namespace_init = _children(proc.pid)
        # Also after a normal end: without namespaces, background children would live on.
        _kill_group(proc.pid)
        proc.wait()
        _wait_until_gone(namespace_init)


def _execute(code: str, timeout_s: float, memory_mb: int, max_processes: int, max_output_mb: int,
             isolated: bool) -> SandboxResult:
    """One run, limits already checked: the program in a fresh working directory, its output in files."""
    output_bytes = max_output_mb * 2**20
    # Inside a fresh user namespace RLIMIT_NPROC counts that namespace's tasks only (+1: the supervisor).
    tasks = max_processes + 1 if isolated else _tasks_of_current_user() + max_processes
    limits = [memory_mb * 2**20, max(1, math.ceil(timeout_s)), output_bytes, tasks]
    # ``stage``: the empty directory where an isolated run assembles the file tree it will see as its root.
    with (tempfile.TemporaryDirectory(prefix="corsa-sandbox-") as workdir,
          tempfile.TemporaryDirectory(prefix="corsa-root-") as stage,
          tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err):
        workdir, stage = os.path.realpath(workdir), os.path.realpath(stage)
        program = Path(workdir, "main.py")
        program.write_text(code, encoding="utf-8")
        if isolated and os.geteuid() == 0:
            _give_to_nobody(workdir, program)
        report_r, report_w = os.pipe()
        try:
            bootstrap = [sys.executable, "-I", "-X", "utf8", "-c", _BOOTSTRAP, *map(str, limits), str(report_w),
                         str(program)]
            command = _isolated_command(stage, workdir, memory_mb, bootstrap) if isolated else bootstrap
            proc = subprocess.Popen(command, cwd=workdir, env=_clean_env(workdir), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, start_new_session=True, pass_fds=(report_w,))
        finally:
            os.close(report_w)  # the child has its own copy: EOF once every holder is gone
        try:
            timed_out = _wait(proc, timeout_s)
            report = _read_report(report_r)
        finally:
            os.close(report_r)
        returncode, completed = report if report else (proc.returncode, False)
        timed_out = timed_out or returncode == -signal.SIGXCPU
        out.seek(0)
        err.seek(0)
        stdout = out.read(output_bytes).decode("utf-8", errors="replace")
        stderr = err.read(output_bytes).decode("utf-8", errors="replace")
    return SandboxResult(completed and returncode == 0 and not timed_out, returncode, stdout, stderr, timed_out)


@functools.cache
def _isolation_failure() -> Optional[str]:
    """Why namespace isolation does not work here, or None: probed once per process with a tiny program."""
    try:
        probe = _execute("print('ok')", timeout_s=10, memory_mb=256, max_processes=4, max_output_mb=1,
                         isolated=True)
    except OSError as error:
        return str(error)
    if probe.passed and probe.stdout == "ok\n":
        return None
    detail = probe.stderr.strip()[-2000:] or "no error output"
    return f"a test program did not run (exit status {probe.returncode}): {detail}"


@functools.cache
def _warn_unisolated() -> None:
    """Once per process: running without isolation is a choice the log should show."""
    warnings.warn("run_python runs generated code WITHOUT namespace isolation (isolation='none' or "
                  f"{UNSAFE_ENV_VAR}=1): only resource limits, a scrubbed environment and a socket patch "
                  "guard the host", RuntimeWarning, stacklevel=3)


def run_python(
    code: str,
    timeout_s: float = 10,
    memory_mb: int = DEFAULT_MEMORY_MB,
    *,
    max_processes: int = 32,
    max_output_mb: int = 16,
    isolation: Optional[str] = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed ``python -I`` child (see the module docstring).

    ``isolation``: ``"namespaces"`` (default) or ``"none"`` (weaker guards, warned about once); when not
    given, ``LIT_EDITQ_UNSAFE_SANDBOX=1`` in the environment means ``"none"``. Raises
    ``SandboxUnavailable`` when namespaces are asked for and do not work here.

    ``stdout``/``stderr`` go to files capped at ``max_output_mb`` by RLIMIT_FSIZE: a program printing
    forever fails with "File too large" instead of filling this process's memory.
    """
    limits = {"timeout_s": timeout_s, "memory_mb": memory_mb, "max_processes": max_processes,
              "max_output_mb": max_output_mb}
    for name, value in limits.items():
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{name} must be positive; got {value!r}")
    if isolation is None:
        isolation = "none" if os.environ.get(UNSAFE_ENV_VAR) == "1" else "namespaces"
    if isolation not in ("namespaces", "none"):
        raise ValueError(f"isolation must be 'namespaces' or 'none'; got {isolation!r}")
    if isolation == "none":
        _warn_unisolated()
    else:
        failure = _isolation_failure()
        if failure is not None:
            raise SandboxUnavailable(
                "refusing to run generated code: the sandbox's namespace isolation does not work here. "
                f"Probed by running a test program through util-linux unshare/setpriv; it failed: {failure}. "
                "It needs unshare and setpriv on PATH, Linux >= 5.12, and the right to create user, PID, "
                "mount and network namespaces (root with CAP_SYS_ADMIN, or unprivileged user namespaces). "
                f"To run with weaker guards instead, set {UNSAFE_ENV_VAR}=1 or pass isolation='none'.")
    return _execute(code, timeout_s, memory_mb, max_processes, max_output_mb, isolated=isolation == "namespaces")


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
    raise SystemExit(1)
globals().update((k, v) for k, v in _cua_namespace.items() if k != "__name__")
'''

_RUN_TESTS = '''
for _cua_test in {names!r}:
    try:
        globals()[_cua_test]()
    except BaseException:
        _cua_traceback.print_exc()
        print("SANDBOX: failed " + _cua_test, file=_cua_sys.stderr)
        raise SystemExit(1)
print("SANDBOX: passed {count} tests")
'''


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
    solution (with its own imports); the unit tests; then every ``test*`` function is called in order
    and the program exits with status 1 at the first failure (by ``raise SystemExit``, not ``sys.exit``,
    which a solution may have replaced). Each part runs once: ``imports`` (the dataset's
    ``prog_syn_imports``) hold ``old_floor = math.floor``, which must bind the original function; run
    again after the patch, it would alias the update and make it call itself. The patch precedes the
    solution so ``from math import floor`` inside it sees the update.

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
    test_names = test_function_names([tests_src])
    if not test_names:
        raise ValueError("no test function (def test...) in unit_tests: the check would pass vacuously")
    parent_path, _, old_name = function_path.rpartition(".")
    if not parent_path:
        raise ValueError(f"function_path must be dotted, like 'math.sin'; got {function_path!r}")
    new_name = replacing_function(implementation, function_path)
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


def run_solution(test: ProgramTest, body: str, timeout_s: float = 10.0,
                 memory_mb: int = DEFAULT_MEMORY_MB) -> SandboxResult:
    """Run a solution body (generated, or a reference's) against its unit tests with the API update patched
    in: the solution is its prelude (the reference's own imports), its header and ``body``."""
    solution = f"{test.solution_imports}\n{join_solution(test.solution_signature, body)}\n"
    program = build_program(test.imports, test.implementation, test.function_path, solution, test.unit_tests,
                            update_type=test.update_type)
    return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb)
