"""The README's examples, as a newcomer copies them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_section(title: str) -> str:
    """The README text from the heading `## title` to the next `## ` heading."""
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


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


def test_every_launch_server_flag_is_listed_in_the_http_server_section() -> None:
    import dataclasses

    from rollserve.server.args import ServerArgs

    section = readme_section("The HTTP server")
    flags = ["--" + field.name.replace("_", "-") for field in dataclasses.fields(ServerArgs)]
    assert [flag for flag in flags if f"`{flag}`" not in section] == []


def test_the_in_process_engine_snippet_runs_including_its_stream_loop(tmp_path) -> None:
    code = readme_block("## The engine in-process", "python")
    assert "engine.stream(" in code
    script = tmp_path / "engine.py"
    script.write_text(code.replace('"/tmp/tiny-qwen2"', repr(str(tmp_path / "tiny-qwen2"))))
    result = run_script(script, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


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
