"""The HTTP server over a real engine process: native API, OpenAI API, admin endpoints, bad
input, disconnects and shutdown."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import time
from collections.abc import Callable

import pytest
import requests
from conftest import generate_in_background

NO_PROXY = {"http": None, "https": None}
GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


def post(server, path: str, body, headers: dict | None = None) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, proxies=NO_PROXY, timeout=60,
                         headers={"Content-Type": "application/json", **(headers or {})})


def get(server, path: str, **kwargs) -> requests.Response:
    return requests.get(server.url + path, proxies=NO_PROXY, timeout=60, **kwargs)


def test_generate_single_text_has_sglang_shape(llama_server) -> None:
    out = post(llama_server, "/generate", {"text": "The capital of France is",
                                            "sampling_params": GREEDY}).json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(out["output_ids"]) == 8
    assert {"id", "prompt_tokens", "cached_tokens", "e2e_latency", "weight_version"} <= set(meta)


def test_generate_batch_with_n_is_prompt_major(llama_server) -> None:
    outs = post(llama_server, "/generate", {
        "input_ids": [[5, 6, 7], [8, 9, 10, 11]],
        "sampling_params": {"temperature": 0.0, "max_new_tokens": 4, "n": 2}}).json()
    assert len(outs) == 4
    assert [o["meta_info"]["prompt_tokens"] for o in outs] == [3, 3, 4, 4]
    assert outs[0]["output_ids"] == outs[1]["output_ids"]  # greedy samples agree


def test_generate_logprobs_are_logprob_token_text_triples(llama_server) -> None:
    out = post(llama_server, "/generate", {
        "input_ids": [5, 6, 7, 8], "sampling_params": GREEDY, "return_logprob": True,
        "logprob_start_len": 0, "top_logprobs_num": 2, "return_text_in_logprobs": True}).json()
    meta = out["meta_info"]
    triples = meta["output_token_logprobs"]
    assert [t[1] for t in triples] == out["output_ids"]
    assert all(t[0] <= 0 and isinstance(t[2], str) for t in triples)
    assert meta["input_token_logprobs"][0][0] is None and len(meta["input_token_logprobs"]) == 4
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])


def test_generate_stream_is_cumulative_sse_ending_with_done(llama_server) -> None:
    response = requests.post(llama_server.url + "/generate", json={
        "text": "Hello", "sampling_params": {**GREEDY, "max_new_tokens": 12}, "stream": True},
        stream=True, proxies=NO_PROXY, timeout=60)
    lines = [line.decode() for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[5:]) for line in lines[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    full = post(llama_server, "/generate", {"text": "Hello",
                                            "sampling_params": {**GREEDY, "max_new_tokens": 12}})
    assert texts[-1] == full.json()["text"]


# Raw bodies get short ids: the test id is in PYTEST_CURRENT_TEST, and with 200 KB of it there
# a server process that the module's fixture started then could not exec (E2BIG).
@pytest.mark.parametrize(("body", "fragment"), [
    (b"{not json", "malformed JSON"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ({"text": "a", "input_ids": [1]}, "exactly one"),
    ({"sampling_params": {}}, "exactly one"),
    ({"text": ["a", 3]}, "text"),
    ({"text": "a", "sampling_params": {"max_new_token": 3}}, "max_new_token"),
    ({"text": "a", "temperature": 0.5}, "inside 'sampling_params'"),
    ({"text": "a", "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens"),
    ({"text": "a", "sampling_params": {"temperature": -1}}, "temperature"),
    ({"text": "a", "sampling_params": {"top_p": 0}}, "top_p"),
    ({"input_ids": [1, 99999999]}, "vocabulary"),
    ({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 100000}}, "context length"),
    ({"text": "a", "stream": "yes"}, "stream"),
    ({"text": "a", "lora_path": "/x"}, "lora_path"),
], ids=lambda value: "raw" if isinstance(value, bytes) else None)
def test_bad_generate_requests_are_400_naming_the_problem(llama_server, body, fragment) -> None:
    response = post(llama_server, "/generate", body)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]
    assert get(llama_server, "/health").status_code == 200


def test_oversized_body_is_413(llama_server) -> None:
    response = post(llama_server, "/generate", {"text": "x" * (33 * 2**20)})
    assert response.status_code == 413


@pytest.mark.parametrize(("body", "fragment"), [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream_options": "x"},
     "stream_options"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": "x"},
     "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"},
     "logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "rid": 7}, "rid"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
     "sampling_seed"),
    ({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, "content parts"),
])
def test_bad_chat_requests_are_400(llama_server, body, fragment) -> None:
    response = post(llama_server, "/v1/chat/completions", body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]["message"]


def test_chat_content_as_text_parts_equals_the_joined_string(llama_server) -> None:
    def chat(content) -> dict:
        return post(llama_server, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": content}],
            "max_tokens": 6, "temperature": 0}).json()

    parts = chat([{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo there"}])
    whole = chat("Hello there")
    assert parts["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    assert parts["choices"][0]["message"] == whole["choices"][0]["message"]


def test_chat_without_max_tokens_generates_up_to_the_context_length(llama_server) -> None:
    context = get(llama_server, "/model_info").json()["max_context_length"]
    reply = post(llama_server, "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
        "ignore_eos": True}).json()
    usage = reply["usage"]
    assert reply["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == context
    native = post(llama_server, "/generate", {
        "input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": None, "ignore_eos": True,
                                                    "temperature": 0}}).json()
    assert native["meta_info"]["completion_tokens"] == context - 3


def test_chat_rid_reaches_abort_request(llama_server) -> None:
    import threading

    result: dict = {}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "rid": "chat-rid-1",
            "max_tokens": 1500, "ignore_eos": True}
    worker = threading.Thread(target=lambda: result.update(
        post(llama_server, "/v1/chat/completions", body).json()))
    worker.start()
    deadline = time.monotonic() + 30
    while get(llama_server, "/get_load").json()["num_running_reqs"] == 0:
        assert time.monotonic() < deadline, "request never started running"
        time.sleep(0.01)
    assert post(llama_server, "/abort_request", {"rid": "chat-rid-1"}).json()["success"]
    worker.join(timeout=60)
    assert result["choices"][0]["finish_reason"] == "abort"
    assert result["usage"]["completion_tokens"] < 1500


def test_info_and_admin_endpoints(llama_server) -> None:
    for path in ("/model_info", "/get_model_info"):
        info = get(llama_server, path).json()
        assert info["is_generation"] is True and info["weight_version"] == "default"
        assert {"model_path", "tokenizer_path"} <= set(info)
    for path in ("/server_info", "/get_server_info"):
        info = get(llama_server, path).json()
        assert info["tp_size"] == 1 and info["dp_size"] == 1 and "version" in info
    assert get(llama_server, "/health_generate").status_code == 200
    load = get(llama_server, "/get_load").json()
    assert {"num_running_reqs", "num_waiting_reqs", "num_tokens"} <= set(load)
    ids = post(llama_server, "/tokenize", {"prompt": "hello world"}).json()["tokens"]
    assert post(llama_server, "/detokenize", {"tokens": ids}).json()["text"] == "hello world"
    assert get(llama_server, "/v1/models").json()["data"][0]["object"] == "model"
    metrics = get(llama_server, "/metrics").text
    for name in ("rollserve:num_running_reqs", "rollserve:num_queue_reqs",
                 "rollserve:token_usage", "rollserve:cache_hit_rate",
                 "rollserve:prompt_tokens_total", "rollserve:time_to_first_token_seconds_bucket",
                 "rollserve:inter_token_latency_seconds_count"):
        assert name in metrics


def test_flush_cache_succeeds_while_requests_run(llama_server) -> None:
    worker, result = generate_in_background(llama_server.url, {
        "input_ids": list(range(5, 60)),
        "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}})
    for method in (requests.get, requests.post):
        response = method(llama_server.url + "/flush_cache", proxies=NO_PROXY, timeout=30)
        assert response.status_code == 200 and response.json()["success"] is True
    assert get(llama_server, "/get_load").json()["num_running_reqs"] == 1
    worker.join(timeout=60)
    assert result["meta_info"]["finish_reason"]["type"] == "length"


def test_abort_request_by_rid_finishes_with_abort(llama_server) -> None:
    worker, result = generate_in_background(llama_server.url, {
        "input_ids": [5, 6, 7], "rid": "to-abort",
        "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}})
    assert post(llama_server, "/abort_request", {"rid": "to-abort"}).status_code == 200
    worker.join(timeout=60)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"


LONG = {"max_new_tokens": 2000, "ignore_eos": True}  # seconds of decoding on the tiny model


def generated_tokens(server) -> float:
    for line in get(server, "/metrics").text.splitlines():
        if line.startswith("rollserve:generation_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no generation token counter in /metrics")


def wait_until_idle(server) -> None:
    deadline = time.monotonic() + 30
    while get(server, "/get_load").json()["num_running_reqs"] != 0:
        assert time.monotonic() < deadline, "a request kept running"
        time.sleep(0.05)


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"input_ids": [5, 6, 7], "sampling_params": LONG}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": LONG["max_new_tokens"], "ignore_eos": True}),
])
def test_client_disconnect_aborts_its_streaming_request(llama_server, path, body) -> None:
    before = generated_tokens(llama_server)
    response = requests.post(llama_server.url + path, json={**body, "stream": True},
                             stream=True, proxies=NO_PROXY, timeout=60)
    next(response.iter_lines())
    response.close()
    wait_until_idle(llama_server)
    assert generated_tokens(llama_server) - before < LONG["max_new_tokens"]


def test_client_disconnect_aborts_its_non_streaming_request(llama_server) -> None:
    before = generated_tokens(llama_server)
    body = json.dumps({"input_ids": [5, 6, 7], "sampling_params": LONG}).encode()
    host, port = llama_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while generated_tokens(llama_server) == before:  # wait until it runs, then hang up
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
    wait_until_idle(llama_server)
    assert generated_tokens(llama_server) - before < LONG["max_new_tokens"]


def test_openai_client_chat_completions_streaming_and_models(llama_server) -> None:
    import openai

    client = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello"}], temperature=0,
        max_tokens=8, n=2, logprobs=True, top_logprobs=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.role == "assistant"
    assert chat.usage.completion_tokens == 16
    assert len(chat.choices[0].logprobs.content) == 8
    pieces, usage = [], None
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello"}], temperature=0,
            max_tokens=8, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == 8
    completion = client.completions.create(model=model, prompt="Once upon", max_tokens=6,
                                           temperature=0)
    assert completion.choices[0].finish_reason == "length"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="Once upon", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == completion.choices[0].text


def test_streamed_completion_logprobs_match_the_unstreamed_ones(llama_server) -> None:
    import openai

    client = openai.OpenAI(base_url=llama_server.url + "/v1", api_key="none")
    kwargs = {"model": "m", "prompt": "Once upon", "max_tokens": 6, "temperature": 0,
              "logprobs": 2}
    whole = client.completions.create(**kwargs).choices[0].logprobs
    tokens, logprobs, tops = [], [], []
    for chunk in client.completions.create(**kwargs, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            piece = chunk.choices[0].logprobs
            tokens += piece.tokens
            logprobs += piece.token_logprobs
            tops += piece.top_logprobs
    assert tokens == whole.tokens and len(tokens) == 6
    assert logprobs == pytest.approx(whole.token_logprobs)
    assert [sorted(t) for t in tops] == [sorted(t) for t in whole.top_logprobs]


def test_api_key_guards_everything_but_health(tiny_model_factory, start_server) -> None:
    server = start_server(tiny_model_factory("qwen2"), "--api-key", "sekret")
    assert get(server, "/health").status_code == 200
    assert get(server, "/model_info").status_code == 401
    assert post(server, "/generate", {"text": "a"}).status_code == 401
    ok = post(server, "/generate", {"text": "a", "sampling_params": GREEDY},
              headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200


def _last_event_after_interrupting(url: str, interrupt: Callable[[], object]) -> dict:
    """Starts a long streaming /generate, calls `interrupt()` once its first event arrived,
    and returns the stream's last event."""
    response = requests.post(url + "/generate", json={
        "input_ids": [5, 6, 7], "stream": True,
        "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}},
        stream=True, proxies=NO_PROXY, timeout=60)
    lines = response.iter_lines()
    next(lines)
    interrupt()
    events = [line.decode() for line in lines if line]
    return json.loads(next(e for e in reversed(events) if e != "data: [DONE]")[5:])


def test_sigterm_aborts_in_flight_requests_and_exits(tiny_model_factory, start_server) -> None:
    server = start_server(tiny_model_factory("qwen2"))
    final = _last_event_after_interrupting(
        server.url, lambda: server.process.send_signal(signal.SIGTERM))
    assert final["meta_info"]["finish_reason"]["type"] == "abort"
    # uvicorn re-raises the signal once its graceful shutdown is done
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)


