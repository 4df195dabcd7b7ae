"""The README's code blocks, as a newcomer copies them.

Every fenced block of README.md is either run by a test below (marked `@runs(snippet)`) or
listed in NOT_RUN with the reason; `snippet` is text that occurs in that block alone, and a
block that no entry names fails `test_every_readme_block_is_run_or_listed_as_not_run`.

How blocks run: python blocks as scripts, bash blocks with `bash -e`, in a temporary
directory, with this interpreter's bin directory first on PATH, each in its own process group,
which is stopped whole however the test ends (servers a block starts are in it, or die with
it, as rollserve's child processes do). The one substitution: the
README's port 30000 becomes a free port (the test's server listens there, on 127.0.0.1).
A comment `# -> TEXT` in a block is output the block must print (in order; `...` stands for
any text within a line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from rollserve.utils.process import free_port

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w+-]*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
SHOWN_OUTPUT = re.compile(r"# -> (.*)$", re.MULTILINE)
README_PORT = re.compile(r"\b30000\b")
SERVER_MARKER = "# then, in another shell:\n"
ARCHITECTURE = "src/rollserve/\n  models/"
NO_PROXY = {"http": None, "https": None}

# snippet -> why the block holding it is not run here.
NOT_RUN = {
    "python examples/grpo.py": "a 7-15 minute training run; tests/test_grpo_example.py runs "
                               "two steps of the same code on a tiny model",
    "pip install torch==2.13.0": "installs packages, then runs `rollserve demo` and the whole "
                                 "test suite: CI runs these commands itself",
    "--compare vllm --emulate-isa avx2": "benchmarks against vLLM's CPU build: minutes "
                                         "each and a venv made on first use; "
                                         "tests/test_emulated_isa.py runs bench.offline "
                                         "with --emulate-isa on a tiny model",
    "rollserve launch model_path=/ckpt": "variants of the `rollserve launch` block, with "
                                         "placeholders (/ckpt, /my/dir) or a 1000-request "
                                         "workload; tests/test_launch_cli.py runs overrides, "
                                         "demo=true and --config-path/--config-name on a tiny "
                                         "model",
}
RUNS: dict[str, str] = {}  # snippet -> the test that runs the block holding it


def runs(snippet: str) -> Callable[[Callable], Callable]:
    """Marks a test as the one that runs the README block containing `snippet`."""

    def mark(test: Callable) -> Callable:
        RUNS[snippet] = test.__name__
        return test

    return mark


@dataclasses.dataclass(frozen=True)
class Block:
    language: str  # "" for a plain fence
    code: str
    line: int  # of the opening fence in README.md

    def __str__(self) -> str:
        first = self.code.splitlines()[0] if self.code else ""
        return f"README.md:{self.line} ```{self.language} {first!r}"


def readme_blocks() -> list[Block]:
    text = README.read_text()
    return [Block(match[1], match[2], text.count("\n", 0, match.start()) + 1)
            for match in FENCE.finditer(text)]


def block_with(snippet: str) -> Block:
    """The one README block that contains `snippet`."""
    found = [block for block in readme_blocks() if snippet in block.code]
    assert len(found) == 1, f"{snippet!r} is in {len(found)} README blocks, not one"
    return found[0]


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


# ---- running blocks ------------------------------------------------------------------------


def block_env() -> dict[str, str]:
    """This environment, this interpreter's `python` and `rollserve` first on PATH, loopback
    never proxied, output unbuffered."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
            "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1"}


def with_port(code: str, port: int) -> str:
    return README_PORT.sub(str(port), code)


def block_command(language: str, script: Path) -> list[str]:
    commands = {"python": [sys.executable, str(script)], "bash": ["bash", "-e", str(script)]}
    assert language in commands, f"no way to run a {language!r} block"
    return commands[language]


