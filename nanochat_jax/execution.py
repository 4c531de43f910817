"""Run model-written Python in a separate process with limits (nanochat's execution.py).

Used by HumanEval: the generated program plus the task's tests run; success iff nothing raises.

NOT A SECURITY SANDBOX. As in nanochat (and OpenAI's human-eval), the limits only stop honest
mistakes of a small model: a time limit, a memory limit, no stdin, and the destructive functions
of `os`/`shutil`/`subprocess` set to None. The network is reachable, files outside the temporary
working directory can still be written, and a determined program can undo the guard. Do not run
untrusted code with it outside a disposable machine or container.

Each program runs in a fresh interpreter (this file executed as a script with `python -I -B`:
isolated from PYTHON* variables and the user's site-packages), started by fork+exec from the
parent. Plain fork is unsafe in a parent running JAX threads, and multiprocessing's
spawn/forkserver children re-import the parent's `__main__` (for `python -m scripts.chat_eval`
that is JAX itself: seconds per program, eaten out of the time limit, and over the 256 MiB
address-space limit), so neither is used. The child imports only the standard library; startup
costs ~20 ms.

Protocol: the parent writes a JSON request (code, timeout, memory limit, a random nonce) to the
child's stdin; the child keeps the nonce in a local variable only (not in the request, the
globals or the program's namespace), keeps a private copy of its stdout for the JSON result,
points file descriptors 0/1/2 at /dev/null (so a program writing to fd 1 cannot corrupt the
result), captures sys.stdout/stderr in memory, and runs the code with `exec` under the guard. The
result echoes the nonce, and the parent counts a result without it as a failure: a program that
writes its own "success" JSON to the result descriptor and exits cannot pass a test that way (a
program that walks the interpreter's frames to find the nonce still can; see above). The parent
kills the child if it is still alive `timeout + 1` s after the start (nanochat's join timeout),
and deletes the working directory itself: the guard leaves the child without `rmtree`/`unlink`.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

DEFAULT_MEMORY_BYTES = 256 * 1024 * 1024

# What the guard sets to None (nanochat's list): process control, file removal and renaming,
# permissions, changing or reading the working directory.
_DISABLED_OS = (
    "kill system putenv remove removedirs rmdir fchdir setuid fork forkpty killpg rename renames "
    "truncate replace unlink fchmod fchown chmod chown chroot lchflags lchmod lchown getcwd chdir"
).split()
_DISABLED_SHUTIL = ("rmtree", "move", "chown")
_BLOCKED_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


@dataclass
class ExecutionResult:
    """The outcome of one program. stdout/stderr: what it printed through sys.stdout/stderr."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False

    def __repr__(self) -> str:
        shown = [f"success={self.success}"]
        shown += [f"{k}={v!r}" for k, v in asdict(self).items() if k != "success" and v]
        return f"ExecutionResult({', '.join(shown)})"


def _failure(error: str, *, timeout: bool = False) -> ExecutionResult:
    return ExecutionResult(success=False, stdout="", stderr="", error=error, timeout=timeout)


