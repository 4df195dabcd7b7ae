"""The README's examples, as a newcomer copies them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(after: str, language: str) -> str:
    """The first fenced `language` block after the README line containing `after`."""
    text = README.read_text()
    start = text.index(after)
    match = re.compile(rf"^```{language}\n(.*?)^```$", re.MULTILINE | re.DOTALL).search(
        text, start)
    assert match, f"no {language} block after {after!r}"
    return match[1]


def run_script(path: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Runs `python path args` in its own session, killed whole (Ray included) on timeout."""
    process = subprocess.Popen([sys.executable, str(path), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_the_fleet_driver_snippet_runs_as_a_script_with_launch_overrides(llama_path,
                                                                          tmp_path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(readme_block("Seed 004's driver runs", "python"))
    result = run_script(driver, f"model_path={llama_path}",
                        "router_server_args.server.dtype=float32",
                        "+router_server_args.server.max_total_tokens=4096", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"^http://127\.0\.0\.1:\d+ \['http://127\.0\.0\.1:\d+', "
                     r"'http://127\.0\.0\.1:\d+'\] \[True, True\]$", result.stdout, re.MULTILINE)