def stop_group(process: subprocess.Popen, first: signal.Signals = signal.SIGINT,
               grace: float = 60.0) -> None:
    """Sends `first` to the process group (as Ctrl-C does), then SIGKILL to what is left."""
    with contextlib.suppress(ProcessLookupError):
        if process.poll() is None:
            os.killpg(process.pid, first)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_script(path: Path, *args: str, timeout: float, language: str = "python",
               cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs the script in its own session, its process group killed whole (Ray included)
    however it ends."""
    process = subprocess.Popen([*block_command(language, path), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               cwd=cwd or path.parent, env=block_env())
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        stop_group(process, signal.SIGKILL, grace=0)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_code(code: str, language: str, directory: Path, *args: str,
             timeout: float) -> subprocess.CompletedProcess:
    """Writes `code` to a script in `directory` and runs it; asserts it succeeds."""
    script = directory / ("block.py" if language == "python" else "block.sh")
    script.write_text(code)
    result = run_script(script, *args, timeout=timeout, language=language)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def assert_prints_what_it_shows(code: str, stdout: str) -> None:
    """Each `# -> TEXT` of `code` is printed, in order; `...` matches any text in a line."""
    position = 0
    for shown in SHOWN_OUTPUT.findall(code):
        pattern = re.compile(".*?".join(re.escape(part) for part in shown.split("...")))
        match = pattern.search(stdout, position)
        assert match, f"the README shows {shown!r}; the block printed:\n{stdout[-3000:]}"
        position = match.end()


@contextlib.contextmanager
def in_background(code: str, language: str, directory: Path) -> Iterator[
        tuple[subprocess.Popen, Path]]:
    """Runs `code` in its own process group with its output in a log file; stops the group
    (Ctrl-C, then SIGKILL) on the way out, whatever happened."""
    script = directory / ("serve.py" if language == "python" else "serve.sh")
    script.write_text(code)
    log = directory / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(block_command(language, script), stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   cwd=directory, env=block_env())
    try:
        yield process, log
    finally:
        stop_group(process)


def wait_for(ready: Callable[[], bool], process: subprocess.Popen, log: Path,
             timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"exited early:\n{log.read_text()[-5000:]}"
        assert time.monotonic() < deadline, f"not ready in {timeout}s:\n{log.read_text()[-5000:]}"
        time.sleep(0.5)


def answers_health(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=2, proxies=NO_PROXY).status_code == 200
    except requests.ConnectionError:
        return False


def group_members(pgid: int, timeout: float) -> list[str]:
    """The command lines of the processes left in process group `pgid` after up to
    `timeout` seconds of waiting for it to empty."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        left = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            with contextlib.suppress(ProcessLookupError, psutil.Error):
                if os.getpgid(process.info["pid"]) == pgid:
                    left.append(" ".join(process.info["cmdline"] or [])[:200])
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def listening(url: str) -> bool:
    try:
        requests.get(url + "/health", timeout=2, proxies=NO_PROXY)
        return True
    except requests.ConnectionError:
        return False


# ---- which blocks run ----------------------------------------------------------------------


def test_every_readme_block_is_run_or_listed_as_not_run() -> None:
    snippets = [*RUNS, *NOT_RUN]
    unnamed = [str(block) for block in readme_blocks()
               if sum(snippet in block.code for snippet in snippets) != 1]
    assert not unnamed, ("README blocks that no test runs and NOT_RUN does not list (or that "
                         "several entries name); run each here or list it with the reason:\n"
                         + "\n".join(unnamed))


def test_every_listed_snippet_names_one_readme_block() -> None:
    for snippet in [*RUNS, *NOT_RUN]:
        block_with(snippet)


def test_a_shown_output_the_block_does_not_print_fails_its_check() -> None:
    code = 'print("a b c")  # -> a ... c\nprint(2)  # -> 3\n'
    assert_prints_what_it_shows(code.replace("# -> 3", "# -> 2"), "a b c\n2\n")
    with pytest.raises(AssertionError, match="the README shows '3'"):
        assert_prints_what_it_shows(code, "a b c\n2\n")


def test_every_launch_server_flag_is_listed_in_the_http_server_section() -> None:
    from rollserve.server.args import ServerArgs

    section = readme_section("The HTTP server")
    flags = ["--" + field.name.replace("_", "-") for field in dataclasses.fields(ServerArgs)]
    assert [flag for flag in flags if f"`{flag}`" not in section] == []


# ---- the blocks ----------------------------------------------------------------------------


@runs(ARCHITECTURE)
def test_the_architecture_tree_names_only_files_that_exist() -> None:
    names = re.findall(r"^  ([\w.]+/?(?:, [\w.]+/?)*)", block_with(ARCHITECTURE).code,
                       re.MULTILINE)
    paths = [name for group in names for name in group.split(", ")]
    assert len(paths) > 10
    assert [p for p in paths if not (ROOT / "src" / "rollserve" / p).exists()] == []


@runs("with Engine() as engine:")
def test_the_in_process_engine_block_prints_what_it_shows(tmp_path) -> None:
    code = block_with("with Engine() as engine:").code
    assert "engine.stream(" in code
    result = run_code(code, "python", tmp_path, timeout=400)
    assert_prints_what_it_shows(code, result.stdout)


@runs('Engine("random-qwen2", tp_size=2)')
def test_the_tensor_parallel_block_runs_two_ranks(tmp_path) -> None:
    code = block_with('Engine("random-qwen2", tp_size=2)').code
    result = run_code(code, "python", tmp_path, timeout=400)
    assert result.stdout.strip()  # the generated text


@runs("load_config(sys.argv[1:])")
def test_the_fleet_driver_block_runs_as_a_script_with_launch_overrides(llama_path,
                                                                        tmp_path) -> None:
    result = run_code(block_with("load_config(sys.argv[1:])").code, "python", tmp_path,
                      f"model_path={llama_path}", "router_server_args.server.dtype=float32",
                      "+router_server_args.server.max_total_tokens=4096", timeout=400)
    assert re.search(r"^http://127\.0\.0\.1:\d+ \['http://127\.0\.0\.1:\d+', "
                     r"'http://127\.0\.0\.1:\d+'\] \[True, True\]$", result.stdout, re.MULTILINE)


@runs("prints their URLs; Ctrl-C stops")
def test_rollserve_launch_serves_until_ctrl_c_and_leaves_nothing_behind(tmp_path) -> None:
    code = block_with("prints their URLs; Ctrl-C stops").code
    with in_background(code, "bash", tmp_path) as (process, log):
        wait_for(lambda: "\nserving" in log.read_text(), process, log, timeout=400)
        urls = re.findall(r"http://127\.0\.0\.1:\d+", log.read_text())
        assert len(urls) == 3, log.read_text()  # two engines and the router
        assert all(answers_health(url) for url in urls)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C
        assert process.wait(timeout=120) == 0, log.read_text()[-5000:]
        assert group_members(process.pid, timeout=60) == []
    assert [url for url in urls if listening(url)] == []


@runs("RolloutService.from_pretrained(")
def test_the_rollout_service_block_generates_and_pushes_weights(tmp_path) -> None:
    code = block_with("RolloutService.from_pretrained(").code
    result = run_code(code, "python", tmp_path, timeout=500)
    assert_prints_what_it_shows(code, result.stdout)


@pytest.fixture(scope="class")
def readme_server(tmp_path_factory) -> Iterator[int]:
    """The HTTP server block's server half (on a free port), serving until the class ends;
    yields the port."""
    serve, marker, _ = block_with(SERVER_MARKER).code.partition(SERVER_MARKER)
    assert marker, "the HTTP server block splits into server and client at the marker"
    port = free_port()
    with in_background(with_port(serve, port), "bash",
                       tmp_path_factory.mktemp("readme-server")) as (process, log):
        wait_for(lambda: answers_health(f"http://127.0.0.1:{port}"), process, log,
                 timeout=300)
        yield port


class TestTheBlocksThatTalkToTheServer:
    """One server, started as the README shows, for the blocks that talk to it."""

    @runs(SERVER_MARKER)
    def test_the_curl_examples_answer_as_shown(self, readme_server, tmp_path) -> None:
        code = block_with(SERVER_MARKER).code.partition(SERVER_MARKER)[2]
        result = run_code(with_port(code, readme_server), "bash", tmp_path, timeout=300)
        assert_prints_what_it_shows(code, result.stdout)

    @runs("openai.OpenAI(")
    def test_the_openai_client_block_answers_as_shown(self, readme_server, tmp_path) -> None:
        code = block_with("openai.OpenAI(").code
        result = run_code(with_port(code, readme_server), "python", tmp_path, timeout=300)
        assert_prints_what_it_shows(code, result.stdout)

    @runs("client = InferenceHTTPClient(")
    def test_the_client_block_answers_as_shown(self, readme_server, tmp_path) -> None:
        code = block_with("client = InferenceHTTPClient(").code
        result = run_code(with_port(code, readme_server), "python", tmp_path, timeout=300)
        assert_prints_what_it_shows(code, result.stdout)

    @runs("WeightSync([")
    def test_the_weight_sync_block_pushes_the_trainers_weights(self, readme_server,
                                                                tmp_path) -> None:
        code = block_with("WeightSync([").code
        result = run_code(with_port(code, readme_server), "python", tmp_path, timeout=300)
        assert_prints_what_it_shows(code, result.stdout)
