"""Child processes that never outlive their owner: start, log tail, stop the whole tree.

Every child starts in its own session (so a stop reaches its whole process group) and, when
started from the main thread, with Linux's parent-death signal set, so it gets SIGTERM if
its owner dies without stopping it (a killed Ray actor, a driver killed with SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

_PR_SET_PDEATHSIG = 1


def command_flags(options: Mapping[str, Any]) -> list[str]:
    """`{"--tp-size": 2, "--enable-metrics": True, "--urls": [a, b], "--x": None}` ->
    `["--tp-size", "2", "--enable-metrics", "--urls", "a", "b"]` (False and None dropped)."""
    flags: list[str] = []
    for flag, value in options.items():
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, list | tuple):
            flags += [flag, *(str(item) for item in value)]
        else:
            flags += [flag, str(value)]
    return flags


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def die_with_parent() -> None:
    """In a child process: Linux sends it SIGTERM when the thread that started it ends."""
    with contextlib.suppress(OSError):  # not Linux: the owner's explicit stop is the guard
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _prepare_child(cpu_cores: Sequence[int] | None, with_parent: bool) -> None:
    if with_parent:
        die_with_parent()
    if cpu_cores:
        os.sched_setaffinity(0, cpu_cores)


@dataclass(slots=True)
class ManagedProcess:
    """One child process with its log file; `stop()` is idempotent."""

    command: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cpu_cores: list[int] | None = None
    process: subprocess.Popen | None = None

    def start(self) -> int:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cores = self.cpu_cores
        # Linux sends the parent-death signal when the *thread* that started the child ends,
        # so it is only set from the main thread (Ray actors start theirs there); children
        # started from other threads rely on stop() and the owner's atexit handler.
        on_main_thread = threading.current_thread() is threading.main_thread()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env}, start_new_session=True,
                preexec_fn=lambda: _prepare_child(cores, on_main_thread),
            )
        return self.process.pid

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - chars))
                return log.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def start_and_wait(self, ready: Callable[[], bool], timeout: float) -> str | None:
        self.start()
        return self.wait_ready(ready, timeout)

    def wait_ready(self, ready: Callable[[], bool], timeout: float) -> str | None:
        """Waits until `ready()`; returns None, or why it failed (with the log tail) after
        stopping it: it exited during start-up, or was not ready in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                return self._failure(f"exited with code {code} during start-up")
            if ready():
                return None
            time.sleep(0.25)
        return self._failure(f"was not ready within {timeout:.0f}s")

    def _failure(self, what: str) -> str:
        tail = self.log_tail()
        self.stop()
        return f"{what}; log {self.log_path}, last lines:\n{tail}"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to the process group, SIGKILL to whatever is left after `timeout`."""
        if self.process is None:
            return
        tree = _tree(self.process.pid)
        _signal_group(self.process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=timeout)
        _signal_group(self.process.pid, signal.SIGKILL)
        for proc in tree:  # children that left the process group
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        self.process.wait()


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)  # the child leads its own session, so pgid == pid


# The exit status of a child process that was told to start one of its own while importing
# the parent's script (see `exit_if_importing_main`): the parent explains it.
UNGUARDED_MAIN_EXIT = 79


def exit_if_importing_main() -> None:
    """A "spawn" child imports the parent's script again before it runs its target. A script
    that starts an engine process at top level, with no `if __name__ == "__main__":` guard,
    starts one in the child too, and multiprocessing refuses that start with a traceback
    about "bootstrapping" that names neither rollserve nor the fix. Such a child exits here,
    with a status the parent turns into an error that does. `_inheriting` is what
    multiprocessing's own check reads (`spawn._check_not_importing_main`): true only while a
    child re-imports its parent's main module, so a process started later in a child is not
    affected."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise SystemExit(UNGUARDED_MAIN_EXIT)


def unguarded_main_message(what: str) -> str:
    """The error for a child that exited with UNGUARDED_MAIN_EXIT; `what` ("the
    EngineProcess") is what the script makes at top level."""
    script = getattr(sys.modules["__main__"], "__file__", None) or "your script"
    return (f"the engine process stopped at once: it imports {script} again (multiprocessing's "
            f"'spawn' start, which torch needs), and that made {what} again there. "
            f'Put the code that makes {what} under `if __name__ == "__main__":`, '
            "as multiprocessing requires of a script that starts processes")
