"""execution: results of good, failing, slow and greedy programs, the guard, parallel batches, and
that the parent process is left as it was."""

from __future__ import annotations

import os
import time

import pytest

from nanochat_jax import execution
from nanochat_jax.execution import ExecutionResult, execute_code, execute_many


def test_success_captures_stdout_and_stderr():
    result = execute_code("import sys\nprint('hello')\nprint('oops', file=sys.stderr)\nx = 1 + 1")
    assert result.success and result.error is None
    assert result.stdout == "hello\n" and result.stderr == "oops\n"
    assert not result.timeout and not result.memory_exceeded


def test_exception_and_syntax_error():
    result = execute_code("print('before')\nassert 1 == 2, 'math is broken'")
    assert not result.success and result.error == "AssertionError: math is broken"
    assert result.stdout == "before\n"  # output up to the failure is kept
    result = execute_code("def f(:\n    pass")
    assert not result.success and result.error.startswith("SyntaxError")


def test_humaneval_style_program():
    program = (
        "from typing import List\n\n"
        "def add(xs: List[int]) -> int:\n    return sum(xs)\n\n"
        "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n\n"
        "check(add)\n"
    )
    assert execute_code(program).success
    assert not execute_code(program.replace("sum(xs)", "sum(xs) + 1")).success


def test_infinite_loop_times_out():
    start = time.perf_counter()
    result = execute_code("while True:\n    pass", timeout=1.0)
    elapsed = time.perf_counter() - start
    assert result.timeout and not result.success
    assert result.error == "Execution timed out"  # the child's own alarm fired
    assert elapsed < 2.0 + 1.0


def test_hard_kill_when_the_alarm_is_ignored():
    # A program that swallows the timeout exception is killed by the parent at timeout + 1 s.
    program = (
        "while True:\n"
        "    try:\n        while True:\n            pass\n"
        "    except BaseException:\n        pass"
    )
    start = time.perf_counter()
    result = execute_code(program, timeout=0.3)
    elapsed = time.perf_counter() - start
    assert result.timeout and result.error == "Execution timed out (process killed)"
    assert 1.2 < elapsed < 4.0


def test_memory_blowup_is_stopped():
    result = execute_code("x = bytearray(1024 * 1024 * 1024)\nprint('allocated')")
    assert result.memory_exceeded and not result.success
    assert result.error.startswith("Memory limit exceeded")
    assert "allocated" not in result.stdout
    # The same program passes with the limit off (nothing is really written to the buffer).
    assert execute_code("x = bytearray(300 * 1024 * 1024)", maximum_memory_bytes=None).success


@pytest.mark.parametrize(
    "program, error",
    [
        ("import os\nos.system('echo hi')", "TypeError"),
        ("import os\nos.remove('x')", "TypeError"),
        ("import shutil\nshutil.rmtree('.')", "TypeError"),
        ("import subprocess\nsubprocess.Popen(['ls'])", "TypeError"),
        ("import resource", "ModuleNotFoundError"),
        ("exit(0)", "TypeError"),
        ("input()", "OSError"),
        ("import sys\nsys.stdin.read()", "OSError"),
    ],
)
def test_guard_disables_destructive_calls_and_stdin(program, error):
    result = execute_code(program)
    assert not result.success and result.error.startswith(error), result


def test_writing_to_fd_1_does_not_corrupt_the_result():
    result = execute_code("import os\nos.write(1, b'{garbage')\nprint('fine')")
    assert result.success and result.stdout == "fine\n"


def test_parent_state_untouched(tmp_path):
    cwd, environ = os.getcwd(), dict(os.environ)
    before = set(os.listdir(tmp_path.parent))
    program = (
        "import os\n"
        "print(os.readlink('/proc/self/cwd'))\n"  # os.getcwd is disabled
        "open('scratch.txt', 'w').write('x')\n"
        "os.putenv('A', 'B')"
    )
    result = execute_code(program)
    assert not result.success and result.error.startswith("TypeError")  # putenv is disabled
    workdir = result.stdout.strip()
    assert os.path.basename(workdir).startswith("nanochat_exec_")
    assert not os.path.exists(workdir)  # deleted with the file written there
    assert os.getcwd() == cwd and dict(os.environ) == environ
    assert callable(os.system) and callable(os.remove)
    assert not os.path.exists(os.path.join(cwd, "scratch.txt"))
    assert set(os.listdir(tmp_path.parent)) == before


