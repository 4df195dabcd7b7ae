"""Shared fixtures: tiny random-weight checkpoints built offline, once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import psutil
import pytest

from rollserve.utils.process import free_port

# Set before any test module imports torch (importing rollserve does not), and inherited by
# the servers tests start: the suite runs engines side by side on the same cores, where
# libgomp's default spin (~5 ms per idle worker after every kernel) makes them spin against
# each other; ~50 us does not (README, "Engine"; BENCHMARKS.md).
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory):
    """Returns build(preset, **options) -> checkpoint path, memoised per session/worker."""
    from rollserve.models.make_tiny import make_tiny_model

    built: dict[tuple, Path] = {}

    def build(preset: str = "llama", seed: int = 0, **options: object) -> Path:
        key = (preset, seed, tuple(sorted(options.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"model-{preset}")
            built[key] = make_tiny_model(path, preset, seed, **options)
        return built[key]

    return build


@pytest.fixture(scope="session")
def llama_path(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")




class ServerProcess:
    """A real server child process on 127.0.0.1 (`python -m rollserve.launch_server` unless
    another launcher is given)."""

    def __init__(self, model_path: Path, *extra: str, log_dir: Path,
                 launcher: tuple[str, ...] | None = None) -> None:
        """`launcher`: the command before the flags (default: python -m
        rollserve.launch_server)."""
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-{self.port}.log"
        command = [
            *(launcher or (sys.executable, "-m", "rollserve.launch_server")),
            "--model-path", str(model_path),
            "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
            "--dtype", "float32", "--max-total-tokens", "8192", "--log-level", "warning",
            *extra,
        ]
        env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env=env)

    def wait_ready(self, timeout: float = 120.0) -> None:
        import time

        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=1,
                                proxies={"http": None}).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        return stop_process(self.process)


def generate_in_background(url: str, body: dict):
    """POST {url}/generate on a thread; returns (thread, result dict filled when it ends)
    once the engine is running the request."""
    import threading
    import time

    import requests

    no_proxy = {"http": None, "https": None}
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(requests.post(
        url + "/generate", json=body, proxies=no_proxy, timeout=120).json()))
    worker.start()
    deadline = time.monotonic() + 30
    while requests.get(url + "/get_load", proxies=no_proxy,
                       timeout=10).json()["num_running_reqs"] == 0:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.01)
    return worker, result


def stop_process(process, timeout: float = 30.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; returns the exit code."""
    import subprocess

    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture
def start_server(tmp_path: Path):
    """start_server(model_path, *flags, launcher=None) -> ready ServerProcess, stopped at
    teardown."""
    started: list[ServerProcess] = []

    def start(model_path: Path, *extra: str,
              launcher: tuple[str, ...] | None = None) -> ServerProcess:
        server = ServerProcess(model_path, *extra, log_dir=tmp_path, launcher=launcher)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def llama_server(tiny_model_factory, tmp_path_factory):
    server = ServerProcess(tiny_model_factory("llama"), "--enable-metrics",
                           log_dir=tmp_path_factory.mktemp("server"))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def tp_ranks(server_pid: int) -> list[psutil.Process]:
    """The TP ranks under a server: spawned children of its spawned engine process."""
    def spawned(process: psutil.Process) -> bool:
        return "spawn_main" in " ".join(process.cmdline())

    return [p for p in psutil.Process(server_pid).children(recursive=True)
            if spawned(p) and spawned(p.parent())]
