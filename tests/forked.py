"""A script run in a real second process forked from the test process, whose torch, transformers,
ModelOpt and MLflow are already imported (a cold interpreter pays 10-15 s for them).

For tests of what a separate process shows from outside: its exit code, its stderr, a signal
sent to it, a resource limit set in it. The child starts from the environment and directory
given, with the logging, signal handlers and standard streams of a fresh interpreter, and runs
the script's file as `__main__`. What a cold interpreter proves (nothing heavy imported before
a refusal, a fresh restore, the console commands, `mlflow run`) keeps its own subprocess tests.

`fork_context` does the same for `multiprocessing` processes.

CUDA cannot follow a fork, so where a GPU is visible the same command runs as a cold subprocess.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import multiprocessing.context
import os
import runpy
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch


class Forked:
    """The part of `subprocess.Popen(cmd, stdout=DEVNULL, stderr=PIPE, text=True)` the tests use."""

    def __init__(self, pid: int, stderr_fd: int):
        self.pid = pid
        self.returncode: int | None = None
        # Text mode with universal newlines, as Popen(text=True): tqdm's "\r" ends a line.
        self.stderr = open(stderr_fd, encoding="utf-8", errors="replace")

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def popen_script(
    cmd: list[str], env: dict, cwd: Path, preexec_fn: Callable[[], None] | None = None
) -> Forked | subprocess.Popen:
    """Start `cmd` (`[python, script, *args]`) with stdout discarded and stderr piped as text."""
    if torch.cuda.is_available():
        return subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec_fn,
        )
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        os.close(read_end)
        _child(cmd[1:], env, cwd, preexec_fn, write_end)
    os.close(write_end)
    return Forked(pid, read_end)


def _child(argv: list[str], env: dict, cwd: Path, preexec_fn: Callable[[], None] | None, err: int) -> None:
    """Become a fresh run of the script `argv[0]`; exit with its exit code, never return."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(err, 2)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if preexec_fn is not None:
            preexec_fn()
        torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in a forked child
        sys.stdin = open(0, closefd=False)
        # Unbuffered, as PYTHONUNBUFFERED=1 (subprocess_env): each line reaches the pipe at once.
        sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0, closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), write_through=True)
        root = logging.getLogger()
        for handler in list(root.handlers):  # pytest's; the CLI configures logging as when cold
            root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        sys.argv = list(argv)
        code = _run_main(argv[0])
    finally:
        os._exit(code)


def _run_main(script: str) -> int:
    """Run the script as `__main__`, and the exit code the interpreter would give."""
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, exit 1
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class _OneThreadProcess(multiprocessing.context.ForkProcess):
    def run(self) -> None:
        torch.set_num_threads(1)  # the parent's OpenMP threads do not exist in a forked child
        super().run()


class _WarmForkContext(multiprocessing.context.ForkContext):
    Process = _OneThreadProcess


def fork_context() -> multiprocessing.context.BaseContext | None:
    """A `multiprocessing` context whose processes are forked from this process, for code that
    asks for "spawn" (`multiprocessing.get_context` patched to return it); None with a GPU."""
    return None if torch.cuda.is_available() else _WarmForkContext()