def test_many_in_parallel_keep_order():
    programs = [f"print({i} * {i})" for i in range(24)]
    programs[5] = "raise ValueError('five')"
    programs[7] = "while True: pass"
    start = time.perf_counter()
    results = execute_many(programs, timeout=1.0, max_workers=4)
    elapsed = time.perf_counter() - start
    assert all(isinstance(r, ExecutionResult) for r in results)
    assert [r.stdout for i, r in enumerate(results) if i not in (5, 7)] == [
        f"{i * i}\n" for i in range(24) if i not in (5, 7)
    ]
    assert results[5].error == "ValueError: five" and results[7].timeout
    assert elapsed < 10.0
    assert execute_many([]) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="timeout"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="maximum_memory_bytes"):
        execute_code("pass", maximum_memory_bytes=1000)
    with pytest.raises(TypeError, match="code must be a str"):
        execute_code(b"pass")
    with pytest.raises(ValueError, match="max_workers"):
        execute_many(["pass"], max_workers=0)


def test_repr_shows_what_matters():
    assert repr(ExecutionResult(True, "", "")) == "ExecutionResult(success=True)"
    r = ExecutionResult(False, "", "", error="boom", timeout=True)
    assert repr(r) == "ExecutionResult(success=False, error='boom', timeout=True)"


_FORGED = b'{"success": true, "stdout": "", "stderr": ""}'
_WRONG_NONCE = _FORGED[:-1] + b', "nonce": "00"}'


@pytest.mark.parametrize(
    "program",
    [
        f"import os\nos.write(3, {_FORGED!r})\nos._exit(0)",
        f"import posix\nposix.write(3, {_FORGED!r})\nposix._exit(0)",  # os._exit's twin
        f"import os\nos.write(3, {_FORGED!r})\nraise SystemExit(0)",
        f"import os, posix\nos.write(3, {_WRONG_NONCE!r})\nposix._exit(0)",
    ],
)
def test_a_result_written_by_the_program_is_rejected(program):
    result = execute_code(program)
    assert not result.success, result
    assert not result.timeout and not result.memory_exceeded


def test_the_nonce_is_what_is_checked_and_the_program_cannot_see_it(monkeypatch):
    # With the nonce known, a forged result carrying it passes: the nonce is the check. The
    # program finds it in none of argv, the environment, its globals or stdin.
    nonce = "f00d" * 8
    monkeypatch.setattr(execution.secrets, "token_hex", lambda n: nonce)
    forged = _FORGED[:-1] + f', "nonce": "{nonce}"}}'.encode()
    assert execute_code(f"import posix\nposix.write(3, {forged!r})\nposix._exit(0)").success
    program = (
        "import os, sys\n"
        f"n = {nonce!r}\n"
        "others = {k: v for k, v in globals().items() if k != 'n'}\n"
        "seen = [n in ' '.join(sys.argv), n in repr(dict(os.environ)), n in repr(others)]\n"
        "seen.append(n.encode() in os.read(0, 1 << 20))\n"  # fd 0 is /dev/null now
        "print(seen)"
    )
    result = execute_code(program)
    assert result.success and result.stdout == "[False, False, False, False]\n", result


def test_os_exit_is_disabled_and_the_interpreter_is_isolated(tmp_path, monkeypatch):
    result = execute_code("import os\nos._exit(0)")
    assert not result.success and result.error.startswith("TypeError")
    # -I: PYTHONPATH (and the other PYTHON* variables) do not reach the child's imports.
    (tmp_path / "planted_module.py").write_text("print('planted')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    result = execute_code("import planted_module")
    assert not result.success and result.error.startswith("ModuleNotFoundError"), result
