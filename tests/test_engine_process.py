"""`EngineProcess` (the server's engine, in a child process) answers like the in-process
`Engine`, and never leaves a request or a caller waiting: not at shutdown, not when the
child dies, not when the model fails to load."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import torch

from rollserve import Engine
from rollserve.engine.args import EngineArgs
from rollserve.engine.engine_process import EngineProcess
from rollserve.engine.messages import RemoteTraceback

OPTIONS = {"device": "cpu", "dtype": "float32", "max_total_tokens": 4096}
GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def engine_process(llama_path):
    with EngineProcess(EngineArgs(model_path=str(llama_path), **OPTIONS)) as engine:
        yield engine


def _child_pids() -> set[int]:
    """Engine processes (multiprocessing's spawned children), not its resource tracker."""
    return {p.pid for p in psutil.Process().children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())}


def test_outputs_and_streams_equal_the_in_process_engine(engine_process, llama_path) -> None:
    with Engine(str(llama_path), **OPTIONS) as engine:
        expected = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY,
                                   return_logprob=True)
    got = engine_process.generate(input_ids=PROMPTS, sampling_params=GREEDY,
                                  return_logprob=True)
    assert [o["output_ids"] for o in got] == [o["output_ids"] for o in expected]
    assert [o["meta_info"]["output_token_logprobs"] for o in got] == [
        o["meta_info"]["output_token_logprobs"] for o in expected]

    async def stream() -> list[int]:
        produced = []
        async for _, output, _ in engine_process.async_stream(input_ids=PROMPTS[0],
                                                              sampling_params=GREEDY):
            produced.append(len(output["output_ids"]))
        return produced

    assert asyncio.run(stream()) == list(range(1, 13))
    assert [len(output["output_ids"]) for _, output, _ in engine_process.stream(
        input_ids=PROMPTS[0], sampling_params=GREEDY)] == list(range(1, 13))


def test_calls_return_values_and_raise_the_engines_errors(engine_process) -> None:
    stats = engine_process.stats()
    assert stats["kv_pool_size"] == 4096 and stats["num_running_reqs"] == 0
    assert engine_process.weight_version == "default"
    with pytest.raises(ValueError, match="not a parameter of this model") as raised:
        engine_process.get_weights_by_name("no.such.weight")
    _assert_caused_in_child(raised.value, "updater.py")
    assert engine_process.device.type == "cpu" and engine_process.context_len > 0


def _assert_caused_in_child(error: BaseException, source_file: str) -> None:
    """The child's traceback travels as the error's cause, down to the raising frame."""
    assert isinstance(error.__cause__, RemoteTraceback)
    frames = [line for line in str(error.__cause__).splitlines()
              if line.lstrip().startswith('File "')]
    assert source_file in frames[-1]


def test_tensor_updates_reach_the_engine_in_the_child(engine_process) -> None:
    name = "model.norm.weight"
    original = torch.tensor(engine_process.get_weights_by_name(name, truncate_size=10**6))
    message = engine_process.update_weights_from_tensor(
        [(name, torch.full_like(original, 0.5))], weight_version="v1")
    try:
        assert "weight_version=v1" in message and engine_process.weight_version == "v1"
        assert engine_process.get_weights_by_name(name, truncate_size=4) == [0.5] * 4
    finally:  # the module's other tests expect the checkpoint's weights
        engine_process.update_weights_from_tensor([(name, original)],
                                                  weight_version="default")


@pytest.mark.parametrize("where", ["in this process", "in a child process"])
def test_a_failing_output_callback_leaves_other_requests_running(where, request,
                                                                 llama_path) -> None:
    """A callback that raises (an asyncio client whose loop has closed) fails its own
    delivery only: the step, the reader thread and the other requests go on."""
    finals: dict[int, dict] = {}
    done = threading.Event()

    def broken(_index: int, _output: dict, _finished: bool) -> None:
        raise RuntimeError("Event loop is closed")

    def collect(index: int, output: dict, finished: bool) -> None:
        if finished:
            finals[index] = output
            done.set()

    if where == "in this process":
        engine = Engine(str(llama_path), **OPTIONS)
    else:
        engine = request.getfixturevalue("engine_process")
    try:
        _, failing = engine.prepare(None, GREEDY, PROMPTS[0])
        _, healthy = engine.prepare(None, GREEDY, PROMPTS[1])
        engine.submit(failing, broken, stream=True)
        engine.submit(healthy, collect, stream=True)
        assert done.wait(60)
    finally:
        if where == "in this process":
            engine.shutdown()
    assert finals[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 12}