def execute_code(
    code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = DEFAULT_MEMORY_BYTES
) -> ExecutionResult:
    """Run `code` in a fresh Python process with a `timeout` (seconds) and an address-space
    limit (`maximum_memory_bytes`, None = no limit); see the module docstring for what is and
    is not guarded. Safe to call from many threads at once."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if maximum_memory_bytes is not None and maximum_memory_bytes < 16 * 1024 * 1024:
        raise ValueError(
            f"maximum_memory_bytes must be None or >= 16 MiB (the interpreter itself needs "
            f"that much), got {maximum_memory_bytes!r}"
        )
    nonce = secrets.token_hex(16)
    request = {"code": code, "timeout": timeout, "memory": maximum_memory_bytes, "nonce": nonce}
    workdir = tempfile.mkdtemp(prefix="nanochat_exec_")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=workdir,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # its own process group: a kill reaches anything it started
        )
        try:
            out, _ = proc.communicate(json.dumps(request).encode(), timeout=timeout + 1)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return _failure("Execution timed out (process killed)", timeout=True)
        return _parse_result(out, nonce, proc.returncode)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _parse_result(out: bytes, nonce: str, returncode: int | None) -> ExecutionResult:
    """The child's result, or a failure when it is not one result carrying this run's nonce
    (nothing came back, or the program wrote its own)."""
    try:
        fields = json.loads(out)
        echoed = fields.pop("nonce") if isinstance(fields, dict) else None
        if isinstance(echoed, str) and secrets.compare_digest(echoed, nonce):
            return ExecutionResult(**fields)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        pass
    return _failure(f"Execution failed (result forged or missing, exit code {returncode})")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, 9)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def execute_many(
    codes: Sequence[str],
    timeout: float = 5.0,
    maximum_memory_bytes: int | None = DEFAULT_MEMORY_BYTES,
    max_workers: int | None = None,
) -> list[ExecutionResult]:
    """`execute_code` for each program, at most `max_workers` processes at a time (default: one
    per CPU core; more would make the wall-clock time limits unfair). Results in input order."""
    if max_workers is None:
        max_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        max_workers = max_workers or os.cpu_count() or 1
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    if not codes:
        return []
    # Threads only wait on their child processes, so the GIL is no bottleneck.
    with ThreadPoolExecutor(max_workers=min(max_workers, len(codes))) as pool:
        return list(pool.map(lambda c: execute_code(c, timeout, maximum_memory_bytes), codes))


# ---- the child -----------------------------------------------------------------------------


class _TimeoutException(Exception):
    pass


class _NoInput(io.StringIO):
    """stdin for the program: any read raises (nanochat's WriteOnlyStringIO)."""

    def read(self, *args, **kwargs):
        raise OSError("stdin is not readable in the sandbox")

    readline = readlines = read

    def readable(self) -> bool:
        return False


def _lower_limit(resource, kind: int, limit: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(kind, (limit, limit))


def _reliability_guard(maximum_memory_bytes: int | None) -> None:
    """nanochat's guard: memory limits, then the destructive functions disabled."""
    import builtins
    import faulthandler
    import platform

    if maximum_memory_bytes is not None:
        import resource

        _lower_limit(resource, resource.RLIMIT_AS, maximum_memory_bytes)
        _lower_limit(resource, resource.RLIMIT_DATA, maximum_memory_bytes)
        if platform.uname().system != "Darwin":
            _lower_limit(resource, resource.RLIMIT_STACK, maximum_memory_bytes)
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in _DISABLED_OS:
        setattr(os, name, None)
    for name in _DISABLED_SHUTIL:
        setattr(shutil, name, None)
    subprocess.Popen = None
    for name in _BLOCKED_MODULES:
        sys.modules[name] = None  # a later `import name` raises ImportError


def _run_guarded(code: str, timeout: float, maximum_memory_bytes: int | None) -> dict:
    import contextlib
    import signal

    def on_alarm(signum, frame):
        raise _TimeoutException("Timed out!")

    result = {"success": False, "stdout": "", "stderr": "", "error": None}
    result |= {"timeout": False, "memory_exceeded": False}
    stdout, stderr = io.StringIO(), io.StringIO()
    _reliability_guard(maximum_memory_bytes)
    try:
        signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                sys.stdin = _NoInput()
                exec(code, {})
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        result["success"] = True
    except _TimeoutException:
        result |= {"timeout": True, "error": "Execution timed out"}
    except MemoryError as e:
        result |= {"memory_exceeded": True, "error": f"Memory limit exceeded: {e}"}
    except BaseException as e:  # noqa: BLE001  (SystemExit, KeyboardInterrupt: the program's)
        result["error"] = f"{type(e).__name__}: {e}"
    result["stdout"], result["stderr"] = stdout.getvalue(), stderr.getvalue()
    return result


def _child_main() -> None:
    request = json.loads(sys.stdin.buffer.read())
    # The nonce lives only in this frame's locals from here on; the program's namespace, the
    # request and the result dict it could reach never hold it.
    nonce = request.pop("nonce")
    exit_now = os._exit
    os._exit = None  # the program cannot end the child early through os._exit
    result_fd = os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    try:
        result = _run_guarded(request["code"], request["timeout"], request["memory"])
    except BaseException as e:  # noqa: BLE001  (e.g. a timeout landing after exec returned)
        result = {"success": False, "stdout": "", "stderr": "", "error": f"{type(e).__name__}"}
    # Memory may be exhausted; the result is small, and a failure here reads as "no result".
    data = json.dumps({**result, "nonce": nonce}, default=str).encode()
    while data:
        data = data[os.write(result_fd, data) :]
    exit_now(0)  # skip interpreter shutdown: the program may have left threads or broken state


if __name__ == "__main__":
    _child_main()
