"""`rollserve launch` / `rollserve demo`: the main job as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import requests

NO_PROXY = {"http": None, "https": None}


def launch_command(model_path, run_dir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rollserve.cli", "launch", f"model_path={model_path}",
            f"hydra.run.dir={run_dir}", "router_server_args.server.dtype=float32",
            "+router_server_args.server.max_total_tokens=4096", *overrides]


@pytest.fixture
def driver(llama_path, tmp_path):
    """start(*overrides) -> (process, printed lines up to 'serving'); killed at teardown."""
    started: list[subprocess.Popen] = []

    def start(*overrides: str, sigint_ignored: bool = False) -> tuple[subprocess.Popen,
                                                                       list[str]]:
        process = subprocess.Popen(launch_command(llama_path, tmp_path, *overrides),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                   preexec_fn=_ignore_sigint if sigint_ignored else None)
        started.append(process)
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving"):
                return process, lines
        raise AssertionError("launch ended early:\n" + "".join(lines[-60:]))

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_demo_from_a_user_yaml_prints_the_status_table_and_a_summary(llama_path,
                                                                     tmp_path) -> None:
    """A user's own YAML (here: the packaged one, edited) works like the packaged config."""
    from importlib.resources import files

    packaged = (files("rollserve.cluster") / "configs" / "launch.yaml").read_text()
    user_dir = tmp_path / "my_configs"
    user_dir.mkdir()
    (user_dir / "my_fleet.yaml").write_text(packaged.replace("demo: false", "demo: true"))
    result = subprocess.run(
        launch_command(llama_path, tmp_path, "demo_requests=24", "demo_max_new_tokens=4",
                       "--config-path", str(user_dir), "--config-name", "my_fleet"),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert re.search(r"RolloutServerGroup-0\s+http://127\.0\.0\.1:\d+\s+0\s+cpu cores \d+\s+yes",
                     out)
    assert "RolloutServerGroup-1" in out and "router: http://127.0.0.1:" in out
    assert f"logs: {tmp_path / 'logs'}\n" in out  # under hydra.run.dir
    summary = re.search(r"^\s+24\s+96\s+[\d.]+\s+[\d.]+\s+\d+%\s+\[(\d+), (\d+)\]$", out,
                        re.MULTILINE)
    assert summary, out
    assert int(summary[1]) + int(summary[2]) == 24


def _ignore_sigint() -> None:
    """What a shell does to a script's background job (`rollserve launch &`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# SIGINT is sent to a driver that inherited it ignored: Ctrl-C / kill -INT must stop it all
# the same (a driver that inherited the default is the README test's case).
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_stopping_the_driver_leaves_no_engine_or_router_behind(driver, how) -> None:
    process, lines = driver(sigint_ignored=how == signal.SIGINT)
    urls = re.findall(r"http://127\.0\.0\.1:\d+", "".join(lines))
    assert len(urls) == 3  # two engines and the router
    assert all(requests.get(u + "/health", proxies=NO_PROXY, timeout=5).ok for u in urls[:2])
    process.send_signal(how)
    process.wait(timeout=120)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(_listening(u) for u in urls):
        time.sleep(0.5)
    assert not [u for u in urls if _listening(u)]


def _listening(url: str) -> bool:
    try:
        requests.get(url + "/health", proxies=NO_PROXY, timeout=2)
        return True
    except requests.ConnectionError:
        return False