def test_shutdown_finishes_requests_in_flight_with_an_abort(llama_path) -> None:
    finished = threading.Event()
    finals: list[dict] = []
    engine = EngineProcess(EngineArgs(model_path=str(llama_path), **OPTIONS))
    pid = engine._process.pid
    assert pid in _child_pids()

    def on_output(_index: int, output: dict, done: bool) -> None:
        if done:
            finals.append(output)
            finished.set()

    try:
        _, inputs = engine.prepare(None, {"max_new_tokens": 2000, "ignore_eos": True},
                                   PROMPTS[0])
        engine.submit(inputs, on_output, stream=True)
    finally:
        engine.shutdown()
    assert finished.wait(10)
    assert finals[0]["meta_info"]["finish_reason"] == {"type": "abort",
                                                       "message": "engine shut down"}
    assert pid not in _child_pids() and not engine.crashed


def test_a_dead_engine_process_fails_requests_and_calls_and_says_so(llama_path) -> None:
    exited = threading.Event()
    engine = EngineProcess(EngineArgs(model_path=str(llama_path), **OPTIONS),
                           on_exit=exited.set)
    updates: list[tuple[dict, bool]] = []
    first_token, finished = threading.Event(), threading.Event()

    def on_output(_index: int, output: dict, done: bool) -> None:
        updates.append((output, done))
        first_token.set()
        if done:
            finished.set()

    try:
        _, inputs = engine.prepare(None, {"max_new_tokens": 2000, "ignore_eos": True},
                                   PROMPTS[1], return_logprob=True)
        engine.submit(inputs, on_output, stream=True)
        assert first_token.wait(30)
        engine.pause_generation("in_place")  # it stays unfinished until the kill
        engine._process.kill()
        assert finished.wait(30) and exited.wait(30) and engine.crashed
        final = updates[-1][0]
        assert final["meta_info"]["finish_reason"]["type"] == "abort"
        assert "engine process exited" in final["meta_info"]["finish_reason"]["message"]
        assert final["output_ids"], "the tokens streamed before the crash are kept"
        with pytest.raises(RuntimeError, match="engine process exited"):
            engine.stats()
        with pytest.raises(RuntimeError, match="engine process exited"):
            engine.submit(inputs, on_output, stream=False)
    finally:
        engine.shutdown()


def test_a_model_that_fails_to_load_raises_its_error_here(llama_path, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(llama_path, broken)
    for weights in broken.glob("*.safetensors"):
        weights.unlink()
    before = _child_pids()
    with pytest.raises(FileNotFoundError, match="safetensors") as raised:
        EngineProcess(EngineArgs(model_path=str(broken), **OPTIONS))
    _assert_caused_in_child(raised.value, "loader.py")
    assert _child_pids() <= before


SCRIPT = """\
from rollserve.engine.args import EngineArgs
from rollserve.engine.engine_process import EngineProcess

def main():
    with EngineProcess(EngineArgs(model_path={model!r}, **{options!r})) as engine:
        print(engine.generate(input_ids=[5, 6], sampling_params={{"max_new_tokens": 2}})[
            "meta_info"]["completion_tokens"], "tokens")
"""


@pytest.mark.parametrize("guarded", [False, True])
def test_a_script_without_a_main_guard_gets_an_error_naming_the_guard(
        llama_path, tmp_path, guarded: bool) -> None:
    script = tmp_path / "script.py"
    body = SCRIPT.format(model=str(llama_path), options=OPTIONS)
    script.write_text(body + ('if __name__ == "__main__":\n    main()\n' if guarded
                              else "main()\n"))
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    finally:  # the engine process is in the script's session: nothing may outlive the test
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if guarded:
        assert process.returncode == 0 and stdout == "2 tokens\n", stderr[-3000:]
        return
    assert process.returncode == 1
    assert 'Put the code that makes the EngineProcess under `if __name__ == "__main__":`' in stderr
    assert f"imports {script} again" in stderr and "bootstrapping" not in stderr