def test_a_stop_of_the_whole_process_group_aborts_requests_and_stops_the_engine(
        tiny_model_factory, tmp_path) -> None:
    """Fleets (rollserve.utils.process) and service managers signal the server's whole process
    group, its engine process included: the server still aborts what runs, then stops the
    engine itself, and exits cleanly."""
    import os
    import sys

    import psutil

    from rollserve.utils.process import ManagedProcess, free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ManagedProcess([
        sys.executable, "-m", "rollserve.launch_server", "--port", str(port),
        "--model-path", str(tiny_model_factory("qwen2")), "--host", "127.0.0.1",
        "--device", "cpu", "--dtype", "float32", "--max-total-tokens", "8192",
        "--log-level", "warning"], tmp_path / "server.log")

    def healthy() -> bool:
        try:
            return requests.get(url + "/health", proxies=NO_PROXY, timeout=1).ok
        except requests.ConnectionError:
            return False

    try:
        assert server.start_and_wait(healthy, 120) is None
        engine = psutil.Process(server.pid).children()
        assert engine, "the engine runs in a child process"
        final = _last_event_after_interrupting(
            url, lambda: os.killpg(server.pid, signal.SIGTERM))
        assert final["meta_info"]["finish_reason"] == {
            "type": "abort", "message": "server shutting down"}
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)
        psutil.wait_procs(engine, timeout=30)
        assert not any(p.is_running() for p in engine)
    finally:
        server.stop()


def test_a_dead_engine_process_aborts_requests_and_stops_the_server_with_status_1(
        tiny_model_factory, start_server) -> None:
    import psutil

    server = start_server(tiny_model_factory("qwen2"))
    (engine,) = [p for p in psutil.Process(server.process.pid).children()
                 if "spawn_main" in " ".join(p.cmdline())]  # not the resource tracker
    final = _last_event_after_interrupting(server.url, engine.kill)
    reason = final["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "engine process exited" in reason["message"]
    assert final["output_ids"], "the tokens streamed before the crash are kept"
    assert server.process.wait(timeout=30) == 1


def test_server_args_reject_unknown_keys_and_flags(llama_path) -> None:
    import subprocess
    import sys

    from rollserve import ServerArgs

    with pytest.raises(TypeError, match="attention_backnd"):
        ServerArgs(model_path="m", attention_backnd="triton")
    with pytest.raises(ValueError, match="tp_size must be >= 1"):
        ServerArgs(model_path=str(llama_path), tp_size=0)
    run = subprocess.run([sys.executable, "-m", "rollserve.launch_server", "--model-path", "m",
                          "--bogus-flag", "1"], capture_output=True, text=True)
    assert run.returncode == 2 and "--bogus-flag" in run.stderr


def test_unexpected_handler_error_answers_json_500_and_the_app_keeps_serving() -> None:
    from fastapi import FastAPI
    from starlette.testclient import TestClient

    from rollserve.server.guard import GuardMiddleware

    app = FastAPI()
    app.add_middleware(GuardMiddleware, api_key=None, max_request_bytes=1024)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("kaput")

    @app.get("/ok")
    async def ok() -> dict:
        return {"ok": True}

    with TestClient(app) as client:
        response = client.get("/boom")
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "internal error: RuntimeError: kaput"
        assert client.get("/ok").json() == {"ok": True}


def test_sigint_aborts_a_non_streaming_request_and_exits(tiny_model_factory,
                                                         start_server) -> None:
    server = start_server(tiny_model_factory("qwen2"))
    worker, result = generate_in_background(server.url, {
        "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}})
    server.process.send_signal(signal.SIGINT)
    worker.join(timeout=60)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"
    assert server.process.wait(timeout=30) in (0, -signal.SIGINT)


def test_start_up_logs_model_dtype_device_kv_pool_and_one_ready_line(tiny_model_factory,
                                                                   start_server) -> None:
    server = start_server(tiny_model_factory("qwen2"), "--log-level", "info")
    log = server.log.read_text()
    loaded = next(line for line in log.splitlines() if "KV pool:" in line)
    assert "dtype=float32" in loaded and "device=cpu" in loaded and "8192 tokens" in loaded
    ready = [line for line in log.splitlines() if "server ready:" in line]
    assert len(ready) == 1 and server.url in ready[0]


def test_console_script_serves_under_the_served_model_name(tiny_model_factory,
                                                          start_server) -> None:
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "rollserve"
    assert script.exists(), "the rollserve console script is not installed next to python"
    server = start_server(tiny_model_factory("qwen2"), "--served-model-name", "policy-v1",
                          "--skip-server-warmup", launcher=(str(script), "serve"))
    assert get(server, "/v1/models").json()["data"][0]["id"] == "policy-v1"
    reply = post(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).json()
    assert reply["model"] == "policy-v1"
    assert get(server, "/metrics").status_code == 404  # no --enable-metrics


def test_sglang_sampling_extras_over_chat(llama_server) -> None:
    def chat(**extra) -> dict:
        response = post(llama_server, "/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            **extra})
        assert response.status_code == 200, response.text
        return response.json()

    greedy = chat(temperature=0, logprobs=True)
    first_id = greedy["choices"][0]["logprobs"]["content"][0]["token"]
    ids = post(llama_server, "/tokenize", {"prompt": first_id,
                                           "add_special_tokens": False}).json()["tokens"]
    stopped = chat(temperature=0, stop_token_ids=ids[:1])
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["matched_stop"] == ids[0]
    assert stopped["usage"]["completion_tokens"] == 1
    seeded = [chat(temperature=1.0, seed=7, top_k=50, min_p=0.01, repetition_penalty=1.1)
              for _ in range(2)]
    assert seeded[0]["choices"][0]["message"] == seeded[1]["choices"][0]["message"]
    ignored = chat(temperature=0, ignore_eos=True, max_tokens=12)
    assert ignored["usage"]["completion_tokens"] == 12
    assert post(llama_server, "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "Hello"}], "top_k": 0,
    }).status_code == 400


def test_abort_all_finishes_every_running_request(llama_server) -> None:
    worker, result = generate_in_background(llama_server.url, {
        "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 1800, "ignore_eos": True}})
    assert post(llama_server, "/abort_request", {"abort_all": True}).json()["success"]
    worker.join(timeout=60)
    assert result["meta_info"]["finish_reason"]["type"] == "abort"


def test_completions_n_and_logprobs_and_native_batch_stream_indices(llama_server) -> None:
    reply = post(llama_server, "/v1/completions", {
        "model": "m", "prompt": ["Once upon", "The sky"], "max_tokens": 3, "n": 2,
        "temperature": 0, "logprobs": 1}).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert all(len(c["logprobs"]["tokens"]) == 3 for c in reply["choices"])
    assert reply["usage"]["completion_tokens"] == 12
    response = requests.post(llama_server.url + "/generate", json={
        "input_ids": [[5, 6], [7, 8, 9]], "stream": True,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0}},
        stream=True, proxies=NO_PROXY, timeout=60)
    events = [json.loads(line[5:]) for line in response.iter_lines(decode_unicode=True)
              if line.startswith("data: {")]
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"]}
    assert sorted(finals) == [0, 1]
    assert all(len(e["output_ids"]) == 3 for e in finals.values())
